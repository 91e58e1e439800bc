"""The shared benchmark weights: a random-weight HF MambaForCausalLM of mamba-130m size, saved once, and the
GGUF f32 that llama-cpp-python's own converter makes from it."""

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


def to_gguf(hf_dir: Path, cache: Path, outtype: str = "f32") -> Path:
    """The GGUF (outtype f32 or bf16) of an HF Mamba dir, made once by the converter llama.cpp ships."""
    out = hf_dir.with_suffix(f".{outtype}.gguf")
    if out.exists():
        return out
    script = converter_script(cache)
    # Without tokenizer files the converter uses its built-in GPT-NeoX vocab; hide ours from it.
    tmp = hf_dir.parent / (hf_dir.name + "-weights-only")
    tmp.mkdir(exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        if not (tmp / name).exists():
            (tmp / name).symlink_to((hf_dir / name).resolve())
    env_path = str(script.parent / "gguf-py")
    subprocess.run(
        [sys.executable, str(script), str(tmp), "--outfile", str(out), "--outtype", outtype],
        check=True,
        env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"},
        capture_output=True,
    )
    return out


def write_random_hf(config, directory: Path, dtype: torch.dtype = torch.bfloat16, shard_bytes: int = 1 << 30) -> int:
    """A random checkpoint of any transformers config at any size, written shard by shard (the model is laid out
    on the meta device, so the writer never holds more than one shard): norms 1, A_log / dt_bias / D and
    correction biases small, other weights N(0, 0.02). Returns the parameter count; writes config.json and
    model.safetensors(.index.json)."""
    import json

    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
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
