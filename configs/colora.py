"""CoLoRA fine-tuning (stage `colora`), with the contributions that size its ranks.

One command, from contributions to a trained adapter (ranks computed into <workdir>/colora/):

  python train.py --config configs/colora.py --workdir runs/colora \
      --config.init.checkpoint=runs/prod --config.data.source_dir=/path/to/pairs \
      --config.eval.datasets.val.source_dir=/path/to/pairs

Or in two steps: configs/colora_contributions.py writes contributions.json, ranks.json,
ranks.txt and the charts into its workdir, then any number of runs train with that ranks file
(`--config.colora.ranks=runs/colora_ranks/ranks.json`).

Budget 7% of the backbone (the paper's NAFNet figure) [V]; FAIG along a 200-step full fine-tune
with 20 Riemann steps, the delta rule and biases/norms tuned directly are [R] defaults
(METHODS.md sections 4-5); `--config.colora.contribution=grad_norm` needs no fine-tune.
`arg`: `variant=NAME` (default nafnet-sidd-w32).
"""

from configs import common


def get_config(arg=None):
    settings = common.parse_arg(arg, variant="nafnet-sidd-w32")
    config = common.training_config("colora", "colora", settings.variant)
    config.num_train_steps = 10_000
    config.checkpoint_every_steps = 1_000
    config.log_every_steps = 100
    config.optimizer.lr = 1e-3
    config.eval.datasets.val = common.eval_dataset("paired", "", split="val")
    config.lock()
    return config
