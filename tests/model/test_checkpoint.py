"""Our checkpoint format: bit-exact round trip, and bad checkpoints name what is wrong."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import HybridLM
from model.checkpoint import CheckpointError, load_model, resolve, save_checkpoint
from tests.helpers import make_tiny_checkpoint, tiny_config, toy_tokenizer


@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_is_bit_exact(tmp_path, tie):
    model = HybridLM(tiny_config(300, tie_embeddings=tie, mixer_norms=True))
    save_checkpoint(model, tmp_path, toy_tokenizer())
    loaded, tok = load_model(tmp_path)
    assert loaded.config == model.config and tok is not None and tok.vocab_size == 300
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert (loaded.lm_head.weight is loaded.embeddings.weight) == tie
    tokens = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        assert torch.equal(model.eval()(tokens).logits, loaded(tokens).logits)


def test_load_in_bf16_keeps_ssm_params_fp32(tmp_path):
    make_tiny_checkpoint(tmp_path)
    model, _ = load_model(tmp_path, dtype=torch.bfloat16)
    assert model.embeddings.weight.dtype == torch.bfloat16
    assert model.layers[0].mixer.A_log.dtype == torch.float32 and model.layers[0].mixer.D.dtype == torch.float32


def _corrupt(tmp_path, edit):
    make_tiny_checkpoint(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    edit(sd)
    save_file(sd, tmp_path / "model.safetensors")


def test_missing_tensor_named(tmp_path):
    _corrupt(tmp_path, lambda sd: sd.pop("layers.1.mixer.A_log"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'layers.1.mixer.A_log' \(expected shape \(64, 8\)\)"):
        load_model(tmp_path)


def test_extra_tensor_named(tmp_path):
    _corrupt(tmp_path, lambda sd: sd.update({"layers.0.mixer.bogus": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'layers.0.mixer.bogus' with shape \(3,\)"):
        load_model(tmp_path)


def test_misshaped_tensor_names_both_shapes(tmp_path):
    _corrupt(tmp_path, lambda sd: sd.update({"layers.0.mixer.D": torch.zeros(65)}))
    with pytest.raises(CheckpointError, match=r"'layers.0.mixer.D' has shape \(65,\), expected \(64,\)"):
        load_model(tmp_path)


def test_pickle_only_and_missing_files_refused(tmp_path):
    make_tiny_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only safetensors is read"):
        load_model(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="pytorch_model.bin is a PyTorch pickle; only safetensors"):
        load_model(tmp_path)
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_model(tmp_path)


def test_bad_config_key_named(tmp_path):
    make_tiny_checkpoint(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["d_modle"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"unknown keys \['d_modle'\]"):
        load_model(tmp_path)


def test_not_a_directory_or_hub_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_model(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="not loadable from the Hub"):
        load_model("someone/not-cached-here")


def test_unknown_layer_type_is_refused_naming_it(tmp_path):
    directory = make_tiny_checkpoint(tmp_path / "ckpt")
    cfg = json.loads((directory / "config.json").read_text())
    cfg["layers"][0]["mixer"] = "retention"
    (directory / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="layer mixer 'retention' is not supported"):
        load_model(directory)


def test_a_folder_above_checkpoints_finds_the_one_meant(tmp_path, caplog):
    """The original project's `--checkpoint_dir checkpoints`: one checkpoint below is taken, a `latest`
    pointer (what training writes) wins, several are listed, and a folder of pickles says only safetensors
    are read."""
    make_tiny_checkpoint(tmp_path / "runs" / "step-1")
    with caplog.at_level("INFO", logger="aetheris"):
        assert resolve(tmp_path / "runs") == tmp_path / "runs" / "step-1"
    assert "the one checkpoint below it" in caplog.text
    make_tiny_checkpoint(tmp_path / "runs" / "step-2")
    with pytest.raises(CheckpointError, match=r"several below it \(step-1, step-2\); name one"):
        resolve(tmp_path / "runs")
    (tmp_path / "runs" / "latest").write_text("step-1\n")
    assert resolve(tmp_path / "runs") == tmp_path / "runs" / "step-1"
    load_model(tmp_path / "runs")
    (tmp_path / "old").mkdir()
    torch.save({"step": 1}, tmp_path / "old" / "checkpoint_current.pth")
    with pytest.raises(CheckpointError, match="checkpoint_current.pth is a PyTorch pickle; only safetensors"):
        load_model(tmp_path / "old")
