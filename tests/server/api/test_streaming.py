"""merge(): several output streams interleaved as items arrive, failures passed on, all streams closed."""

from __future__ import annotations

import asyncio

import pytest

from server.api.streaming import merge


async def _gen(items, delay: float, closed: list, fail: bool = False):
    try:
        for item in items:
            await asyncio.sleep(delay)
            yield item
        if fail:
            raise RuntimeError("engine failed")
    finally:
        closed.append(items[0])


def test_merge_interleaves_tagged_by_stream_and_keeps_each_order():
    async def run():
        closed: list = []
        got = [x async for x in merge([_gen(["a1", "a2", "a3"], 0.03, closed), _gen(["b1", "b2"], 0.01, closed)])]
        return got, closed

    got, closed = asyncio.run(run())
    assert sorted(got) == [(0, "a1"), (0, "a2"), (0, "a3"), (1, "b1"), (1, "b2")]
    assert [x for i, x in got if i == 0] == ["a1", "a2", "a3"] and [x for i, x in got if i == 1] == ["b1", "b2"]
    assert got.index((1, "b2")) < got.index((0, "a3"))  # the faster stream is not held back by the slower
    assert sorted(closed) == ["a1", "b1"]


def test_merge_raises_a_streams_failure_and_closes_the_others():
    async def run():
        closed: list = []
        got = []
        with pytest.raises(RuntimeError, match="engine failed"):
            async for x in merge([_gen(["a1"], 0.01, closed, fail=True), _gen(["b1"] * 50, 0.01, closed)]):
                got.append(x)
        await asyncio.sleep(0.05)
        return got, closed

    got, closed = asyncio.run(run())
    assert (0, "a1") in got and sorted(closed) == ["a1", "b1"]
