"""Every finished run under `--root` as one CSV and markdown tables (partial sweeps included).

  python -m scripts.ablations.collect --root runs/ablations --out docs/ablations

The ablation scripts write their CSV and chart once all their runs exist; this reads the
`result.json` of whatever has finished, so a sweep cut short still reports what it measured.
"""

import argparse
import glob
import json
import os

from scripts.ablations import common


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="runs/ablations")
    parser.add_argument("--out", default="docs/ablations")
    args = parser.parse_args()
    rows = []
    for path in sorted(
        glob.glob(os.path.join(args.root, "finetune", "*", "*", "*", "result.json"))
    ):
        with open(path) as f:
            rows.append(json.load(f))
    if not rows:
        raise SystemExit(f"No finished fine-tune under {args.root}/finetune")
    rows.sort(key=lambda r: (r["task"], r["pretraining"], r["num_pairs"], r["tuning"]))
    common.write_csv(os.path.join(args.out, "runs.csv"), rows)
    columns = ["task", "pretraining", "num_pairs", "tuning", "percent", "psnr", "ssim"]
    print(common.markdown(rows, columns))


if __name__ == "__main__":
    main()
