"""CoLoRA fine-tuning of a pre-trained NAFNet, with the contributions that size its ranks.

One command, from contributions to a trained adapter (ranks computed into <workdir>/colora/):

  python train.py --config configs/colora.py --workdir runs/colora \
      --config.init.checkpoint=runs/prod --config.data.source_dir=/path/to/pairs \
      --config.eval.datasets.val.source_dir=/path/to/pairs

Or in two steps: the contributions stage writes contributions.json, ranks.json, ranks.txt and the
charts contributions.png (per block, encoder / middle / decoder) and ranks.png into its workdir,
then any number of runs train with that ranks file:

  python train.py --config configs/colora.py:contributions --workdir runs/colora_ranks \
      --config.init.checkpoint=runs/prod --config.data.source_dir=/path/to/pairs
  python train.py --config configs/colora.py --workdir runs/colora \
      --config.colora.ranks=runs/colora_ranks/ranks.json --config.init.checkpoint=runs/prod \
      --config.data.source_dir=/path/to/pairs --config.eval.datasets.val.source_dir=/path/to/pairs

Budget 7% of the backbone (the paper's NAFNet figure) [V]; FAIG along a 200-step full fine-tune
with 20 Riemann steps, the delta rule and biases/norms tuned directly are [R] defaults
(METHODS.md sections 4-5); `--config.colora.contribution=grad_norm` needs no fine-tune.
"""

from configs import common


def get_config(arg=None):
    stage = arg or "finetune"
    if stage not in ("finetune", "contributions"):
        raise ValueError(f"configs/colora.py:<stage> takes finetune or contributions, got {arg!r}")
    config = common.base_config()
    config.stage = stage
    config.method = "colora"
    config.num_train_steps = 10_000
    config.checkpoint_every_steps = 1_000
    config.log_every_steps = 100
    config.optimizer.lr = 1e-3
    config.eval.datasets.val = common.eval_dataset("paired", "", split="val")
    config.lock()
    return config
