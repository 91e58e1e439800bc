"""Building a model tensor by tensor (model/build.py): quantizing while loading gives what quantizing the loaded
model gives, a model that cannot fit is refused before anything is allocated, and the counts stay true."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import model.build as build
from model import HybridLM
from model.checkpoint import CheckpointError, load_model, save_checkpoint
from model.int4 import INT4
from model.quantized import INT8, Int8Linear
from tests.helpers import save_hf_family, tiny_config, toy_tokenizer

ROOT = Path(__file__).resolve().parents[2]

TOKENS = torch.tensor([[5, 9, 2, 7, 7, 1]])


def _quantized_tensors(model) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{k}": v
        for name, m in model.named_modules()
        if getattr(m, "QUANTIZED", None)
        for k, v in m.named_buffers(recurse=False)
    }


@pytest.mark.parametrize("source, quantizer", [("ours", INT8), ("granitemoehybrid", INT8), ("ours", INT4)])
def test_quantizing_while_loading_equals_quantizing_the_loaded_model(tmp_path, source, quantizer):
    """A MoE checkpoint of ours and an HF Granite one (fused gate/up experts split while loading)."""
    if source == "ours":
        save_checkpoint(HybridLM(tiny_config(300, "mamba2-hybrid", d_model=64, d_ff=64)), tmp_path, toy_tokenizer())
    else:
        save_hf_family(source, tmp_path, 300)
    after, _ = load_model(tmp_path, dtype=torch.bfloat16)
    quantizer.quantize(after)
    during, _ = load_model(tmp_path, dtype=torch.bfloat16, quantizer=quantizer)
    want, got = _quantized_tensors(after), _quantized_tensors(during)
    assert set(got) == set(want) and len(got) > 10
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    with torch.no_grad():
        torch.testing.assert_close(during(TOKENS).logits, after(TOKENS).logits, atol=0, rtol=0)
    assert during.num_parameters() == load_model(tmp_path)[0].num_parameters()


def test_weights_that_cannot_fit_are_refused_naming_the_bytes(tmp_path, monkeypatch):
    save_checkpoint(HybridLM(tiny_config(300, "moe-mamba")), tmp_path, toy_tokenizer())
    fp32, bf16 = (build.weight_bytes(load_model(tmp_path, dtype=d)[0]) for d in (torch.float32, torch.bfloat16))
    monkeypatch.setattr(build, "available_bytes", lambda device: (fp32 + bf16) // 2)
    expected = rf"the weights need {build.size(fp32)} and {build.size((fp32 + bf16) // 2)} of cpu memory is available"
    with pytest.raises(CheckpointError, match=expected):
        load_model(tmp_path, dtype=torch.float32)
    load_model(tmp_path, dtype=torch.bfloat16)  # fewer bytes: fits


def test_needed_bytes_is_what_the_loaded_model_holds(tmp_path):
    save_checkpoint(HybridLM(tiny_config(300, "mamba2-hybrid")), tmp_path, toy_tokenizer())
    for dtype, quantizer in ((torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, INT8)):
        model, _ = load_model(tmp_path, dtype=dtype, quantizer=quantizer)
        with torch.device("meta"):
            meta = HybridLM(model.config).cast(dtype)
        biases = sum(m.bias.nbytes for m in model.modules() if isinstance(m, Int8Linear) and m.bias is not None)
        assert (
            build.needed_bytes(meta, build._targets(meta, quantizer), quantizer) == build.weight_bytes(model) + biases
        )


def test_int4_refuses_experts_it_cannot_group(tmp_path):
    save_checkpoint(HybridLM(tiny_config(300, "mamba2-hybrid", d_model=64, d_ff=40)), tmp_path, toy_tokenizer())
    with pytest.raises(ValueError, match="--quantize int4: experts with 40 inputs are not a whole number of groups"):
        load_model(tmp_path, quantizer=INT4)


def test_serving_reuses_freed_memory_that_loading_returns():
    """Loading maps large blocks and returns them when freed; serving keeps them, so an activation does not fault
    its pages in again (with transparent huge pages always on, a mapping faults 2 MiB at a time, still > 1). In a
    fresh process: the heap a long test session leaves behind is not a serving process's."""
    code = """
import resource, torch
import model.build as build

def faults_refilling_freed(nbytes=32 << 20):
    first = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    del first
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def settled():  # the last of three rounds: the first may grow the heap to where an aligned block fits again
    return [faults_refilling_freed() for _ in range(3)][-1]

print(build.map_large_allocations(), settled(), build.reuse_freed_memory(), settled())
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    mapped, faults_mapped, reused, faults_reused = run.stdout.split()
    if mapped != "True":
        pytest.skip("not glibc: its mallopt is absent")
    assert reused == "True" and int(faults_mapped) > 1 and int(faults_reused) <= 1
