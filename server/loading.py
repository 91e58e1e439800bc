"""Loading the model into a running engine, and the app lifespan that does it in the background.

The server listens before the model is ready: /health answers 503 ("loading") until `ModelHolder.serving`
is set, and 200 after; the API routes answer 503 meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable

import torch
from fastapi import FastAPI

from model import gemv
from model.checkpoint import load_model
from model.huge_pages import huge_page_bytes, use_huge_pages
from model.packed import can_pack, pack_linears, packing_pays_here
from model.quantized import quantize_int8

from .core import CoreConfig
from .engine import Engine
from .metrics import Metrics
from .serving import Serving
from .settings import Settings

log = logging.getLogger("aetheris.api")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available")
    return torch.device(name)


def missing_compiler(device: torch.device) -> str | None:
    """Why torch.compile cannot run here, or None. On CPU inductor builds C++ kernels, so it needs a C++
    compiler ($CXX, g++ or c++); on CUDA it builds Triton kernels, which brings its own."""
    if device.type != "cpu":
        return None
    names = [os.environ.get("CXX") or "g++", "c++"]
    return None if any(shutil.which(n) for n in names) else f"no C++ compiler ({' / '.join(names)}) on PATH"


def _speed_up(model, settings: Settings, metrics: Metrics) -> None:
    """Quantize, or route the projections through the few-row kernel (the default on CPU) or oneDNN packing, move
    the weights into huge pages, and compile, as the settings ask. Compiling, the kernel and huge pages are the
    default where they can work; where they cannot, or fail, the paths before them serve."""
    if settings.quantize == "int8":
        log.info("quantized %d Linear layers and the MoE experts to int8", quantize_int8(model))
    elif settings.pack_weights is None and gemv.can_use(model) and (n := gemv.use_gemv(model)):
        log.info("few-row kernel (bf16: %s) serves %d Linear layers and the MoE experts", gemv.bf16_kernel(), n)
    elif can_pack(model):
        pack = settings.pack_weights
        if pack is None:
            pack = packing_pays_here(model.embeddings.weight.dtype)
        if pack:
            log.info("packed %d Linear layers for oneDNN", pack_linears(model))
        else:
            why = "--no-pack-weights" if settings.pack_weights is False else "MKL's fp32 GEMV is faster on Intel CPUs"
            log.info("Linear layers left to F.linear (%s)", why)
    if settings.huge_pages and (moved := use_huge_pages(model)):  # CPU weights only: 0 on a GPU
        backed = huge_page_bytes(model.embeddings.weight)
        log.info("weights in transparent huge pages: %d MiB moved, %d MiB backed", moved >> 20, backed >> 20)
    compiled = False
    if settings.compile and (why := missing_compiler(model.embeddings.weight.device)):
        log.warning("not compiling: %s; serving the eager path (install g++, or pass --no-compile)", why)
    elif settings.compile:
        t0 = time.perf_counter()
        try:
            model.compile_inference()  # warms up too: /health turns 200 only after this
            compiled = True
            log.info("compiled the decode step and the prefill scan in %.1f s", time.perf_counter() - t0)
        except Exception as e:  # an optimisation: serve eagerly rather than not at all
            log.warning("torch.compile failed (%s: %s); decoding eagerly", type(e).__name__, str(e)[:300])
    metrics.compiled.set(int(compiled))


DEFAULT_CONTEXT_CAP = 32768  # tokens: the default context of a model with attention layers, at most


def context_limit(requested: int, model) -> int:
    """The context limit in tokens, 0 = unlimited. Only attention layers grow with the length, so a pure SSM
    model has no limit unless one is asked for; a hybrid defaults to its checkpoint's context, capped."""
    if requested or not model.config.attention_layers:
        return requested
    return min(model.config.max_position_embeddings or DEFAULT_CONTEXT_CAP, DEFAULT_CONTEXT_CAP)


def core_config(settings: Settings, model) -> CoreConfig:
    max_len = context_limit(settings.max_model_len, model)
    block = CoreConfig.kv_block_size
    block_bytes = model.empty_state(1, "meta").bytes_per_sequence(block)["growing"]
    kv_blocks = int(settings.kv_cache_mb * (1 << 20)) // block_bytes if block_bytes else 0
    if settings.kv_cache_mb and block_bytes and kv_blocks == 0:
        raise ValueError(f"--kv-cache-mb {settings.kv_cache_mb:g} holds no block of {block} tokens")
    cache_bytes = int(settings.state_cache_mb * (1 << 20))
    return CoreConfig(
        settings.max_batch_size,
        settings.prefill_budget,
        cache_bytes,
        max_len,
        kv_blocks,
        block,
        settings.snapshot_interval,
        settings.state_cache_dir,
        settings.model_name,
        settings.cuda_graphs,
    )


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
    """Load the model and start the engine (runs in a worker thread)."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = resolve_device(settings.device)
    dtype = DTYPES.get(settings.dtype)
    if dtype is None and device.type == "cuda":
        dtype = torch.bfloat16
    model, tokenizer = load_model(settings.model, device, dtype)
    if tokenizer is None:
        raise RuntimeError(f"{settings.model}: the checkpoint has no tokenizer.json, which serving needs")
    total, active = model.num_parameters()  # before packing, which moves weights out of the parameters
    _speed_up(model, settings, metrics)
    cfg = core_config(settings, model)
    engine = Engine(
        model, tokenizer, cfg, settings.max_queue, metrics, settings.max_queue_tokens, settings.send_timeout
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


class ModelHolder:
    """The app's one loaded model: None while loading, or the error that stopped it loading."""

    def __init__(self, settings: Settings, serving: Serving | None = None) -> None:
        self.settings = settings
        self.serving = serving
        self.error: str | None = None
        self.metrics = serving.engine.metrics if serving is not None and serving.engine.metrics else Metrics()
        # Called when loading fails; `python -m server` stops the server with it, so the process exits
        # non-zero and `docker run` or an orchestrator shows the cause, instead of a server answering 503.
        self.on_failure: Callable[[], None] | None = None

    def load(self) -> None:
        try:
            self.serving = build_serving(self.settings, self.metrics)
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            log.error("could not load the model %s: %s", self.settings.model, self.error)
            log.debug("the loader's traceback:", exc_info=True)
            if self.on_failure is not None:
                self.on_failure()


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start loading when the server starts (the loader runs beside the event loop); stop the engine at exit."""
    holder: ModelHolder = app.state.holder
    if holder.serving is None:
        threading.Thread(target=holder.load, name="aetheris-load", daemon=True).start()
    yield
    if holder.serving is not None:
        await asyncio.to_thread(holder.serving.engine.shutdown)
