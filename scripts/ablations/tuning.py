"""Ablation 1: tuning methods at CoLoRA's budget, after PROD pre-training (paper Results (b)).

  python -m scripts.ablations.tuning                       # CPU size: tiny NAFNet, 16 pairs
  python -m scripts.ablations.tuning --num-pairs 128 --variant nafnet-sidd-w32 --width 0 \
      --enc '' --gt-size 256 --finetune-steps 10000 --pretrain-steps 200000   # paper size

Rows per novel task (haze, low light; held-out photographs): the PROD model without tuning,
full fine-tuning, uniform-rank LoRA at exactly CoLoRA's trainable count (rank chosen by
`uniform_rank_for_budget`), CoLoRA (FAIG ranks, `--budget` of the backbone, biases/norms tuned)
and decoder-only tuning. Writes `<out>/tuning.csv` and `<out>/tuning.png`.
"""

import os

import matplotlib

from scripts.ablations import common

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROWS = ("none", "full", "lora_uniform", "colora", "decoder")
LABELS = {
    "none": "PROD, no tuning",
    "full": "full",
    "lora_uniform": "LoRA (uniform r)",
    "colora": "CoLoRA",
    "decoder": "decoder only",
}


def main():
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--num-pairs", type=int, default=16)
    args = parser.parse_args()
    common.setup_logging()
    rows = []
    for task in args.tasks.split(","):
        for tuning in ROWS:
            rows.append(
                common.finetune(
                    args, pretraining="prod", task=task, num_pairs=args.num_pairs, tuning=tuning
                )
            )
    common.write_csv(os.path.join(args.out, "tuning.csv"), rows)
    means = common.mean_over_tasks(rows, "tuning")
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(tasks)
    for i, task in enumerate(tasks):
        values = [common.psnr_of(rows, task=task, tuning=t) for t in ROWS]
        ax.bar([x + i * width for x in range(len(ROWS))], values, width, label=task)
    ax.set_xticks([x + width * (len(tasks) - 1) / 2 for x in range(len(ROWS))])
    ax.set_xticklabels([LABELS[t] for t in ROWS], rotation=15)
    ax.set_ylabel("PSNR (dB), held-out photographs")
    ax.set_ylim(min(r["psnr"] for r in rows) - 1, max(r["psnr"] for r in rows) + 0.5)
    ax.set_title(f"Tuning at equal budget, PROD backbone, {args.num_pairs} pairs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "tuning.png"), dpi=120)
    table = [
        {
            "tuning": LABELS[t],
            "% trainable": next(r["percent"] for r in rows if r["tuning"] == t),
            **{task: common.psnr_of(rows, task=task, tuning=t) for task in tasks},
            "mean": means[t],
        }
        for t in ROWS
    ]
    print(common.markdown(table, list(table[0])))


if __name__ == "__main__":
    main()
