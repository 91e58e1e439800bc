"""The mixer registry: the sequence-mixing layer each `LayerSpec.mixer` name builds.

Every mixer has one set of weights and three ways to run it, all on the per-sequence state it declares:
    state_spec() -> {name: StateSpec}    what one sequence keeps between calls (state.py);
    forward(u (B, L, D), state) -> (y (B, L, D), new state)
                                         a chunk after the tokens `state` holds (training: a fresh state);
                                         never modifies `state`;
    step(u (B, D), state) -> y (B, D)    one token per sequence, updating `state`'s tensors in place.
Optional class attributes: FP32_PARAMS (parameters kept fp32 whatever the model dtype), RESIDUAL_OUT (the output
projection whose init is scaled with depth), COMPILE_STEP (its step joins the torch.compile'd decode graph).

Adding a mixer: its module file, a line here, and its options in config.py.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .attention import Attention
from .config import ModelConfig
from .mamba import MambaMixer
from .mamba2 import Mamba2Mixer

# name -> a constructor taking the ModelConfig
MIXERS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "mamba": MambaMixer,
    "mamba2": Mamba2Mixer.from_config,
    "attention": Attention,
}


def build_mixer(name: str, cfg: ModelConfig) -> nn.Module:
    return MIXERS[name](cfg)
