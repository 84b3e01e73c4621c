"""Ablation 2: pre-training (random init, fixed order, single degradation, PROD) + full tuning.

  python -m scripts.ablations.pretraining                  # CPU size
  python -m scripts.ablations.pretraining --num-pairs 128 --pretrain-steps 200000 ...

The same fine-tune (full, `--finetune-steps`, `--num-pairs` pairs of each novel task) from four
backbones: random initialisation, and PROD pre-training with `prod.mode` "fixed_order",
"single" and "random_order" (PROD), each `--pretrain-steps` steps on the same clean photographs
(paper Results (a)). Writes `<out>/pretraining.csv` and `<out>/pretraining.png`.
"""

import os

import matplotlib

from scripts.ablations import common

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {
    "random_init": "random init",
    "fixed_order": "fixed order",
    "single": "single degradation",
    "prod": "PROD",
}


def main():
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--num-pairs", type=int, default=16)
    parser.add_argument("--tuning", default="full", choices=common.TUNINGS)
    args = parser.parse_args()
    common.setup_logging()
    rows = []
    for pretraining in common.PRETRAININGS:
        for task in args.tasks.split(","):
            for tuning in ("none", args.tuning):
                rows.append(
                    common.finetune(
                        args,
                        pretraining=pretraining,
                        task=task,
                        num_pairs=args.num_pairs,
                        tuning=tuning,
                    )
                )
    common.write_csv(os.path.join(args.out, "pretraining.csv"), rows)
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    tuned = [r for r in rows if r["tuning"] == args.tuning]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(tasks)
    kinds = common.PRETRAININGS
    for i, task in enumerate(tasks):
        values = [common.psnr_of(tuned, task=task, pretraining=k) for k in kinds]
        ax.bar([x + i * width for x in range(len(kinds))], values, width, label=task)
    ax.set_xticks([x + width * (len(tasks) - 1) / 2 for x in range(len(kinds))])
    ax.set_xticklabels([LABELS[k] for k in kinds])
    ax.set_ylabel("PSNR (dB), held-out photographs")
    ax.set_ylim(min(r["psnr"] for r in tuned) - 1, max(r["psnr"] for r in tuned) + 0.5)
    ax.set_title(f"Pre-training, then {args.tuning} tuning on {args.num_pairs} pairs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "pretraining.png"), dpi=120)
    table = []
    for k in kinds:
        row = {"pre-training": LABELS[k]}
        for task in tasks:
            for tuning in ("none", args.tuning):
                psnr = common.psnr_of(rows, pretraining=k, task=task, tuning=tuning)
                row[f"{task} ({tuning})"] = psnr
        row[f"mean ({args.tuning})"] = common.psnr_of(tuned, pretraining=k)
        table.append(row)
    print(common.markdown(table, list(table[0])))


if __name__ == "__main__":
    main()
