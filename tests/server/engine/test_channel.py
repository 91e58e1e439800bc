"""The bounded output channel: a reader that falls behind gets what piled up as one message, one delta per
choice, with nothing lost or reordered."""

import asyncio

from server.engine.channel import OutputChannel
from server.engine_io import ChoiceDelta, RequestOutput, Usage


def message(i: int, n: int = 2, last: bool = False) -> RequestOutput:
    deltas = [ChoiceDelta(c, f"t{i}.{c} ", [100 * c + i], finish_reason="length" if last else None) for c in range(n)]
    return RequestOutput("r", deltas, usage=Usage(3, i + 1) if last else None, finished=last)


def test_a_reader_behind_gets_one_message_with_one_delta_per_choice():
    async def run():
        ch = OutputChannel("r", lambda: None, send_timeout=30, limit=64)
        ch.put(message(0))
        first = await ch.get()  # a reader that keeps up: one message per iteration
        for i in range(1, 5):
            ch.put(message(i, last=i == 4))
        rest = await ch.get()  # fell behind by four iterations
        return first, rest, ch.items

    first, rest, left = asyncio.run(run())
    assert [d.text for d in first.deltas] == ["t0.0 ", "t0.1 "]
    assert [d.index for d in rest.deltas] == [0, 1] and not left
    assert rest.deltas[0].text == "t1.0 t2.0 t3.0 t4.0 " and rest.deltas[1].token_ids == [101, 102, 103, 104]
    assert rest.finished and rest.usage.completion_tokens == 5
    assert [d.finish_reason for d in rest.deltas] == ["length", "length"]


def test_prompt_logprobs_stay_their_own_message():
    async def run():
        ch = OutputChannel("r", lambda: None, send_timeout=30, limit=64)
        ch.put(RequestOutput("r", [ChoiceDelta(0, "a", [1])], prompt_logprobs=[None]))
        ch.put(message(1, n=1))
        return await ch.get(), await ch.get()

    a, b = asyncio.run(run())
    assert a.prompt_logprobs == [None] and a.deltas[0].text == "a" and b.deltas[0].text == "t1.0 "
