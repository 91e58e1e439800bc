"""Checkpoints: our directory format, the Hugging Face family directories of model/families, and Hub repo ids.

`CheckpointError` (model/errors.py, re-exported here) is what every loader raises for a checkpoint it refuses.

Our format (what `save_checkpoint` writes and every loader reads):
    config.json            ModelConfig.to_dict() ({"model_type": "aetheris", ...})
    model.safetensors      the weights (lm_head omitted when tied to the embedding)
    tokenizer.json         `tokenizers` file, and tokenizer_config.json (special tokens, chat template)
Weights are read from safetensors only, single file or sharded with model.safetensors.index.json; never
pickle. Every tensor is checked: a missing, unexpected or mis-shaped tensor raises CheckpointError naming it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .config import ModelConfig
from .errors import CheckpointError
from .families import detect
from .lm import HybridLM
from .packed import is_packed
from .quantized import is_quantized
from .tokenizer import Tokenizer

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLES = ("*.pth", "*.pt", "*.bin", "*.ckpt")  # PyTorch pickles, which running would trust: never read
log = logging.getLogger("aetheris")


def resolve(path_or_id: str | os.PathLike) -> Path:
    """A local directory as is; anything else is a Hugging Face Hub repo id, downloaded (or taken from the
    local cache when HF_HUB_OFFLINE=1) with huggingface_hub.snapshot_download."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return find_checkpoint(path)
    if path.exists() or str(path_or_id).startswith((".", "/", "~")) or str(path_or_id).count("/") > 1:
        raise CheckpointError(f"{path_or_id}: not a checkpoint directory")
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(str(path_or_id), allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja"])
    except Exception as e:  # network, auth, offline without cache: one clear message
        raise CheckpointError(f"{path_or_id}: not a local directory and not loadable from the Hub ({e})") from e
    return Path(local)


def find_checkpoint(directory: Path) -> Path:
    """A directory holding a checkpoint (config.json) as is. One that holds none itself: the checkpoint its
    `latest` pointer names (what training writes), else the only checkpoint directory right below it, said in
    one log line; several candidates, or only PyTorch pickles, are an error saying so."""
    if (directory / "config.json").exists():
        return directory
    pointer = directory / "latest"
    if pointer.is_file() and (directory / pointer.read_text().strip() / "config.json").exists():
        found = directory / pointer.read_text().strip()
        log.info("%s holds no checkpoint itself; loading %s, which its `latest` pointer names", directory, found)
        return found
    below = sorted(p for p in directory.iterdir() if p.is_dir() and (p / "config.json").exists())
    if len(below) == 1:
        log.info("%s holds no checkpoint itself; loading %s, the one checkpoint below it", directory, below[0])
        return below[0]
    if below:
        names = ", ".join(p.name for p in below)
        raise CheckpointError(f"{directory}: holds no checkpoint itself but several below it ({names}); name one")
    if pickles := sorted(p.name for pattern in PICKLES for p in directory.glob(pattern)):
        raise CheckpointError(
            f"{directory}: {pickles[0]} is a PyTorch pickle; only safetensors checkpoints are read "
            "(config.json + model.safetensors, as `aetheris train` writes them)"
        )
    return directory  # reading it names what is missing


def read_safetensors(directory: Path) -> dict[str, Tensor]:
    """All tensors of a checkpoint directory, single-file or sharded."""
    index = directory / INDEX
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no weight_map")
        files = sorted(set(weight_map.values()))
    elif (directory / WEIGHTS).exists():
        files = [WEIGHTS]
    else:
        found = sorted(p.name for p in directory.iterdir())
        raise CheckpointError(f"{directory}: no {WEIGHTS} or {INDEX} (found {found}); only safetensors is read")
    tensors: dict[str, Tensor] = {}
    for name in files:
        file = directory / name
        if not file.exists():
            raise CheckpointError(f"{file}: shard listed in {INDEX} is missing")
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from e
    return tensors


def _read_config(directory: Path) -> dict:
    file = directory / "config.json"
    if not file.exists():
        raise CheckpointError(f"{directory}: config.json is missing")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: invalid JSON ({e})") from e


def _embedding_rows(sd: dict[str, Tensor]) -> int | None:
    for key in ("backbone.embeddings.weight", "backbone.embedding.weight", "model.embed_tokens.weight"):
        if key in sd:
            return sd[key].shape[0]
    return None


def config_and_weights(directory: Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Read any supported checkpoint directory into our config and our parameter names."""
    raw = _read_config(directory)
    family = detect(raw)
    sd = read_safetensors(directory)
    try:  # a config whose values our ModelConfig rejects (e.g. groups not dividing heads) is the checkpoint's
        cfg = family.config(raw, _embedding_rows(sd))
    except CheckpointError:
        raise
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{directory / 'config.json'}: {e}") from e
    sd = family.convert(sd, cfg)
    if "lm_head.weight" not in sd and family.tie_missing_head:
        cfg.tie_embeddings = True  # a missing lm_head is the tied embedding
    elif cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)  # stored anyway by some writers; the tie makes it the embedding
    return cfg, sd


def build_model(
    cfg: ModelConfig, sd: dict[str, Tensor], device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> HybridLM:
    """Allocate the model without initialising it, check every tensor, then copy the weights in."""
    with torch.device("meta"):
        model = HybridLM(cfg)
    expected = {k: v for k, v in model.state_dict().items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing:
        raise CheckpointError(
            f"missing tensor {missing[0]!r} (expected shape {tuple(expected[missing[0]].shape)})"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
        )
    if unexpected:
        raise CheckpointError(
            f"unexpected tensor {unexpected[0]!r} with shape {tuple(sd[unexpected[0]].shape)}"
            + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else "")
        )
    for k, v in expected.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise CheckpointError(f"tensor {k!r} has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)}")
    dtype = dtype or sd["embeddings.weight"].dtype
    model.to_empty(device=device)
    model.cast(dtype)
    if cfg.tie_embeddings:
        sd = {**sd, "lm_head.weight": sd["embeddings.weight"]}
    model.load_state_dict(sd, strict=True)
    model.tie_weights()
    for moe in model.moe_layers().values():
        moe.reset_stats()
    return model.eval()


def load_model(
    path_or_id: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[HybridLM, Tokenizer | None]:
    """Load a model (and its tokenizer if the checkpoint has one) from a directory or a Hub repo id."""
    directory = resolve(path_or_id)
    cfg, sd = config_and_weights(directory)
    model = build_model(cfg, sd, device, dtype)
    return model, Tokenizer.from_dir(directory)


def save_checkpoint(model: HybridLM, directory: str | os.PathLike, tokenizer: Tokenizer | None = None) -> Path:
    """Write our format. Weights are saved contiguous, in their current dtype."""
    if is_packed(model):  # packed weights are not in state_dict(): the file would lack them
        raise ValueError("this model's Linear weights are packed for inference; save the model as loaded")
    if is_quantized(model):  # int8 weights would be saved under names no loader reads
        raise ValueError("this model's weights are quantized for inference; save the model as loaded")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save(directory / "config.json")
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight")
    save_file(sd, str(directory / WEIGHTS), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory
