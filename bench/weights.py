"""The shared benchmark weights: a random-weight HF MambaForCausalLM of mamba-130m size, saved once, and the
GGUF f32 that llama-cpp-python's own converter makes from it."""

from __future__ import annotations

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
