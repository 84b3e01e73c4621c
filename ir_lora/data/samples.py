"""A tiny offline dataset: the public-domain and CC0 colour photographs scikit-image ships.

No standard restoration benchmark can be installed without a download, so the quickstart trains
and evaluates on these (with synthetic degradations). Licences, from each loader's docstring in
`skimage.data` (scikit-image 0.26), are listed in `SAMPLE_PHOTOS` and in data/README.md.
"""

import os

import numpy as np
from PIL import Image

# name -> licence, as stated in the `skimage.data.<name>` docstring.
SAMPLE_PHOTOS = {
    "astronaut": "public domain (NASA; 'No known copyright restrictions')",
    "coffee": "CC0 (photographer Rachel Michetti)",
    "chelsea": "CC0 (photographer Stefan van der Walt)",
    "rocket": "public domain (SpaceX, DSCOVR launch on Falcon 9)",
    "hubble_deep_field": "public domain (NASA)",
    "retina": "CC0 1.0 (Mikael Haggstrom, Wikimedia Commons)",
}


def sample_photos() -> list[tuple[str, np.ndarray]]:
    """Returns `[(name, (H, W, 3) uint8 RGB), ...]` for every photograph in `SAMPLE_PHOTOS`.

    Raises:
      ImportError: if scikit-image is not installed.
    """
    try:
        from skimage import data as skdata
    except ImportError as e:
        raise ImportError(
            "The sample photographs need scikit-image: pip install scikit-image"
        ) from e
    return [(name, np.asarray(getattr(skdata, name)(), np.uint8)) for name in SAMPLE_PHOTOS]


def shrink(pixels: np.ndarray, max_side: int | None) -> np.ndarray:
    """The image shrunk (Pillow bicubic, aspect kept) so its longer side is at most `max_side`."""
    img = Image.fromarray(pixels)
    if max_side is not None and max(img.size) > max_side:
        scale = max_side / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.BICUBIC)
    return np.asarray(img)


def write_sample_folder(folder: str, *, max_side: int | None = None) -> str:
    """Writes the sample photographs as `<folder>/<name>.png`, a clean-image folder.

    Args:
      folder: created if needed.
      max_side: if set, larger photographs are shrunk (Pillow bicubic, aspect kept) so that their
        longer side is `max_side`; small CPU runs use 256.

    Returns:
      `folder`, for `prepare("images", source_dir=folder, ...)`.
    """
    os.makedirs(folder, exist_ok=True)
    for name, pixels in sample_photos():
        Image.fromarray(shrink(pixels, max_side)).save(os.path.join(folder, f"{name}.png"))
    return folder
