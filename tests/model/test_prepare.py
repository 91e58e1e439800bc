"""The load-time speed-up chain (model/prepare.py) that the server and the benchmarks share: which form the
projections take for each setting, what it says it did, and where it cannot work, a fallback with a warning
(the server) or NotSupported (the benchmarks, `strict`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import model.prepare as prepare
from model import gemv, huge_pages
from model.packed import can_pack
from model.prepare import NotSupported, Speedups, prepare_for_inference
from tests.helpers import tiny

ROOT = Path(__file__).resolve().parents[2]

TOKENS = torch.tensor([[3, 14, 15, 92, 65, 35]])


def _model():
    torch.manual_seed(0)
    return tiny("moe-mamba")


def _logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.mark.parametrize(
    "speedups, linears",
    [
        (Speedups(compile=False), "few-row kernel" if gemv.compiler() else None),
        (Speedups(pack=True, compile=False), "oneDNN packed"),
        (Speedups(pack=False, compile=False), "F.linear"),
        (Speedups(quantize="int8", compile=False), "int8"),
    ],
)
def test_each_setting_serves_the_same_model(speedups, linears):
    if linears == "oneDNN packed" and not can_pack(_model()):
        pytest.skip("oneDNN does not pack fp32 here")  # mkldnn missing from this torch build
    model = _model()
    want = _logits(model)
    done = prepare_for_inference(model, speedups)
    assert done.linears == (linears or done.linears) and not done.compiled and not done.warnings
    atol = 0.05 if linears == "int8" else 1e-4
    torch.testing.assert_close(_logits(model), want, atol=atol, rtol=atol)
    if linears == "F.linear":
        assert done.notes[0] == "Linear layers left to F.linear (--no-pack-weights)"
    if speedups.huge_pages and huge_pages.available():
        assert done.huge_page_bytes > 0 and any("weights in transparent huge pages" in n for n in done.notes)


def test_no_huge_pages_moves_nothing():
    done = prepare_for_inference(_model(), Speedups(pack=False, huge_pages=False, compile=False))
    assert done.huge_page_bytes == 0 and all("huge pages" not in n for n in done.notes)


def test_without_a_compiler_the_server_warns_and_the_benchmark_refuses(monkeypatch):
    monkeypatch.setattr(prepare.shutil, "which", lambda name: None)
    done = prepare_for_inference(_model(), Speedups(pack=False, huge_pages=False))
    assert not done.compiled
    assert done.warnings == [
        "not compiling: no C++ compiler (g++ / c++) on PATH; serving the eager path (install g++, or pass --no-compile)"
    ]
    with pytest.raises(NotSupported, match="no C\\+\\+ compiler"):
        prepare_for_inference(_model(), Speedups(pack=False, huge_pages=False), strict=True)


def test_a_failed_compile_falls_back_to_eager(monkeypatch):
    model = _model()
    want = _logits(model)

    def fail():
        raise RuntimeError("inductor cannot build")

    monkeypatch.setattr(model, "compile_inference", fail)
    done = prepare_for_inference(model, Speedups(pack=False, huge_pages=False))
    assert not done.compiled and done.warnings[0].startswith("torch.compile failed (RuntimeError: inductor")
    torch.testing.assert_close(_logits(model), want)
    with pytest.raises(NotSupported, match="torch.compile \\(RuntimeError\\)"):
        prepare_for_inference(model, Speedups(pack=False, huge_pages=False), strict=True)


def test_packing_asked_for_where_it_cannot_run(monkeypatch):
    monkeypatch.setattr(prepare, "can_pack", lambda model: False)
    done = prepare_for_inference(_model(), Speedups(pack=True, huge_pages=False, compile=False))
    assert done.linears == "F.linear" and done.notes == []  # the server serves plain F.linear
    with pytest.raises(NotSupported, match="oneDNN weight packing"):
        prepare_for_inference(_model(), Speedups(pack=True, huge_pages=False, compile=False), strict=True)


def test_compiling_needs_the_python_headers_and_the_devices_compiler(monkeypatch, tmp_path):
    """Inductor's C++ kernels (CPU) and Triton's launcher (CUDA) both include Python.h; Triton builds with a C
    compiler, not a C++ one."""
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(prepare.sysconfig, "get_paths", lambda: {"include": str(tmp_path)})
    assert prepare.missing_compiler(torch.device("cpu")) == (
        f"no Python development headers ({tmp_path / 'Python.h'} is missing; e.g. apt-get install python3-dev)"
    )
    (tmp_path / "Python.h").touch()
    found = {"g++"}
    monkeypatch.setattr(prepare.shutil, "which", lambda name: name if name in found else None)
    assert prepare.missing_compiler(torch.device("cpu")) is None
    assert prepare.missing_compiler(torch.device("cuda")) == "no C compiler (gcc / clang) on PATH"
    found.add("gcc")
    assert prepare.missing_compiler(torch.device("cuda")) is None


@pytest.mark.parametrize("quantize", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_moe_decode_runs_in_one_kernel_call_as_its_reference(quantize, dtype):
    """--quantize hands each MoE layer's decode step to moe_decode.cpp (routed and shared experts in one
    format), and its steps equal the same weights through the grouped dispatch and the plain reference
    products (dequantize, multiply in fp32)."""
    import model.int4 as int4
    import model.quantized as int8

    assert gemv.load()
    torch.manual_seed(0)
    model = tiny("mamba2-hybrid", d_model=64, d_ff=64, shared_d_ff=128).cast(dtype)
    done = prepare_for_inference(model, Speedups(quantize=quantize, compile=False))
    layers = model.moe_layers().values()
    assert layers and all(m.kernel_step for m in layers) and "one kernel call" in done.notes[1]
    tokens = torch.tensor([[3, 9, 27, 81, 17, 51], [5, 7, 11, 13, 17, 19]])
    with torch.no_grad():
        _, state = model.prefill(tokens, model.empty_state(2).with_capacity(16))
        got, _ = model.decode(torch.tensor([5, 6]), state.clone())
        for m in layers:
            m.kernel_step = False
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(int8, "int8_linear", int8.int8_linear_reference)
            mp.setattr(int4, "int4_linear", int4.int4_linear_reference)
            want, _ = model.decode(torch.tensor([5, 6]), state.clone())
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(got, want, **tol)


def test_serving_on_a_cpu_flushes_denormals_on_every_thread():
    """FTZ / DAZ on the intra-op threads too, which torch.set_flush_denormal alone leaves as they were: a product
    split across two threads of a denormal input comes out all zeros. In a fresh process, whose threads exist
    before the settings are made (as a server's do), since they outlive the test; preparing a model alone
    changes nothing there."""
    code = """
import torch
from model.prepare import Speedups, configure_cpu_for_serving, prepare_for_inference
from tests.helpers import tiny
torch.set_num_threads(2)
x = torch.full((1 << 20,), 1e-39)
print((x * 0.5 == 0).all().item())
prepare_for_inference(tiny(None), Speedups(pack=False, huge_pages=False, compile=False))
print((x * 0.5 == 0).all().item())
torch.set_flush_denormal(True)
print((x * 0.5 == 0).all().item())
configure_cpu_for_serving()
print((x * 0.5 == 0).all().item())
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert run.stdout.split() == ["False", "False", "False", "True"]  # the caller's flag alone misses the other thread
