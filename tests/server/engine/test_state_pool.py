"""StatePool: pool operations on every kind of layer state (fixed SSM state, growing K/V, contiguous or paged)."""

from __future__ import annotations

import pytest
import torch

from server.engine.prefix_cache import PrefixCache
from server.engine.state_pool import StatePool
from tests.helpers import tiny


class Seq:
    slot = -1


@pytest.mark.parametrize("kv_blocks", [0, 20], ids=["contiguous", "paged"])
def test_pool_operations_on_every_kind_of_layer_state(kv_blocks):
    """Admit, fork (n = 2), decode in place, release with a row move, snapshot and restore, on a model with
    Mamba and attention layers, with K/V contiguous per slot or paged in blocks of 4 tokens: every sequence's
    logits equal the same sequence decoded alone."""
    model = tiny("hybrid")
    prompts = {"a": [5, 6, 7], "b": [8, 9, 10, 11, 12, 13, 14], "c": [20, 21, 22, 23, 24]}
    alone = {}  # name -> (logits after the prompt, then after each greedy step), decoded alone out of place
    for name, p in prompts.items():
        logits, st = model.prefill(torch.tensor([p]), model.empty_state(1))
        out = [logits[0]]
        for _ in range(6):
            logits, st = model.decode(logits.argmax(-1), st)
            out.append(logits[0])
        alone[name] = out
    pool = StatePool(model, 5, torch.device("cpu"), capacity=24, kv_blocks=kv_blocks, block_size=4)
    cache = PrefixCache(1 << 20)
    seqs, step = {}, {}
    for name in ("a", "b", "c"):
        logits, st = model.prefill(torch.tensor([prompts[name]]), model.empty_state(1))
        group = [Seq(), Seq()] if name == "b" else [Seq()]  # b is forked into two rows
        pool.add(group, st, len(prompts[name]), reserve=len(prompts[name]) + 6)
        for i, s in enumerate(group):
            seqs[name + str(i)], step[name + str(i)] = s, 0
    assert pool.used == 4 and pool.held == [3, 7, 7, 5]

    def decode_all():
        names = sorted(seqs, key=lambda n: seqs[n].slot)
        tokens = torch.stack([alone[n[0]][step[n]].argmax() for n in names])
        rows = pool.view()
        logits, _ = model.decode(tokens, rows, out=rows)
        pool.advance()
        for i, n in enumerate(names):
            step[n] += 1
            torch.testing.assert_close(logits[i], alone[n[0]][step[n]], atol=1e-5, rtol=1e-5)

    decode_all()
    decode_all()
    cache.put(prompts["a"] + [int(alone["a"][i].argmax()) for i in range(2)], pool.row(seqs["a0"].slot), torch.zeros(3))
    pool.remove(seqs.pop("a0"))  # row 0 freed: the last row (c) moves into it
    assert seqs["c0"].slot == 0 and pool.used == 3 and pool.held == [7, 9, 9]
    decode_all()
    snap = cache.lookup(prompts["a"] + [int(alone["a"][i].argmax()) for i in range(3)])
    assert snap is not None and len(snap.tokens) == 5
    k = snap.state.layers[1]["k"]
    assert k.shape[2] == 5  # the snapshot keeps K/V only up to its prefix: (1, nKV, 5, hd)
    seqs["a1"] = Seq()
    pool.add([seqs["a1"]], snap.state, len(snap.tokens), reserve=9)  # restore: a resumes after 2 sampled tokens
    step["a1"] = 2
    decode_all()
    decode_all()
    if kv_blocks:  # a0's blocks came back; held: c 11 tokens, b0 and b1 13 each, a1 9 -> 3 + 4 + 4 + 3 blocks of 4
        assert pool.free_blocks == kv_blocks - 14
