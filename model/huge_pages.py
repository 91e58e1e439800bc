"""Weights in transparent huge pages: one 2 MiB page table entry instead of 512 for every 2 MiB of weights.

A decode step at batch 1 streams every weight once, ~0.5 GB for a 130m-size model in fp32, through 4 KiB
pages: ~126k TLB misses and page walks a step (far more pages than the TLB holds). Moved into memory the kernel
backs with huge pages (an anonymous mapping, madvise(MADV_HUGEPAGE), which Linux honours unless its THP
setting is "never"), the same step runs a few percent faster with identical logits (bench/results/README.md,
"Huge pages"). PyTorch's allocator does this for every large allocation only when THP_MEM_ALLOC_ENABLE=1 is in
the environment before its first one; here it is done for the weights alone, at load, and a call can say how
much of them huge pages actually back.

Only contiguous CPU tensors move; a tensor sharing its storage with one of another layout (a view) stays
where it is, so no alias is split. Parameters keep their identity (their `.data` is replaced), so tied
weights stay tied and modules holding a reference see the move.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

HUGE = 2 << 20  # bytes in an x86-64 / arm64 transparent huge page
ALIGN = 64  # bytes: each tensor starts on a cache line
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def available() -> bool:
    """Whether this OS backs madvise'd memory with huge pages: Linux with THP "always" or "madvise"."""
    try:
        mode = THP_SETTING.read_text()
    except OSError:
        return False
    return hasattr(mmap, "MADV_HUGEPAGE") and "[never]" not in mode


def _movable(model: nn.Module) -> list[list[Tensor]]:
    """The model's contiguous CPU weights and saved buffers grouped by storage; a group is one tensor and its
    aliases of the same layout. Storages that hold tensors of several layouts (views) are left out, and so are
    the buffers not saved with the weights (the MoE's routing counts): the decode step writes those, and a
    compiled graph cannot write into a view of a storage that holds other dtypes."""
    groups: dict[int, list[Tensor]] = {}
    saved = [
        b for m in model.modules() for n, b in m.named_buffers(recurse=False) if n not in m._non_persistent_buffers_set
    ]
    for t in [*model.parameters(), *saved]:
        if t.device.type == "cpu" and t.layout == torch.strided and t.numel():
            groups.setdefault(t.untyped_storage().data_ptr(), []).append(t)

    def layout(t: Tensor) -> tuple:
        return t.storage_offset(), t.shape, t.stride(), t.dtype

    return [ts for ts in groups.values() if ts[0].is_contiguous() and len({layout(t) for t in ts}) == 1]


def use_huge_pages(model: nn.Module) -> int:
    """Move `model`'s CPU weights and buffers into one huge-page-backed mapping; returns the bytes moved (0 where
    the OS offers no huge pages, and then nothing moves). Call it before torch.compile, after any step that
    replaces weights (quantizing, packing)."""
    groups = _movable(model)
    if not available() or not groups:
        return 0
    sizes = [-(-ts[0].nbytes // ALIGN) * ALIGN for ts in groups]
    span = -(-sum(sizes) // HUGE) * HUGE  # whole huge pages, and one more to align the start with
    arena = mmap.mmap(-1, span + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    arena.madvise(mmap.MADV_HUGEPAGE)  # before the first touch, so the first fault takes a huge page
    raw = torch.frombuffer(arena, dtype=torch.uint8)  # the tensor keeps the mapping alive
    offset = -raw.data_ptr() % HUGE  # start on a huge-page boundary
    for ts, size in zip(groups, sizes, strict=True):
        first = ts[0]
        moved = raw[offset : offset + first.nbytes].view(first.dtype).view(first.shape)
        moved.copy_(first.detach())
        for t in ts:
            t.data = moved
        offset += size
    return sum(ts[0].nbytes for ts in groups)


def huge_page_bytes(t: Tensor) -> int:
    """How many bytes of the mapping holding `t` huge pages back now (AnonHugePages in /proc/self/smaps); 0
    where it cannot be read."""
    addr = t.data_ptr()
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head = line.split(maxsplit=1)[0]
                if "-" in head and not head.endswith(":"):  # a mapping's header line: start-end perms ...
                    start, end = (int(a, 16) for a in head.split("-"))
                    inside = start <= addr < end
                elif inside and head == "AnonHugePages:":
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
