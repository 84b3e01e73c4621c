"""Trains with an ml-collections config: `python train.py --config configs/NAME.py --workdir DIR`.

Runs `config.stage` (`ir_lora.stages.registry`: pretrain, finetune, colora, lora_ir_allinone,
uir_lora, quickstart, ...). Override any config value on the command line, e.g.
`--config.num_train_steps=100` or `--config.model.overrides.width=16`; unknown keys are errors
that name the nearest valid key (or the method whose section it is).
"""

import tensorflow_datasets as tfds
from absl import app, flags, logging

from ir_lora import cli, sharding
from ir_lora.stages import registry

FLAGS = flags.FLAGS
cli.define_config_flag()
flags.DEFINE_string("workdir", None, "Directory for checkpoints, event files and results.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    # Must run before any other JAX call on multi-host systems (TPU pods, Slurm).
    sharding.maybe_initialize_distributed()
    logging.set_verbosity(logging.INFO)
    tfds.disable_progress_bar()  # The trainer has its own; TFDS's bars clutter the logs.
    registry.train(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    cli.run(main)
