"""The model on a CUDA device equals the same model on the CPU: every layout, prefill and decode in place, fp32
and bf16, eager and compiled. Skipped, saying so, on machines without a GPU (bench/gpu_check.sh runs it where
there is one)."""

import pytest
import torch

from tests.helpers import LAYOUTS, tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is present")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_equals_cpu(layout, dtype):
    cpu = tiny(layout).cast(dtype)
    gpu = tiny(layout).cast(dtype)
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.to("cuda")
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    tokens = torch.randint(0, 97, (3, 19))
    want, state = cpu.prefill(tokens[:, :11], cpu.empty_state(3), all_logits=True)
    got, pool = gpu.prefill(tokens[:, :11].cuda(), gpu.empty_state(3), all_logits=True)
    torch.testing.assert_close(got.cpu(), want, **tol)
    state, pool = state.with_capacity(24), pool.with_capacity(24)
    for t in range(11, 19):
        want, _ = cpu.decode(tokens[:, t], state, out=state)
        got, _ = gpu.decode(tokens[:, t].cuda(), pool, out=pool)
        torch.testing.assert_close(got.cpu(), want, **tol)


@pytest.mark.parametrize("layout", ["moe-mamba", "hybrid"])
def test_cuda_compiled_equals_eager(layout):
    eager = tiny(layout).to("cuda")
    compiled = tiny(layout).to("cuda")
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_inference()
    tokens = torch.randint(0, 97, (2, 21), device="cuda")
    want, state = eager.prefill(tokens, eager.empty_state(2), all_logits=True)
    got, pool = compiled.prefill(tokens, compiled.empty_state(2), all_logits=True)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    state, pool = state.with_capacity(32), pool.with_capacity(32)
    for _ in range(4):
        step = torch.randint(0, 97, (2,), device="cuda")
        want, _ = eager.decode(step, state, out=state)
        got, _ = compiled.decode(step, pool, out=pool)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
