"""A checkpoint's tensors, read one at a time into their final place: what lets a model load in about its own
size of memory.

Glossary: E experts, S shards.

Reading a whole state dict and then copying it into the model holds every weight twice; a memory-mapped file
adds its pages to the process's resident memory as they are read. Here each tensor is a lazy node: its shape
and dtype come from the file's header, and its bytes are read with plain file reads (through the page cache,
never mapped) only when the loader asks, straight into the destination when the dtypes match. The family
converters (model/families) rename, split and stack nodes as they would tensors, so a stacked expert weight
is read expert by expert into its slot, and a quantizer can take one expert at a time.

The safetensors format (a little-endian u64 header length, a JSON header mapping each name to its dtype,
shape and [begin, end) byte offsets after the header, then the data) is read here directly: the safetensors
library reads through a memory map. `tests/model/test_weights.py` holds this reader equal to it.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch
from torch import Tensor

from .errors import CheckpointError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class Node:
    """A tensor not read yet: `shape`, `dtype`, `load()` (a new tensor), `load_into(out)` (cast as it copies),
    and `[i]` (the node of index i along the first dimension)."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def load(self) -> Tensor:
        out = torch.empty(self.shape, dtype=self.dtype)
        self.load_into(out)
        return out

    def load_into(self, out: Tensor) -> None:
        raise NotImplementedError

    def __getitem__(self, i: int) -> Node:
        raise NotImplementedError

    def chunk(self, n: int, dim: int = 0) -> list[Node]:
        """Like Tensor.chunk for n equal parts (what the families split fused weights with)."""
        dim %= len(self.shape)
        if self.shape[dim] % n:
            raise CheckpointError(f"a tensor of shape {self.shape} does not split in {n} along dimension {dim}")
        return [Chunk(self, n, i, dim) for i in range(n)]


class FileTensor(Node):
    """A contiguous tensor at a byte range of a safetensors file."""

    def __init__(self, path: Path, start: int, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        self.path, self.start, self.dtype, self.shape = path, start, dtype, shape
        self.nbytes = math.prod(shape) * dtype.itemsize

    def load_into(self, out: Tensor) -> None:
        if tuple(out.shape) != self.shape:
            raise CheckpointError(f"{self.path}: a tensor of shape {self.shape} read into {tuple(out.shape)}")
        if out.dtype == self.dtype and out.is_contiguous() and out.device.type == "cpu":
            return self._read(out.reshape(-1).view(torch.uint8))  # straight into its place
        raw = torch.empty(self.nbytes, dtype=torch.uint8)
        self._read(raw)
        out.copy_(raw.view(self.dtype).view(self.shape))  # cast / moved to out's device

    def _read(self, dest: Tensor) -> None:
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.start)
            view, done = memoryview(dest.numpy()), 0
            while done < self.nbytes:
                got = f.readinto(view[done:])
                if not got:
                    raise CheckpointError(f"{self.path}: the file ends inside a tensor (truncated?)")
                done += got

    def __getitem__(self, i: int) -> FileTensor:
        row = self.nbytes // self.shape[0]
        return FileTensor(self.path, self.start + i * row, self.dtype, self.shape[1:])


class Chunk(Node):
    """Part `index` of `n` equal parts of `parent` along `dim`."""

    def __init__(self, parent: Node, n: int, index: int, dim: int) -> None:
        self.parent, self.n, self.index, self.dim = parent, n, index, dim
        self.dtype = parent.dtype
        self.shape = tuple(s // n if d == dim else s for d, s in enumerate(parent.shape))

    def load_into(self, out: Tensor) -> None:
        out.copy_(self.parent.load().chunk(self.n, self.dim)[self.index])

    def __getitem__(self, i: int) -> Node:
        if self.dim == 0:
            return self.parent[self.index * self.shape[0] + i]
        return Chunk(self.parent[i], self.n, self.index, self.dim - 1)


class Stack(Node):
    """Nodes of one shape stacked along a new first dimension (per-expert weights into (E, ...))."""

    def __init__(self, items: list[Node]) -> None:
        shapes = {tuple(n.shape) for n in items}
        if len(shapes) != 1:
            raise CheckpointError(f"experts of different shapes cannot be stacked: {sorted(shapes)}")
        self.items, self.dtype, self.shape = items, items[0].dtype, (len(items), *items[0].shape)

    def load_into(self, out: Tensor) -> None:
        for e, item in enumerate(self.items):
            item.load_into(out[e])

    def __getitem__(self, i: int) -> Node:
        return self.items[i]


class InMemory(Node):
    """A tensor already in memory (a state dict passed in by training or a test), as a node."""

    def __init__(self, t: Tensor) -> None:
        self.t, self.shape, self.dtype = t, tuple(t.shape), t.dtype

    def load(self) -> Tensor:
        return self.t

    def load_into(self, out: Tensor) -> None:
        out.copy_(self.t)

    def __getitem__(self, i: int) -> InMemory:
        return InMemory(self.t[i])


def stack(items: list) -> Node | Tensor:
    """torch.stack for tensors, a Stack node for nodes."""
    return Stack(items) if isinstance(items[0], Node) else torch.stack(items)


def as_node(value: Node | Tensor) -> Node:
    return value if isinstance(value, Node) else InMemory(value)


def read_header(path: Path) -> dict[str, FileTensor]:
    """name -> FileTensor for every tensor of one safetensors file; a malformed file is a CheckpointError."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"a header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            node = FileTensor(path, 8 + n + begin, DTYPES[info["dtype"]], tuple(info["shape"]))
            if end - begin != node.nbytes or 8 + n + end > size:
                raise ValueError(f"tensor {name!r}: offsets {begin}..{end} do not hold its {node.nbytes} bytes")
            out[name] = node
        return out
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
