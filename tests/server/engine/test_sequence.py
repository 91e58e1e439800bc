"""Stop strings in server/sequence.py: held back while they may be forming, cut when complete, released
when they turn out not to be one."""

from __future__ import annotations

import pytest

from server.engine.sequence import Sequence, _held_back
from server.engine_io import SamplingParams
from tests.helpers import toy_tokenizer


@pytest.mark.parametrize(
    "text,stops,want",
    [
        ("hello wor", ["world"], 3),  # "wor" may become "world"
        ("hello w", ["world", "xyz"], 1),
        ("hello", ["world"], 0),
        ("abab", ["abc"], 2),  # the longest suffix that starts a stop string
        ("the en", ["end", "the end"], 6),  # "the en" itself starts "the end"
        ("", ["x"], 0),
    ],
)
def test_held_back(text, stops, want):
    assert _held_back(text, stops) == want


def _feed(text_pieces: list[str], stop: list[str], max_tokens: int = 100):
    """Push the tokens of each piece through a Sequence; return the released text per token and the end."""
    tok = toy_tokenizer()
    seq = Sequence.create("r", 0, SamplingParams(max_tokens=max_tokens, stop=stop), tok, set())
    released = []
    for piece in text_pieces:
        for t in tok.encode(piece, add_special_tokens=False):
            if seq.finished:
                break
            released.append(seq.append(t, None).text)
    return released, seq


def test_stop_string_split_over_tokens_is_never_released():
    released, seq = _feed(["Tom liked", " to play with a red ball."], stop=["to play"])
    assert "".join(released) == "Tom liked " and seq.finish_reason == "stop"
    assert all("to play" not in r for r in released)


def test_a_false_start_is_released_once_it_cannot_be_a_stop_string():
    released, seq = _feed(["The cat sat."], stop=["cats"])
    assert "".join(released) == "The cat sat." and not seq.finished


def test_length_finish_flushes_held_back_text():
    tok = toy_tokenizer()
    ids = tok.encode("The cat", add_special_tokens=False)
    seq = Sequence.create("r", 0, SamplingParams(max_tokens=len(ids), stop=["cats"]), tok, set())
    text = "".join(seq.append(t, None).text for t in ids)
    assert text == "The cat" and seq.finish_reason == "length"  # "cat" could start "cats": released at the end
