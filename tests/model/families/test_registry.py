"""The family registry: every module of model/families is found, a config.json finds its family by model_type,
by architectures or by the family's own claim, and what no family reads is refused naming what it is."""

from __future__ import annotations

import json
import pkgutil

import pytest

import model.families as families
from model.checkpoint import CheckpointError, load_model
from model.families import FAMILIES, Family, detect, index
from tests.helpers import FAMILIES as TESTED
from tests.helpers import make_tiny_checkpoint


def test_every_family_module_is_registered():
    modules = {m.name for m in pkgutil.iter_modules(families.__path__)} - {"common"}
    assert {f.name for f in FAMILIES.values()} == {
        "aetheris", "mamba", "jamba", "mamba2", "bamba", "granitemoehybrid", "nemotron_h",
    }  # fmt: skip
    assert len(modules) == len(FAMILIES)


def test_every_hf_mamba2_family_has_a_parity_entry():
    """Adding a family means adding its random checkpoint to tests/helpers.py, which the parity tests run."""
    hf_families = {f.name for f in FAMILIES.values()} - {"aetheris", "mamba", "jamba"}  # tested on their own
    assert hf_families <= set(TESTED)


@pytest.mark.parametrize(
    "config, family",
    [
        ({"model_type": "aetheris"}, "aetheris"),
        ({"model_type": "granitemoehybrid"}, "granitemoehybrid"),
        ({"model_type": "mystery", "architectures": ["NemotronHForCausalLM"]}, "nemotron_h"),
        ({"architectures": ["JambaForCausalLM"]}, "jamba"),
        ({"architectures": ["Other", "Mamba2ForCausalLM"]}, "mamba2"),
        ({"d_model": 768, "n_layer": 24, "vocab_size": 50277}, "mamba"),  # the state-spaces layout names neither
        ({"model_type": "falcon_mamba"}, "mamba"),  # found, then refused by the family itself (below)
    ],
)
def test_detect(config, family):
    assert detect(config).name == family


def test_unknown_model_type_is_refused_naming_it():
    with pytest.raises(
        CheckpointError, match=r"unsupported model_type 'llama' \(architectures \['LlamaForCausalLM'\]\)"
    ):
        detect({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})


def test_a_family_refuses_what_it_does_not_implement(tmp_path):
    make_tiny_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "falcon_mamba", "hidden_size": 32}))
    with pytest.raises(CheckpointError, match="FalconMamba checkpoints are not supported"):
        load_model(tmp_path)


def test_two_families_claiming_one_key_is_an_error():
    a = Family("a", lambda raw, v: None, lambda sd, cfg: sd, model_types=("x",))
    b = Family("b", lambda raw, v: None, lambda sd, cfg: sd, architectures=("XForCausalLM",), model_types=("x",))
    with pytest.raises(RuntimeError, match="families a and b both claim 'x'"):
        index({"a": a, "b": b})
