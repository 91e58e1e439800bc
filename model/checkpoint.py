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
from safetensors.torch import save_file

from .build import build_model
from .config import ModelConfig
from .errors import CheckpointError
from .families import detect
from .lm import HybridLM
from .packed import is_packed
from .quantized import Quantizer, is_quantized
from .tokenizer import Tokenizer
from .weights import Node, read_header

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


def read_safetensors(directory: Path) -> dict[str, Node]:
    """Every tensor of a checkpoint directory, single-file or sharded, as nodes read on demand (model/weights.py)."""
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
    nodes: dict[str, Node] = {}
    for name in files:
        file = directory / name
        if not file.exists():
            raise CheckpointError(f"{file}: shard listed in {INDEX} is missing")
        nodes.update(read_header(file))
    return nodes


def _read_config(directory: Path) -> dict:
    file = directory / "config.json"
    if not file.exists():
        raise CheckpointError(f"{directory}: config.json is missing")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: invalid JSON ({e})") from e


def _embedding_rows(sd: dict[str, Node]) -> int | None:
    for key in ("backbone.embeddings.weight", "backbone.embedding.weight", "model.embed_tokens.weight"):
        if key in sd:
            return sd[key].shape[0]
    return None


def config_and_weights(directory: Path) -> tuple[ModelConfig, dict[str, Node]]:
    """Read any supported checkpoint directory into our config and our parameter names (nodes, not read yet)."""
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


def load_model(
    path_or_id: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    quantizer: Quantizer | None = None,
) -> tuple[HybridLM, Tokenizer | None]:
    """Load a model (and its tokenizer if the checkpoint has one) from a directory or a Hub repo id, tensor by
    tensor (model/build.py), quantizing while loading when a quantizer is given."""
    directory = resolve(path_or_id)
    cfg, nodes = config_and_weights(directory)
    model = build_model(cfg, nodes, device, dtype, quantizer)
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
