"""AdaptIR: the heterogeneous mixture-of-experts adapter placed beside a block's feed-forward path.

Guo et al., "AdaptIR: Parameter Efficient Adaptation for Image Restoration with Heterogeneous
Mixture-of-Experts" (code: csguoh/AdaptIR, `class AdaptIR` in `net/ipt.py`). The adapter reads the
block's pre-FFN normalised features and its output is *added* to the FFN output:
`x = x + FFN(LN2(x)) + AdaptIR(LN2(x))`. In NHWC, with `d` the block width and `h` the hidden width:

    z      = norm(conv1x1_{d->h}(x))
    local  = depthwise3x3(z, reshape(A_{h x R} @ B_{R x 9}))            # LIM: low-rank local conv
    F      = rfft2(z, ortho);  F' = (a_m |F| + b_m) exp(i (a_p angle(F) + b_p))
    glob   = |irfft2(F', ortho)|                                         # FAM: frequency affine
    p      = softmax_HW(conv1x1_{h->1}(z));  c = MLP_{h->h/2->h}(sum_HW p z)   # channel branch
    g_c    = sigmoid(conv_{m->h}(gelu(conv_{h->m}(mean_HW glob))))     # last conv zero-init
    g_s    = sigmoid(conv1x1_{h->1}(local))                              # zero-init
    out    = conv1x1_{h->d, no bias, zero-init}(c * (g_c * local + g_s * glob))

`m = max(1, h // reduction)` (the official sizes have h >= reduction). The tail is
zero-initialised, so the adapter returns exactly 0 at init and the frozen backbone is unchanged
at step 0. The released IPT adapter uses d=576, h=d//24=24, R=h//2=12,
reduction 8 (m=3): 29,069 parameters (`param_count`); EDT uses d=180, h=12, R=6, reduction 4.

Normalisation after the down projection: the official code uses `BatchNorm2d(h)`. `norm="layer"`
(the default here) normalises each pixel over its `h` channels instead (per-channel affine, eps
1e-6), which needs no mutable `batch_stats` collection, behaves the same in training and
evaluation, and does not depend on the batch, so batch-1 fine-tuning is well defined. It has the
same 2h parameters as BatchNorm's affine, so the count is unchanged. `norm="batch"` reproduces the
official module (torch defaults: momentum 0.1, eps 1e-5; running statistics in `batch_stats`,
selected with `use_running_average`) for loading the released weights; `norm="none"` drops it.

Phase of zero-amplitude coefficients: `angle(F)` has an undefined gradient where `|F| = 0` (a
constant image has only its DC coefficient). Coefficients with `|F| <= phase_eps` are treated as
exact zeros (magnitude 0, phase 0, no gradient); at the default 1e-6 they are at float32 round-off
for O(1) features, so their phase is noise anyway.

Parameter names follow the official module where one exists (`head`, `conv_weight_A`,
`conv_weight_B`, `conv_bias`, `compress`, `tail`); torch's `amp_fuse`/`pha_fuse` depthwise 1x1
convs are `amp_scale`/`amp_bias`/`pha_scale`/`pha_bias`, `proj.0/2` are `proj_in`/`proj_out`,
`channel_interaction.1/3` are `channel_gate_in`/`channel_gate_out`, `spatial_interaction` is
`spatial_gate`.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from ir_lora.models import layers

NORMS = ("layer", "batch", "none")


def torch_uniform(fan_in: int):
    """PyTorch's default init for conv/linear weights and biases: U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _conv1x1(features: int, fan_in: int, name: str, *, use_bias: bool = True, zero: bool = False):
    weight_init = nn.initializers.zeros if zero else torch_uniform(fan_in)
    bias_init = nn.initializers.zeros if zero else torch_uniform(fan_in)
    return layers.Conv(
        features,
        (1, 1),
        use_bias=use_bias,
        kernel_init=weight_init,
        bias_init=bias_init,
        name=name,
    )


def _self_conjugate(shape: tuple[int, ...], full_size: tuple[int, int]) -> np.ndarray:
    """Mask of the `rfft2` bins (axes 1, 2) that are real for a real input."""
    height, width = full_size
    rows = np.zeros(shape[1], bool)
    cols = np.zeros(shape[2], bool)
    rows[0] = cols[0] = True
    if height % 2 == 0:
        rows[height // 2] = True
    if width % 2 == 0:
        cols[width // 2] = True
    return (rows[:, None] & cols[None, :])[None, :, :, None]


def safe_polar(
    spectrum: jax.Array, eps: float, full_size: tuple[int, int] | None = None
) -> tuple[jax.Array, jax.Array]:
    """`(|F|, angle(F))` with finite gradients everywhere; `(0, 0)` where `|F| <= eps`.

    Phases lie in (-pi, pi]; a zero imaginary part counts as +0. With `full_size=(H, W)`,
    `spectrum` is `rfft2` of a real `(N, H, W, C)` array and its self-conjugate bins are taken
    as exactly real.

    Both `jnp.abs` and `jnp.angle` have 0/0 gradients at `F = 0`. The double `where` keeps the
    masked-out branch's inputs at a regular point, so no NaN reaches the gradient.
    """
    re, im = jnp.real(spectrum), jnp.imag(spectrum)
    # A negative real coefficient must get phase +pi, not -pi: the two differ once the phase is
    # scaled. XLA's FFT leaves round-off (+-1e-9) in the imaginary part of the self-conjugate
    # bins of a real signal (DC and Nyquist rows/columns), where torch and numpy return exact 0.
    im = jnp.where(_self_conjugate(spectrum.shape, full_size), 0.0, im) if full_size else im
    im = jnp.where(im == 0, 0.0, im)  # -0 -> +0
    power = re * re + im * im
    ok = power > eps * eps
    safe_power = jnp.where(ok, power, 1.0)
    magnitude = jnp.where(ok, jnp.sqrt(safe_power), 0.0)
    phase = jnp.where(ok, jnp.arctan2(jnp.where(ok, im, 0.0), jnp.where(ok, re, 1.0)), 0.0)
    return magnitude, phase


class AdaptIR(nn.Module):
    """The AdaptIR adapter (module docstring). Input and output `(N, H, W, features)`.

    Attributes:
      features: d, the width of the block it is attached to (input and output channels).
      hidden: h, the adapter width (official: d // 24 for IPT, d // 14 for EDT).
      rank: R, the rank of the low-rank depthwise kernel; None means h // 2 (official).
      reduction: the channel-gate bottleneck is max(1, h // reduction) wide (official: 8 IPT,
        4 EDT).
      norm: "layer" (default), "batch" (official) or "none"; see the module docstring.
      use_running_average: BatchNorm mode when norm="batch" (also accepted at call time).
      phase_eps: coefficients with |F| at or below it count as 0 (finite gradients at |F| = 0).
      dtype: computation dtype (None: inferred from the input and parameters).
    """

    features: int
    hidden: int
    rank: int | None = None
    reduction: int = 8
    norm: str = "layer"
    use_running_average: bool | None = None
    phase_eps: float = 1e-6
    dtype: Any = None

    def _check(self, x: jax.Array) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"AdaptIR.norm must be one of {NORMS}, got {self.norm!r}")
        if x.ndim != 4 or x.shape[-1] != self.features:
            raise ValueError(
                f"AdaptIR(features={self.features}) expects (N, H, W, {self.features}) input, "
                f"got shape {x.shape}"
            )
        if self.hidden < 2 or self.reduction < 1:
            raise ValueError(
                f"AdaptIR: hidden={self.hidden} must be >= 2 (rank and MLP use hidden // 2) and "
                f"reduction={self.reduction} >= 1"
            )

    @nn.compact
    def __call__(self, x: jax.Array, *, use_running_average: bool | None = None) -> jax.Array:
        self._check(x)
        n, height, width, _ = x.shape
        h = self.hidden
        rank = self.rank or h // 2
        squeeze = max(1, h // self.reduction)
        if self.dtype is not None:
            x = x.astype(self.dtype)

        z = _conv1x1(h, self.features, "head")(x)
        if self.norm == "layer":
            z = nn.LayerNorm(epsilon=1e-6, name="norm")(z)
        elif self.norm == "batch":
            use_ra = nn.merge_param(
                "use_running_average", self.use_running_average, use_running_average
            )
            z = nn.BatchNorm(use_running_average=use_ra, momentum=0.9, epsilon=1e-5, name="norm")(z)

        # LIM: torch's (h, 1, 3, 3) OIHW kernel `(A @ B).view(...)` is HWIO (3, 3, 1, h) here.
        a = self.param("conv_weight_A", torch_uniform(rank), (h, rank))
        b = self.param("conv_weight_B", torch_uniform(9), (rank, 9))
        conv_bias = self.param("conv_bias", nn.initializers.zeros, (h,))
        a, b, conv_bias = (t.astype(z.dtype) for t in (a, b, conv_bias))
        kernel = (a @ b).reshape(h, 3, 3).transpose(1, 2, 0)[:, :, None, :]
        local = layers.depthwise_conv(z, kernel, ((1, 1), (1, 1))) + conv_bias

        # FAM: per-channel affine of amplitude and phase (identity at init).
        spectrum = jnp.fft.rfft2(z.astype(jnp.float32), axes=(1, 2), norm="ortho")
        magnitude, phase = safe_polar(spectrum, self.phase_eps, (height, width))
        ones, zeros = nn.initializers.ones, nn.initializers.zeros
        magnitude = magnitude * self.param("amp_scale", ones, (h,)) + self.param(
            "amp_bias", zeros, (h,)
        )
        phase = phase * self.param("pha_scale", ones, (h,)) + self.param("pha_bias", zeros, (h,))
        spectrum = jax.lax.complex(magnitude * jnp.cos(phase), magnitude * jnp.sin(phase))
        glob = jnp.fft.irfft2(spectrum, s=(height, width), axes=(1, 2), norm="ortho")
        glob = jnp.abs(glob).astype(z.dtype)

        # Channel branch: attention pooling over HW, then an MLP (no final activation).
        score = _conv1x1(1, h, "compress")(z).reshape(n, height * width, 1)
        weights = jax.nn.softmax(score, axis=1)
        pooled = jnp.einsum("npc,np->nc", z.reshape(n, height * width, h), weights[..., 0])
        channel = nn.Dense(
            h // 2, kernel_init=torch_uniform(h), bias_init=torch_uniform(h), name="proj_in"
        )(pooled)
        channel = nn.Dense(
            h,
            kernel_init=torch_uniform(h // 2),
            bias_init=torch_uniform(h // 2),
            name="proj_out",
        )(nn.gelu(channel, approximate=False))

        # Cross gating: global statistics gate the local branch, local features gate the global.
        gate = jnp.mean(glob, axis=(1, 2), keepdims=True)
        gate = nn.gelu(_conv1x1(squeeze, h, "channel_gate_in")(gate), approximate=False)
        gate_c = jax.nn.sigmoid(_conv1x1(h, squeeze, "channel_gate_out", zero=True)(gate))
        gate_s = jax.nn.sigmoid(_conv1x1(1, h, "spatial_gate", zero=True)(local))
        mixed = channel[:, None, None, :] * (gate_c * local + gate_s * glob)
        return _conv1x1(self.features, h, "tail", use_bias=False, zero=True)(mixed)


def param_count(
    features: int, hidden: int, rank: int | None = None, reduction: int = 8, norm: str = "layer"
) -> int:
    """Trainable parameters of one adapter (BatchNorm running statistics excluded).

    With the official IPT sizes, `param_count(576, 24)` is 29,069 for `norm="batch"` and the
    same for `norm="layer"` (both carry a 2h affine).
    """
    if norm not in NORMS:
        raise ValueError(f"param_count: norm must be one of {NORMS}, got {norm!r}")
    d, h = features, hidden
    r = rank or h // 2
    m = max(1, h // reduction)
    terms = {
        "head": d * h + h,
        "norm": 0 if norm == "none" else 2 * h,
        "lim": h * r + r * 9 + h,
        "fam": 4 * h,
        "compress": h + 1,
        "proj": h * (h // 2) + h // 2 + (h // 2) * h + h,
        "channel_gate": h * m + m + m * h + h,
        "spatial_gate": h + 1,
        "tail": h * d,
    }
    return int(np.sum(list(terms.values())))
