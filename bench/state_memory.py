"""Per-slot state memory of a Jamba-shaped model, computed from its config (no weights are loaded).

    python -m bench.state_memory

The shape is transformers' JambaConfig defaults (Jamba-v0.1: hidden 4096, 32 layers of which 4 are attention,
8 K/V heads of 128 dims, Mamba d_state 16, expand 2), in bf16. A pure transformer of the same width keeps K/V in
all 32 layers. Prints a Markdown table.
"""

from __future__ import annotations

import torch

from model.families.jamba import config as jamba_config
from model.lm import HybridLM
from model.state import ModelState


def per_slot_bytes(tokens: int) -> tuple[dict[str, int], int]:
    """(our hybrid's {'fixed', 'growing'} bytes, a same-width transformer's K/V bytes) for `tokens` tokens."""
    from transformers import JambaConfig  # the reference config; transformers is a bench dependency

    cfg = jamba_config(JambaConfig().to_dict(), None)
    with torch.device("meta"):
        specs = HybridLM(cfg).state_specs()
    state = ModelState.zeros(specs, 1, "meta", torch.bfloat16)
    hd = cfg.attn_head_dim
    transformer = cfg.n_layers * 2 * cfg.n_kv_heads * hd * 2 * tokens  # K and V, bf16
    return state.bytes_per_sequence(tokens), transformer


def main() -> None:
    mib = 2**20
    print("| context | Mamba state (fixed) | K/V, 4 attention layers | hybrid total | transformer K/V, 32 layers |")
    print("|---:|---:|---:|---:|---:|")
    for tokens in (4096, 32768):
        ours, transformer = per_slot_bytes(tokens)
        total = ours["fixed"] + ours["growing"]
        print(
            f"| {tokens:,} | {ours['fixed'] / mib:.1f} MiB | {ours['growing'] / mib:.0f} MiB | {total / mib:.0f} MiB "
            f"| {transformer / mib:.0f} MiB |"
        )


if __name__ == "__main__":
    main()
