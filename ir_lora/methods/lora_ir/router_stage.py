"""The `lora_ir_router` stage of train.py: the degradation router alone (LoRA-IR step 1).

    python train.py --config configs/lora_ir_router.py --workdir runs/router \
        --config.data.source_dir=/path/to/clean/images

Clean crops (`config.data`, dataset `images`) are degraded on the device by PROD (`config.prod`)
and the router (`config.router`, `routing`) learns which degradations each crop carries: sigmoid
cross-entropy against PROD's multi-hot `present` labels. It trains through `trainer.train` (one
train step, checkpoints, exact resume, mesh, TensorBoard, NaN stop); only the router's trainable
part changes (the whole small CNN; for a registered frozen encoder, only its MLP and head).

At the end the params go to `<workdir>/export/router` (what `config.router.checkpoint` of the
`lora_ir` stages points at) and `<workdir>/router.json` holds the training curve and the routing
accuracy on `eval_batches` fresh batches with one degradation per image from `classes` (top-1
over the classes' logits: the expert LoRA-IR would pick). Every `eval_every_steps`, TensorBoard
and `accuracy_log` get the routing accuracy so far, on `eval_batches` batches drawn once before
training from a second iterator (crops of the same images). A workdir that already holds
`export/router` and `router.json` is not retrained.
"""

import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ir_lora import degradations, routers, services, train_lib, trainer
from ir_lora.methods.lora_ir import routing


def single_degradation_config(prod_config, classes) -> ml_collections.ConfigDict:
    """PROD with exactly one degradation per image, drawn from `classes`."""
    prod = ml_collections.ConfigDict(prod_config.to_dict())
    prod.ops = tuple(classes)
    prod.mode = "single"
    prod.min_degradations = prod.max_degradations = 1
    return prod


def routing_accuracy(router_apply, params, clean_batches, config, seed: int) -> float:
    """Top-1 accuracy over `config.classes` on single-degradation versions of `clean_batches`."""
    classes = tuple(config.classes)
    prod = single_degradation_config(config.prod, classes)
    indices = jnp.asarray(routing.class_indices(classes))

    @jax.jit
    def correct(params, clean, key):
        lq, labels = degradations.prod(key, clean, prod)
        _, logits = router_apply({"params": params}, lq)
        truth = jnp.argmax(labels["present"][:, indices], axis=-1)
        return jnp.sum(routing.predicted_class(logits, classes) == truth)

    hits = total = 0
    for i, clean in enumerate(clean_batches):
        hits += int(correct(params, clean, jax.random.fold_in(jax.random.key(seed), i)))
        total += clean.shape[0]
    return hits / max(total, 1)


def router_method(config, model) -> train_lib.Method:
    """The router as the trainer's method: PROD in the step, scored on PROD's `present`."""
    prod = config.prod

    def degrade_fn(rng, clean):
        return degradations.prod(rng, clean, prod)

    size = int(config.data.gt_size)
    return routers.router_method(
        model,
        (1, size, size, 3),
        labels_of=lambda targets: targets["labels"]["present"],
        degrade_fn=degrade_fn,
    )


def train(config, workdir: str) -> dict:
    """Runs the router stage in `workdir`.

    Returns:
      `{"export", "routing_accuracy", "log", "accuracy_log"}` (also `<workdir>/router.json`).
    """
    routing.class_indices(config.classes)
    workdir = os.path.abspath(workdir)
    export = os.path.join(workdir, routing.EXPORT_DIR)
    summary_path = os.path.join(workdir, "router.json")
    if os.path.isdir(export) and os.path.exists(summary_path):
        logging.info("Router already trained in %s", workdir)
        with open(summary_path) as f:
            return json.load(f)
    os.makedirs(workdir, exist_ok=True)
    model = routing.build_router(config.router)
    probe_iterator = services.train_iterator(config, workdir)
    probe = [np.asarray(next(probe_iterator)["gt"]) for _ in range(int(config.eval_batches))]
    accuracy_log, log = [], []

    def eval_fn(state, frozen):
        del frozen
        params = state.trainable
        accuracy = routing_accuracy(model.apply, params, probe, config, int(config.seed) + 2)
        logging.info("router step %d: routing accuracy %.3f", int(state.step), accuracy)
        accuracy_log.append({"step": int(state.step), "routing_accuracy": accuracy})
        return {"routing_accuracy": accuracy}

    iterator = services.train_iterator(config, workdir)
    state, _ = trainer.train(
        config,
        workdir,
        method=router_method(config, model),
        data_iterator=iterator,
        eval_fn=eval_fn,
        metrics_log=log,
    )
    params = jax.device_get(state.trainable)
    held_out = [np.asarray(next(iterator)["gt"]) for _ in range(int(config.eval_batches))]
    accuracy = routing_accuracy(model.apply, params, held_out, config, int(config.seed) + 1)
    logging.info("Routing accuracy over %s: %.3f", list(config.classes), accuracy)
    services.export_params(params, export)
    summary = {
        "export": export,
        "routing_accuracy": accuracy,
        "log": log,
        "accuracy_log": accuracy_log,
    }
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=1)
    return summary
