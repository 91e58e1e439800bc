"""PagedKV, the block allocator behind paged attention K/V: blocks reserved and given back, never two owners
of one block, a request past what is free refused without side effects, a row move that moves the table row
only, and token t of a slot stored at offset t % bs of its (t // bs)-th block. (That a paged pool decodes as
the contiguous one does is tests/server/engine/test_state_pool.py's.)"""

from __future__ import annotations

import pytest
import torch

from server.engine.kv_blocks import PagedKV
from tests.helpers import tiny

BS = 4  # tokens per block


@pytest.fixture(scope="module")
def model():
    return tiny("hybrid")  # layer 1 is attention: the only growing state


def _paged(model, n_blocks=10, slots=4, max_tokens=24) -> PagedKV:
    return PagedKV(model, n_blocks, BS, slots, max_tokens, torch.device("cpu"))


def _owned(kv: PagedKV) -> list[int]:
    return [b for blocks in kv.owned for b in blocks]


def test_only_attention_layers_are_paged_in_blocks_of_bs_tokens(model):
    kv = _paged(model)
    assert [sorted(layer) for layer in kv.layers] == [[], ["k", "v"], []]
    attn = model.layers[1].mixer
    assert kv.layers[1]["k"].shape == (11, attn.n_kv_heads, BS, attn.head_dim)  # 10 usable + the scratch block
    assert kv.table.shape == (4, 6) and kv.blocks_for(0) == 0 and kv.blocks_for(4) == 1 and kv.blocks_for(5) == 2
    assert kv.scratch == 10 and bool((kv.table == 10).all()) and 10 not in kv.free


def test_blocks_are_reserved_and_given_back_and_never_shared(model):
    kv = _paged(model)
    kv.allocate(0, 9)  # 3 blocks
    kv.allocate(1, 4)  # 1 block
    kv.allocate(2, 16)  # 4 blocks
    assert [len(b) for b in kv.owned] == [3, 1, 4, 0] and kv.free_blocks == 2
    assert len(set(_owned(kv))) == 8 and not set(_owned(kv)) & set(kv.free)  # no block has two owners
    assert kv.table[0, :3].tolist() == kv.owned[0] and kv.table[2, :4].tolist() == kv.owned[2]
    kv.release(1)
    assert kv.owned[1] == [] and kv.free_blocks == 3
    kv.allocate(3, 12)  # 3 blocks: the one slot 1 gave back and the two never used
    assert sorted(_owned(kv) + kv.free) == list(range(10)) and len(set(_owned(kv))) == 10 and kv.free_blocks == 0
    for slot in range(4):
        kv.release(slot)
    assert sorted(kv.free) == list(range(10)) and _owned(kv) == []
    assert bool((kv.table == kv.scratch).all())  # a free row writes only to the scratch block


def test_running_out_is_refused_and_changes_nothing(model):
    kv = _paged(model, n_blocks=5)
    kv.allocate(0, 12)  # 3 of 5 blocks
    table = kv.table.clone()
    with pytest.raises(RuntimeError, match="3 blocks needed, 2 free"):
        kv.allocate(1, 9)
    assert kv.free_blocks == 2 and kv.owned[1] == [] and torch.equal(kv.table, table)
    with pytest.raises(RuntimeError):  # more than one slot's table row can list, however many are free
        _paged(model, n_blocks=20).allocate(0, 25)
    kv.allocate(1, 8)  # exactly what is left
    assert kv.free_blocks == 0


def test_a_row_move_moves_the_table_row_not_the_kv(model):
    kv = _paged(model)
    kv.allocate(0, 8)
    kv.allocate(1, 12)
    for layer in kv.layers:
        for t in layer.values():
            t.normal_()
    before = {name: t.clone() for name, t in kv.layers[1].items()}
    blocks = kv.owned[1]
    kv.release(0)
    kv.move(0, 1)  # what StatePool.remove does: the last row takes the freed one's place
    assert kv.owned[0] == blocks and kv.owned[1] == [] and kv.table[0, :3].tolist() == blocks
    assert bool((kv.table[1] == kv.scratch).all())
    assert all(torch.equal(kv.layers[1][name], t) for name, t in before.items())  # not one K/V value moved
    kv.release(0)
    assert sorted(kv.free) == list(range(10))  # the moved row's blocks come back once, from its new row


def test_write_puts_token_t_at_offset_t_mod_bs_of_its_block_and_read_gives_it_back(model):
    kv = _paged(model)
    _, a = model.prefill(torch.randint(0, 97, (1, 10)), model.empty_state(1))
    _, b = model.prefill(torch.randint(0, 97, (1, 7)), model.empty_state(1))
    kv.allocate(0, 13)  # room to grow past the 10 tokens written
    kv.allocate(1, 7)
    kv.write(0, a, 10)
    kv.write(1, b, 7)  # writes its own blocks only: slot 0's K/V stays as written
    for name in ("k", "v"):
        paged, src = kv.layers[1][name], a.layers[1][name][0]  # (nB, nKV, bs, hd), (nKV, 10, hd)
        for t in range(10):
            torch.testing.assert_close(paged[kv.table[0, t // BS], :, t % BS], src[:, t], atol=0, rtol=0)
    for slot, state, n in ((0, a, 10), (1, b, 7)):
        got = kv.read(slot, n)
        assert got[0] == {} and got[2] == {}
        for name in ("k", "v"):
            assert got[1][name].shape == state.layers[1][name].shape
            torch.testing.assert_close(got[1][name], state.layers[1][name], atol=0, rtol=0)


def test_decode_view_lists_the_block_pool_and_the_running_rows_table(model):
    kv = _paged(model)
    kv.allocate(0, 4)
    kv.allocate(1, 8)
    view = kv.view_layers(2, 5)
    assert view[0] == {} and view[2] == {} and view[1]["k"] is kv.layers[1]["k"]
    table = view[1]["block_table"]  # the blocks for 5 positions: a view of the table's own memory
    assert torch.equal(table, kv.table[:2, :2]) and table.data_ptr() == kv.table.data_ptr()
