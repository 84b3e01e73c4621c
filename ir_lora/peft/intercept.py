"""Attach code to the modules of any `flax.linen` model from outside, by module-path rules.

Every adapter in `ir_lora.peft` (LoRA now; AdaptIR beside a block's `feed_forward`, mixtures of
LoRA experts with per-sample routing weights later) is a *wrapper*: a function called in place of
one method of one module instance,

    wrapper(next_fun, args, kwargs, module) -> output

where `next_fun(*args, **kwargs)` runs the original method (and any inner interceptors) and
`module` is the bound module, in whose scope the wrapper runs: it declares its own variables with
`variable(module, collection, name, init_fn, ...)` (they live at the module's path, in a
collection of their own), reads the module's parameters with `module.get_variable("params",
name)` and may call helper modules inside `bypass()`. The model's code is never changed;
`flax.linen.intercept_methods` does the dispatch. Several `attach` contexts nest (LoRA inside
an AdaptIR block, say); the innermost runs closest to the original method.

A `Rule` selects the calls to wrap: `re.fullmatch` of its pattern on the module's "/"-joined path
(e.g. "encoders_0/blocks_0/conv1"), the method name, and optionally the module types it
supports. Rules are ordered and the first one whose pattern and method match a call wins, so a
broad rule can follow specific exceptions (a rule whose wrapper is None leaves its modules alone).
A winning rule whose module types do not fit is an error for a leaf layer (a module with
parameters and no sub-modules, e.g. a LayerNorm: a typo or too broad a pattern must not silently
adapt nothing) and is ignored for containers (modules with sub-modules, even with a few
parameters of their own like NAFNet's beta/gamma): ".*conv.*" also matches a block
"conv_block", and ".*" matches every block.
"""

import contextlib
import dataclasses
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn

Wrapper = Callable[[Callable[..., Any], tuple, dict, nn.Module], Any]


@dataclasses.dataclass(frozen=True)
class Rule:
    """Wrap `method` of the modules whose "/"-joined path fully matches `pattern`.

    Attributes:
      pattern: regular expression matched with `re.fullmatch` against the module path.
      wrapper: `wrapper(next_fun, args, kwargs, module) -> output`, or None to leave the matched
        modules unwrapped (an explicit exception ahead of broader rules).
      method: name of the intercepted method.
      module_types: the module classes `wrapper` supports (subclasses included); None for any.
    """

    pattern: str
    wrapper: Wrapper | None
    method: str = "__call__"
    module_types: tuple[type, ...] | None = None

    def __post_init__(self):
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"Rule pattern {self.pattern!r} is not a valid regex: {e}") from e


@dataclasses.dataclass
class Trace:
    """What the rules did during one intercepted call of a model (filled in while tracing).

    Attributes:
      wrapped: `{module path: (rule index, module class name)}` for every wrapped module.
      used_rules: indices of rules that won at least one module call (None-wrapper rules too).
    """

    wrapped: dict[str, tuple[int, str]] = dataclasses.field(default_factory=dict)
    used_rules: set[int] = dataclasses.field(default_factory=set)

    def check_all_rules_used(self, rules: Sequence[Rule]) -> None:
        """Raises ValueError naming every rule that selected no module (typo, shadowed rule)."""
        unused = [r for i, r in enumerate(rules) if i not in self.used_rules]
        if unused:
            names = ", ".join(f"{r.pattern!r} (method {r.method!r})" for r in unused)
            raise ValueError(
                f"Rules that selected no module: {names}. Check the pattern against the model's "
                "module paths (see ir_lora.peft.intercept.module_paths) and the rule order."
            )


_bypass_state = threading.local()


@contextlib.contextmanager
def bypass() -> Iterator[None]:
    """Calls made inside this context are not intercepted (for helper modules in wrappers)."""
    depth = getattr(_bypass_state, "depth", 0)
    _bypass_state.depth = depth + 1
    try:
        yield
    finally:
        _bypass_state.depth = depth


def path_of(module: nn.Module) -> str:
    """The "/"-joined path of a bound module, e.g. "encoders_0/blocks_0/conv1"."""
    return "/".join(str(p) for p in module.path)


def variable(module: nn.Module, col: str, name: str, init_fn: Callable[..., Any], *init_args):
    """The value of variable `col/name` of `module`, created with `init_fn(*init_args)` if absent.

    For wrappers: unlike `module.variable`, it works beside methods that are neither `setup` nor
    `@compact` (a block's `feed_forward`) and when a module runs several times per call (shared
    layers); the variable lives in the module's own scope, so its path is the module's path.

    Raises:
      ValueError: the variable is absent and `col` is not mutable (not `init`), naming both.
    """
    scope = module.scope
    if scope.has_variable(col, name):
        return scope.get_variable(col, name)
    if not scope.is_mutable_collection(col):
        raise ValueError(
            f"Module {path_of(module)!r} has no variable {name!r} in collection {col!r}: create "
            "it (init with the same rules) and pass it to apply"
        )
    reserved = scope.reservations.get(name, set())
    if reserved - {col}:
        raise ValueError(f"Module {path_of(module)!r} already uses the name {name!r}")
    value = init_fn(*init_args)
    scope.put_variable(col, name, value)
    return value


def _is_leaf_layer(module: nn.Module) -> bool:
    # Own variables are the non-dict entries of the scope's "params"; dict entries are children.
    own = module.variables.get("params", {})
    values = list(own.values())
    return bool(values) and not any(hasattr(v, "keys") for v in values)


def select(rules: Sequence[Rule], path: str, method: str) -> int | None:
    """Index of the first rule whose method is `method` and whose pattern fully matches `path`."""
    for i, rule in enumerate(rules):
        if rule.method == method and re.fullmatch(rule.pattern, path):
            return i
    return None


@contextlib.contextmanager
def attach(rules: Sequence[Rule], trace: Trace | None = None) -> Iterator[Trace]:
    """Context in which every `flax.linen` module call is dispatched through `rules`.

    Args:
      rules: ordered rules; the first one matching a call's path and method wins.
      trace: where to record what was wrapped; a fresh `Trace` if None.

    Yields:
      The `Trace`, filled in as modules are called (at trace time under `jax.jit`).

    Raises:
      TypeError: (at call time) a rule with a wrapper selected a leaf layer that is not one of
        the rule's `module_types`.
    """
    rules = tuple(rules)
    trace = Trace() if trace is None else trace

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        # The root module (path ()) is the model itself, or a helper applied inside a wrapper.
        if getattr(_bypass_state, "depth", 0) or not module.path:
            return next_fun(*args, **kwargs)
        path = path_of(module)
        index = select(rules, path, context.method_name)
        if index is None:
            return next_fun(*args, **kwargs)
        rule = rules[index]
        if rule.wrapper is None:
            trace.used_rules.add(index)
            return next_fun(*args, **kwargs)
        if rule.module_types is not None and not isinstance(module, rule.module_types):
            # Run the method first: at init its parameters only exist afterwards.
            out = next_fun(*args, **kwargs)
            if _is_leaf_layer(module):
                supported = ", ".join(t.__name__ for t in rule.module_types)
                raise TypeError(
                    f"Rule {rule.pattern!r} selected module {path!r} of type "
                    f"{type(module).__name__}, which it does not support (supported: "
                    f"{supported}). Narrow the pattern or put an exception (wrapper None / "
                    "rank 0) before it."
                )
            return out
        trace.used_rules.add(index)
        trace.wrapped[path] = (index, type(module).__name__)
        return rule.wrapper(next_fun, args, kwargs, module)

    with nn.intercept_methods(interceptor):
        yield trace


def module_paths(model: nn.Module, *args, method: str = "__call__", **kwargs) -> dict[str, str]:
    """`{path: class name}` of every module whose `method` runs when `model.init` is traced.

    Shapes only (`jax.eval_shape`): use it to write rule patterns for an unfamiliar model.
    `args`/`kwargs` are sample inputs (arrays or `jax.ShapeDtypeStruct`).
    """
    seen: dict[str, str] = {}

    def record(next_fun, call_args, call_kwargs, context):
        if context.module.path and context.method_name == method:
            seen[path_of(context.module)] = type(context.module).__name__
        return next_fun(*call_args, **call_kwargs)

    with nn.intercept_methods(record):
        eval_shape_init(model, *args, **kwargs)
    return seen


def _is_array(x) -> bool:
    return isinstance(x, jax.Array | np.ndarray | jax.ShapeDtypeStruct)


def eval_shape_init(model: nn.Module, *args, rngs=None, **kwargs):
    """`jax.eval_shape` of `model.init(rngs, *args, **kwargs)`: variable shapes, no FLOPs.

    Array leaves of `args`/`kwargs` (arrays or `jax.ShapeDtypeStruct`) are abstract; every other
    leaf (`train=False`, strings) is passed through unchanged, so Python control flow on it works.
    """
    leaves, treedef = jax.tree.flatten((args, kwargs))
    is_array = [_is_array(leaf) for leaf in leaves]
    arrays = [leaf for leaf, a in zip(leaves, is_array) if a]

    if rngs is None:
        rngs = jax.random.key(0)

    def init(arrays):
        it = iter(arrays)
        call_args, call_kwargs = jax.tree.unflatten(
            treedef, [next(it) if a else leaf for leaf, a in zip(leaves, is_array)]
        )
        return model.init(rngs, *call_args, **call_kwargs)

    return jax.eval_shape(init, arrays)
