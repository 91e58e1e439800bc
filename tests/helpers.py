"""Small objects the tests build for themselves: a trained toy tokenizer and tiny checkpoints."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from model import HybridLM, LayerSpec, ModelConfig, ModelState
from model.checkpoint import save_checkpoint
from training.tokenizer import train_tokenizer

TOY_TEXT = [
    "Once upon a time there was a little cat named Tom. Tom liked to play with a red ball.",
    "One day, Lily went to the park with her mom. She saw a big dog and said hello.",
    "The sun was warm and the birds sang. Café, naïve, 日本語 and emoji 🙂 are text too.",
] * 20


@cache
def toy_tokenizer(vocab_size: int = 300):
    return train_tokenizer(TOY_TEXT, vocab_size)


LAYOUTS = {
    "mamba": dict(layers=[LayerSpec("mamba", None)] * 3),
    "moe-mamba": dict(layers=[LayerSpec("mamba", "moe")] * 2, d_ff=48, n_experts=4, top_k=1),
    "jamba": dict(
        layers=[LayerSpec("mamba", "mlp"), LayerSpec("mamba", "moe")],
        d_ff=40,
        n_experts=4,
        top_k=2,
        mixer_norms=True,
        residual_in_fp32=False,
        tie_embeddings=False,
        norm_eps=1e-6,
    ),
    # Mamba-1 + grouped-query attention with partial RoPE and biases + MoE: every kind of layer state.
    "hybrid": dict(
        layers=[LayerSpec("mamba", "mlp"), LayerSpec("attention", "moe"), LayerSpec("mamba", None)],
        d_ff=40,
        n_experts=4,
        top_k=2,
        n_heads=4,
        n_kv_heads=2,
        rope_theta=10000.0,
        partial_rotary_factor=0.5,
        attn_bias=True,
    ),
    # Mamba-2 (2 groups, chunks of 4: every prompt spans several) + attention + MoE with a shared expert and
    # Granite's multipliers: Bamba / Granite 4.0-H shapes.
    "mamba2-hybrid": dict(
        layers=[LayerSpec("mamba2", "moe"), LayerSpec("attention", "mlp"), LayerSpec("mamba2", None)],
        mamba2_head_dim=8,
        n_groups=2,
        chunk_size=4,
        time_step_limit_min=0.01,
        time_step_limit_max=0.5,
        d_ff=40,
        shared_d_ff=24,
        n_experts=4,
        top_k=2,
        renormalize=True,
        n_heads=4,
        n_kv_heads=2,
        rope_theta=10000.0,
        partial_rotary_factor=0.5,
        embedding_multiplier=2.0,
        residual_multiplier=0.5,
        logits_scaling=1.5,
    ),
    # Nemotron-H: each layer one sublayer; sigmoid-routed relu² MoE in 2 groups with a shared expert.
    "nemotron-h": dict(
        layers=[LayerSpec("mamba2", None), LayerSpec(None, "moe_sigmoid"), LayerSpec("attention", None)]
        + [LayerSpec(None, "mlp_relu2"), LayerSpec("mamba2", None)],
        mamba2_heads=6,
        mamba2_head_dim=6,
        n_groups=3,
        chunk_size=5,
        d_ff=40,
        moe_d_ff=24,
        shared_d_ff=16,
        n_experts=6,
        top_k=2,
        renormalize=True,
        n_expert_groups=3,
        topk_groups=2,
        routed_scaling_factor=2.5,
        n_heads=4,
        n_kv_heads=2,
        head_dim=6,
        residual_in_fp32=False,
        tie_embeddings=False,
    ),
}
# What the serving and training tests run by default: a plain Mamba layer and a Mamba + MoE layer.
SERVING = dict(layers=[LayerSpec("mamba", None), LayerSpec("mamba", "moe")], d_ff=48, n_experts=4, top_k=1)


def tiny_config(vocab_size: int = 97, layout: str | None = None, **kw) -> ModelConfig:
    """The tests' one tiny model: d_model 32, d_state 8, the layers of LAYOUTS[layout] (default SERVING)."""
    base = dict(vocab_size=vocab_size, d_model=32, d_state=8, **(LAYOUTS[layout] if layout else SERVING))
    return ModelConfig(**{**base, **kw})


def tiny(layout: str, **kw) -> HybridLM:
    """A tiny model of one of LAYOUTS (vocab 97) in eval mode."""
    return HybridLM(tiny_config(97, layout, **kw)).eval()


def assert_states_close(got: ModelState, want: ModelState, tol: float = 1e-5) -> None:
    """Every tensor of two states equal within tol; growing ones (K/V) over the positions both hold."""
    for (spec, a, layer), (_, b, _) in zip(got.items(), want.items()):
        if spec.seq_axis is not None:
            n = min(a.shape[1 + spec.seq_axis], b.shape[1 + spec.seq_axis])
            a, b = a.narrow(1 + spec.seq_axis, 0, n), b.narrow(1 + spec.seq_axis, 0, n)
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol, msg=f"layer {layer}")


def greedy(model: HybridLM, tok, prompt_ids: list[int], max_tokens: int) -> str:
    """The obvious loop: one sequence, prefill, then argmax decode until a stop token or max_tokens."""
    logits, state = model.prefill(torch.tensor([prompt_ids]), model.empty_state(1))
    out = []
    for _ in range(max_tokens):
        t = int(logits[0, : tok.vocab_size].argmax())
        if t in tok.stop_token_ids:
            break
        out.append(t)
        logits, state = model.decode(torch.tensor([t]), state)
    return tok.decode(out)


def make_tiny_checkpoint(directory: Path, **kw) -> Path:
    tok = toy_tokenizer()
    model = HybridLM(tiny_config(tok.vocab_size, **kw))
    return save_checkpoint(model, directory, tok)


def jamba_config(**kw):
    """A tiny HF JambaConfig: 4 layers, MoE (4 experts, top-2) on layers 1 and 3, attention placed past the last
    layer (attention-free) unless `kw` moves it. transformers is a test dependency."""
    import transformers

    base = dict(
        vocab_size=173,
        hidden_size=32,
        intermediate_size=56,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_experts=4,
        num_experts_per_tok=2,
        expert_layer_period=2,
        expert_layer_offset=1,
        attn_layer_period=5,
        attn_layer_offset=4,
        mamba_d_state=8,
        mamba_dt_rank=5,
        use_mamba_kernels=False,
    )
    return transformers.JambaConfig(**{**base, **kw})


def hybrid_jamba(directory: Path, **kw):
    """A random HF JambaForCausalLM with attention, written by save_pretrained: 6 layers, attention on 1 and 4,
    grouped-query (6 heads over 2 K/V heads of 6 dims), MoE on odd layers, odd sizes. Returns the HF model."""
    import transformers

    cfg = jamba_config(
        hidden_size=36,
        num_hidden_layers=6,
        num_attention_heads=6,
        num_key_value_heads=2,
        attn_layer_period=3,
        attn_layer_offset=1,
        mamba_dt_rank=3,
        **kw,
    )
    hf = transformers.JambaForCausalLM(cfg).eval()
    hf.save_pretrained(directory)
    return hf


# The Mamba-2 hybrid families at odd sizes (tests/model/test_hf_families.py, tests/integration).
MAMBA2 = dict(hidden_size=12, num_attention_heads=3, num_key_value_heads=1, tie_word_embeddings=False)
BAMBA_SSM = dict(mamba_expand=2, mamba_n_heads=6, mamba_d_head=4, mamba_d_state=7, mamba_n_groups=3)
BAMBA_SSM |= dict(mamba_chunk_size=5, time_step_limit=(0.02, 0.9))


def _mamba2(V: int):
    import transformers

    cfg = transformers.Mamba2Config(
        vocab_size=V, hidden_size=12, expand=2, num_heads=6, head_dim=4, state_size=7, n_groups=3, chunk_size=5,
        num_hidden_layers=3, time_step_limit=(0.0, 0.7), use_bias=True,
    )  # fmt: skip
    return transformers.Mamba2ForCausalLM(cfg)


def _bamba(V: int):
    import transformers

    cfg = transformers.BambaConfig(
        **MAMBA2, **BAMBA_SSM, vocab_size=V, num_hidden_layers=3, attn_layer_indices=[1], intermediate_size=22,
        attention_bias=True, rope_theta=500.0,
    )  # fmt: skip
    return transformers.BambaForCausalLM(cfg)


def _granite(V: int, n_experts: int = 5):
    import transformers

    cfg = transformers.GraniteMoeHybridConfig(
        **MAMBA2, **BAMBA_SSM, vocab_size=V, num_hidden_layers=3, layer_types=["mamba", "attention", "mamba"],
        intermediate_size=14, shared_intermediate_size=10, num_local_experts=n_experts, num_experts_per_tok=2,
        position_embedding_type="rope", embedding_multiplier=1.7, residual_multiplier=0.6,
        attention_multiplier=0.4, logits_scaling=2.5,
    )  # fmt: skip
    return transformers.GraniteMoeHybridForCausalLM(cfg)


def _nemotron_h(V: int):
    import transformers

    cfg = transformers.NemotronHConfig(
        **MAMBA2, vocab_size=V, mamba_num_heads=6, mamba_head_dim=4, ssm_state_size=7, n_groups=3, chunk_size=5,
        head_dim=5,
        layers_block_type=["mamba", "moe", "attention", "mlp", "mamba"], intermediate_size=22,
        moe_intermediate_size=9, moe_shared_expert_intermediate_size=8, n_routed_experts=6, num_experts_per_tok=2,
        n_group=3, topk_group=2, routed_scaling_factor=1.8, time_step_min=0.05,
    )  # fmt: skip
    return transformers.NemotronHForCausalLM(cfg)


FAMILIES = {
    "mamba2": _mamba2,
    "bamba": _bamba,
    "granitemoehybrid": _granite,
    "granite-dense": lambda V: _granite(V, n_experts=0),
    "nemotron_h": _nemotron_h,
}


@torch.no_grad()
def _randomize(model) -> None:
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name or name.endswith("norm_f.weight"):
            p.uniform_(0.5, 1.5)
        elif name.endswith(("A_log", "dt_bias")):
            p.uniform_(-1.0, 1.0)
        else:
            p.normal_(0.0, 0.3)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.normal_(0.0, 0.2)


def save_hf_family(family: str, directory: Path, vocab_size: int = 61, **save_kw):
    """A random HF checkpoint of one Mamba-2 family at odd sizes (Mamba-2 with H = 6 heads of P = 4 in G = 3 groups,
    N = 7, chunk 5; grouped-query attention 3 heads over 1 K/V head), every parameter random, written by
    save_pretrained and reloaded by transformers as a user would. Returns the HF model."""
    import transformers

    hf = FAMILIES[family](vocab_size)
    _randomize(hf)
    hf.eval().save_pretrained(directory, **save_kw)
    # Reloaded as a user would; eager attention and the per-expert loop (HF's grouped_mm needs 16-byte strides)
    return transformers.AutoModelForCausalLM.from_pretrained(
        directory, attn_implementation="eager", experts_implementation="eager"
    ).eval()


# ---------------------------------------------------------------- real chat templates (tests/data/chat_templates)

TEMPLATES = Path(__file__).with_name("data") / "chat_templates"
GRANITE_TOKENS = ["<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>", "<tools>", "</tools>"]
GRANITE_TOKENS += ["<documents>", "</documents>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
QWEN_TAGS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
JAMBA_TAGS = ["tool_definitions", "tool_calls", "documents", "citations"]
JAMBA_TOKENS = ["<|startoftext|>", "<|pad|>", "<|bom|>", "<|eom|>", "<|tool|>", *(f"<{t}>" for t in JAMBA_TAGS)]
JAMBA_TOKENS += [f"</{t}>" for t in JAMBA_TAGS]
# name -> (template file, HF family of the random checkpoint, special tokens, non-special added tokens,
# tokenizer_config's named tokens). Granite 4.0's real tokenizer adds <tool_call> and friends as plain (non-special)
# tokens; here they are special, the harder case (skipped when decoding, unreachable by text in a grammar).
CHAT_FAMILIES = {
    "granite-4.0": (
        "granite-4.0.jinja", "granitemoehybrid", GRANITE_TOKENS, [],
        {"bos_token": "<|end_of_text|>", "eos_token": "<|end_of_text|>"},
    ),
    "qwen3": (
        "qwen3.jinja", "mamba2", ["<|im_start|>", "<|im_end|>"], QWEN_TAGS,
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    ),
    "qwen2.5": (
        "qwen2.5-instruct.jinja", "bamba", ["<|im_start|>", "<|im_end|>"], ["<tool_call>", "</tool_call>"],
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    ),
    "jamba": (
        "jamba-mini-1.7.jinja", "jamba", JAMBA_TOKENS, [],
        {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>"},
    ),
    "nemotron-h": (
        "nemotron-nano-9b-v2.jinja", "nemotron_h", ["<SPECIAL_10>", "<SPECIAL_11>", "<SPECIAL_12>", "<s>"],
        ["<think>", "</think>", "<TOOLCALL>", "</TOOLCALL>"], {"bos_token": "<s>", "eos_token": "<SPECIAL_12>"},
    ),
    "bamba": (None, "bamba", [], [], {"eos_token": "<|endoftext|>"}),  # Bamba publishes no chat template
}  # fmt: skip


def chat_tokenizer(name: str):
    """The toy byte-level BPE vocabulary plus a family's special and added tokens, with its real chat template
    and named tokens in tokenizer_config.json (as transformers and we both read them)."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    from model.tokenizer import Tokenizer

    template, _, special, plain, named = CHAT_FAMILIES[name]
    tok = HFTokenizer.from_str(toy_tokenizer().tokenizer.to_str())
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, **named}
    if template is not None:
        config["chat_template"] = (TEMPLATES / template).read_text()
    return Tokenizer(tok, config)


def save_chat_checkpoint(name: str, directory: Path):
    """A random HF checkpoint of the family `name` belongs to, with its chat tokenizer; returns the HF model."""
    tok = chat_tokenizer(name)
    family = CHAT_FAMILIES[name][1]
    hf = (
        hybrid_jamba(directory, vocab_size=tok.vocab_size)
        if family == "jamba"
        else save_hf_family(family, directory, tok.vocab_size)
    )
    tok.save(directory)
    return hf


class HostReads(TorchFunctionMode):
    """Records each call that makes the host wait for the device, whatever the device (so a CPU test sees what a
    GPU would wait for): reading values (.item(), .tolist(), bool(), int(), float(), .numpy()), and ops whose
    output size depends on values (nonzero, unique, masked_select, bincount, indexing by a boolean mask,
    repeat_interleave by a tensor)."""

    READS = {Tensor.item, Tensor.tolist, Tensor.__bool__, Tensor.__int__, Tensor.__float__, Tensor.__index__}
    READS |= {Tensor.numpy, Tensor.nonzero, torch.nonzero, Tensor.unique, torch.unique, torch.argwhere}
    READS |= {Tensor.masked_select, torch.masked_select, Tensor.bincount, torch.bincount}

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.READS or _sized_by_values(func, args, kwargs):
            self.reads.append(getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)


def _sized_by_values(func, args, kwargs) -> bool:
    if func in (Tensor.__getitem__, Tensor.__setitem__, Tensor.index_put_, Tensor.index_put):
        index = args[1] if isinstance(args[1], tuple | list) else (args[1],)
        return any(isinstance(i, Tensor) and i.dtype == torch.bool for i in index)
    if func in (Tensor.repeat_interleave, torch.repeat_interleave):
        return isinstance(kwargs.get("repeats", args[1] if len(args) > 1 else None), Tensor)
    return func is torch.where and len(args) + len(kwargs) == 1
