"""Evaluates a trained model on the config's eval datasets (PSNR/SSIM tables, images).

  python eval.py --config configs/NAME.py --workdir DIR          # newest checkpoint of a run
  python eval.py --config configs/NAME.py --checkpoint PATH      # exported params or a .pth
  python eval.py ... --datasets=val,test --out_dir=DIR
  python eval.py --config configs/moe_allinone.py --workdir DIR  # the LoRA-IR all-in-one run

The config must describe the trained model (the same file and overrides as for training). Tables
go to `<out_dir>/results.{md,json,csv}`, written after each finished dataset. The all-in-one
experiment (stage `allinone`) re-scores its stages 2 and 3 and the router on its mixed test set
and writes the per-degradation table to `<out_dir>/allinone.md` (default out_dir: DIR/eval).
"""

import tensorflow_datasets as tfds
from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
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
    from ir_lora import allinone, evaluator, preflight, runner

    if FLAGS.workdir:
        preflight.require_workdir(FLAGS.workdir)  # a typo must not create a folder

    if FLAGS.config.stage == "allinone":
        if not FLAGS.workdir or FLAGS.datasets:
            raise app.UsageError("stage 'allinone' takes --workdir (and --out_dir) only")
        allinone.evaluate(FLAGS.config, FLAGS.workdir, out_dir=FLAGS.out_dir)
        return
    config = FLAGS.config.finetune if FLAGS.config.stage == "quickstart" else FLAGS.config
    results = runner.evaluate(
        config,
        workdir=FLAGS.workdir,
        checkpoint=FLAGS.checkpoint,
        datasets=FLAGS.datasets,
        out_dir=FLAGS.out_dir,
    )
    print(evaluator.format_table(results))


if __name__ == "__main__":
    app.run(main)
