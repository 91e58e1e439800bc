"""The shared benchmark weights: random-weight HF checkpoints (mamba-130m size, or any config at any size), saved
once, and the GGUFs that llama-cpp-python's own converter and quantizer make from them."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import torch


def mamba_130m(directory: Path, tokenizer_dir: Path | None = None) -> Path:
    """hidden 768, 24 layers, vocab 50280, random weights (seed 0). A tokenizer.json is copied in for the
    HTTP benchmark (the server needs one; only the token ids matter for speed)."""
    if (directory / "model.safetensors").exists():
        return directory
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    cfg = MambaConfig(vocab_size=50280, hidden_size=768, num_hidden_layers=24, state_size=16, expand=2)
    MambaForCausalLM(cfg).save_pretrained(directory)
    if tokenizer_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_dir / name, directory / name)
    return directory


def converter_script(cache: Path) -> Path:
    """convert_hf_to_gguf.py from the llama-cpp-python sdist (pip download; no build)."""
    script = next(cache.glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"), None)
    if script is None:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "llama-cpp-python==0.3.36", "-d", str(cache)],
            check=True,
        )
        with tarfile.open(next(cache.glob("llama_cpp_python-*.tar.gz"))) as tar:
            tar.extractall(cache, filter="data")
        script = next(cache.glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    return script


# The converter run with two changes for weights without a tokenizer: NemotronHModel reads its vocabulary through
# AutoTokenizer, which needs tokenizer files, so it takes Mamba2Model's built-in GPT-NeoX vocabulary as Granite
# does; and the built-in vocabulary is found beside the script (sys.path[0]), as when the script runs directly.
_CONVERT = """
import runpy, sys
script = sys.argv.pop(1)
sys.argv[0], sys.path[0] = script, script.rsplit("/", 1)[0]
from conversion.mamba import Mamba2Model
from conversion.nemotron import NemotronHModel
def set_vocab(self):
    self.hparams["pad_vocab_size_multiple"] = 8
    Mamba2Model.set_vocab(self)
NemotronHModel.set_vocab = set_vocab
runpy.run_path(script, run_name="__main__")
"""
# llama.cpp's converter finds Granite's attention layers by the Hub checkpoints' layer_types names;
# transformers' save_pretrained writes the newer ones.
_LAYER_TYPES = {"full_attention": "attention", "linear_attention": "mamba"}


def to_gguf(hf_dir: Path, cache: Path, outtype: str = "f32") -> Path:
    """The GGUF (outtype f32, bf16 or q8_0) of an HF checkpoint dir, made once by the converter llama.cpp
    ships; its tokenizer files are hidden (the converter takes its built-in GPT-NeoX vocabulary)."""
    import json

    out = hf_dir.parent / f"{hf_dir.name}.{outtype}.gguf"
    if out.exists():
        return out
    script = converter_script(cache)
    tmp = hf_dir.parent / (hf_dir.name + "-weights-only")
    tmp.mkdir(exist_ok=True)
    cfg = json.loads((hf_dir / "config.json").read_text())
    weight_map = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        weight_map |= dict.fromkeys(_hub_layout(f, tmp / f.name, cfg["model_type"]), f.name)
    if (hf_dir / "model.safetensors.index.json").exists():
        index = json.dumps({"metadata": {}, "weight_map": weight_map})
        (tmp / "model.safetensors.index.json").write_text(index)
    if isinstance(cfg.get("layer_types"), list):
        cfg["layer_types"] = [_LAYER_TYPES.get(t, t) for t in cfg["layer_types"]]
    (tmp / "config.json").unlink(missing_ok=True)  # never write through a link into the checkpoint's own
    (tmp / "config.json").write_text(json.dumps(cfg))
    run = subprocess.run(
        [sys.executable, "-c", _CONVERT, str(script), str(tmp), "--outfile", str(out), "--outtype", outtype],
        env={"PYTHONPATH": str(script.parent / "gguf-py"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    if run.returncode != 0:
        out.unlink(missing_ok=True)
        raise RuntimeError(f"convert_hf_to_gguf.py {hf_dir.name} {outtype}: {run.stderr[-2000:]}")
    return out


def _hub_name(name: str, model_type: str) -> str:
    """A tensor's name as the Hub checkpoints (and so llama.cpp's converter) spell it; transformers 5 saves Granite's
    expert stacks and Nemotron-H's prefix under its own names."""
    name = name.replace("block_sparse_moe.experts.gate_up_proj", "block_sparse_moe.input_linear.weight")
    name = name.replace("block_sparse_moe.experts.down_proj", "block_sparse_moe.output_linear.weight")
    if model_type == "nemotron_h" and name.startswith("model."):
        return "backbone." + name.removeprefix("model.")
    return name


def _hub_layout(source: Path, out: Path, model_type: str) -> list[str]:
    """One safetensors shard in the Hub layout, made once: names as _hub_name, and Nemotron-H's stacked experts
    (E, ...) one tensor per expert (mixer.experts.{e}.up_proj.weight); a shard that needs no change is linked.
    Returns the names it holds."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if out.exists():
        with safe_open(str(out), "pt") as f:
            return list(f.keys())
    with safe_open(str(source), "pt") as f:
        names = list(f.keys())
        if all(_hub_name(k, model_type) == k for k in names):
            out.symlink_to(source.resolve())
            return names
        tensors = {}
        for k in names:
            name, t = _hub_name(k, model_type), f.get_tensor(k)
            if model_type == "nemotron_h" and name.endswith(("mixer.experts.up_proj", "mixer.experts.down_proj")):
                stem, proj = name.rsplit(".", 1)
                tensors |= {f"{stem}.{e}.{proj}.weight": t[e].clone() for e in range(t.shape[0])}
            else:
                tensors[name] = t
    save_file(tensors, str(out), metadata={"format": "pt"})
    return list(tensors)


def quantize_gguf(source: Path, ftype: str) -> Path:
    """llama.cpp's own quantizer (llama_model_quantize, as the llama-quantize tool calls it) on a bf16 / f32
    GGUF: ftype a LLAMA_FTYPE_MOSTLY_* suffix such as "Q4_K_M". Made once, beside the source."""
    import llama_cpp as L

    out = source.with_name(source.name.rsplit(".", 2)[0] + f".{ftype.lower()}.gguf")  # {name}.bf16.gguf
    if not out.exists():
        params = L.llama_model_quantize_default_params()
        params.ftype = getattr(L, f"LLAMA_FTYPE_MOSTLY_{ftype}")
        params.nthread = 2
        if L.llama_model_quantize(str(source).encode(), str(out).encode(), params) != 0:
            out.unlink(missing_ok=True)
            raise RuntimeError(f"llama_model_quantize {source.name} -> {ftype} failed")
    return out


def write_random_hf(config, directory: Path, dtype: torch.dtype = torch.bfloat16, shard_bytes: int = 1 << 30) -> int:
    """A random checkpoint of any transformers config at any size, written shard by shard (the model is laid out
    on the meta device, so the writer never holds more than one shard): norms 1, A_log / dt_bias / D and
    correction biases small, other weights N(0, 0.02). Returns the parameter count; writes config.json and
    model.safetensors(.index.json)."""
    import json

    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tied = getattr(model, "all_tied_weights_keys", None) or {}  # a tied head is not written, as save_pretrained does
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}
    config.architectures = [type(model).__name__]  # as save_pretrained writes it (llama.cpp's converter reads it)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    gen = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, shape in shapes.items():
        if size > shard_bytes:
            _save_shard(shards, directory)
            shards.append({})
            size = 0
        t = torch.empty(shape, dtype=torch.float32)
        if "norm" in name and name.endswith("weight"):
            t.fill_(1.0)
        elif name.endswith(("A_log", "dt_bias", "D", "correction_bias")):
            t.uniform_(-0.5, 0.5, generator=gen)
        else:
            t.normal_(0.0, 0.02, generator=gen)
        shards[-1][name] = t.to(dtype)
        size += shards[-1][name].nbytes
    _save_shard(shards, directory)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for i, name in enumerate(names):
        (directory / f"shard-{i}.safetensors").rename(directory / name)
    weight_map = {k: names[i] for i, shard in enumerate(shards) for k in shard}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum(math.prod(s) for s in shapes.values())


def _save_shard(shards: list[dict], directory: Path) -> None:
    from safetensors.torch import save_file

    i = len(shards) - 1
    save_file(shards[i], str(directory / f"shard-{i}.safetensors"), metadata={"format": "pt"})
    shards[i] = dict.fromkeys(shards[i])  # the names stay for the index, the tensors go
