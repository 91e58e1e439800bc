"""Pinned prefix snapshots on disk (--state-cache-dir), so a restarted server keeps its warm system prompts.

One safetensors file per snapshot: its tokens, the logits after them and every state tensor (`layer{i}.{name}`,
exact length), with metadata naming the model (a fingerprint of its config, dtype and name) and the sha256 of
the tokens. Loading checks all of it, and the tensors' names and shapes against the model's state specs; a file
that does not match is skipped with a warning. Only safetensors is read: a snapshot file cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model import HybridLM, ModelState

from .prefix_cache import Snapshot

log = logging.getLogger("aetheris.engine")
FORMAT = "aetheris-state-snapshot-1"


def model_fingerprint(model: HybridLM, model_id: str) -> str:
    """Snapshots are only valid for the exact model that made them: its config, weight dtype and name."""
    blob = json.dumps(model.config.to_dict(), sort_keys=True) + str(model.embeddings.weight.dtype) + model_id
    return hashlib.sha256(blob.encode()).hexdigest()


def _tokens_sha(tokens: tuple[int, ...]) -> str:
    return hashlib.sha256(json.dumps(list(tokens)).encode()).hexdigest()


class SnapshotStore:
    def __init__(self, directory: str | os.PathLike, model: HybridLM, model_id: str) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.model, self.fingerprint = model, model_fingerprint(model, model_id)

    def _path(self, tokens: tuple[int, ...]) -> Path:
        key = hashlib.sha256((self.fingerprint + _tokens_sha(tokens)).encode()).hexdigest()[:40]
        return self.dir / f"{key}.safetensors"

    def save(self, snap: Snapshot) -> None:
        """Write a snapshot atomically (a temporary file renamed into place)."""
        path = self._path(snap.tokens)
        if path.exists():
            return
        tensors = {"tokens": torch.tensor(snap.tokens, dtype=torch.long), "last_logits": snap.last_logits.cpu()}
        for i, layer in enumerate(snap.state.layers):
            for name, t in layer.items():
                tensors[f"layer{i}.{name}"] = t.contiguous().cpu()
        meta = {"format": FORMAT, "fingerprint": self.fingerprint, "tokens_sha256": _tokens_sha(snap.tokens)}
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)

    def load(self) -> list[tuple[tuple[int, ...], ModelState, torch.Tensor]]:
        """(tokens, one-row state, logits after them) of every valid snapshot of this model in the directory."""
        out = []
        for path in sorted(self.dir.glob("*.safetensors")):
            try:
                out.append(self._read(path))
            except Exception as e:  # any unreadable or foreign file (safetensors raises its own error types)
                log.warning("state cache: skipping %s (%s)", path.name, e)
        return out

    def _read(self, path: Path) -> tuple[tuple[int, ...], ModelState, torch.Tensor]:
        device = self.model.embeddings.weight.device
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT or meta.get("fingerprint") != self.fingerprint:
                raise ValueError("made by another model or format")
            tokens = tuple(f.get_tensor("tokens").tolist())
            if _tokens_sha(tokens) != meta.get("tokens_sha256") or self._path(tokens) != path:
                raise ValueError("its tokens do not match its checksum")
            empty = self.model.empty_state(1, "meta")
            layers = []
            for i, spec in enumerate(empty.specs):
                layer = {}
                for name, s in spec.items():
                    t = f.get_tensor(f"layer{i}.{name}")
                    want = list(empty.layers[i][name].shape)
                    if s.seq_axis is not None:
                        want[1 + s.seq_axis] = len(tokens)
                    if list(t.shape) != want:
                        raise ValueError(f"layer{i}.{name} has shape {tuple(t.shape)}, expected {tuple(want)}")
                    layer[name] = t.to(device)
                layers.append(layer)
            logits = f.get_tensor("last_logits").to(device)
        return tokens, ModelState(empty.specs, layers), logits
