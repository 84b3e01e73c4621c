"""LoRA-IR's degradation-aware modulation (DAM): channel gates computed from the router embedding.

LoRA-IR (`PriorPreModel_arch.py`) maps the router embedding `e_clip (N, 384)` once through
`intro_de` (`DegradationPrior`: two 1x1 convs 384->384 with GELU; 1x1 convs on a 1x1 map are
Dense layers) and, before each encoder stage and the middle stage, modulates the features:

    g = sigmoid(W4 relu(W3 W2 gelu(W1 e)))        # (N, 1, 1, C): 384->128->C->C/16->C
    x = x + beta * (LayerNorm_C(x) * g)           # beta (C,) zero-init: identity at the start

(no activation between `W2` and `W3`, as in the official module). The official decoder stages
have no DAM although the paper's figure draws them.
"""

import jax
from flax import linen as nn


class DegradationPrior(nn.Module):
    """LoRA-IR's `intro_de`: `gelu(Dense(gelu(Dense(e))))`, shared by all DAMs.

    Attributes:
      features: the output width; None keeps the embedding's width (LoRA-IR: 384 -> 384).
    """

    features: int | None = None

    @nn.compact
    def __call__(self, embedding: jax.Array) -> jax.Array:
        features = self.features or embedding.shape[-1]
        x = nn.gelu(nn.Dense(features, name="dense0")(embedding), approximate=False)
        return nn.gelu(nn.Dense(features, name="dense1")(x), approximate=False)


class DegradationModulation(nn.Module):
    """`x + beta * (LayerNorm(x) * sigmoid(MLP(e)))` for x `(N, H, W, C)` and e `(N, D)`.

    Attributes:
      features: C, the channels of the stage it modulates.
      hidden: the first MLP width (LoRA-IR: 128).
      reduction: the squeeze of the gate MLP, C // reduction wide (LoRA-IR: 16).
    """

    features: int
    hidden: int = 128
    reduction: int = 16

    def setup(self):
        squeeze = max(self.features // self.reduction, 1)
        self.embed_in = nn.Dense(self.hidden)
        self.embed_out = nn.Dense(self.features)
        self.gate_in = nn.Dense(squeeze)
        self.gate_out = nn.Dense(self.features)
        self.norm = nn.LayerNorm(epsilon=1e-6)
        self.beta = self.param("beta", nn.initializers.zeros, (self.features,))

    def gate(self, embedding: jax.Array) -> jax.Array:
        """The `(N, C)` channel gates `sigmoid(MLP(e))`."""
        g = self.embed_out(nn.gelu(self.embed_in(embedding), approximate=False))
        return jax.nn.sigmoid(self.gate_out(nn.relu(self.gate_in(g))))

    def __call__(self, x: jax.Array, embedding: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != self.features:
            raise ValueError(
                f"DegradationModulation(features={self.features}): x must be "
                f"(N, H, W, {self.features}), got {x.shape}"
            )
        if embedding.ndim != 2 or embedding.shape[0] != x.shape[0]:
            raise ValueError(
                f"DegradationModulation: embedding must be ({x.shape[0]}, D), got {embedding.shape}"
            )
        g = self.gate(embedding)[:, None, None, :].astype(x.dtype)
        return x + self.beta.astype(x.dtype) * (self.norm(x) * g)
