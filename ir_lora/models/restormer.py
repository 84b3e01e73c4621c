"""Restormer (Zamir et al., CVPR 2022) in flax.linen, NHWC.

A transcription of the official PyTorch `restormer_arch.py` (swz30/Restormer): multi-Dconv
head transposed attention (MDTA, attention over channels with a learned per-head temperature), the
gated Dconv feed-forward network (GDFN), pixel-(un)shuffle resampling and a global residual.
Parameters are the official ones (see `ir_lora.models.torch_io` for the key mapping). Images are
`(N, H, W, C)` float arrays in [0, 1]; the output has the input's shape.

Module tree (what adapters target by path):

    patch_embed                           Conv 3x3, inp_channels -> dim
    encoder_level{1,2,3}/blocks_{j}       TransformerStage, widths dim, 2dim, 4dim
    down1_2, down2_3, down3_4             Downsample (submodule `conv`)
    latent/blocks_{j}                     TransformerStage, width 8dim
    up4_3, up3_2, up2_1                   Upsample (submodule `conv`)
    reduce_chan_level{3,2}                Conv 1x1 after the skip concatenation
    decoder_level{3,2,1}/blocks_{j}       TransformerStage, widths 4dim, 2dim, 2dim
    refinement/blocks_{j}                 TransformerStage, width 2dim
    output                                Conv 3x3, 2dim -> out_channels

and inside each TransformerBlock: `norm1, attn (temperature, qkv, qkv_dwconv, project_out), norm2,
ffn (project_in, dwconv, project_out)`; `ffn` is called on `norm2`'s output.

Differences from the PyTorch code: the official network needs H and W divisible by 8 (three 2x
downsamplings); here any size works: the input is padded at the bottom and right to a multiple of
8 and the output cropped back. The padding is zeros by default, as NAFNet does; the official
Restormer test scripts and demo.py pad by reflection before calling the network, which
`pad_mode="reflect"` reproduces. The dual-pixel defocus variant (`dual_pixel_task`)
is not provided, and flax's default initialisers are used.
"""

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from ir_lora.models.layers import Conv, pixel_shuffle, pixel_unshuffle
from ir_lora.models.nafnet import check_image, pad_to_multiple
from ir_lora.models.norms import LayerNorm
from ir_lora.models.remat import remat_block

LAYER_NORM_TYPES = ("WithBias", "BiasFree")


def layer_norm(layer_norm_type: str) -> nn.Module:
    """Restormer's per-pixel channel LayerNorm (eps 1e-5) of the given type."""
    if layer_norm_type == "WithBias":
        return LayerNorm(epsilon=1e-5)
    if layer_norm_type == "BiasFree":
        # `x / sqrt(var(x) + eps) * scale`: the variance is mean-centred, the output is not.
        return LayerNorm(epsilon=1e-5, bias_free=True)
    raise ValueError(f"layer_norm_type must be one of {LAYER_NORM_TYPES}, got {layer_norm_type!r}")


def channel_attention(qkv: jnp.ndarray, temperature: jnp.ndarray) -> jnp.ndarray:
    """MDTA's attention over channels, per head, on `(N, H, W, 3C)` = `[q | k | v]`.

    The official code normalises q and k over the pixels (`F.normalize`, norm floored at 1e-12),
    takes `softmax(temperature * q k^T)` per head (`(d, d)`, `d = C / heads`, PyTorch's `(head c)`
    channel order) and applies it to v. Here the grams of the raw q, k are taken over the pixels
    in the NHWC layout and divided by the two norms afterwards, which is the same number, so
    neither normalised copies of q and k nor head-major transposes of the activations are ever
    formed (forward or backward); `tests/test_models.py` checks it against the official order of
    operations to 1e-5. Returns `(N, H, W, C)` in `qkv`'s dtype.

    With narrower (bf16) activations the grams and norms are sums over every pixel: they are
    accumulated in float32, and the logits and softmax stay float32 (the `(d, d)` maps are
    small); only the final product with v runs in `qkv`'s dtype.
    """
    n, h, w, c3 = qkv.shape
    heads = temperature.shape[0]
    d = c3 // (3 * heads)
    wide = jnp.promote_types(qkv.dtype, jnp.float32)
    # `split`, not indexing: its transpose is one concatenate, where three slices would
    # transpose to three zero-padded full-width cotangents summed (benchmarks/NOTES.md, E15).
    q, k, v = (t.reshape(n, h * w, heads, d) for t in jnp.split(qkv, 3, axis=-1))
    gram = jnp.einsum("bphc,bphd->bhcd", q, k, preferred_element_type=wide)
    q_norm = jnp.maximum(jnp.sqrt(_sum_of_squares(q, wide)), 1e-12)  # (N, heads, d)
    k_norm = jnp.maximum(jnp.sqrt(_sum_of_squares(k, wide)), 1e-12)
    temperature = temperature.astype(wide)[:, None, None]
    logits = gram / q_norm[..., :, None] / k_norm[..., None, :] * temperature
    attn = jax.nn.softmax(logits, axis=-1).astype(qkv.dtype)
    return jnp.einsum("bhcd,bphd->bphc", attn, v).reshape(n, h, w, heads * d)


def _sum_of_squares(t: jnp.ndarray, dtype) -> jnp.ndarray:
    """`sum(t * t)` over the pixel axis 1, accumulated in `dtype`."""
    if t.dtype == dtype:
        return jnp.sum(t * t, axis=1)
    return jnp.einsum("bphc,bphc->bhc", t, t, preferred_element_type=dtype)


class Attention(nn.Module):
    """MDTA: attention across channels, per head, with a learned temperature.

    Attributes:
      features: channels in and out.
      num_heads: attention heads; `features` must be divisible by it.
      use_bias: whether the convolutions have biases.
      dtype: computation dtype of the convolutions (parameters stay float32).
    """

    features: int
    num_heads: int
    use_bias: bool = False
    dtype: Any = jnp.float32

    def setup(self):
        if self.features % self.num_heads:
            raise ValueError(
                f"Attention: features={self.features} not divisible by num_heads={self.num_heads}"
            )
        qkv_channels = 3 * self.features
        conv = functools.partial(Conv, dtype=self.dtype)
        self.temperature = self.param("temperature", nn.initializers.ones, (self.num_heads,))
        self.qkv = conv(qkv_channels, (1, 1), use_bias=self.use_bias)
        self.qkv_dwconv = conv(
            qkv_channels,
            (3, 3),
            padding=1,
            feature_group_count=qkv_channels,
            use_bias=self.use_bias,
        )
        self.project_out = conv(self.features, (1, 1), use_bias=self.use_bias)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        out = channel_attention(self.qkv_dwconv(self.qkv(x)), self.temperature)
        return self.project_out(out)


class FeedForward(nn.Module):
    """GDFN: 1x1 to 2*hidden, depthwise 3x3, GELU(x1) * x2, 1x1 back to `features`.

    Attributes:
      features: channels in and out.
      expansion_factor: `hidden = int(features * expansion_factor)`.
      use_bias: whether the convolutions have biases.
      dtype: computation dtype of the convolutions (parameters stay float32).
    """

    features: int
    expansion_factor: float = 2.66
    use_bias: bool = False
    dtype: Any = jnp.float32

    def setup(self):
        hidden = int(self.features * self.expansion_factor)
        conv = functools.partial(Conv, dtype=self.dtype, use_bias=self.use_bias)
        self.project_in = conv(2 * hidden, (1, 1))
        self.dwconv = conv(2 * hidden, (3, 3), padding=1, feature_group_count=2 * hidden)
        self.project_out = conv(self.features, (1, 1))

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x1, x2 = jnp.split(self.dwconv(self.project_in(x)), 2, axis=-1)
        return self.project_out(gelu(x1) * x2)


def gelu(x: jnp.ndarray) -> jnp.ndarray:
    """PyTorch's `F.gelu` (the exact form) as PyTorch computes it, `x/2 (1 + erf(x / sqrt 2))`.

    `jax.nn.gelu(approximate=False)` takes `erfc`, which XLA:CPU evaluates in two branches and
    a select, slower than `erf`'s one rational form (benchmarks/NOTES.md, E15).
    """
    return 0.5 * x * (1 + jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


class TransformerBlock(nn.Module):
    """`x + attn(norm1(x))`, then `x + ffn(norm2(x))`."""

    features: int
    num_heads: int
    ffn_expansion_factor: float = 2.66
    use_bias: bool = False
    layer_norm_type: str = "WithBias"
    dtype: Any = jnp.float32

    def setup(self):
        self.norm1 = layer_norm(self.layer_norm_type)
        self.attn = Attention(self.features, self.num_heads, self.use_bias, self.dtype)
        self.norm2 = layer_norm(self.layer_norm_type)
        self.ffn = FeedForward(self.features, self.ffn_expansion_factor, self.use_bias, self.dtype)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class TransformerStage(nn.Module):
    """`num_blocks` TransformerBlocks in sequence (submodules `blocks_{j}`), each
    rematerialised as `remat` says (`ir_lora.models.remat`)."""

    features: int
    num_blocks: int
    num_heads: int
    ffn_expansion_factor: float = 2.66
    use_bias: bool = False
    layer_norm_type: str = "WithBias"
    dtype: Any = jnp.float32
    remat: str = "none"

    def setup(self):
        block = remat_block(TransformerBlock, self.remat)
        self.blocks = [
            block(
                self.features,
                self.num_heads,
                self.ffn_expansion_factor,
                self.use_bias,
                self.layer_norm_type,
                self.dtype,
            )
            for _ in range(self.num_blocks)
        ]

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        for block in self.blocks:
            x = block(x)
        return x


class Downsample(nn.Module):
    """Conv 3x3 (no bias) c -> c/2, then PixelUnshuffle(2): (H, W, c) -> (H/2, W/2, 2c)."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        conv = Conv(
            x.shape[-1] // 2, (3, 3), padding=1, use_bias=False, dtype=self.dtype, name="conv"
        )
        x = conv(x)
        return pixel_unshuffle(x, 2)


class Upsample(nn.Module):
    """Conv 3x3 (no bias) c -> 2c, then PixelShuffle(2): (H, W, c) -> (2H, 2W, c/2)."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        conv = Conv(
            2 * x.shape[-1], (3, 3), padding=1, use_bias=False, dtype=self.dtype, name="conv"
        )
        x = conv(x)
        return pixel_shuffle(x, 2)


class Restormer(nn.Module):
    """The Restormer U-Net. Field names follow the PyTorch constructor (`bias`, `LayerNorm_type`
    become `use_bias`, `layer_norm_type`).

    Attributes:
      inp_channels: image channels in.
      out_channels: image channels out (equal to `inp_channels`: the output adds the input).
      dim: channels of the first level; levels 2, 3, 4 have 2, 4, 8 times as many.
      num_blocks: TransformerBlocks of encoder levels 1-3 and the latent (decoders mirror 1-3).
      num_refinement_blocks: blocks of the refinement stage.
      heads: attention heads of levels 1-4.
      ffn_expansion_factor: GDFN hidden width factor.
      use_bias: whether the convolutions have biases.
      layer_norm_type: "WithBias" or "BiasFree" (the real-denoising release).
      pad_mode: `jnp.pad` mode that brings H and W to multiples of 8: "constant" (zeros) or
        "reflect" (as the official test scripts).
      dtype: computation dtype (e.g. `jnp.bfloat16`). Parameters stay float32; LayerNorm
        statistics, the attention maps' softmax and the output are float32, so the loss and
        metrics are too.
      remat: which blocks recompute their activations in the backward pass: "none",
        "blocks" or "blocks_jax" (`ir_lora.models.remat`). Parameter paths do not change.
    """

    inp_channels: int = 3
    out_channels: int = 3
    dim: int = 48
    num_blocks: Sequence[int] = (4, 6, 6, 8)
    num_refinement_blocks: int = 4
    heads: Sequence[int] = (1, 2, 4, 8)
    ffn_expansion_factor: float = 2.66
    use_bias: bool = False
    layer_norm_type: str = "WithBias"
    pad_mode: str = "constant"
    dtype: Any = jnp.float32
    remat: str = "none"

    def setup(self):
        if self.out_channels != self.inp_channels:
            raise ValueError(
                "Restormer adds its input to the output: out_channels must equal inp_channels, "
                f"got {self.out_channels} and {self.inp_channels}"
            )
        if len(self.num_blocks) != 4 or len(self.heads) != 4:
            raise ValueError(
                "Restormer has 4 levels: num_blocks and heads need 4 entries, got "
                f"num_blocks={tuple(self.num_blocks)}, heads={tuple(self.heads)}"
            )
        if self.layer_norm_type not in LAYER_NORM_TYPES:
            raise ValueError(
                f"layer_norm_type must be one of {LAYER_NORM_TYPES}, got {self.layer_norm_type!r}"
            )
        dim, blocks, heads = self.dim, self.num_blocks, self.heads

        def stage(level_dim, num, num_heads):
            return TransformerStage(
                level_dim,
                num,
                num_heads,
                self.ffn_expansion_factor,
                self.use_bias,
                self.layer_norm_type,
                self.dtype,
                self.remat,
            )

        conv = functools.partial(Conv, dtype=self.dtype)
        # The original builds OverlapPatchEmbed without passing `bias`: never a bias here.
        self.patch_embed = conv(dim, (3, 3), padding=1, use_bias=False)
        self.encoder_level1 = stage(dim, blocks[0], heads[0])
        self.down1_2 = Downsample(self.dtype)
        self.encoder_level2 = stage(2 * dim, blocks[1], heads[1])
        self.down2_3 = Downsample(self.dtype)
        self.encoder_level3 = stage(4 * dim, blocks[2], heads[2])
        self.down3_4 = Downsample(self.dtype)
        self.latent = stage(8 * dim, blocks[3], heads[3])
        self.up4_3 = Upsample(self.dtype)
        self.reduce_chan_level3 = conv(4 * dim, (1, 1), use_bias=self.use_bias)
        self.decoder_level3 = stage(4 * dim, blocks[2], heads[2])
        self.up3_2 = Upsample(self.dtype)
        self.reduce_chan_level2 = conv(2 * dim, (1, 1), use_bias=self.use_bias)
        self.decoder_level2 = stage(2 * dim, blocks[1], heads[1])
        self.up2_1 = Upsample(self.dtype)
        # Level 1 keeps the concatenated 2*dim channels (no channel reduction), as in the original.
        self.decoder_level1 = stage(2 * dim, blocks[0], heads[0])
        self.refinement = stage(2 * dim, self.num_refinement_blocks, heads[0])
        self.output = conv(self.out_channels, (3, 3), padding=1, use_bias=self.use_bias)

    def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
        """Restores `(N, H, W, inp_channels)` images of any size; returns the same shape."""
        check_image(images, self.inp_channels, "Restormer")
        height, width = images.shape[1:3]
        inputs = pad_to_multiple(images, 8, self.pad_mode)
        enc1 = self.encoder_level1(self.patch_embed(inputs.astype(self.dtype)))
        enc2 = self.encoder_level2(self.down1_2(enc1))
        enc3 = self.encoder_level3(self.down2_3(enc2))
        latent = self.latent(self.down3_4(enc3))
        x = jnp.concatenate([self.up4_3(latent), enc3], axis=-1)
        x = self.decoder_level3(self.reduce_chan_level3(x))
        x = jnp.concatenate([self.up3_2(x), enc2], axis=-1)
        x = self.decoder_level2(self.reduce_chan_level2(x))
        x = jnp.concatenate([self.up2_1(x), enc1], axis=-1)
        x = self.refinement(self.decoder_level1(x))
        x = self.output(x).astype(inputs.dtype) + inputs
        return x[:, :height, :width, :]
