"""CoLoRA's contributions stage: per-layer contributions of a pre-trained backbone to a task.

  python train.py --config configs/colora_contributions.py --workdir runs/colora_ranks \
      --config.init.checkpoint=runs/prod --config.data.source_dir=/path/to/pairs

Writes contributions.json, ranks.json (what `method = colora` reads), ranks.txt and the charts
contributions.png (per block, encoder / middle / decoder) and ranks.png into the workdir.
Everything else is configs/colora.py's (`arg`: `variant=NAME`).
"""

from configs import colora


def get_config(arg=None):
    config = colora.get_config(arg)
    with config.unlocked():
        config.stage = "colora_contributions"
    return config
