"""Weights moved into transparent huge pages (model/huge_pages.py): the model computes exactly what it did, ties
and aliases hold, huge pages back the weights where the OS offers them, and nothing moves where it does not."""

import pytest
import torch

from model import huge_pages
from model.huge_pages import available, huge_page_bytes, use_huge_pages
from model.quantized import quantize_int8
from tests.helpers import LAYOUTS, tiny

needs_thp = pytest.mark.skipif(not available(), reason="this kernel has transparent huge pages set to 'never'")


def _outputs(model) -> list[torch.Tensor]:
    """Prefill logits and three decode steps' logits and states: what serving computes."""
    with torch.inference_mode():
        logits, state = model.prefill(torch.tensor([[3, 1, 4, 1, 5]]), model.empty_state(1))
        out = [logits]
        for t in (9, 2, 6):
            logits, state = model.decode(torch.tensor([t]), state)
            out += [logits, *(v for _, v, _ in state.items())]
    return out


def _tensors(model) -> list[torch.Tensor]:
    """The weights and saved buffers (the MoE's routing counts, which the decode step writes, stay put)."""
    saved = (
        b for m in model.modules() for n, b in m.named_buffers(recurse=False) if n not in m._non_persistent_buffers_set
    )
    return [*model.parameters(), *saved]


@needs_thp
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("int8", [False, True])
def test_moved_model_computes_the_same(layout, int8):
    model = tiny(layout)
    if int8:
        quantize_int8(model)
    want = _outputs(model)
    if "[madvise]" in huge_pages.THP_SETTING.read_text():  # only madvise'd memory gets huge pages
        assert huge_page_bytes(model.embeddings.weight) == 0
    moved = use_huge_pages(model)
    assert moved == sum(t.nbytes for t in _tensors(model))  # every weight and saved buffer
    got = _outputs(model)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    # one mapping holds them all, and huge pages back it (its first 2 MiB at least: the weights start there)
    assert all(huge_page_bytes(t) >= huge_pages.HUGE for t in _tensors(model))
    assert all(t.data_ptr() % huge_pages.ALIGN == 0 for t in _tensors(model))


@needs_thp
def test_ties_and_parameters_survive():
    model = tiny("mamba", tie_embeddings=True)
    params = dict(model.named_parameters())
    use_huge_pages(model)
    assert model.lm_head.weight is model.embeddings.weight  # still one Parameter, at one place
    assert dict(model.named_parameters()) == params  # the same objects, moved in place
    assert huge_page_bytes(model.lm_head.weight) > 0


@needs_thp
def test_views_stay_where_they_are():
    """A storage holding two layouts (a weight and a view of it) is left alone: moving one would split them."""
    model = tiny("mamba")
    w = model.layers[0].mixer.out_proj.weight
    model.register_buffer("w_t", w.detach().t())  # shares w's storage, another layout
    before = w.data_ptr()
    use_huge_pages(model)
    assert w.data_ptr() == before and model.w_t.data_ptr() == before
    assert huge_page_bytes(model.layers[0].mixer.in_proj.weight) > 0  # the rest moved


def test_nothing_moves_without_huge_pages(tmp_path, monkeypatch):
    setting = tmp_path / "enabled"
    setting.write_text("always madvise [never]\n")
    monkeypatch.setattr(huge_pages, "THP_SETTING", setting)
    assert not available()
    model = tiny("mamba")
    before = [t.data_ptr() for t in _tensors(model)]
    assert use_huge_pages(model) == 0
    assert [t.data_ptr() for t in _tensors(model)] == before
    monkeypatch.setattr(huge_pages, "THP_SETTING", tmp_path / "absent")  # not Linux, or no THP support
    assert not available()
