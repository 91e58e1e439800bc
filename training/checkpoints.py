"""Training checkpoints that a crash cannot lose: written whole, then renamed into place.

A checkpoint is written to a hidden temporary directory beside its final place, every file and the directory
flushed to disk (fsync), and only then renamed to `step_NNNNNNN`: a rename within one filesystem is atomic,
so a reader sees either the old set of checkpoints or the new one, never half a checkpoint. The `latest`
pointer is replaced the same way (a temporary file renamed over it). Only then are old checkpoints pruned
(`checkpoint.keep_last`), never the one `latest` names.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

PREFIX = "step_"


def _fsync(path: Path) -> None:
    """Flush a file, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_atomically(root: Path, name: str, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` fills a temporary directory; it becomes root/name only once all of it is on disk."""
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / name, root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # what an earlier crash left
    write(tmp)
    for f in sorted(tmp.rglob("*")):
        if f.is_file():
            _fsync(f)
    _fsync(tmp)
    if final.exists():  # the same step saved again (a resumed run): move the old one aside first
        old = root / f".{name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync(root)
    return final


def point_latest(root: Path, name: str) -> None:
    """Make root/latest name the checkpoint `name`, atomically."""
    tmp = root / ".latest.tmp"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / "latest")
    _fsync(root)


def latest(root: Path) -> Path | None:
    pointer = root / "latest"
    return root / pointer.read_text().strip() if pointer.exists() else None


def prune(root: Path, keep_last: int) -> list[Path]:
    """Remove all but the newest `keep_last` checkpoints (0 keeps all), never the one `latest` names."""
    if keep_last <= 0:
        return []
    current = latest(root)
    steps = sorted(p for p in root.glob(PREFIX + "*") if p.is_dir())
    doomed = [p for p in steps[:-keep_last] if p != current]
    for p in doomed:
        shutil.rmtree(p)
    return doomed
