"""bench/report.py renders what a run measured: configurations this CPU cannot run are marked, stages that did
not run are left out, and a partial run round-trips through JSON."""

import json

from bench.report import load, to_json, write


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
