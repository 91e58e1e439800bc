"""A model built from a checkpoint's tensors one at a time, each straight into its final form: the loader never
holds a second copy of the weights.

The model is laid out on the meta device (shapes and dtypes, no memory), every checkpoint tensor is checked
against it (name and shape), the memory it will take is checked against what the machine has, and then each
parameter is allocated and read from its node (model/weights.py), cast on the way. With a quantizer, a
called Linear's weight is read into a temporary tensor and quantized at once, and a MoE layer's expert
stacks one expert at a time: the full-precision model never exists, so quantizing saves memory at load too.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor, nn

from .config import ModelConfig
from .errors import CheckpointError
from .lm import HybridLM
from .moe import MoE
from .packed import called_linears
from .quantized import Quantizer
from .weights import Node, as_node

GiB = 1 << 30
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


def build_model(
    cfg: ModelConfig,
    sd: dict[str, Node | Tensor],
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    quantizer: Quantizer | None = None,
) -> HybridLM:
    """The model with the weights of `sd` (our names; nodes or tensors), in `dtype` (default: the checkpoint's),
    its Linear layers and experts quantized while loading when a quantizer is given."""
    nodes = {k: as_node(v) for k, v in sd.items()}
    map_large_allocations()
    with torch.device("meta"):
        model = HybridLM(cfg)
    model.cast(dtype or nodes["embeddings.weight"].dtype)
    _check_tensors(model, nodes)
    device = torch.device(device)
    if cfg.tie_embeddings:
        nodes["lm_head.weight"] = nodes["embeddings.weight"]  # quantized as a copy; otherwise tied after
    targets = _targets(model, quantizer)
    check_fits(needed_bytes(model, targets, quantizer), device)
    with torch.no_grad():
        _load_parameters(model, nodes, device, skip=set(targets))
        if quantizer is not None:
            _quantize(model, nodes, quantizer, targets, device)
    if isinstance(model.lm_head, nn.Linear):  # the embedding, unless the head was quantized as a copy
        model.tie_weights()
    for moe in model.moe_layers().values():
        moe.reset_stats()
    return model.eval()


def map_large_allocations(threshold: int = 1 << 20) -> bool:
    """For loading: have glibc give every allocation of `threshold` bytes or more its own mapping, returned to the
    OS when freed. By default the threshold rises with the first large free (up to 32 MiB), after which
    weight-sized blocks come from the heap and stay resident once freed: a temporary of the loader, or a weight
    that moves into huge pages, would then keep its memory. False where the C library is not glibc."""
    return _mallopt(M_MMAP_THRESHOLD, threshold)


def reuse_freed_memory(largest: int = 256 << 20, keep: int = 512 << 20) -> bool:
    """For serving, once the weights are in place: have glibc serve allocations under `largest` bytes from its
    heap and keep up to `keep` bytes of freed heap, so each op of a prefill reuses the memory the ops before it
    freed. Under map_large_allocations' policy every activation of a MiB or more is a fresh mapping, faulted in
    page by page, which takes about a third of a long bf16 prefill. False where the C library is not glibc."""
    return _mallopt(M_MMAP_THRESHOLD, largest) and _mallopt(M_TRIM_THRESHOLD, keep)


def _mallopt(param: int, value: int) -> bool:
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(param, value))
    except (OSError, AttributeError):
        return False


def _check_tensors(model: HybridLM, nodes: dict[str, Node]) -> None:
    """Every tensor the model expects is there with its shape, and nothing else (a tied head may be absent)."""
    expected = {
        k: v for k, v in model.state_dict().items() if not (model.config.tie_embeddings and k == "lm_head.weight")
    }
    missing = sorted(set(expected) - set(nodes))
    unexpected = sorted(set(nodes) - set(expected))
    if missing:
        raise CheckpointError(
            f"missing tensor {missing[0]!r} (expected shape {tuple(expected[missing[0]].shape)})"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
        )
    if unexpected:
        raise CheckpointError(
            f"unexpected tensor {unexpected[0]!r} with shape {tuple(nodes[unexpected[0]].shape)}"
            + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else "")
        )
    for k, v in expected.items():
        if tuple(nodes[k].shape) != tuple(v.shape):
            raise CheckpointError(f"tensor {k!r} has shape {tuple(nodes[k].shape)}, expected {tuple(v.shape)}")


def _targets(model: HybridLM, quantizer: Quantizer | None) -> dict[str, tuple[nn.Module, str]]:
    """{parameter name: (its module, attribute)} of what the quantizer replaces: called Linear weights and
    biases, and MoE expert stacks."""
    if quantizer is None:
        return {}
    path = {id(m): name for name, m in model.named_modules()}
    out = {}
    for parent, attr, child in called_linears(model):
        prefix = f"{path[id(parent)]}.{attr}".lstrip(".")
        out[f"{prefix}.weight"] = (parent, attr)
        if child.bias is not None:
            out[f"{prefix}.bias"] = (parent, attr)
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        for attr in ("gate_proj", "up_proj", "down_proj"):
            if getattr(moe, attr) is not None:
                out[f"{path[id(moe)]}.{attr}"] = (moe, attr)
    return out


def needed_bytes(model: HybridLM, targets: dict, quantizer: Quantizer | None) -> int:
    """The bytes the loaded model will hold: its parameters and buffers in their dtypes, quantized ones as the
    quantizer stores them (a tied head once, or twice when quantized as a copy)."""
    total = 0
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]:
        if name.endswith(".bias") and name in targets:
            total += t.numel() * t.element_size()
        elif name in targets:
            total += quantizer.nbytes(tuple(t.shape), t.dtype)
        elif not (model.config.tie_embeddings and name == "lm_head.weight"):
            total += t.numel() * t.element_size()
    return total


def weight_bytes(model: nn.Module) -> int:
    """The bytes the model's parameters and buffers hold, each storage counted once (ties, views)."""
    storages = {}
    for t in [*model.parameters(), *model.buffers()]:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def available_bytes(device: torch.device) -> int | None:
    """Memory free for the weights: MemAvailable on CPU (Linux), free device memory on CUDA; None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_fits(needed: int, device: torch.device) -> None:
    """Refuse, before anything is allocated, weights that cannot fit in the memory there is."""
    free = available_bytes(device)
    if free is not None and needed > free:
        raise CheckpointError(
            f"the weights need {size(needed)} and {size(free)} of {device.type} memory is available "
            "(a smaller --dtype or --quantize needs less)"
        )


def size(nbytes: int) -> str:
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB // 10 else f"{nbytes / (1 << 20):.1f} MiB"


def _load_parameters(model: HybridLM, nodes: dict[str, Node], device: torch.device, skip: set[str]) -> None:
    """Allocate every parameter and buffer of the meta model on `device` and read it from its node."""
    for prefix, module in model.named_modules():
        for kind in ("_parameters", "_buffers"):
            table = getattr(module, kind)
            for attr, meta in table.items():
                name = f"{prefix}.{attr}".lstrip(".")
                if meta is None or name in skip or (name == "lm_head.weight" and model.config.tie_embeddings):
                    continue
                t = torch.empty(meta.shape, dtype=meta.dtype, device=device)
                if name in nodes:
                    nodes[name].load_into(t)
                else:  # a non-persistent buffer (routing statistics): zeroed
                    t.zero_()
                table[attr] = nn.Parameter(t, requires_grad=meta.requires_grad) if kind == "_parameters" else t


def _quantize(model: HybridLM, nodes: dict[str, Node], q: Quantizer, targets: dict, device: torch.device) -> None:
    dtype = model.embeddings.weight.dtype
    done = set()
    for name, (module, attr) in targets.items():
        if (id(module), attr) in done:
            continue
        done.add((id(module), attr))
        if isinstance(module, MoE):
            wrapped = q.experts(nodes[name], dtype)
            delattr(module, attr)
            setattr(module, attr, wrapped)
            module.linear = q.expert_linear
            continue
        prefix = name.rsplit(".", 1)[0]
        weight = nodes[f"{prefix}.weight"].load().to(device, dtype)
        bias = nodes[f"{prefix}.bias"].load().to(device, dtype) if f"{prefix}.bias" in nodes else None
        setattr(module, attr, q.linear(weight, bias))
