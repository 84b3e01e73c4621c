"""The backbones as restore functions: their own padding, the official scripts' padding, and one
jitted forward per architecture (shared by every run merged into it)."""

import functools
from collections.abc import Callable
from typing import Any

import jax

from ir_lora import models

Forward = Callable[[Any, jax.Array], jax.Array]


def network_multiple(variant: str, **overrides) -> int:
    """The multiple a backbone zero-pads its input to by itself."""
    model = models.build(variant, **overrides)
    if isinstance(model, models.NAFNet):
        return 2 ** len(model.enc_blk_nums)
    return 8  # Restormer's three 2x downsamplings


def official_reflect_multiple(variant: str) -> int | None:
    """The reflect padding of the official inference script: Restormer's demo.py 8, NAFNet none."""
    return 8 if models.architecture(variant) is models.Restormer else None


@functools.cache
def _architecture_forward(variant: str, overrides: tuple) -> Forward:
    model = models.build(variant, **dict(overrides))
    return jax.jit(lambda params, images: model.apply({"params": params}, images))


def architecture_forward(variant: str, **overrides) -> Forward:
    """The jitted `model.apply({"params": p}, x)` of a backbone; one per architecture."""
    frozen = tuple(
        sorted((k, tuple(v) if isinstance(v, list | tuple) else v) for k, v in overrides.items())
    )
    return _architecture_forward(variant, frozen)
