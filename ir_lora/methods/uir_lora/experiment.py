"""Offline data for the UIR-LoRA experiment (configs/uir_lora.py), from the sample photographs.

  python -m ir_lora.methods.uir_lora.experiment --root runs/uir_lora

Writes under `<root>/data/` (`ir_lora.data.synthetic`: held-out photographs and file names as
every offline experiment):

* `clean/`: the training photographs (all sample photographs but the held-out ones), longer side
  256, for PROD pre-training (as the quickstart);
* `<degradation>/train/{lq,gt}`: `num_pairs` random crops of the training photographs, degraded
  by that one degradation, for that degradation's LoRA;
* `mixed/test/{lq,gt}`: crops of the held-out photographs, each degraded by one degradation
  or by two in sequence (`MIXES`); names `<group>__<photo>_<i>`, the group being the
  degradations joined by "+", which the uir_lora table reads.

Degradation ranges are moderate choices for this demonstration [R], drawn per image.
"""

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from ir_lora import degradations
from ir_lora.data import synthetic

DEGRADATIONS = ("haze", "low_light", "noise", "rain")
MIXES = (("haze", "noise"), ("rain", "noise"), ("haze", "rain"), ("low_light", "rain"))
MAX_SIDE = 256


def _uniform(key, low, high):
    return jax.random.uniform(key, (), minval=low, maxval=high)


def degrade(name: str, key: jax.Array, image: jax.Array) -> jax.Array:
    """One draw of degradation `name` on a float `(H, W, 3)` image in [0, 1]."""
    k = jax.random.split(key, 5)
    if name == "haze":
        return degradations.haze(
            k[0],
            image,
            beta=_uniform(k[1], 0.8, 1.6),
            airlight=_uniform(k[2], 0.75, 0.95),
            depth_mix=_uniform(k[3], 0.3, 0.7),
        )
    if name == "low_light":
        return degradations.low_light(
            k[0],
            image,
            gamma=_uniform(k[1], 1.5, 2.2),
            gain=_uniform(k[2], 0.3, 0.5),
            shot=3e-3,
            read=5e-3,
        )
    if name == "noise":
        return degradations.gaussian_noise(k[0], image, sigma=_uniform(k[1], 15 / 255, 30 / 255))
    if name == "rain":
        return degradations.rain(
            k[0],
            image,
            density=_uniform(k[1], 0.002, 0.005),
            length=_uniform(k[2], 15.0, 35.0),
            angle=_uniform(k[3], -0.4, 0.4),
            brightness=_uniform(k[4], 0.3, 0.5),
        )
    raise ValueError(f"uir_lora experiment: unknown degradation {name!r}; known: {DEGRADATIONS}")


def _degrade_all(names, key, pixels: np.ndarray) -> np.ndarray:
    image = jnp.asarray(pixels, jnp.float32) / 255.0
    for i, name in enumerate(names):
        image = degrade(name, jax.random.fold_in(key, i), image)
    return synthetic.to_uint8(image)


def write(root: str, *, num_pairs: int = 32, pair_size: int = 96, test_size: int = 128, seed=0):
    """Writes every folder of the module docstring under `<root>/data`; returns that folder."""
    data = os.path.join(os.path.abspath(root), "data")
    train, held_out = synthetic.photos(MAX_SIDE)
    synthetic.write_clean(os.path.join(data, "clean"), train)
    key = jax.random.key(seed)
    for d, degradation in enumerate(DEGRADATIONS):
        rng = np.random.default_rng([seed, d])
        for i, crop in synthetic.random_crops(train, num_pairs, pair_size, rng):
            degraded = _degrade_all([degradation], jax.random.fold_in(key, 1000 * d + i), crop)
            name = synthetic.pair_name(i)
            synthetic.write_pair(os.path.join(data, degradation), "train", name, crop, degraded)
    groups = [(d,) for d in DEGRADATIONS] + list(MIXES)
    photos = sorted(held_out)
    for g, group in enumerate(groups):
        for photo in photos:
            pixels = held_out[photo]
            # Two crops per photograph: its left and right ends (held out from all training).
            width = pixels.shape[1]
            for i, left in enumerate((0, width - test_size)):
                crop = np.ascontiguousarray(pixels[:test_size, left : left + test_size])
                k = jax.random.fold_in(key, 10_000 + 100 * g + 10 * photos.index(photo) + i)
                name = synthetic.group_name("+".join(group), photo, i)
                lq = _degrade_all(group, k, crop)
                synthetic.write_pair(os.path.join(data, "mixed"), "test", name, crop, lq)
    return data


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="experiment root (data goes to root/data)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write(args.root, seed=args.seed))


if __name__ == "__main__":
    main()
