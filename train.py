"""Trains with an ml-collections config: `python train.py --config configs/NAME.py --workdir DIR`.

Thin entry point; the logic lives in `ir_lora.runner` (stages), `ir_lora.router_stage` (the
LoRA-IR router), `ir_lora.quickstart` and `ir_lora.allinone` (offline experiments).
Override any config value on the command line, e.g. `--config.num_train_steps=100`; unknown keys
are errors that name the nearest valid key.
"""

import tensorflow_datasets as tfds
from absl import app, flags, logging
from ml_collections import config_flags

from ir_lora import sharding

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, event files and results.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    # Must run before any other JAX call on multi-host systems (TPU pods, Slurm).
    sharding.maybe_initialize_distributed()
    logging.set_verbosity(logging.INFO)
    tfds.disable_progress_bar()  # The trainer has its own; TFDS's bars clutter the logs.
    from ir_lora import allinone, preflight, quickstart, router_stage, runner, workdir

    # Before anything is written: a config that would fail later, then one run per workdir (the
    # lock is held until this process exits).
    preflight.check_run(FLAGS.config)
    workdir.acquire(FLAGS.workdir)
    if FLAGS.config.stage == "quickstart":
        quickstart.run(FLAGS.config, FLAGS.workdir)
    elif FLAGS.config.stage == "router":
        router_stage.train(FLAGS.config, FLAGS.workdir)
    elif FLAGS.config.stage == "allinone":
        allinone.run(FLAGS.config, FLAGS.workdir)
    else:
        runner.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
