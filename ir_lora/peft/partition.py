"""Which variables train: ordered `(regex, label)` rules over "/"-joined variable paths.

Paths start with the collection name: "params/encoders_0/blocks_0/conv1/kernel",
"lora/encoders_0/blocks_0/conv1/lora_a". The first rule whose pattern `re.fullmatch`es a path
labels it (big_vision's `make_mask_trees` convention). Every leaf must be labelled and every rule
must label at least one leaf, so a typo can neither freeze nor train something silently.

The label `"frozen"` (`FROZEN`) means "not trained"; any other label ("lora", "train", or your
own) is trained, with the optimizer given for it in `make_optimizer`. `split` cuts the variables
into two nested dicts, trainable and frozen, holding disjoint leaves, so a step reads

    loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, batch)  # differentiates trainable

with `frozen` an ordinary (never donated) argument, and optimizer state built for `trainable`
only. `combine` puts the two back together for `model.apply`.
"""

import re
from collections.abc import Mapping, Sequence
from typing import Any

import optax
from flax import traverse_util

FROZEN = "frozen"
LORA = "lora"
TRAIN = "train"

Rules = Sequence[tuple[str, str]]

# Parameter names of biases, norm scales, NAFNet's beta/gamma and Restormer's temperature.
BIAS_NORM_PATTERN = r"params/(.*/)?(bias|scale|beta|gamma|temperature)"


def lora_rules(
    *, tune_bias_norm: bool = True, also_train: Sequence[str] = ()
) -> list[tuple[str, str]]:
    """LoRA factors train (label "lora"); optionally biases and norms too ("train"); rest frozen.

    Args:
      tune_bias_norm: label biases, norm scales, beta/gamma and temperatures "train"
        (`BIAS_NORM_PATTERN`).
      also_train: further patterns labelled "train", checked first, e.g.
        `["params/.*/dwconv/kernel"]` to tune depthwise kernels fully instead of with LoRA.
    """
    rules = [(pattern, TRAIN) for pattern in also_train]
    rules.append((f"{LORA}/.*", LORA))
    if tune_bias_norm:
        rules.append((BIAS_NORM_PATTERN, TRAIN))
    rules.append(("params/.*", FROZEN))
    return rules


def full_rules(*, with_lora: bool = False) -> list[tuple[str, str]]:
    """Every parameter trains ("train"); with `with_lora`, the LoRA factors too ("lora")."""
    rules = [(f"{LORA}/.*", LORA)] if with_lora else []
    return [*rules, ("params/.*", TRAIN)]


def _flatten(tree: Mapping) -> dict[str, Any]:
    if not isinstance(tree, Mapping):
        raise TypeError(f"Expected a nested dict of variables, got {type(tree).__name__}")
    return traverse_util.flatten_dict(tree, sep="/")


def label_paths(paths: Sequence[str], rules: Rules) -> dict[str, tuple[str, int]]:
    """`{path: (label, index of the rule that matched)}`, checking coverage both ways.

    Raises:
      ValueError: a path no rule matches, a rule that labels no path (unused, or shadowed by an
        earlier rule), a pattern listed twice or an invalid regex; each named.
    """
    rules = [(str(p), str(label)) for p, label in rules]
    patterns = [p for p, _ in rules]
    for pattern in patterns:
        if patterns.count(pattern) > 1:
            raise ValueError(f"Trainability rule {pattern!r} is listed more than once")
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"Trainability rule {pattern!r} is not a valid regex: {e}") from e
    out = {}
    for path in paths:
        index = next((i for i, (p, _) in enumerate(rules) if re.fullmatch(p, path)), None)
        if index is None:
            raise ValueError(
                f"Variable {path!r} matches no trainability rule; add a rule for it "
                f"(rules: {patterns})"
            )
        out[path] = (rules[index][1], index)
    used = {i for _, i in out.values()}
    for i, (pattern, label) in enumerate(rules):
        if i not in used:
            matched = [q for q in paths if re.fullmatch(pattern, q)]
            shadow = sorted({patterns[out[q][1]] for q in matched})
            why = f"every path it matches is taken by earlier rules {shadow}" if shadow else ""
            raise ValueError(
                f"Trainability rule ({pattern!r}, {label!r}) labels no variable"
                + (f": {why}" if why else " (check the pattern against the variable paths)")
            )
    return out


def label_tree(variables: Mapping, rules: Rules) -> dict:
    """The labels of `variables` (a nested dict `{"params": ..., "lora": ...}`), same structure.

    Args:
      variables: nested dict of arrays (or `jax.ShapeDtypeStruct`); top-level keys are the
        collection names.
      rules: ordered `(regex, label)` pairs; first `re.fullmatch` on the "/"-joined path wins.

    Returns:
      A nested dict with the same keys whose leaves are label strings.
    """
    flat = _flatten(variables)
    labels = label_paths(list(flat), rules)
    return traverse_util.unflatten_dict({k: v[0] for k, v in labels.items()}, sep="/")


def _check_same_keys(variables: Mapping, labels: Mapping) -> tuple[dict, dict]:
    flat_v, flat_l = _flatten(variables), _flatten(labels)
    if flat_v.keys() != flat_l.keys():
        extra = sorted(flat_v.keys() - flat_l.keys())[:5]
        missing = sorted(flat_l.keys() - flat_v.keys())[:5]
        raise ValueError(
            f"Labels do not match the variables: unlabelled {extra}, labels without a variable "
            f"{missing}"
        )
    return flat_v, flat_l


def split(variables: Mapping, labels: Mapping) -> tuple[dict, dict]:
    """`(trainable, frozen)`: nested dicts holding the non-"frozen" and the "frozen" leaves.

    Both keep the original nesting, minus the leaves of the other; empty branches are dropped.
    `split(labels, labels)[0]` gives the labels of the trainable tree for `make_optimizer`.
    """
    flat_v, flat_l = _check_same_keys(variables, labels)
    trainable = {k: v for k, v in flat_v.items() if flat_l[k] != FROZEN}
    frozen = {k: v for k, v in flat_v.items() if flat_l[k] == FROZEN}
    return (
        traverse_util.unflatten_dict(trainable, sep="/"),
        traverse_util.unflatten_dict(frozen, sep="/"),
    )


def combine(trainable: Mapping, frozen: Mapping) -> dict:
    """Inverse of `split`: one nested dict of variables (their leaves must be disjoint)."""
    flat_t, flat_f = _flatten(trainable), _flatten(frozen)
    both = sorted(flat_t.keys() & flat_f.keys())
    if both:
        raise ValueError(f"Variables both trainable and frozen: {both[:5]}")
    return traverse_util.unflatten_dict({**flat_f, **flat_t}, sep="/")


def make_optimizer(
    tx_by_label: Mapping[str, optax.GradientTransformation], labels_of_trainable: Mapping
) -> optax.GradientTransformation:
    """One optimizer for the trainable tree: `optax.partition` over its labels.

    Args:
      tx_by_label: an optax transformation per label ("lora", "train", ...). Labels absent from
        the tree are ignored, so one mapping serves several rule presets.
      labels_of_trainable: the labels of the trainable tree (`split(labels, labels)[0]`).

    Returns:
      A transformation whose state holds entries for the trainable leaves only.

    Raises:
      ValueError: a trainable label has no transformation, or the tree holds "frozen" leaves.
    """
    present = set(_flatten(labels_of_trainable).values())
    if FROZEN in present:
        raise ValueError(
            "labels_of_trainable holds 'frozen' leaves; pass split(labels, labels)[0], the labels "
            "of the trainable tree"
        )
    missing = sorted(present - set(tx_by_label))
    if missing:
        raise ValueError(f"No optimizer for trainable label(s) {missing}: add them to tx_by_label")
    return optax.partition(
        {k: v for k, v in tx_by_label.items() if k in present}, labels_of_trainable
    )


def describe(variables: Mapping, rules: Rules) -> list[tuple[str, str, str]]:
    """`(path, label, matching rule's pattern)` per leaf, for logging which rule labelled what."""
    labels = label_paths(list(_flatten(variables)), rules)
    patterns = [p for p, _ in rules]
    return [(path, label, patterns[i]) for path, (label, i) in labels.items()]
