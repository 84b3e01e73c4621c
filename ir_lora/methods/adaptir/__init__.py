"""AdaptIR beside every feed-forward path of the backbone (config section `adaptir`).

The adapter (`adapter.AdaptIR`) reads the feed-forward input (the block's
second-norm output) and its output is added to the feed-forward output, as in the official
`x + FFN(LN2(x)) + AdaptIR(LN2(x))`:

* NAFNet: beside `NAFBlock.feed_forward` (the FFN half of each block). NAFNet scales the FFN
  output by its learned per-channel `gamma`, so the adapter's output is scaled by it too; a
  per-channel scale is absorbed by the adapter's zero-initialised tail, so nothing is lost.
* Restormer: beside every `FeedForward` (the GDFN).

Hidden width per block `h = max(min_hidden, round(d * hidden_ratio))` for a block of width `d`
(default ratio 1/24, the official IPT adapter's 576 -> 24; `min_hidden` 2, the smallest working
adapter), unless `hidden` fixes one width for every block. Only the adapters train;
the backbone is frozen. The tail is zero-initialised, so the adapted network equals the backbone
at step 0. The adapters cannot be merged into the backbone (they are non-linear): inference runs
them (`merge_fn` is None).
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from ir_lora.methods.adaptir.adapter import AdaptIR, param_count
from ir_lora.methods.base import MethodSpec, Parts, init_or_given
from ir_lora.models import NAFBlock
from ir_lora.models.restormer import FeedForward
from ir_lora.peft import intercept, partition

COLLECTION = "adaptir"

__all__ = ["COLLECTION", "SPEC", "AdaptIR", "default_config", "hidden_width", "param_count"]


def default_config() -> ml_collections.ConfigDict:
    """The `adaptir` section: hidden width `hidden` (0: `max(min_hidden, round(width *
    hidden_ratio))` per block, ratio 1/24 as the official IPT adapter), `rank` (0: hidden // 2),
    channel-gate `reduction`, `norm` ("layer" or "none")."""
    return ml_collections.ConfigDict(
        {
            "hidden": 0,
            "hidden_ratio": 1 / 24,
            "min_hidden": 2,
            "rank": 0,
            "reduction": 4,
            "norm": "layer",
        }
    )


def hidden_width(features: int, section) -> int:
    """The adapter width of a block of width `features`."""
    if int(section.hidden):
        return int(section.hidden)
    ratio = float(section.hidden_ratio)
    if ratio <= 0:
        raise ValueError(f"config.adaptir.hidden_ratio={ratio} must be > 0 (or set adaptir.hidden)")
    return max(int(section.min_hidden), round(features * ratio))


def _adapter(section, features: int) -> AdaptIR:
    return AdaptIR(
        features=features,
        hidden=hidden_width(features, section),
        rank=int(section.rank) or None,
        reduction=int(section.reduction),
        norm=str(section.norm),
        parent=None,  # a free-standing module applied by hand, not a child of the block
    )


def _beside(section, next_fun, args, kwargs, module):
    """`FFN(x) + AdaptIR(x)` for the wrapped feed-forward method of `module`."""
    x = args[0]
    out = next_fun(*args, **kwargs)
    adapter = _adapter(section, x.shape[-1])

    def init():
        # AdaptIR's own init under a key private to this block.
        with intercept.bypass():
            return adapter.init(module.make_rng("params"), x)["params"]

    variables = intercept.variable(module, COLLECTION, "adapter", init)
    with intercept.bypass():
        return out + adapter.apply({"params": variables}, x)


def rules(section) -> list[intercept.Rule]:
    """The NAFBlock and Restormer GDFN rules (one of them selects nothing per backbone)."""
    wrapper = functools.partial(_beside, section)
    return [
        intercept.Rule(
            r"(.*/)?blocks_\d+", wrapper, method="feed_forward", module_types=(NAFBlock,)
        ),
        intercept.Rule(r"(.*/)?ffn", wrapper, module_types=(FeedForward,)),
    ]


def trainability_rules() -> tuple[tuple[str, str], ...]:
    return ((f"{COLLECTION}/.*", partition.TRAIN), ("params/.*", partition.FROZEN))


def parts(config, model: nn.Module, sample) -> Parts:
    section = config.adaptir
    if section.norm == "batch":
        raise ValueError(
            "config.adaptir.norm='batch' needs a mutable batch_stats collection in the train "
            "step; use 'layer' (default) or 'none'"
        )
    attach_rules = rules(section)

    def variables_fn(rng, backbone):
        params_key, adapter_key = jax.random.split(rng)
        params = init_or_given(model, sample, params_key, backbone)
        with intercept.attach(attach_rules) as trace:
            variables = model.init(adapter_key, jnp.zeros(sample.shape, sample.dtype))
        if not trace.wrapped:
            raise ValueError(
                f"adaptir: no feed-forward path found in {type(model).__name__} (supported: "
                "NAFNet's NAFBlock.feed_forward, Restormer's FeedForward)"
            )
        return {"params": params, COLLECTION: variables[COLLECTION]}

    def apply_fn(trainable, frozen, images):
        variables = partition.combine(trainable, frozen)
        with intercept.attach(attach_rules):
            return model.apply(variables, images)

    return Parts(
        rules=trainability_rules(), variables_fn=variables_fn, apply_fn=apply_fn, merge_fn=None
    )


SPEC = MethodSpec(parts=parts, sections={"adaptir": default_config})
