"""Offline data for the UIR-LoRA experiment (configs/uirlora.py), from scikit-image photographs.

  python -m ir_lora.uir.data --root runs/uirlora

Writes under `<root>/data/`:

* `clean/`: the training photographs (all sample photographs but `EVAL_PHOTOS`), longer side 256,
  for PROD pre-training (as the quickstart);
* `<degradation>/train/{lq,gt}`: `num_pairs` random crops of the training photographs, degraded
  by that one degradation, for that degradation's LoRA;
* `mixed/test/{lq,gt}`: crops of the held-out photographs, each degraded by one degradation
  or by two in sequence (`MIXES`); names `<group>__<photo>_<i>`, the group being the
  degradations joined by "+", which the multilora table reads.

Degradation ranges are moderate choices for this demonstration [R], drawn per image.
"""

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from ir_lora import degradations
from ir_lora.data import samples
from ir_lora.quickstart import _save, _shrink, _to_uint8

EVAL_PHOTOS = ("chelsea", "coffee")
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
    raise ValueError(f"ir_lora.uir.data: unknown degradation {name!r}; known: {DEGRADATIONS}")


def _degrade_all(names, key, pixels: np.ndarray) -> np.ndarray:
    image = jnp.asarray(pixels, jnp.float32) / 255.0
    for i, name in enumerate(names):
        image = degrade(name, jax.random.fold_in(key, i), image)
    return _to_uint8(image)


def _crop(rng, pixels, size):
    top = rng.integers(0, pixels.shape[0] - size + 1)
    left = rng.integers(0, pixels.shape[1] - size + 1)
    return np.ascontiguousarray(pixels[top : top + size, left : left + size])


def write(root: str, *, num_pairs: int = 32, pair_size: int = 96, test_size: int = 128, seed=0):
    """Writes every folder of the module docstring under `<root>/data`; returns that folder."""
    data = os.path.join(os.path.abspath(root), "data")
    photos = {n: _shrink(p, MAX_SIDE) for n, p in samples.sample_photos()}
    train = {n: p for n, p in photos.items() if n not in EVAL_PHOTOS}
    for name, pixels in train.items():
        _save(os.path.join(data, "clean", f"{name}.png"), pixels)
    key = jax.random.key(seed)
    names = sorted(train)
    for d, degradation in enumerate(DEGRADATIONS):
        rng = np.random.default_rng([seed, d])
        for i in range(num_pairs):
            crop = _crop(rng, train[names[i % len(names)]], pair_size)
            degraded = _degrade_all([degradation], jax.random.fold_in(key, 1000 * d + i), crop)
            for kind, pixels in (("gt", crop), ("lq", degraded)):
                _save(os.path.join(data, degradation, "train", kind, f"{i:03d}.png"), pixels)
    groups = [(d,) for d in DEGRADATIONS] + list(MIXES)
    for g, group in enumerate(groups):
        for photo in EVAL_PHOTOS:
            pixels = photos[photo]
            # Two crops per photograph: its left and right ends (held out from all training).
            width = pixels.shape[1]
            for i, left in enumerate((0, width - test_size)):
                crop = np.ascontiguousarray(pixels[:test_size, left : left + test_size])
                k = jax.random.fold_in(key, 10_000 + 100 * g + 10 * EVAL_PHOTOS.index(photo) + i)
                name = f"{'+'.join(group)}__{photo}_{i}.png"
                _save(os.path.join(data, "mixed", "test", "gt", name), crop)
                _save(os.path.join(data, "mixed", "test", "lq", name), _degrade_all(group, k, crop))
    return data


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="experiment root (data goes to root/data)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write(args.root, seed=args.seed))


if __name__ == "__main__":
    main()
