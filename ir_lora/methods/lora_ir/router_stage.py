"""The `router` stage of train.py: train the degradation router alone (LoRA-IR step 1).

    python train.py --config configs/moe_router.py --workdir runs/router \
        --config.data.source_dir=/path/to/clean/images

Clean crops (`config.data`, dataset `images`) are degraded on the device by PROD (`config.prod`)
and the router (`config.router`, `ir_lora.routing`) learns which degradations each crop carries:
sigmoid cross-entropy against PROD's multi-hot `present` labels. Only the router's trainable
part changes (the whole small CNN; for a registered frozen encoder, only its MLP and head).

At the end the params go to `<workdir>/export/router` (what `config.router.checkpoint` of the
`moe` stages points at) and `<workdir>/router.json` holds the training curve and the routing
accuracy on `eval_batches` fresh batches with one degradation per image from `moe.classes`
(top-1 over the classes' logits: the expert LoRA-IR would pick). Every `eval_every_steps`,
`accuracy_log` gets the routing accuracy so far, on `eval_batches` batches drawn once before
training from a second iterator (crops of the same images). A workdir that already holds
`export/router` is not retrained.
"""

import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ir_lora import degradations, routing, runner, train_lib
from ir_lora.adapters import router as router_lib


def _single_config(config) -> ml_collections.ConfigDict:
    """PROD with one degradation per image, drawn from the experts' classes."""
    prod = ml_collections.ConfigDict(config.prod.to_dict())
    prod.ops = list(config.moe.classes)
    prod.mode = "single"
    prod.min_degradations = prod.max_degradations = 1
    return prod


def routing_accuracy(router_apply, params, clean_batches, config, seed: int) -> float:
    """Top-1 accuracy over `moe.classes` on single-degradation versions of `clean_batches`."""
    prod = _single_config(config)
    indices = jnp.asarray(routing.class_indices(config.moe.classes))

    @jax.jit
    def correct(params, clean, key):
        lq, labels = degradations.prod(key, clean, prod)
        _, logits = router_apply({"params": params}, lq)
        truth = jnp.argmax(labels["present"][:, indices], axis=-1)
        return jnp.sum(routing.predicted_class(logits, config.moe.classes) == truth)

    hits = total = 0
    for i, clean in enumerate(clean_batches):
        hits += int(correct(params, clean, jax.random.fold_in(jax.random.key(seed), i)))
        total += clean.shape[0]
    return hits / max(total, 1)


def train(config, workdir: str) -> dict:
    """Runs the router stage in `workdir`.

    Returns:
      `{"export", "routing_accuracy", "log", "accuracy_log"}` (also `<workdir>/router.json`).
    """
    workdir = os.path.abspath(workdir)
    export = os.path.join(workdir, routing.EXPORT_DIR)
    summary_path = os.path.join(workdir, "router.json")
    if os.path.isdir(export) and os.path.exists(summary_path):
        logging.info("Router already trained in %s", workdir)
        with open(summary_path) as f:
            return json.load(f)
    os.makedirs(workdir, exist_ok=True)
    model = routing.build_router(config.router)
    iterator = runner.train_iterator(config, workdir)
    steps = int(config.num_train_steps)
    tx = train_lib.make_optimizer(config.optimizer, num_train_steps=steps)
    first = np.asarray(next(iterator)["gt"])
    key = jax.random.key(int(config.seed))
    params = model.init(jax.random.fold_in(key, 0), first)["params"]
    opt_state = tx.init(params)
    prod = config.prod
    update = router_lib.make_train_step(model, tx)
    every = int(config.eval_every_steps)
    probe = []
    if every > 0:
        probe_iterator = runner.train_iterator(config, workdir)
        probe = [np.asarray(next(probe_iterator)["gt"]) for _ in range(int(config.eval_batches))]

    @jax.jit
    def degrade(clean, key):
        lq, labels = degradations.prod(key, clean, prod)
        return lq, labels["present"]

    log, pending, accuracy_log = [], [], []
    for step in range(1, steps + 1):
        clean = first if step == 1 else np.asarray(next(iterator)["gt"])
        lq, present = degrade(clean, jax.random.fold_in(key, step))
        params, opt_state, metrics = update(params, opt_state, lq, present)
        pending.append(metrics)
        if step % int(config.log_every_steps) == 0 or step == steps:
            mean = {k: float(np.mean([float(m[k]) for m in pending])) for k in pending[0]}
            logging.info("router step %d: %s", step, mean)
            log.append({"step": step, **mean})
            pending = []
        if every > 0 and (step % every == 0 or step == steps):
            accuracy = routing_accuracy(model.apply, params, probe, config, int(config.seed) + 2)
            logging.info("router step %d: routing accuracy %.3f", step, accuracy)
            accuracy_log.append({"step": step, "routing_accuracy": accuracy})
    held_out = [np.asarray(next(iterator)["gt"]) for _ in range(int(config.eval_batches))]
    accuracy = routing_accuracy(model.apply, params, held_out, config, int(config.seed) + 1)
    logging.info("Routing accuracy over %s: %.3f", list(config.moe.classes), accuracy)
    runner.export_params(params, export)
    summary = {
        "export": export,
        "routing_accuracy": accuracy,
        "log": log,
        "accuracy_log": accuracy_log,
    }
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=1)
    return summary
