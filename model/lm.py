"""The hybrid Mamba / MoE language model.

Glossary: B batch, L length, D d_model, V vocab size, nL layers.

tokens -> embeddings -> nL x [h += mixer(norm(h)) if the layer has one; h += ffn(ffn_norm(h)) if it has one]
       -> norm_f -> lm_head -> logits.
Pre-norm residual blocks (HF MambaBlock / Jamba decoder layers). The mixer is Mamba-1, Mamba-2 or attention
(mixers.py); Nemotron-H's layers carry only one of the two sublayers. Granite's multipliers scale the
embeddings, each residual branch and the logits (all 1 elsewhere).
With `residual_in_fp32` the residual stream is kept in fp32 (mamba_ssm's default) while the mixers and FFNs
run in the weight dtype.

Interfaces:
    forward(tokens)               training / evaluation from a fresh state -> LMOutput (logits + aux losses)
    prefill(tokens, state)        a chunk of tokens per sequence, continuing from `state` -> (logits, state)
    decode(tokens, state, out)    one token per sequence -> (logits, state); O(1) in the sequence length for
                                  Mamba layers, O(length) reads for attention layers
`state` is a ModelState (state.py). prefill returns a new one and leaves the one passed in as it was; decode
writes into `out` (which may be `state` itself: the engine's pool decodes in place) or into a copy.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import LayerSpec, ModelConfig
from .layers import Relu2MLP, RMSNorm, SwiGLU
from .mixers import build_mixer
from .moe import MoE, RouterOutput, SigmoidMoE, load_balancing_loss, router_z_loss
from .scan import scan_chunk
from .state import ModelState

# Layers per compiled decode run: a longer run saves a call and a guard check per layer a step, but inductor's
# compile time grows with the graph, and a server compiles every shape of run before it turns healthy.
RUN_LAYERS = 4


@dataclass
class LMOutput:
    logits: Tensor  # (B, L, V) fp32
    aux_loss: Tensor  # mean load-balancing loss over MoE layers (0 without MoE)
    z_loss: Tensor  # mean router z-loss over MoE layers (0 without MoE)
    routers: list[RouterOutput] = field(default_factory=list)


def build_ffn(kind: str | None, cfg: ModelConfig) -> nn.Module | None:
    """The feed-forward of a LayerSpec.ffn kind (config.FFNS)."""
    D, E, k = cfg.d_model, cfg.n_experts, cfg.top_k
    if kind == "mlp":
        return SwiGLU(D, cfg.d_ff)
    if kind == "mlp_relu2":
        return Relu2MLP(D, cfg.d_ff)
    if kind == "moe":
        return MoE(D, cfg.expert_d_ff, E, k, cfg.renormalize, cfg.capacity_factor, cfg.shared_d_ff)
    if kind == "moe_sigmoid":
        return SigmoidMoE(
            D, cfg.expert_d_ff, E, k, cfg.renormalize, cfg.capacity_factor, cfg.shared_d_ff,
            cfg.n_expert_groups, cfg.topk_groups, cfg.routed_scaling_factor,
        )  # fmt: skip
    return None


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: LayerSpec) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps) if spec.mixer else None
        self.mixer = build_mixer(spec.mixer, cfg) if spec.mixer else None
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if spec.ffn else None
        self.ffn = build_ffn(spec.ffn, cfg)
        self.residual_multiplier = cfg.residual_multiplier

    def _feed_forward(self, h: Tensor) -> tuple[Tensor, RouterOutput | None]:
        if self.ffn is None:
            return h, None
        y = self.ffn(self.ffn_norm(h.to(self.ffn_norm.weight.dtype)))
        router = None
        if isinstance(self.ffn, MoE):
            y, router = y
        return h + y * self.residual_multiplier, router

    def forward(self, h: Tensor, state: dict[str, Tensor]):
        """h: (B, L, D) -> (B, L, D), the layer's new state, router or None."""
        if self.mixer is not None:
            y, state = self.mixer(self.norm(h.to(self.norm.weight.dtype)), state)
            h = h + y * self.residual_multiplier
        h, router = self._feed_forward(h)
        return h, state, router

    def step(self, h: Tensor, state: dict[str, Tensor], mixer_step=None) -> Tensor:
        """h: (B, D) -> (B, D), the layer's state updated in place.

        `mixer_step` is `mixer_residual_step` or its compiled twin (HybridLM.compile_inference)."""
        if self.mixer is not None:
            h = (mixer_step or mixer_residual_step)(self, h, state)
        if self.ffn is None:
            return h
        x = self.ffn_norm(h.to(self.ffn_norm.weight.dtype))
        return h + (self.ffn.step(x) if isinstance(self.ffn, MoE) else self.ffn(x)) * self.residual_multiplier


def mixer_residual_step(block: Block, h: Tensor, state: dict[str, Tensor]) -> Tensor:
    """h + mixer(norm(h)) for one token per sequence, the layer's state updated in place.

    A free function so that one torch.compile of it serves every Mamba layer (the block's parameters become
    graph inputs): compiled, the norm, conv, SSM update and gate fuse into three loops around the four
    projections, and the SSM state is written straight into the pool instead of being materialised, added and
    copied (~10 passes over B x Di x N fp32 per layer when eager). Run eagerly it is the reference the compiled
    one is tested against. Each state tensor is passed once: a graph that mutates two aliased inputs runs on the
    wrong arguments in torch 2.13."""
    return h + block.mixer.step(block.norm(h.to(block.norm.weight.dtype)), state) * block.residual_multiplier


def blocks_step(blocks: tuple[Block, ...], h: Tensor, states: tuple[dict[str, Tensor], ...]) -> Tensor:
    """`Block.step` through consecutive layers: compiled, a run of them is one graph: one guard check and one call
    a step instead of several per layer, and the norms, gates and residual adds between the projections fuse.
    Layers' states are separate tensors, so no two inputs alias."""
    for block, state in zip(blocks, states):
        h = block.step(h, state)
    return h


def compiles_whole(block: Block) -> bool:
    """Whether a layer's decode step can join a compiled run: a mixer whose step compiles (or none) and a
    feed-forward without data-dependent shapes (or none)."""
    mixer_ok = block.mixer is None or getattr(block.mixer, "COMPILE_STEP", False)
    ffn_ok = not isinstance(block.ffn, MoE) or block.ffn.static_step()
    return mixer_ok and ffn_ok and (block.mixer is not None or block.ffn is not None)


def layer_kind(block: Block) -> tuple[str, str]:
    return type(block.mixer).__name__, type(block.ffn).__name__


def own_code(fn: types.FunctionType) -> types.FunctionType:
    """`fn` with a code object of its own. Dynamo keeps compiled graphs and their guards on the code object and
    compiles at most 8 per code object (`recompile_limit`); past that it runs the function eagerly, with one
    warning. Compiling a copy per model keeps each model's graphs apart: several models in one process (the
    benchmark's variants, a test run) each stay compiled, and a step checks only its own model's guards."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class HybridLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, spec) for spec in cfg.layers)
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self._mixer_step = None  # the compiled mixer step, once compile_inference() ran
        self._runs = self._decode_runs(None)  # [(start, end, compiled blocks_step or None)]
        self._init_weights()
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embeddings.weight

    def cast(self, dtype: torch.dtype) -> HybridLM:
        """Cast the weights to `dtype`, keeping each mixer's and FFN's FP32_PARAMS (Mamba's A_log and D, the
        sigmoid router's bias) in fp32."""
        owners = [m for b in self.layers for m in (b.mixer, b.ffn) if m is not None]
        fp32 = [getattr(m, n) for m in owners for n in getattr(m, "FP32_PARAMS", ())]
        keep = [p.data.float().clone() for p in fp32]
        self.to(dtype)
        for p, data in zip(fp32, keep):
            p.data = data
        return self

    @torch.no_grad()
    def _init_weights(self) -> None:
        """mamba_ssm `_init_weights`: N(0, init_std) embeddings, zero linear biases (but dt_proj's), and
        residual-branch output projections scaled by 1/sqrt(residuals per layer * n_layers) (GPT-2 §2.3)."""
        cfg = self.config
        nn.init.normal_(self.embeddings.weight, std=cfg.init_std)
        nn.init.normal_(self.lm_head.weight, std=cfg.init_std)
        per_layer = 2 if any(s.ffn for s in cfg.layers) else 1
        scale = 1 / math.sqrt(per_layer * cfg.n_layers) if cfg.rescale_prenorm_residual else 1.0
        for block in self.layers:
            for name, mod in block.named_modules():
                if isinstance(mod, nn.Linear) and mod.bias is not None and not name.endswith("dt_proj"):
                    mod.bias.zero_()
            if block.mixer is not None:
                getattr(block.mixer, block.mixer.RESIDUAL_OUT).weight.mul_(scale)
            if isinstance(block.ffn, (SwiGLU, Relu2MLP)):
                block.ffn.down_proj.weight.mul_(scale)
            elif isinstance(block.ffn, MoE):
                block.ffn.down_proj.mul_(scale)
                nn.init.normal_(block.ffn.router.weight, std=cfg.init_std)
                if block.ffn.shared_mlp is not None:
                    block.ffn.shared_mlp.down_proj.weight.mul_(scale)

    # ---------------------------------------------------------------- state
    def state_specs(self) -> list:
        return [block.mixer.state_spec() if block.mixer is not None else {} for block in self.layers]

    def empty_state(self, batch: int, device: torch.device | str | None = None, capacity: int = 0) -> ModelState:
        """Zero state for `batch` fresh sequences; growing tensors (K/V) get room for `capacity` tokens."""
        device = device or self.embeddings.weight.device
        return ModelState.zeros(self.state_specs(), batch, device, self.embeddings.weight.dtype, capacity)

    def _embed(self, tokens: Tensor) -> Tensor:
        h = self.embeddings(tokens)  # (B, L, D) or (B, D)
        if self.config.embedding_multiplier != 1:
            h = h * self.config.embedding_multiplier
        return h.float() if self.config.residual_in_fp32 else h

    def _logits(self, h: Tensor) -> Tensor:
        # The fp32 residual is normalised as is and cast once for the head (HF MambaForCausalLM).
        logits = self.lm_head(self.norm_f(h).to(self.embeddings.weight.dtype)).float()  # (..., V)
        return logits / self.config.logits_scaling if self.config.logits_scaling != 1 else logits

    def _run(self, tokens: Tensor, state: ModelState):
        """tokens (B, L) -> final hidden (B, L, D), new state, routers of MoE layers."""
        h = self._embed(tokens)  # (B, L, D)
        layers, routers = [], []
        for block, layer_state in zip(self.layers, state.layers):
            if self.gradient_checkpointing and self.training:
                h, layer_state, router = checkpoint(block, h, layer_state, use_reentrant=False)
            else:
                h, layer_state, router = block(h, layer_state)
            layers.append(layer_state)
            if router is not None:
                routers.append(router)
        return h, ModelState(state.specs, layers), routers

    # ---------------------------------------------------------------- training
    def forward(self, tokens: Tensor) -> LMOutput:
        """tokens: (B, L) -> logits (B, L, V) and the MoE losses, from a fresh state."""
        h, _, routers = self._run(tokens, self.empty_state(tokens.shape[0], tokens.device))
        aux = [load_balancing_loss(r.logits, r.experts, self.config.n_experts) for r in routers]
        z = [router_z_loss(r.logits) for r in routers]
        mean = lambda xs: torch.stack(xs).mean() if xs else torch.zeros((), device=tokens.device)  # noqa: E731
        return LMOutput(logits=self._logits(h), aux_loss=mean(aux), z_loss=mean(z), routers=routers)

    def loss(self, tokens: Tensor, targets: Tensor) -> tuple[Tensor, LMOutput]:
        """Cross-entropy + aux_loss_coef * aux + z_loss_coef * z. Targets of -100 are ignored."""
        out = self(tokens)
        ce = F.cross_entropy(out.logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        total = ce + self.config.aux_loss_coef * out.aux_loss + self.config.z_loss_coef * out.z_loss
        return total, out

    # ---------------------------------------------------------------- inference
    @torch.inference_mode()
    def prefill(self, tokens: Tensor, state: ModelState, all_logits: bool = False) -> tuple[Tensor, ModelState]:
        """tokens (B, L) continuing `state` -> logits (B, V) of the last position, or (B, L, V), and the new state."""
        h, state, _ = self._run(tokens, state)
        return self._logits(h if all_logits else h[:, -1]), state

    @torch.inference_mode()
    def decode(self, tokens: Tensor, state: ModelState, out: ModelState | None = None) -> tuple[Tensor, ModelState]:
        """tokens (B,) one per sequence -> logits (B, V) and the new state.

        The new state is written into `out` when given (it may be `state` itself: the engine's pool decodes in
        place; growing tensors need room for one more token), else into a copy of `state` grown by one token.
        `state` is never modified unless it is `out`."""
        if out is None:
            grown = [t.shape[1 + s.seq_axis] for s, t, _ in state.items() if s.seq_axis is not None]
            out = state.with_capacity(max(grown, default=0) + 1)
        elif out is not state:
            out.copy_rows_(slice(None), state)
        h = self._embed(tokens)  # (B, D)
        for start, end, run_step in self._runs:
            if run_step is not None:  # a run of layers that is one compiled graph
                h = run_step(tuple(self.layers[start:end]), h, tuple(out.layers[start:end]))
                continue
            block = self.layers[start]
            h = block.step(
                h, out.layers[start], self._mixer_step if getattr(block.mixer, "COMPILE_STEP", False) else None
            )
        return self._logits(h), out

    def _decode_runs(self, compiled) -> list[tuple[int, int, object]]:
        """[start, end) layer ranges the decode step goes through, each with its compiled step or None: with
        `compiled` (a function that compiles a fresh copy of blocks_step), runs of up to RUN_LAYERS consecutive
        layers of one kind that `compiles_whole`; every other layer alone, uncompiled. Runs of the same kind
        and length share one compiled function (the layers' weights are graph inputs), so a deep model
        compiles a few short graphs rather than one as deep as itself; each shape of run has its own
        function, since dynamo compiles at most 8 graphs per function."""
        runs: list[list] = []
        for i, block in enumerate(self.layers):
            kind = layer_kind(block) if compiled is not None and compiles_whole(block) else None
            if kind and runs and runs[-1][2] == kind and runs[-1][1] - runs[-1][0] < RUN_LAYERS:
                runs[-1][1] = i + 1
            else:
                runs.append([i, i + 1, kind])
        steps: dict = {}
        for start, end, kind in runs:
            if kind and (kind, end - start) not in steps:
                steps[kind, end - start] = compiled()
        return [(start, end, steps.get((kind, end - start))) for start, end, kind in runs]

    def compile_inference(self) -> None:
        """torch.compile the two inference hot loops, and compile them now so the first requests do not wait:
        the decode step (runs of whole layers through `blocks_step`; `mixer_residual_step` for the mixer of any
        other layer, such as one whose MoE dispatch has data-dependent shapes) and prefill's scan chunk
        (scan.py); decode at batch 1 (specialised) and batch 2 (which makes the batch dimension dynamic). Raises
        if compilation fails (e.g. no C++ compiler), leaving the eager paths in place."""
        self._use_compiled(
            torch.compile(own_code(mixer_residual_step)),
            torch.compile(own_code(scan_chunk)),
            lambda: torch.compile(own_code(blocks_step)),
        )
        device = self.embeddings.weight.device
        try:  # warm up as the engine calls: decode in place into the pool, prefill chunk after chunk
            for batch in (1, 2):
                state = self.empty_state(batch, capacity=2)
                self.decode(torch.zeros(batch, dtype=torch.long, device=device), state, out=state)
            _, state = self.prefill(torch.zeros(1, 3, dtype=torch.long, device=device), self.empty_state(1))
            self.prefill(torch.zeros(1, 3, dtype=torch.long, device=device), state)
        except Exception:
            self._use_compiled(None, None, None)
            raise

    @property
    def compiled(self) -> bool:
        """Whether compile_inference() ran (and did not fail)."""
        return self._mixer_step is not None

    def _use_compiled(self, mixer_step, scan_chunk, blocks_step) -> None:
        """Decode through `mixer_step` and the runs `blocks_step()` makes, and prefill through `scan_chunk`
        (None: eager)."""
        self._mixer_step = mixer_step
        self._runs = self._decode_runs(blocks_step)
        for block in self.layers:
            if hasattr(block.mixer, "scan_chunk"):
                block.mixer.scan_chunk = scan_chunk

    # ---------------------------------------------------------------- introspection
    def moe_layers(self) -> dict[int, MoE]:
        return {i: b.ffn for i, b in enumerate(self.layers) if isinstance(b.ffn, MoE)}

    def num_parameters(self) -> tuple[int, int]:
        """(total, active per token): an MoE layer contributes top_k of its experts to the active count. Counted
        on the architecture (a copy on the meta device), so a quantized or packed model counts the same."""
        with torch.device("meta"):
            ref = HybridLM(self.config)
        total = sum(p.numel() for p in ref.parameters())
        inactive = 0
        for moe in ref.moe_layers().values():
            per_expert = sum(w[0].numel() for w in moe.expert_params())
            inactive += (moe.n_experts - moe.top_k) * per_expert
        return total, total - inactive
