"""Offline experiment data from the sample photographs, with one naming convention.

Every offline experiment (the quickstart, the LoRA-IR all-in-one run, the UIR-LoRA experiment,
the CoLoRA ablations) builds its folders from scikit-image's photographs (`samples`) with these
pieces, so that they hold out the same photographs and name their files the same way:

* the photographs in `HELD_OUT` are never trained on; the others are the training photographs;
* training pairs are random crops of the training photographs (cycling through them in name
  order), named `pair<iii>.png`;
* held-out test images are named `<photo>.png`, or `<group>__<photo>_<i>.png` when a test set
  mixes degradation groups (`group_of` reads the group back: "low_light", "haze+noise").

Folders follow the dataset layouts of `ir_lora.data.prepare`: a clean folder of images, and
paired folders `<split>/{lq,gt}/`.
"""

import os
from collections.abc import Iterator, Mapping

import jax.numpy as jnp
import numpy as np
from PIL import Image

from ir_lora.data import samples

HELD_OUT = ("chelsea", "coffee")
GROUP_SEPARATOR = "__"


def save(path: str, pixels: np.ndarray) -> str:
    """Writes a uint8 image as PNG (folders created); returns the path."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def to_uint8(x) -> np.ndarray:
    """A float image in [0, 1] rounded to uint8."""
    return np.asarray(jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0), np.uint8)


def photos(max_side: int, held_out=HELD_OUT) -> tuple[dict, dict]:
    """`(training photographs, held-out photographs)`, `{name: uint8 (H, W, 3)}`, each shrunk
    so that its longer side is at most `max_side`."""
    shrunk = {name: samples.shrink(p, max_side) for name, p in samples.sample_photos()}
    unknown = set(held_out) - set(shrunk)
    if unknown:
        raise ValueError(
            f"held-out photographs {sorted(unknown)} are not sample photographs {list(shrunk)}"
        )
    train = {n: p for n, p in shrunk.items() if n not in held_out}
    return train, {n: shrunk[n] for n in held_out}


def write_clean(folder: str, images: Mapping[str, np.ndarray]) -> str:
    """`<folder>/<name>.png` for every image: an `images` (clean) dataset folder."""
    for name, pixels in images.items():
        save(os.path.join(folder, f"{name}.png"), pixels)
    return folder


def random_crops(
    images: Mapping[str, np.ndarray], count: int, size: int, rng: np.random.Generator
) -> Iterator[tuple[int, np.ndarray]]:
    """`count` random `size` x `size` crops, cycling through `images` in name order:
    `(index, crop)`, the window of crop i drawn from `rng` (top, then left)."""
    names = sorted(images)
    for i in range(count):
        pixels = images[names[i % len(names)]]
        top = rng.integers(0, pixels.shape[0] - size + 1)
        left = rng.integers(0, pixels.shape[1] - size + 1)
        yield i, np.ascontiguousarray(pixels[top : top + size, left : left + size])


def pair_name(index: int) -> str:
    """The file name of training pair `index`."""
    return f"pair{index:03d}.png"


def group_name(group: str, photo: str, index: int) -> str:
    """The file name of a mixed test image: `<group>__<photo>_<index>.png`."""
    return f"{group}{GROUP_SEPARATOR}{photo}_{index}.png"


def group_of(name: str) -> str:
    """The degradation group of a mixed test image's name (`group_name`)."""
    return os.path.basename(name).split(GROUP_SEPARATOR)[0]


def write_pair(folder: str, split: str, name: str, gt: np.ndarray, lq: np.ndarray) -> None:
    """One pair of a paired dataset: `<folder>/<split>/gt/<name>` and `.../lq/<name>`."""
    save(os.path.join(folder, split, "gt", name), gt)
    save(os.path.join(folder, split, "lq", name), lq)
