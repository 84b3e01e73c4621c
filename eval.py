"""Evaluates a trained run: `python eval.py --config configs/NAME.py --workdir DIR`.

  python eval.py --config configs/NAME.py --workdir DIR          # newest checkpoint of a run
  python eval.py --config configs/NAME.py --checkpoint PATH      # exported params or a .pth
  python eval.py ... --datasets=val,test --out_dir=DIR

Re-scores `config.stage` (`ir_lora.stages.registry`): for `pretrain` / `finetune` / `colora`
the PSNR/SSIM tables of `config.eval.datasets` (`<out_dir>/results.{md,json,csv}`); the offline
experiments (`quickstart`, `lora_ir_allinone`, `uir_lora`) rebuild their own tables from the
workdir (default out_dir: DIR/eval). The config must describe the trained model (the same file
and overrides as for training).
"""

import tensorflow_datasets as tfds
from absl import app, flags, logging

from ir_lora import cli
from ir_lora.stages import registry

FLAGS = flags.FLAGS
cli.define_config_flag()
flags.DEFINE_string("workdir", None, "A training workdir: evaluate its newest checkpoint.")
flags.DEFINE_string("checkpoint", None, "Exported params directory or official .pth file.")
flags.DEFINE_list("datasets", None, "Names from config.eval.datasets (default: all).")
flags.DEFINE_string("out_dir", None, "Where results go (default: <workdir or checkpoint>/eval).")
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if bool(FLAGS.workdir) == bool(FLAGS.checkpoint):
        raise app.UsageError("Give exactly one of --workdir and --checkpoint.")
    logging.set_verbosity(logging.INFO)
    tfds.disable_progress_bar()  # The trainer has its own; TFDS's bars clutter the logs.
    text = registry.evaluate(
        FLAGS.config,
        workdir=FLAGS.workdir,
        checkpoint=FLAGS.checkpoint,
        datasets=FLAGS.datasets,
        out_dir=FLAGS.out_dir,
    )
    print(text)


if __name__ == "__main__":
    cli.run(main)
