"""Settings -> a serving model: load the checkpoint, make it fast (model/prepare.py), size the state pool and
the K/V cache, and start the engine. Runs in a worker thread while the server already answers /health."""

from __future__ import annotations

import logging

import torch

from model.build import GiB, weight_bytes
from model.checkpoint import load_model
from model.int4 import why_not as int4_why_not
from model.prepare import QUANTIZERS, Speedups, configure_cpu_for_serving, prepare_for_inference

from .api.serving import Serving
from .engine.async_engine import Engine
from .engine.core import CoreConfig
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger("aetheris.api")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_CONTEXT_CAP = 32768  # tokens: the default context of a model with attention layers, at most


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when it works, else the CPU. An explicit cuda that does not work is an error naming the
    cause (no driver, a driver too old for this torch's CUDA, a CPU build of torch); cuda:N becomes the
    current device, so that everything the engine allocates or captures without an index lands on it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {name}: CUDA is not available here ({_cuda_failure()})")
        if device.index is not None:
            if device.index >= torch.cuda.device_count():
                raise RuntimeError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
            torch.cuda.set_device(device)
    return device


def _cuda_failure() -> str:
    """Why CUDA did not start, in one line: torch's own reason when it gives one."""
    if torch.version.cuda is None:
        return "this torch is a CPU build"
    try:
        torch.cuda.init()
    except Exception as e:  # e.g. "Found no NVIDIA driver on your system" / "The NVIDIA driver ... is too old"
        return str(e).strip().splitlines()[0]
    return "no CUDA device is visible (for Docker: --gpus all)"


def speedups(settings: Settings) -> Speedups:
    return Speedups(
        quantize=None if settings.quantize == "none" else settings.quantize,
        pack=settings.pack_weights,
        huge_pages=settings.huge_pages,
        compile=settings.compile,
    )


def context_limit(requested: int, model) -> int:
    """The context limit in tokens, 0 = unlimited. Only attention layers grow with the length, so a pure SSM
    model has no limit unless one is asked for; a hybrid defaults to its checkpoint's context, capped."""
    if requested or not model.config.attention_layers:
        return requested
    return min(model.config.max_position_embeddings or DEFAULT_CONTEXT_CAP, DEFAULT_CONTEXT_CAP)


def core_config(settings: Settings, model) -> CoreConfig:
    block = CoreConfig.kv_block_size
    block_bytes = model.empty_state(1, "meta").bytes_per_sequence(block)["growing"]
    kv_blocks = int(settings.kv_cache_mb * (1 << 20)) // block_bytes if block_bytes else 0
    if settings.kv_cache_mb and block_bytes and kv_blocks == 0:
        raise ValueError(f"--kv-cache-mb {settings.kv_cache_mb:g} holds no block of {block} tokens")
    return CoreConfig(
        max_batch_size=settings.max_batch_size,
        prefill_budget=settings.prefill_budget,
        state_cache_bytes=int(settings.state_cache_mb * (1 << 20)),
        max_model_len=context_limit(settings.max_model_len, model),
        kv_blocks=kv_blocks,
        kv_block_size=block,
        snapshot_interval=settings.snapshot_interval,
        state_cache_dir=settings.state_cache_dir,
        model_id=settings.model_name,
        cuda_graphs=settings.cuda_graphs,
    )


def _check_quantize(name: str, device: torch.device, dtype: torch.dtype | None) -> None:
    """Refuse, in one line, a quantization this device or dtype cannot serve (dtype None: not known yet)."""
    if name == "int8" and device.type == "cuda":
        raise ValueError("--quantize int8 is CPU-only: on CUDA its kernel decodes slower than bf16, the default there")
    if name == "int4" and (why := int4_why_not(device, dtype)):
        raise ValueError(f"--quantize int4 cannot serve here: {why}")


def _peak() -> str:
    """The process's peak resident memory (VmHWM), where Linux reports it."""
    try:
        with open("/proc/self/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        return f"{kib * 1024 / GiB:.2f} GiB"
    except (OSError, StopIteration, ValueError):
        return "unknown"


def _log_state_layout(model, cfg: CoreConfig, metrics: Metrics) -> None:
    per_slot = model.empty_state(1, "meta").bytes_per_sequence(cfg.max_model_len)
    metrics.observe_layout(per_slot["fixed"], per_slot["growing"], cfg.max_model_len, cfg.kv_blocks)
    if not per_slot["growing"]:
        log.info("state per slot: %.2f MiB, whatever the length (no attention layers)", per_slot["fixed"] / 2**20)
        return
    kv = (
        f"K/V paged in {cfg.kv_blocks} blocks of {cfg.kv_block_size} tokens "
        f"({cfg.kv_blocks * cfg.kv_block_size} tokens over all slots)"
        if cfg.kv_blocks
        else f"a contiguous K/V cache of {per_slot['growing'] / 2**20:.2f} MiB per slot"
    )
    log.info(
        "state per slot: %.2f MiB SSM (fixed) + up to %.2f MiB K/V at the %d-token context; %s",
        per_slot["fixed"] / 2**20,
        per_slot["growing"] / 2**20,
        cfg.max_model_len,
        kv,
    )


def build_serving(settings: Settings, metrics: Metrics) -> Serving:
    """Load the model and start the engine."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = resolve_device(settings.device)
    dtype = DTYPES.get(settings.dtype)
    if dtype is None and device.type == "cuda":
        dtype = torch.bfloat16
    _check_quantize(settings.quantize, device, dtype)
    quantizer = QUANTIZERS.get(settings.quantize)  # quantized while loading: the full-precision model never exists
    model, tokenizer = load_model(settings.model, device, dtype, quantizer)
    _check_quantize(settings.quantize, device, model.embeddings.weight.dtype)  # the checkpoint's, for --dtype auto
    if tokenizer is None:
        raise RuntimeError(f"{settings.model}: the checkpoint has no tokenizer.json, which serving needs")
    total, active = model.num_parameters()
    prepared = prepare_for_inference(model, speedups(settings))
    if device.type == "cpu":
        configure_cpu_for_serving()  # before the engine's thread starts, which inherits it
    for line in prepared.notes:
        log.info("%s", line)
    for line in prepared.warnings:
        log.warning("%s", line)
    metrics.compiled.set(int(prepared.compiled))
    log.info("weights: %.2f GiB in memory; peak memory of the process so far: %s", weight_bytes(model) / GiB, _peak())
    cfg = core_config(settings, model)
    engine = Engine(
        model,
        tokenizer,
        cfg,
        max_queue=settings.max_queue,
        metrics=metrics,
        max_queue_tokens=settings.max_queue_tokens,
        send_timeout=settings.send_timeout,
    ).start()
    _log_state_layout(model, cfg, metrics)
    log.info(
        "serving %s as '%s' on %s (%s): %.1fM parameters, %.1fM active",
        settings.model,
        settings.model_name,
        device,
        model.embeddings.weight.dtype,
        total / 1e6,
        active / 1e6,
    )
    return Serving(settings, engine, tokenizer)
