"""A before | after picture: each input image beside its restored PNG, one row per image.

  ir-lora-restore --input runs/quickstart/data/haze/val/lq --output runs/quickstart/restored \\
      --workdir runs/quickstart
  python -m scripts.before_after --input runs/quickstart/data/haze/val/lq \\
      --restored runs/quickstart/restored --out docs/restore_quickstart.png

The restored panels are the command's PNGs, unchanged except for an optional common downscale
(`--height`) applied to both panels of a row alike.
"""

import argparse
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ir_lora.data import images

HEADER, GAP = 16, 4


def _panel(path: str, height: int | None) -> Image.Image:
    img = Image.fromarray(images.read_rgb(path, exif_orientation=True))
    if height and img.height > height:
        img = img.resize((round(img.width * height / img.height), height), Image.Resampling.LANCZOS)
    return img


def before_after(input_dir: str, restored_dir: str, *, labels, height=None) -> Image.Image:
    rows = []
    for rel in images.list_images(input_dir):
        restored = os.path.join(restored_dir, images.stem(rel) + ".png")
        if os.path.exists(restored):
            rows.append((_panel(os.path.join(input_dir, rel), height), _panel(restored, height)))
    if not rows:
        raise SystemExit(f"No restored PNG in {restored_dir!r} matches an input in {input_dir!r}")
    width = max(a.width + b.width for a, b in rows) + GAP
    canvas = Image.new("RGB", (width, HEADER + sum(a.height + GAP for a, _ in rows)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    draw.text((2, 2), labels[0], fill=(0, 0, 0), font=font)
    draw.text((rows[0][0].width + GAP + 2, 2), labels[1], fill=(0, 0, 0), font=font)
    top = HEADER
    for before, after in rows:
        canvas.paste(before, (0, top))
        canvas.paste(after, (before.width + GAP, top))
        top += before.height + GAP
    return canvas


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="the folder given to ir-lora-restore")
    parser.add_argument("--restored", required=True, help="its --output folder")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--labels", nargs=2, default=["hazy input", "restored (ir-lora-restore)"])
    parser.add_argument("--height", type=int, help="shrink rows taller than this")
    args = parser.parse_args()
    picture = before_after(args.input, args.restored, labels=args.labels, height=args.height)
    picture.save(args.out, optimize=True)
    print(f"{args.out}: {picture.width}x{picture.height}, {np.asarray(picture).nbytes} bytes raw")


if __name__ == "__main__":
    main()
