"""The PyTorch side of `compare_torch.py`: the official models with flax weights, and LoRA as
PyTorch users run it.

Two LoRA forms, each loaded with the same factors as the flax adapters (`alpha = r`, scale 1):

* `PeftConv2d`: the forward of peft's LoRA `Conv2d` (`peft/tuners/lora/layer.py`, `_ConvNd`,
  vanilla LoRA, `lora_dropout=0` so the dropout is `nn.Identity`): the frozen layer, plus
  `lora_B(lora_A(x)) * scaling` with `lora_A` a `Cin -> r` conv of the base layer's kernel size,
  stride and padding and `lora_B` a 1x1 `r -> Cout` conv. peft refuses grouped convs unless the
  rank divides the groups, so it cannot adapt the depthwise convs.
* `MergedLoRAConv2d`: loralib's `ConvLoRA` forward: the frozen conv run once with
  `W0 + (B @ A).view(W0.shape) * scaling`, on any conv (depthwise included). The factors have
  the LoCon shapes of `ir_lora.peft.lora` (`A (r, Cin/g*kh*kw)`, `B (Cout, r)`), i.e. loralib's
  form at the same rank.

Requires torch; import from the benchmarks or after `pytest.importorskip("torch")`.
"""

import numpy as np
import torch
from flax import traverse_util
from torch import nn

from ir_lora.models import ARCHITECTURES, VARIANTS, to_torch, torch_io
from ir_lora.peft import lora
from tests import torch_reference

FORMS = ("peft", "merged")


def _down_oihw(down: np.ndarray, base: nn.Conv2d) -> np.ndarray:
    """flax `A` `(kh*kw*Cin/g, r)` (rows in (kh, kw, Cin/g) order) as `(r, Cin/g, kh, kw)`."""
    kh, kw = base.kernel_size
    hwio = np.asarray(down).reshape(kh, kw, base.in_channels // base.groups, -1)
    return np.ascontiguousarray(hwio.transpose(3, 2, 0, 1))


class PeftConv2d(nn.Module):
    """peft's LoRA `Conv2d` forward around a frozen `base_layer` (module doc)."""

    def __init__(self, base_layer: nn.Conv2d, down: np.ndarray, up: np.ndarray, scaling: float):
        super().__init__()
        rank = down.shape[-1]
        if base_layer.groups > 1 and rank % base_layer.groups:
            raise ValueError(
                f"peft cannot adapt a conv with groups={base_layer.groups} at rank {rank}"
            )
        self.base_layer = base_layer
        self.lora_dropout = nn.Identity()
        self.lora_A = nn.Conv2d(
            base_layer.in_channels,
            rank,
            base_layer.kernel_size,
            base_layer.stride,
            base_layer.padding,
            bias=False,
        )
        self.lora_B = nn.Conv2d(
            rank, base_layer.out_channels, (1, 1), (1, 1), groups=base_layer.groups, bias=False
        )
        self.scaling = scaling
        with torch.no_grad():
            self.lora_A.weight.copy_(torch.from_numpy(_down_oihw(down, base_layer)))
            self.lora_B.weight.copy_(torch.from_numpy(np.ascontiguousarray(up.T[:, :, None, None])))

    def forward(self, x):
        result = self.base_layer(x)
        return result + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling


class MergedLoRAConv2d(nn.Module):
    """loralib's `ConvLoRA` forward: the frozen conv with the merged kernel (module doc)."""

    def __init__(self, conv: nn.Conv2d, down: np.ndarray, up: np.ndarray, scaling: float):
        super().__init__()
        self.conv = conv
        rank = down.shape[-1]
        a = _down_oihw(down, conv).reshape(rank, -1)
        self.lora_A = nn.Parameter(torch.from_numpy(np.ascontiguousarray(a)))
        self.lora_B = nn.Parameter(torch.from_numpy(np.ascontiguousarray(np.asarray(up).T)))
        self.scaling = scaling

    def forward(self, x):
        delta = (self.lora_B @ self.lora_A).view(self.conv.weight.shape) * self.scaling
        return self.conv._conv_forward(x, self.conv.weight + delta, self.conv.bias)


def official_net(variant: str, params, **overrides) -> nn.Module:
    """The official PyTorch model of `variant` (`tests/torch_reference.py`) holding `params`."""
    kwargs = {**VARIANTS[variant], **overrides}
    kwargs.pop("pad_mode", None)  # flax-only: the official network takes padded input
    if variant.startswith("nafnet"):
        net = torch_reference.NAFNet(**kwargs)
    else:
        kwargs["bias"] = kwargs.pop("use_bias")
        kwargs["LayerNorm_type"] = kwargs.pop("layer_norm_type")
        net = torch_reference.Restormer(**kwargs)
    state = to_torch(variant, params, **overrides)
    net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    return net


def attach(net: nn.Module, variant: str, factors, form: str, scale: float = 1.0) -> list[str]:
    """Wraps every conv of `net` that has flax LoRA `factors` in the LoRA `form`.

    Returns the wrapped module names. Raises ValueError for a layer the form cannot adapt.
    """
    if form not in FORMS:
        raise ValueError(f"Unknown PyTorch LoRA form {form!r}; valid: {FORMS}")
    key_rules = ARCHITECTURES[variant.split("-")[0]][1]
    flat = traverse_util.flatten_dict(factors)
    wrapped = []
    for path in lora.ranks(factors):
        names = tuple(path.split("/"))
        key = torch_io.torch_key((*names, "kernel"), key_rules).removesuffix(".weight")
        parent_name, _, child = key.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        base = getattr(parent, child)
        down = np.asarray(flat[(*names, lora.DOWN)])
        up = np.asarray(flat[(*names, lora.UP)])
        cls = PeftConv2d if form == "peft" else MergedLoRAConv2d
        setattr(parent, child, cls(base, down, up, scale))
        wrapped.append(key)
    return wrapped


def set_trainable(net: nn.Module, variant: str, trainable_params) -> None:
    """Trains the parameters of `net` that flax `trainable_params` (the `"params"` part of a
    trainable tree, or None) holds and freezes the rest. Call it before `attach`: the wrapped
    layers keep these parameters, and the LoRA factors that `attach` adds train."""
    key_rules = ARCHITECTURES[variant.split("-")[0]][1]
    keys = {
        torch_io.torch_key(path, key_rules)
        for path in traverse_util.flatten_dict(trainable_params or {})
    }
    names = dict(net.named_parameters())
    missing = sorted(keys - set(names))
    if missing:
        raise ValueError(f"Trainable flax parameters without a PyTorch parameter: {missing}")
    for name, p in names.items():
        p.requires_grad_(name in keys)
