"""bench/hybrid_families.py: the bytes a batch-1 token reads (for the roofline share), and the goals marked from a
run's results: met, not met, the quantized fallback when llama.cpp's quantized model crashed, failures shown."""

from bench.hybrid_families import ours_bytes_per_token
from bench.hybrid_goals import goal_lines, table_lines
from model.prepare import Speedups, prepare_for_inference
from tests.helpers import tiny


def test_bytes_per_token_counts_active_experts_and_the_head_once():
    model = tiny(None, n_experts=4, top_k=1, tie_embeddings=False)
    total, active = model.num_parameters()
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    embedding = model.embeddings.weight.numel()  # an untied head: the lookup reads one row
    assert ours_bytes_per_token(model) == 4 * (active - embedding) + buffers
    tied = tiny(None, n_experts=4, top_k=1, tie_embeddings=True)
    _, active = tied.num_parameters()
    assert ours_bytes_per_token(tied) == 4 * active + sum(b.numel() * b.element_size() for b in tied.buffers())


def test_int8_reads_about_a_quarter_of_fp32():
    model = tiny(None, n_experts=4, top_k=1)
    fp32 = ours_bytes_per_token(model)
    prepare_for_inference(model, Speedups(quantize="int8", compile=False))
    int8 = ours_bytes_per_token(model)
    assert fp32 / 4 < int8 < fp32 / 2  # int8 weights plus fp32 scales, norms and routers


def run(decode_b1: dict[str, float]) -> dict:
    """Results as the JSON holds them: batch 8 twice batch 1, prefill ten times, 1 GB a token."""
    row = lambda rate: {"decode": {"1": rate, "8": 2 * rate}, "prefill": {"512": 10 * rate}, "bytes_per_token": 1e9}  # noqa: E731
    return {system: row(rate) for system, rate in decode_b1.items()}


def test_goals_compare_like_formats_and_mark_met_or_not():
    results = run({"ours fp32": 25.0, "llama.cpp f32": 20.0, "ours bf16": 30.0, "llama.cpp bf16": 30.0})
    lines = "\n".join(goal_lines(results, bandwidth=30e9))
    assert "batch 1, ours fp32 / llama.cpp f32 >= 1.00x: 1.25x, met" in lines
    assert "batch 1, ours bf16 / llama.cpp bf16 >= 1.20x: 1.00x, not met" in lines
    assert "roofline share of ours fp32 >= 0.85: 0.83, not met" in lines  # 25 tok/s x 1 GB / 30 GB/s
    assert "roofline share of ours bf16 >= 0.75: 1.00, met" in lines
    assert "prefill 512, ours fp32 / transformers fp32 >= 2.00x: not measured" in lines


def test_quantized_goals_fall_back_to_bf16_when_llama_cpp_quantized_crashed():
    results = run({"ours int8": 50.0, "ours int4": 80.0, "llama.cpp bf16": 30.0, "llama.cpp Q4_K_M": 70.0})
    results |= run({"llama.cpp Q8_0 no-repack": 60.0})
    results["llama.cpp Q8_0"] = {"failed": "Crashed: bench.llamacpp... crashed"}
    lines = "\n".join(goal_lines(results, bandwidth=30e9))
    assert "ours int8 / llama.cpp Q8_0 no-repack >= 1.00x: 0.83x, not met" in lines
    assert "ours int8 / llama.cpp bf16 (llama.cpp Q8_0 did not run) >= 1.50x: 1.67x, met" in lines
    assert "ours int4 / llama.cpp Q4_K_M >= 1.00x: 1.14x, met" in lines
    assert "ours int4 / llama.cpp bf16" not in lines  # its Q4_K_M ran as it loads by default
    table = "\n".join(table_lines(results, bandwidth=30e9))
    assert "| llama.cpp Q8_0 | failed | failed |" in table and "- llama.cpp Q8_0: Crashed" in table
    assert "| ours int8 | 50.0 | 100.0 | 500 | 1.000 | 1.67 |" in table
