"""Server settings: every option is a command-line flag and an AETHERIS_* environment variable.

Precedence: command line > environment > defaults. `python -m server --help` lists them all.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from aetheris.defaults import DEFAULT_MODEL_DIR, DEFAULT_MODEL_NAME


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AETHERIS_", extra="forbid")

    model: str = Field(str(DEFAULT_MODEL_DIR), description="checkpoint directory or Hugging Face Hub repo id")
    served_model_name: str | None = Field(
        None,
        description="model id in the API (default: aetheris-hybrid "
        "for the embedded model, else the directory or repo name)",
    )
    host: str = Field("0.0.0.0", description="address to listen on")
    port: int = Field(7860, ge=1, le=65535, description="port to listen on")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto, cpu or cuda")
    dtype: str = Field(
        "auto",
        pattern=r"^(auto|float32|bfloat16|float16)$",
        description="weights dtype: auto (checkpoint dtype; bfloat16 on CUDA), float32, bfloat16, float16",
    )
    max_batch_size: int = Field(32, ge=1, description="state slots: the most sequences decoding at once")
    max_model_len: int = Field(
        0,
        ge=0,
        description="most tokens (prompt + max_tokens) a request may use; 0 = the checkpoint's "
        "max_position_embeddings capped at 32768 for models with attention layers, unlimited for pure SSM models",
    )
    kv_cache_mb: float = Field(
        1024,
        ge=0,
        description="memory for attention layers' K/V, MiB, in blocks shared by all slots (0 = a contiguous "
        "--max-model-len cache per slot); unused by pure SSM models",
    )
    max_tokens_limit: int = Field(
        32768, ge=1, description="most max_tokens a request may ask of a model without a context limit (pure SSM)"
    )
    max_prompt_tokens: int = Field(0, ge=0, description="most prompt tokens a request may send (0 = the context)")
    max_queue: int = Field(
        64, ge=0, description="requests allowed to wait for a slot; past it: 503 (0 = no waiting, serve free slots)"
    )
    max_queue_tokens: int = Field(
        262144, ge=0, description="prompt tokens allowed to wait for a slot, over all requests; past it: 503 (0 = any)"
    )
    request_timeout: float = Field(
        0, ge=0, description="seconds a request may run; then it ends with finish_reason 'length' (0 = no deadline)"
    )
    send_timeout: float = Field(
        30, gt=0, description="seconds a stream's client may stop reading before the request is aborted"
    )
    watchdog_s: float = Field(
        60, ge=0, description="/health answers 503 when the engine makes no progress this long while it has work"
    )
    api_key: str | None = Field(None, description="require 'Authorization: Bearer <key>' on the API routes")
    metrics_require_key: bool = Field(False, description="/metrics needs the API key too")
    cache_isolation: bool = Field(
        False,
        description="keep prefix snapshots per tenant (API key and X-Tenant-ID header), so cached_tokens cannot "
        "reveal another tenant's prompt; off: one cache shared by every client",
    )
    cors_origins: list[str] = Field(default_factory=list, description="allowed CORS origins ('*' for any)")
    state_cache_mb: float = Field(256, ge=0, description="memory for prefix state snapshots, MiB (0 = off)")
    snapshot_interval: int = Field(
        256, ge=0, description="prompt tokens between prefix state snapshots during a long prefill (0 = none)"
    )
    state_cache_dir: str | None = Field(
        None, description="directory where system-prompt snapshots persist across restarts (safetensors)"
    )
    prefill_budget: int = Field(512, ge=1, description="prompt tokens prefilled per scheduler iteration")
    default_max_tokens: int = Field(512, ge=1, description="max_tokens for chat requests that set none")
    max_body_mb: float = Field(8, gt=0, description="largest accepted request body, MiB (413 past it)")
    threads: int = Field(0, ge=0, description="torch CPU threads (0 = torch default)")
    pack_weights: bool | None = Field(
        None,
        description="CPU: pack Linear weights in oneDNN's layout at load (off: F.linear through MKL). Unset: our "
        "few-row kernel built for this CPU at load (model/gemv.py) serves decode; where it cannot be built, bf16 "
        "packed where the CPU has bf16 instructions, fp32 packed except on Intel CPUs",
    )
    quantize: str = Field(
        "none",
        pattern=r"^(none|int8|int4)$",
        description="weight-only quantization while loading (CPU): none; int8 (per-row scales, half of bf16's "
        "bytes); int4 (scales per group of 64 inputs, 4.25 bits a weight); activations stay in --dtype",
    )
    huge_pages: bool = Field(
        True,
        description="CPU: move the weights into transparent huge pages at load (Linux, where THP is not 'never'); "
        "fewer TLB misses while a decode step streams them",
    )
    compile: bool = Field(
        True,
        description="torch.compile the decode step and prefill scan at startup, before /health turns 200 (on CPU "
        "only when a C++ compiler is present; otherwise, or if compiling fails, the eager path serves)",
    )
    cuda_graphs: bool = Field(
        True,
        description="on a GPU, replay the decode step as CUDA graphs captured at startup, one per padded batch "
        "size (models without MoE or attention layers; each graph is checked against the plain step first)",
    )
    log_prompts: bool = Field(False, description="log prompt and output text (off: only sizes are logged)")
    log_level: str = Field("info", description="debug, info, warning or error")

    @field_validator("api_key", "served_model_name", "state_cache_dir", mode="before")
    @classmethod
    def _empty_is_unset(cls, v):
        return None if v == "" else v  # docker compose passes unset variables as ""

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        if Path(self.model).resolve() == DEFAULT_MODEL_DIR:
            return DEFAULT_MODEL_NAME
        return Path(self.model.rstrip("/")).name if Path(self.model).is_dir() else self.model


def parse_args(argv: list[str] | None = None) -> Settings:
    """Flags named after the settings (--max-batch-size ...); unset flags fall back to AETHERIS_* / defaults."""
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description="Aetheris OpenAI-compatible server. "
        "Every option can also be set as AETHERIS_<OPTION> in the environment.",
    )
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = f"AETHERIS_{name.upper()}"
        help_text = f"{field.description} (env {env}; default {field.get_default(call_default_factory=True)!r})"
        if field.annotation in (bool, bool | None):
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif name == "cors_origins":
            parser.add_argument(flag, dest=name, nargs="*", default=None, metavar="ORIGIN", help=help_text)
        else:
            parser.add_argument(flag, dest=name, default=None, help=help_text)
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    try:
        return Settings(**args)
    except Exception as e:  # pydantic ValidationError: one line naming the option
        errors = getattr(e, "errors", lambda: [])()
        if errors:
            err = errors[0]
            name = str(err["loc"][0]) if err.get("loc") else "?"
            parser.error(f"--{name.replace('_', '-')}: {err['msg']} (got {err.get('input')!r})")
        parser.error(str(e))
