"""Mean PSNR of `ir_lora.degradations.jpeg` against Pillow's real JPEG codec, per quality.

    python -m benchmarks.jpeg_fidelity [--images astronaut,coffee,chelsea,rocket]

Full-size scikit-image photographs (CC0 / public domain), 4:2:0 subsampling on both sides.
"""

import argparse
import io

import jax
import jax.numpy as jnp
import numpy as np
import skimage.data
from PIL import Image

from ir_lora import degradations


def pillow_jpeg(image_u8: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(image_u8).save(buf, "JPEG", quality=quality, subsampling=2)
    return np.asarray(Image.open(buf))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default="astronaut,coffee,chelsea,rocket")
    parser.add_argument("--qualities", default=",".join(str(q) for q in range(10, 100, 5)))
    args = parser.parse_args()
    names = args.images.split(",")
    photos = {n: getattr(skimage.data, n)() for n in names}
    model = jax.jit(lambda x, q: degradations.jpeg(x, quality=q))
    print(
        f"backend: {jax.default_backend()}; images: "
        + ", ".join(f"{n} {p.shape[1]}x{p.shape[0]}" for n, p in photos.items())
    )
    print("| quality | " + " | ".join(names) + " | mean PSNR (dB) |")
    print("|---" * (len(names) + 2) + "|")
    for q in (int(v) for v in args.qualities.split(",")):
        row = []
        for photo in photos.values():
            ours = np.asarray(model(jnp.asarray(photo, jnp.float32) / 255.0, q), np.float64)
            ref = pillow_jpeg(photo, q).astype(np.float64) / 255.0
            row.append(10 * np.log10(1.0 / np.mean((ours - ref) ** 2)))
        print(f"| {q} | " + " | ".join(f"{v:.1f}" for v in row) + f" | {np.mean(row):.2f} |")


if __name__ == "__main__":
    main()
