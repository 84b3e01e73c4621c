"""Ablation 3: number of training pairs (16, 32, 64, 128) for each tuning method, PROD backbone.

  python -m scripts.ablations.data_size                    # CPU size: full and CoLoRA, haze
  python -m scripts.ablations.data_size --tunings full,lora_uniform,colora,decoder \
      --tasks haze,low_light --sizes 16,32,64,128          # every curve of the paper's plot

CoLoRA's contributions and ranks are computed on each training set (its own brief full fine-tune
and FAIG). Writes `<out>/data_size.csv` and `<out>/data_size.png` (PSNR against pairs).
"""

import os

import matplotlib

from scripts.ablations import common

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16,32,64,128")
    parser.add_argument("--tunings", default="full,colora")
    parser.set_defaults(tasks="haze")
    args = parser.parse_args()
    common.setup_logging()
    sizes = [int(n) for n in args.sizes.split(",")]
    tunings = args.tunings.split(",")
    tasks = args.tasks.split(",")
    # Largest sets first: the smallest is the one tuning.py most likely has run already.
    rows = [
        common.finetune(args, pretraining="prod", task=task, num_pairs=n, tuning=tuning)
        for task in tasks
        for n in sorted(sizes, reverse=True)
        for tuning in tunings
    ]
    common.write_csv(os.path.join(args.out, "data_size.csv"), rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    for tuning in tunings:
        means = [common.psnr_of(rows, tuning=tuning, num_pairs=n) for n in sizes]
        ax.plot(sizes, means, marker="o", label=tuning)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.set_xlabel("training pairs")
    ax.set_ylabel(f"PSNR (dB), mean over {', '.join(tasks)}")
    ax.set_title("Data size, PROD backbone")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "data_size.png"), dpi=120)
    table = [
        {"tuning": t, **{str(n): common.psnr_of(rows, tuning=t, num_pairs=n) for n in sizes}}
        for t in tunings
    ]  # mean over the tasks; the CSV has every task
    print(common.markdown(table, list(table[0])))


if __name__ == "__main__":
    main()
