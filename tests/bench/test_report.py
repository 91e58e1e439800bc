"""bench/report.py renders what a run measured: configurations this CPU cannot run are marked, stages that did
not run are left out, and a partial run round-trips through JSON."""

import json

from bench.report import SUMMARY_END, SUMMARY_START, load, ratio_table, to_json, update_summary, write


def partial_run() -> dict:
    stat = lambda x: {"median": x, "min": x, "max": x}  # noqa: E731
    return {
        "machine": "test CPU",
        "date": "2026-12-01 00:00",
        "command": "python bench/run.py --quick",
        "args": {"repeats": 1, "tokens": 8, "batches": [1, 8], "prefill": [512], "far": 2000},
        "unsupported": {"ours / bfloat16": "oneDNN weight packing in torch.bfloat16"},
        "failed": {"server": "RuntimeError: no port"},
        "roofline": {"fp32_flops": 1e11, "bf16_flops": 2e11, "read_samples": [2e10, 3e10]},
        "decode": {
            ("ours", "float32", 1): stat(50.0),
            ("ours", "float32", 8): stat(300.0),
            ("transformers", "bfloat16", 1): stat(20.0),
        },
    }


def test_partial_run_marks_unsupported_and_skips_missing_stages(tmp_path):
    write(partial_run(), tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert "| ours | bfloat16 | n/s | n/s |" in md
    assert "| ours | float32 | 50.0 (50.0-50.0) | 300.0 (300.0-300.0) |" in md
    assert "stage server failed: RuntimeError: no port" in md
    assert "memory read 30.0 GB/s" in md  # the higher of the two samples
    assert "Targets not checked" in md and "prefill tok/s" not in md
    assert (tmp_path / "decode.png").stat().st_size > 0


def test_json_round_trip(tmp_path):
    run = partial_run()
    (tmp_path / "results.json").write_text(to_json(run))
    back = load(tmp_path / "results.json")
    assert back["decode"] == run["decode"] and back["unsupported"] == run["unsupported"]
    assert json.loads(to_json(back)) == json.loads(to_json(run))


def full_run() -> dict:
    stat = lambda x: {"median": x, "min": x, "max": x}  # noqa: E731
    run = partial_run()
    run["unsupported"], run["failed"] = {}, {}
    run["args"]["batches"] = [1]
    run["decode"] = {
        (s, "float32", 1): stat(v)
        for s, v in [("ours", 40.0), ("llama.cpp", 50.0), ("ours --quantize int8", 60.0), ("llama.cpp Q8_0", 50.0)]
    }
    run["decode"][("ours", "bfloat16", 1)] = stat(70.0)
    run["decode"][("llama.cpp", "bfloat16", 1)] = stat(70.0)
    run["memory"] = {"state_bytes": 2**20, "kv_bytes": {4096: 2**30, 32768: 2**33}, "weight_bytes": 6e8}
    http = {"tokens_per_s": 500.0, "steady_tokens_per_s": 550.0, "ttft_p50_ms": 90.0, "itl_p50_ms": 50.0}
    run["server"] = {"rss_1_mb": 900, "rss_32_mb": 950, "http_32": {**http, "itl_p99_ms": 99.0}}
    run["server"]["http_32"]["server_cpu_s_per_token"] = 0.004
    run["offline_32"], run["offline_32_cpu_s_per_token"] = 600.0, 0.0036
    run["servers"] = {"ours": {1: {**http, "tokens_per_s": 41.0}}, "llama-cpp-python": {1: http}}
    run["default_model"] = {"experts packed": {1: 400.0}, "experts unpacked": {1: 300.0}}
    metric = lambda bpb, agree: {"bits_per_byte": bpb, "greedy_agreement": agree}  # noqa: E731
    names = ("fp32", "bf16", "int8", "int4 (g32)", "int4 (g64, served)", "int4 (g128)")
    run["quality"] = {
        "default_model": {"tokens": 100, "bytes": 400, "prompts": 50}
        | {n: metric(1.0 + i / 100, 1 - i / 100) for i, n in enumerate(names)},
        "mamba_130m": {"tokens": 50} | {n: {"kl_vs_fp32": i / 1000} for i, n in enumerate(names[1:])},
    }
    return run


def test_full_run_checks_the_targets_against_llama_cpp(tmp_path):
    write(full_run(), tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert "| batch 1 float32 vs llama.cpp | 0.80x | >= 1x | NOT met |" in md
    assert "| batch 1 bfloat16 vs llama.cpp | 1.00x | >= 1x | met |" in md
    assert "| batch 1 fp32, share of the read-bandwidth roofline | 0.80 | >= 0.8 | met |" in md  # 40 x 0.6 GB / 30
    assert "| batch 1 int8 vs llama.cpp Q8_0 | 1.20x | - | - |" in md
    assert "offline CPU s/token over the server's | 0.90x | >= 0.85x | met |" in md
    assert "| ours | 41.0, 90 ms |" in md and "| llama-cpp-python | 500.0, 90 ms |" in md
    assert "- experts unpacked: batch 1: 300" in md
    assert "| int4 (g32) | 1.0300 | 97.0% | 0.0020 |" in md and "| fp32 | 1.0000 | 100.0% | - |" in md
    assert load(tmp_path / "results.json")["default_model"] == full_run()["default_model"]  # int keys come back


def test_ratio_table_and_the_summary_block(tmp_path):
    run = partial_run()
    run["decode"][("llama.cpp", "float32", 1)] = {"median": 40.0, "min": 40.0, "max": 40.0}
    assert "| llama.cpp | float32 | 1.25x | - | - |" in ratio_table(run)
    readme = tmp_path / "README.md"
    readme.write_text(f"# Results\n\n{SUMMARY_START}\nold figures\n{SUMMARY_END}\n\n## Method\nkept\n")
    write(run, tmp_path)
    text = readme.read_text()
    assert "old figures" not in text and "| llama.cpp | float32 | 1.25x |" in text
    assert text.startswith("# Results\n") and text.endswith("## Method\nkept\n")
    assert "Run 2026-12-01 00:00 on test CPU" in text
    assert not update_summary(tmp_path / "missing.md", run)
