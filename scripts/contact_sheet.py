"""Draws one photograph under PROD-sampled degradations as a labelled grid (a visual check).

    python -m scripts.contact_sheet --out sheet.png [--image astronaut] [--seed 0] \
        [--ops blur,motion,noise,rain,jpeg] [--mode random_order] [--size 256]

The first tile is the clean image; each of the 12 others is labelled with the operators applied,
in order. `--ops all` draws from every operator (haze, low light and resampling included).
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import skimage.data
import skimage.transform
from PIL import Image, ImageDraw

from ir_lora import degradations


def _load(name: str, size: int) -> np.ndarray:
    if not hasattr(skimage.data, name):
        raise SystemExit(f"contact_sheet: skimage.data has no image {name!r}")
    image = getattr(skimage.data, name)()
    if image.ndim != 3 or image.shape[-1] != 3:
        raise SystemExit(f"contact_sheet: {name!r} is not an RGB photograph ({image.shape})")
    side = min(image.shape[:2])
    top, left = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
    square = image[top : top + side, left : left + side]
    return skimage.transform.resize(square, (size, size), anti_aliasing=True).astype(np.float32)


def _tile(image: np.ndarray, label: str) -> Image.Image:
    tile = Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8))
    canvas = Image.new("RGB", (tile.width, tile.height + 18), "white")
    canvas.paste(tile, (0, 18))
    ImageDraw.Draw(canvas).text((3, 3), label, fill="black")
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output PNG path")
    parser.add_argument("--image", default="astronaut", help="a skimage.data colour photo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ops", default=None, help="comma-separated operators, or 'all'")
    parser.add_argument("--mode", default="random_order", choices=degradations.MODES)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--columns", type=int, default=5)
    args = parser.parse_args()

    config = degradations.default_config()
    if args.ops:
        config.ops = list(degradations.NAMES) if args.ops == "all" else args.ops.split(",")
        config.max_degradations = min(5, len(config.ops))
    config.mode = args.mode
    clean = _load(args.image, args.size)
    batch = jnp.broadcast_to(jnp.asarray(clean), (12, *clean.shape))
    out, labels = jax.jit(lambda k, x: degradations.prod(k, x, config))(
        jax.random.key(args.seed), batch
    )
    tiles = [_tile(clean, "clean")]
    for image, order in zip(np.asarray(out), np.asarray(labels["order"])):
        names = [degradations.NAMES[i] for i in order if i >= 0]
        tiles.append(_tile(image, " > ".join(names)))
    rows = -(-len(tiles) // args.columns)
    w, h = tiles[0].size
    sheet = Image.new("RGB", (args.columns * (w + 4), rows * (h + 4)), "white")
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % args.columns) * (w + 4), (i // args.columns) * (h + 4)))
    sheet.save(args.out)
    print(f"wrote {args.out} ({sheet.width}x{sheet.height}, {len(tiles) - 1} degraded tiles)")


if __name__ == "__main__":
    main()
