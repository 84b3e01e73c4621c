"""The composition with the true degradations' weights (an upper bound on routing), per group.

  python -m ir_lora.methods.uir_lora.oracle --workdir runs/uir_lora/composition

Each test image's group name ("haze+noise") gives its weights: 1/m on each of its m degradations'
LoRAs (`--full`: 1 on each), 0 elsewhere. This separates what the composition can do from what
the router gets right.
"""

import argparse
import os

import numpy as np

from ir_lora import services
from ir_lora.data import synthetic
from ir_lora.methods.uir_lora import compose, stage


def oracle_table(config, workdir: str, *, full: bool = False) -> str:
    """The oracle row; `full` gives each of an image's LoRAs weight 1 instead of 1/m."""
    backbone, bundle, names, lora_config = stage.load_bundle(config, workdir)
    model = services.build_model(config)
    (dataset,) = services.eval_datasets(config, workdir).values()
    groups = {}
    for i in range(len(dataset)):
        example = dataset[i]
        name = example["name"]
        name = name.decode() if isinstance(name, bytes) else str(name)
        groups.setdefault(synthetic.group_of(name), []).append(example)
    cells, psnrs, ssims = [], [], []
    for group, examples in groups.items():
        members = group.split("+")
        share = 1.0 if full else 1.0 / len(members)
        weights = np.asarray([share if n in members else 0.0 for n in names])

        def restore(p, x, weights=weights):
            w = np.broadcast_to(weights, (x.shape[0], len(names))).astype(np.float32)
            return compose.apply(model, p["params"], p["loras"], w, x, config=lora_config)

        params = {"params": backbone, "loras": bundle["loras"]}
        out = os.path.join(workdir, "eval", "oracle_full" if full else "oracle", group)
        result = services.run_evaluation(config, restore, params, {"mixed": examples}, out)
        mean = result["datasets"]["mixed"]["mean"]
        psnrs.append(mean["psnr"])
        ssims.append(mean["ssim"])
        cells.append(f"{mean['psnr']:.2f} / {mean['ssim']:.4f}")
    cells.append(f"{np.mean(psnrs):.2f} / {np.mean(ssims):.4f}")
    header = "| variant | " + " | ".join(groups) + " | mean |"
    rule = "|" + "---|" * (len(groups) + 2)
    label = "oracle, weight 1 each" if full else "oracle weights"
    return "\n".join([header, rule, f"| {label} | " + " | ".join(cells) + " |"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a finished uir_lora stage's workdir")
    parser.add_argument("--full", action="store_true", help="weight 1 on each true LoRA, not 1/m")
    args = parser.parse_args()
    config = stage.run_config(args.workdir)  # the config the stage recorded in its checkpoints
    table = oracle_table(config, args.workdir, full=args.full)
    name = "oracle_full.md" if args.full else "oracle.md"
    with open(os.path.join(args.workdir, "eval", name), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
