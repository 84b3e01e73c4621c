"""NAFNet (Chen et al., "Simple Baselines for Image Restoration", ECCV 2022) in flax.linen, NHWC.

A transcription of the official PyTorch `NAFNet_arch.py` (megvii-research/NAFNet): same blocks, same
order of operations, same parameters (see `ir_lora.models.torch_io` for the key mapping). Images are
`(N, H, W, C)` float arrays in [0, 1]; the output has the input's shape.

Module tree (what adapters target by path, e.g. with `flax.linen.intercept_methods`):

    intro                      Conv 3x3, img_channel -> width
    encoders_{i}/blocks_{j}    NAFStage i holding NAFBlocks j
    downs_{i}                  Conv 2x2 stride 2, c -> 2c
    middle_blks/blocks_{j}     the middle NAFStage
    ups_{i}                    Conv 1x1 without bias, c -> 2c, then pixel_shuffle(2) (channels c/2)
    decoders_{i}/blocks_{j}    NAFStage i
    ending                     Conv 3x3, width -> img_channel

and inside each NAFBlock: `norm1, conv1, conv2, sca, conv3, beta, norm2, conv4, conv5, gamma`. The
feed-forward half is the method `NAFBlock.feed_forward`, so an adapter can run beside it.

Differences from the PyTorch code: no dropout (every released configuration uses rate 0), and flax's
default initialisers (the pre-trained weights are what matter here).
"""

import functools
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from ir_lora.models.layers import Conv, pixel_shuffle
from ir_lora.models.norms import LayerNorm
from ir_lora.models.remat import remat_block

# The official LayerNorm2d: per-pixel normalisation over channels, eps 1e-6, two-pass variance
# (`norms.LayerNorm` has its closed-form backward).
_LAYER_NORM_2D = dict(epsilon=1e-6)


def simple_gate(x: jnp.ndarray) -> jnp.ndarray:
    """Splits the channels in two halves and multiplies them (`x1 * x2`, PyTorch `chunk` order)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x1 * x2


def pad_to_multiple(x: jnp.ndarray, multiple: int, mode: str = "constant") -> jnp.ndarray:
    """Pads `(N, H, W, C)` at the bottom and right so H and W are multiples of `multiple`.

    The default zero padding matches NAFNet's `check_image_size` (`F.pad(x, (0, pad_w, 0, pad_h))`);
    `mode` is any `jnp.pad` mode ("reflect" is PyTorch's `F.pad(..., "reflect")`).
    """
    pad_h = -x.shape[1] % multiple
    pad_w = -x.shape[2] % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    return jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode=mode)


def check_image(x: jnp.ndarray, channels: int, model: str) -> None:
    """Raises a ValueError unless `x` is an `(N, H, W, channels)` batch."""
    if x.ndim != 4 or x.shape[-1] != channels:
        raise ValueError(
            f"{model} expects an (N, H, W, {channels}) NHWC batch, got shape {tuple(x.shape)}"
        )


class NAFBlock(nn.Module):
    """The NAFNet block: LayerNorm, 1x1, depthwise 3x3, SimpleGate, SCA, 1x1, then a gated FFN.

    Attributes:
      features: channels in and out (`c` in the paper).
      dw_expand: expansion of the depthwise branch (`DW_Expand`).
      ffn_expand: expansion of the feed-forward branch (`FFN_Expand`).
      dtype: computation dtype of the convolutions (parameters stay float32).
    """

    features: int
    dw_expand: int = 2
    ffn_expand: int = 2
    dtype: Any = jnp.float32

    def setup(self):
        c = self.features
        dw_channels = c * self.dw_expand
        ffn_channels = c * self.ffn_expand
        conv = functools.partial(Conv, dtype=self.dtype)
        self.norm1 = LayerNorm(**_LAYER_NORM_2D)
        self.conv1 = conv(dw_channels, (1, 1))
        self.conv2 = conv(dw_channels, (3, 3), padding=1, feature_group_count=dw_channels)
        # Simplified channel attention: global average pool, then this 1x1 conv.
        self.sca = conv(dw_channels // 2, (1, 1))
        self.conv3 = conv(c, (1, 1))
        self.norm2 = LayerNorm(**_LAYER_NORM_2D)
        self.conv4 = conv(ffn_channels, (1, 1))
        self.conv5 = conv(c, (1, 1))
        # Residual scales, zero at initialisation so every block starts as the identity.
        self.beta = self.param("beta", nn.initializers.zeros, (c,))
        self.gamma = self.param("gamma", nn.initializers.zeros, (c,))

    def feed_forward(self, x: jnp.ndarray) -> jnp.ndarray:
        """The feed-forward half on `norm2`'s output: `conv5(simple_gate(conv4(x)))`."""
        return self.conv5(simple_gate(self.conv4(x)))

    def __call__(self, inputs: jnp.ndarray) -> jnp.ndarray:
        x = self.conv2(self.conv1(self.norm1(inputs)))
        x = simple_gate(x)
        x = x * self.sca(jnp.mean(x, axis=(1, 2), keepdims=True))
        x = self.conv3(x)
        # The residual scales are float32 parameters: cast, or bf16 activations would promote.
        y = inputs + x * self.beta.astype(x.dtype)
        ffn = self.feed_forward(self.norm2(y))
        return y + ffn * self.gamma.astype(ffn.dtype)


class NAFStage(nn.Module):
    """`num_blocks` NAFBlocks of width `features` in sequence (submodules `blocks_{j}`), each
    rematerialised as `remat` says (`ir_lora.models.remat`)."""

    features: int
    num_blocks: int
    dtype: Any = jnp.float32
    remat: str = "none"

    def setup(self):
        block = remat_block(NAFBlock, self.remat)
        self.blocks = [block(self.features, dtype=self.dtype) for _ in range(self.num_blocks)]

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        for block in self.blocks:
            x = block(x)
        return x


class NAFNet(nn.Module):
    """The NAFNet U-Net. Field names follow the PyTorch constructor.

    Attributes:
      img_channel: image channels in and out.
      width: channels of the first stage; each encoder stage doubles them.
      middle_blk_num: blocks of the middle stage.
      enc_blk_nums: blocks of each encoder stage.
      dec_blk_nums: blocks of each decoder stage (as many stages as `enc_blk_nums`).
      dtype: computation dtype (e.g. `jnp.bfloat16`). Parameters stay float32; LayerNorm
        statistics are float32 and the output is float32, so the loss and metrics are too.
      remat: which blocks recompute their activations in the backward pass: "none",
        "blocks" or "blocks_jax" (`ir_lora.models.remat`). Parameter paths do not change.
    """

    img_channel: int = 3
    width: int = 16
    middle_blk_num: int = 1
    enc_blk_nums: Sequence[int] = ()
    dec_blk_nums: Sequence[int] = ()
    dtype: Any = jnp.float32
    remat: str = "none"

    def setup(self):
        if len(self.enc_blk_nums) != len(self.dec_blk_nums):
            raise ValueError(
                "NAFNet needs as many decoder as encoder stages, got "
                f"enc_blk_nums={tuple(self.enc_blk_nums)}, dec_blk_nums={tuple(self.dec_blk_nums)}"
            )
        conv = functools.partial(Conv, dtype=self.dtype)
        stage = functools.partial(NAFStage, dtype=self.dtype, remat=self.remat)
        self.intro = conv(self.width, (3, 3), padding=1)
        self.ending = conv(self.img_channel, (3, 3), padding=1)
        encoders, downs = [], []
        chan = self.width
        for num in self.enc_blk_nums:
            encoders.append(stage(chan, num))
            downs.append(conv(2 * chan, (2, 2), strides=2, padding="VALID"))
            chan *= 2
        self.encoders, self.downs = encoders, downs
        self.middle_blks = stage(chan, self.middle_blk_num)
        ups, decoders = [], []
        for num in self.dec_blk_nums:
            ups.append(conv(2 * chan, (1, 1), use_bias=False))
            chan //= 2
            decoders.append(stage(chan, num))
        self.ups, self.decoders = ups, decoders

    def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
        """Restores `(N, H, W, img_channel)` images of any size; returns the same shape."""
        check_image(images, self.img_channel, "NAFNet")
        height, width = images.shape[1:3]
        inputs = pad_to_multiple(images, 2 ** len(self.enc_blk_nums))
        x = self.intro(inputs.astype(self.dtype))
        skips = []
        for encoder, down in zip(self.encoders, self.downs):
            x = encoder(x)
            skips.append(x)
            x = down(x)
        x = self.middle_blks(x)
        for decoder, up, skip in zip(self.decoders, self.ups, reversed(skips)):
            x = pixel_shuffle(up(x), 2) + skip
            x = decoder(x)
        x = self.ending(x).astype(inputs.dtype) + inputs
        return x[:, :height, :width, :]
