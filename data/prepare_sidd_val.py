"""Writes SIDD's sRGB validation blocks (.mat) as PNG pairs for `prepare("sidd", split="val")`.

  python data/prepare_sidd_val.py --noisy ValidationNoisyBlocksSrgb.mat \
      --gt ValidationGtBlocksSrgb.mat --out /datasets/SIDD

writes `<out>/val/input/<i>_<j>.png` and `<out>/val/target/<i>_<j>.png` for the 40 x 32 blocks of
256 x 256 (1280 pairs). Needs scipy (`scipy.io.loadmat`).
"""

import argparse
import os

import numpy as np
from PIL import Image


def _blocks(path: str) -> np.ndarray:
    from scipy.io import loadmat

    arrays = [v for k, v in loadmat(path).items() if not k.startswith("__")]
    if len(arrays) != 1 or arrays[0].ndim != 5 or arrays[0].dtype != np.uint8:
        raise ValueError(f"{path}: expected one uint8 array of shape (images, blocks, H, W, 3).")
    return arrays[0]


def write_pairs(noisy_mat: str, gt_mat: str, out_dir: str) -> int:
    """Writes every block pair as PNGs; returns the number of pairs."""
    noisy, gt = _blocks(noisy_mat), _blocks(gt_mat)
    if noisy.shape != gt.shape:
        raise ValueError(f"Block arrays differ in shape: {noisy.shape} vs {gt.shape}.")
    for sub in ("input", "target"):
        os.makedirs(os.path.join(out_dir, "val", sub), exist_ok=True)
    for i in range(noisy.shape[0]):
        for j in range(noisy.shape[1]):
            name = f"{i:02d}_{j:02d}.png"
            Image.fromarray(noisy[i, j]).save(os.path.join(out_dir, "val", "input", name))
            Image.fromarray(gt[i, j]).save(os.path.join(out_dir, "val", "target", name))
    return noisy.shape[0] * noisy.shape[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noisy", required=True, help="ValidationNoisyBlocksSrgb.mat")
    parser.add_argument("--gt", required=True, help="ValidationGtBlocksSrgb.mat")
    parser.add_argument("--out", required=True, help="SIDD root folder for prepare('sidd')")
    args = parser.parse_args()
    print(f"Wrote {write_pairs(args.noisy, args.gt, args.out)} pairs under {args.out}/val.")


if __name__ == "__main__":
    main()
