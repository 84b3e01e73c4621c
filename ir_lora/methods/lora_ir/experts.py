"""LoRA-IR's parts: experts on every conv, DAM on the encoder stages, the frozen router.

Every conv carries E = len(lora_ir.classes) low-rank experts (`ir_lora.peft.mixlora`, rank
`lora_ir.rank`, scale `alpha / rank`):

    y_n = conv(x_n, W0) + b + scale * sum_e w[n, e] conv(x_n, reshape(A_e B_e))

computed as the sum of expert branches (`lora_ir.path = "branches"`) or with a per-image merged
kernel (`"merged"`); both agree to 1e-5 and batch size 1 is not special. The weights `w` come
from the frozen router's logits over the experts' classes (`routing.expert_weights`: "top1", the
paper's hard routing; "topk" with renormalisation; "soft"). The router embedding also drives
degradation-aware modulation (DAM, `modulation`) before every encoder stage and the middle stage
(LoRA-IR has none on the decoder); DAM is zero-initialised, so it starts as the identity.

Variable collections: `params` (backbone), `experts` (at each conv's path), `modulation` (DAM at
each stage's path, plus `degradation_prior`, LoRA-IR's `intro_de`), `router`.
"""

import functools
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import linen as nn
from flax.linen.dtypes import promote_dtype

from ir_lora.methods.base import Parts, init_or_given
from ir_lora.methods.lora_ir import modulation as modulation_lib
from ir_lora.methods.lora_ir import routing
from ir_lora.models import NAFStage, TransformerStage
from ir_lora.peft import intercept, mixlora, partition

EXPERTS, MODULATION, ROUTER = "experts", "modulation", "router"
PRIOR = "degradation_prior"
TRAIN_MODES = ("experts", "backbone")
# Encoder stages and the middle stage of NAFNet and Restormer.
STAGE_PATTERN = r"encoders_\d+|middle_blks|encoder_level\d+|latent"
NORM_PATTERN = r"(.*/)?norm[^/]*"
# Where a previous stage of this method leaves its variables (services.EXPORT_VARIABLES_DIR).
VARIABLES_DIR = os.path.join("export", "variables")


def _scale(section) -> float:
    alpha = float(section.alpha)
    return alpha / int(section.rank) if alpha else 1.0


def _experts(section, weights, next_fun, args, kwargs, module):
    """The wrapped conv with its experts mixed by the per-image `weights` (N, E)."""
    if not module.has_variable("params", "kernel"):  # init: the frozen layer creates its params
        next_fun(*args, **kwargs)
    kernel = module.get_variable("params", "kernel")
    bias = module.get_variable("params", "bias") if module.use_bias else None
    # In the layer's computation dtype (bf16 backbones), as the layer itself would run.
    x, kernel, bias = promote_dtype(args[0], kernel, bias, dtype=module.dtype)

    def init():
        return mixlora.init_factors(
            module.make_rng("params"),
            kernel.shape,
            rank=int(section.rank),
            num_experts=len(section.classes),
        )

    factors = intercept.variable(module, EXPERTS, "experts", init)
    return mixlora.mix_conv(
        x,
        kernel,
        factors["down"],
        factors["up"],
        weights,
        bias=bias,
        scale=_scale(section),
        path=str(section.path),
        **mixlora.conv_kwargs(module),
    )


def dam_width(section, features: int) -> int:
    """DAM's first MLP width for a stage of `features` channels.

    `lora_ir.dam_hidden` fixes it (LoRA-IR: 128 on every stage of its width-64 NAFNet); 0 scales
    it with the stage, `max(1, round(features * lora_ir.dam_ratio))`, so small backbones get
    small DAMs.
    """
    if int(section.dam_hidden):
        return int(section.dam_hidden)
    ratio = float(section.dam_ratio)
    if ratio <= 0:
        raise ValueError(
            f"config.lora_ir.dam_ratio={ratio} must be > 0 (or set lora_ir.dam_hidden)"
        )
    return max(1, round(features * ratio))


def _modulate(section, prior, next_fun, args, kwargs, module):
    """DAM on the stage's input, then the stage."""
    x = args[0]
    dam = modulation_lib.DegradationModulation(
        features=x.shape[-1],
        hidden=dam_width(section, x.shape[-1]),
        reduction=int(section.dam_reduction),
        parent=None,  # a free-standing module applied by hand, not a child of the stage
    )

    def init():
        with intercept.bypass():
            return dam.init(module.make_rng("params"), x, prior)["params"]

    variables = intercept.variable(module, MODULATION, "dam", init)
    with intercept.bypass():
        x = dam.apply({"params": variables}, x, prior)
    return next_fun(x, *args[1:], **kwargs)


def attach_rules(section, *, weights=None, prior=None) -> list[intercept.Rule]:
    """DAM on the encoder/middle stages (with `prior`), experts on every conv (with `weights`)."""
    rules = []
    if prior is not None:
        rules.append(
            intercept.Rule(
                STAGE_PATTERN,
                functools.partial(_modulate, section, prior),
                module_types=(NAFStage, TransformerStage),
            )
        )
    if weights is not None:
        rules += [
            intercept.Rule(NORM_PATTERN, None),
            intercept.Rule(
                ".*", functools.partial(_experts, section, weights), module_types=(nn.Conv,)
            ),
        ]
    return rules


def trainability_rules(section) -> tuple[tuple[str, str], ...]:
    rules = []
    if section.train == "experts":
        rules.append((f"{EXPERTS}/.*", partition.LORA))
    if section.modulation:
        rules.append((f"{MODULATION}/.*", partition.TRAIN))
    backbone = partition.TRAIN if section.train == "backbone" else partition.FROZEN
    rules += [("params/.*", backbone), (f"{ROUTER}/.*", partition.FROZEN)]
    return tuple(rules)


def check(config) -> None:
    section = config.lora_ir
    if section.train not in TRAIN_MODES:
        raise ValueError(f"config.lora_ir.train={section.train!r} is not one of {TRAIN_MODES}")
    if section.path not in mixlora.PATHS:
        raise ValueError(f"config.lora_ir.path={section.path!r} is not one of {mixlora.PATHS}")
    if section.route not in mixlora.ROUTE_MODES:
        raise ValueError(
            f"config.lora_ir.route={section.route!r} is not one of {mixlora.ROUTE_MODES}"
        )
    routing.class_indices(section.classes)


def parts(config, model: nn.Module, sample) -> Parts:
    check(config)
    section = config.lora_ir
    router = routing.build_router(config.router)
    # 0: the prior keeps the router embedding's width, as LoRA-IR's intro_de (384 -> 384).
    prior_model = modulation_lib.DegradationPrior(features=int(section.prior_features) or None)
    with_experts = section.train == "experts"

    def route(variables, images):
        """`(expert weights or None, DAM prior or None)`; nothing flows back into the router."""
        embedding, logits = router.apply({"params": variables[ROUTER]}, images)
        embedding, logits = jax.lax.stop_gradient((embedding, logits))
        weights = None
        if with_experts:
            weights = routing.expert_weights(
                logits, classes=section.classes, mode=section.route, k=int(section.top_k)
            )
        prior = None
        if section.modulation:
            prior = prior_model.apply({"params": variables[MODULATION][PRIOR]}, embedding)
        return weights, prior

    def variables_fn(rng, tree):
        """`tree` is `load`'s; plain backbone params or None (parameter reports) get a fresh
        router, which only `load` (run by train.py and eval.py) replaces by the trained one."""
        params_key, adapters_key, prior_key, router_key = jax.random.split(rng, 4)
        images = jnp.zeros(sample.shape, sample.dtype)
        if tree is None or ROUTER not in tree:
            tree = {"params": tree, ROUTER: router.init(router_key, images)["params"]}
        variables = {
            "params": init_or_given(model, sample, params_key, tree.get("params")),
            ROUTER: tree[ROUTER],
        }
        embedding, _ = router.apply({"params": tree[ROUTER]}, images)
        n, experts = sample.shape[0], len(section.classes)
        prior = None
        if section.modulation:
            width = int(section.prior_features) or embedding.shape[-1]
            prior = jnp.zeros((n, width), sample.dtype)
        weights = jnp.full((n, experts), 1.0 / experts) if with_experts else None
        with intercept.attach(attach_rules(section, weights=weights, prior=prior)):
            created = model.init(adapters_key, images)
        if with_experts:
            variables[EXPERTS] = created[EXPERTS]
        given = tree.get(MODULATION)
        if section.modulation:
            fresh = {PRIOR: prior_model.init(prior_key, embedding)["params"], **created[MODULATION]}
            variables[MODULATION] = fresh if given is None else given
        elif given is not None:
            raise ValueError(
                "lora_ir: the loaded backbone has modulation but lora_ir.modulation=False"
            )
        return variables

    def apply_fn(trainable, frozen, images):
        variables = partition.combine(trainable, frozen)
        weights, prior = route(variables, images)
        model_variables = {"params": variables["params"]}
        if with_experts:
            model_variables[EXPERTS] = variables[EXPERTS]
        if section.modulation:
            stages = {k: v for k, v in variables[MODULATION].items() if k != PRIOR}
            model_variables[MODULATION] = stages
        with intercept.attach(attach_rules(section, weights=weights, prior=prior)):
            return model.apply(model_variables, images)

    return Parts(
        rules=trainability_rules(section),
        variables_fn=variables_fn,
        apply_fn=apply_fn,
        merge_fn=None,
    )


def load(config, load_params) -> tuple[dict, str | None]:
    """The init tree `{"params", "modulation", "router"}` and the backbone path checkpoints
    reference (None from scratch; the router is a reference of its own, `references`).

    `config.init.checkpoint` may be a previous `lora_ir` run (its `export/variables`: backbone
    and modulation), any other exported backbone or workdir (`load_params`), or empty when
    pre-training from scratch; `config.init.torch` an official `.pth`.
    """
    check(config)
    router_params, _ = routing.load_router(config.router)
    # Host arrays: restored arrays are committed to one device, which a sharded init refuses.
    router_params = jax.device_get(router_params)
    tree = {"params": None, MODULATION: None, ROUTER: router_params}
    checkpoint, torch_path = config.init.get("checkpoint", ""), config.init.get("torch", "")
    if checkpoint and torch_path:
        raise ValueError("config.init: give at most one of checkpoint and torch")
    previous = os.path.join(checkpoint, VARIABLES_DIR) if checkpoint else ""
    if previous and os.path.isdir(previous):
        variables = jax.device_get(ocp.StandardCheckpointer().restore(os.path.abspath(previous)))
        tree["params"] = variables["params"]
        tree[MODULATION] = variables.get(MODULATION)
        return tree, os.path.abspath(previous)
    if checkpoint or torch_path:
        params, path = load_params(config, checkpoint or torch_path)
        tree["params"] = jax.device_get(params)
        return tree, path
    return tree, None
