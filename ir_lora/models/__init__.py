"""Image-restoration backbones (NAFNet, Restormer), named variants and PyTorch checkpoint import.

    model = models.build("nafnet-sidd-w32")
    params = models.from_torch("nafnet-sidd-w32", "NAFNet-SIDD-width32.pth")
    restored = model.apply({"params": params}, noisy)  # (N, H, W, 3) in [0, 1]

`VARIANTS` maps each name to the constructor arguments of its architecture (the name's prefix before
the first "-": `nafnet` or `restormer`). The official configurations reproduce the parameter counts
of the released PyTorch models exactly.
"""

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from ir_lora.models import torch_io
from ir_lora.models.nafnet import NAFBlock, NAFNet, NAFStage
from ir_lora.models.restormer import Restormer, TransformerBlock, TransformerStage

__all__ = [
    "ARCHITECTURES",
    "VARIANTS",
    "NAFBlock",
    "NAFNet",
    "NAFStage",
    "Restormer",
    "TransformerBlock",
    "TransformerStage",
    "architecture",
    "build",
    "from_torch",
    "param_shapes",
    "to_torch",
]

ARCHITECTURES: dict[str, tuple[type[nn.Module], tuple]] = {
    "nafnet": (NAFNet, torch_io.NAFNET_KEY_RULES),
    "restormer": (Restormer, torch_io.RESTORMER_KEY_RULES),
}

_NAFNET_SIDD = dict(middle_blk_num=12, enc_blk_nums=(2, 2, 4, 8), dec_blk_nums=(2, 2, 2, 2))
_NAFNET_GOPRO = dict(middle_blk_num=1, enc_blk_nums=(1, 1, 1, 28), dec_blk_nums=(1, 1, 1, 1))
_RESTORMER = dict(
    inp_channels=3,
    out_channels=3,
    dim=48,
    num_blocks=(4, 6, 6, 8),
    num_refinement_blocks=4,
    heads=(1, 2, 4, 8),
    ffn_expansion_factor=2.66,
    use_bias=False,
    layer_norm_type="WithBias",
)

VARIANTS: dict[str, dict[str, Any]] = {
    # NAFNet releases (megvii-research/NAFNet options/test/{SIDD,GoPro}/NAFNet-width{32,64}.yml).
    "nafnet-sidd-w32": dict(img_channel=3, width=32, **_NAFNET_SIDD),
    "nafnet-sidd-w64": dict(img_channel=3, width=64, **_NAFNET_SIDD),
    "nafnet-gopro-w32": dict(img_channel=3, width=32, **_NAFNET_GOPRO),
    "nafnet-gopro-w64": dict(img_channel=3, width=64, **_NAFNET_GOPRO),
    # Restormer defaults: the deraining, motion and single-image defocus deblurring releases.
    "restormer": _RESTORMER,
    # The real-image and blind Gaussian colour denoising releases use the bias-free LayerNorm
    # (swz30/Restormer demo.py).
    "restormer-real-denoise": {**_RESTORMER, "layer_norm_type": "BiasFree"},
    # Tiny configurations for tests.
    "nafnet-tiny": dict(
        img_channel=3, width=8, middle_blk_num=1, enc_blk_nums=(1, 1), dec_blk_nums=(1, 1)
    ),
    "restormer-tiny": {
        **_RESTORMER,
        "dim": 8,
        "num_blocks": (1, 1, 1, 1),
        "num_refinement_blocks": 1,
        "heads": (1, 1, 1, 1),
    },
}


def _lookup(variant: str) -> tuple[type[nn.Module], tuple, dict[str, Any]]:
    if variant not in VARIANTS:
        raise ValueError(f"Unknown variant {variant!r}; valid variants: {sorted(VARIANTS)}")
    module_cls, key_rules = ARCHITECTURES[variant.split("-")[0]]
    return module_cls, key_rules, VARIANTS[variant]


def architecture(variant: str) -> type[nn.Module]:
    """The module class of `variant` (`NAFNet` or `Restormer`)."""
    return _lookup(variant)[0]


def build(variant: str, **overrides) -> nn.Module:
    """The (unbound) module of `variant`, with constructor fields replaced by `overrides`.

    Raises:
      ValueError: the variant is unknown (the message lists the valid ones) or an override is not a
        field of the architecture (the message names it).
    """
    module_cls, _, kwargs = _lookup(variant)
    fields = {f.name for f in dataclasses.fields(module_cls) if f.init} - {"parent", "name"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"Unknown override(s) {unknown} for {variant!r} ({module_cls.__name__}); "
            f"valid fields: {sorted(fields)}"
        )
    merged = {**kwargs, **overrides}
    merged = {k: tuple(v) if isinstance(v, list) else v for k, v in merged.items()}
    if isinstance(merged.get("dtype"), str):  # from a config or the command line: "bfloat16"
        merged["dtype"] = _dtype(merged["dtype"], variant)
    return module_cls(**merged)


def _dtype(name: str, variant: str):
    try:
        dtype = jnp.dtype(name)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"Override dtype={name!r} for {variant!r} is not a floating-point dtype; "
            "use e.g. 'float32' or 'bfloat16'"
        )
    return dtype


def _input_channels(model: nn.Module) -> int:
    return model.img_channel if isinstance(model, NAFNet) else model.inp_channels


def param_shapes(variant: str, **overrides) -> dict:
    """The params tree of `variant` as `jax.ShapeDtypeStruct`s (nothing is allocated)."""
    model = build(variant, **overrides)
    images = jax.ShapeDtypeStruct((1, 16, 16, _input_channels(model)), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    return variables["params"]


def from_torch(
    variant: str,
    state_dict_or_path: Mapping[str, Any] | str | os.PathLike,
    *,
    key: str | None = None,
    **overrides,
) -> dict:
    """Flax params of `variant` from an official PyTorch checkpoint.

    Args:
      variant: a name in `VARIANTS`.
      state_dict_or_path: a state_dict (numpy arrays or torch tensors) or a `.pth` path, read
        without PyTorch (`torch_io.load_state_dict`; BasicSR's "params" entry by default).
      key: for a path, the checkpoint entry holding the state_dict (e.g. "params_ema").
      **overrides: constructor fields replacing the variant's.

    Returns:
      The "params" pytree for `build(variant, **overrides).apply({"params": params}, images)`.

    Raises:
      ValueError: naming the missing, unexpected and wrong-shape state_dict entries.
    """
    _, key_rules, _ = _lookup(variant)
    if isinstance(state_dict_or_path, str | os.PathLike):
        state_dict = torch_io.load_state_dict(state_dict_or_path, key=key)
    else:
        state_dict = state_dict_or_path
    shapes = param_shapes(variant, **overrides)
    return torch_io.state_dict_to_params(state_dict, shapes, key_rules)


def to_torch(variant: str, params, **overrides) -> dict:
    """The PyTorch state_dict (key -> numpy array) of flax `params` of `variant`; inverse of
    `from_torch` (load it with `torch.nn.Module.load_state_dict` after `torch.from_numpy`)."""
    _, key_rules, _ = _lookup(variant)
    return torch_io.params_to_state_dict(params, param_shapes(variant, **overrides), key_rules)
