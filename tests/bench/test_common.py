"""Peers measured in their own process (bench/common.py): a value comes back, a crash is recorded as a crash and
the other measurements go on, and the report shows it."""

import os
import signal

import pytest

from bench import common
from bench.report import _med


def rate(x: float) -> float:
    return x * 2


def segfault(x: float) -> float:
    os.kill(os.getpid(), signal.SIGSEGV)  # what llama.cpp does at context creation on some CPUs
    return x


def test_isolated_returns_what_the_child_computed():
    assert common.isolated(rate, 21.0) == 42.0


def test_a_crash_in_the_child_raises_crashed_and_spares_the_caller():
    with pytest.raises(common.Crashed, match="segfault crashed"):
        common.isolated(segfault, 1.0)
    assert common.isolated(rate, 1.5) == 3.0  # this process goes on


def test_interleaved_records_a_crash_and_runs_the_rest(capsys):
    runs = {"peer": (common.isolated, segfault, 1.0), "ours": (rate, 5.0)}
    out = common.interleaved(2, runs)
    assert out["ours"]["median"] == 10.0 and out["ours"]["values"] == [10.0, 10.0]
    assert "crashed" in out["peer"]["crashed"]
    assert capsys.readouterr().out.count("crashed") == 1  # tried once, not again in the second round
    assert common.fmt(out["peer"]) == "crashed" and _med(out, "peer") is None
