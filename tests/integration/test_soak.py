"""The soak benchmark's CI-sized run: bench/soak.py for 1 minute with 16 clients against the embedded model.
Every outcome is an expected one (answers, rejected bad bodies, disconnects, 503s under overload), no slot is
held at the end, RSS stays within 5% after warm-up and the prefix cache within its byte limit."""

from __future__ import annotations

import json
import subprocess
import sys

from aetheris.serverproc import ROOT


def test_one_minute_soak_with_16_clients(tmp_path):
    out = tmp_path / "soak.md"
    proc = subprocess.run(
        [sys.executable, "bench/soak.py", "--minutes", "1", "--clients", "16", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    result = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert result["unexpected"] == {}, result
    assert result["slots_used_at_end"] == 0
    assert result["rss_growth_after_warmup"] <= 0.05, result["rss_mib"]
    assert result["cache_bytes_max"] <= result["cache_bytes_limit"]
    assert {"chat:ok", "stream:ok", "disconnect:disconnected", "bad_body:rejected_as_expected"} <= set(
        result["outcomes"]
    )
    assert proc.returncode == 0
