"""Reading image files into 8-bit RGB, and finding images and degraded/clean pairs in folders.

Every image is validated once, when a dataset is prepared, so that training never meets a bad file
mid-epoch. The conversions, applied the same way to every file:

* grey (`L`, `1`), palette (`P`) and other colour modes become RGB (grey is repeated 3 times);
* an alpha channel is dropped (not composited onto a background), as cv2's `IMREAD_COLOR` does;
* 16-bit images keep their high byte (`x >> 8`), as Pillow itself reduces 16-bit RGB PNGs;
* floating-point images (Pillow mode `F`) are refused: their range is unknown.

An unreadable or truncated file raises `ImageError` naming it.
"""

import io
import os
import re
from collections.abc import Iterable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")
_PASS_THROUGH_FORMATS = ("PNG", "JPEG")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class ImageError(ValueError):
    """A bad image file or a bad pairing of files; the message names the file(s)."""


def is_image_file(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS) and not os.path.basename(path).startswith(".")


def list_images(folder: str) -> list[str]:
    """Paths, relative to `folder` and sorted, of every image file under it (recursively).

    Raises:
      ImageError: if `folder` is not a directory or holds no image file.
    """
    if not os.path.isdir(folder):
        raise ImageError(f"Image folder {folder!r} does not exist.")
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(
            os.path.relpath(os.path.join(root, f), folder) for f in files if is_image_file(f)
        )
    if not found:
        raise ImageError(f"No image files ({', '.join(IMAGE_EXTENSIONS)}) under {folder!r}.")
    return sorted(found)


def _to_rgb(img: Image.Image, path: str) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(img).astype(np.int64)
        if values.min() < 0 or values.max() > 65535:
            raise ImageError(f"{path}: {img.mode} image with values outside 0..65535.")
        grey = (values >> 8).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1))
    if img.mode == "F":
        raise ImageError(
            f"{path}: floating-point image (mode F) has no known range; save as 8-bit."
        )
    # Dropping alpha rather than compositing keeps the stored colour, as cv2.IMREAD_COLOR does.
    if img.mode in ("RGBA", "RGBa", "RGBX"):
        return img.convert("RGB")
    if img.mode in ("LA", "La", "PA"):
        img = img.convert("RGBA")
    return img.convert("RGB")


def _decode(path: str, *, exif_orientation: bool = False) -> tuple[Image.Image, bytes]:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ImageError(f"Cannot read image {path!r}: {e}") from e
    if not raw:
        raise ImageError(f"Cannot read image {path!r}: the file is empty (0 bytes).")
    try:
        img = Image.open(io.BytesIO(raw))
        img.load()  # decodes fully, so a truncated file fails here and not during training
        if exif_orientation:
            img = ImageOps.exif_transpose(img)
    except UnidentifiedImageError as e:
        # Pillow's message names the in-memory buffer, not the file.
        raise ImageError(
            f"Cannot read image {path!r}: not an image in a format Pillow can decode."
        ) from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"Cannot read image {path!r}: {e}") from e
    return img, raw


def _pixels(img: Image.Image, path: str) -> tuple[Image.Image, np.ndarray]:
    rgb = _to_rgb(img, path)
    pixels = np.asarray(rgb, dtype=np.uint8)
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ImageError(f"{path}: could not convert mode {img.mode} to RGB.")
    return rgb, pixels


def read_rgb(path: str, *, exif_orientation: bool = False) -> np.ndarray:
    """The `(H, W, 3)` uint8 pixels of an image file, converted as `load_rgb` does.

    Args:
      path: image file.
      exif_orientation: first turn the image upright by its EXIF orientation tag, as cv2's
        `imread` and photo viewers do (datasets keep the stored pixel order).

    Raises:
      ImageError: if the file cannot be decoded, or holds a floating-point image.
    """
    return _pixels(_decode(path, exif_orientation=exif_orientation)[0], path)[1]


def load_rgb(path: str) -> tuple[np.ndarray, bytes]:
    """Reads an image file as 8-bit RGB.

    Args:
      path: image file.

    Returns:
      `(pixels, encoded)`: the `(H, W, 3)` uint8 pixels, and PNG or JPEG bytes that decode to
      exactly those pixels with Pillow (the file's own bytes when it already is 8-bit RGB PNG or
      JPEG, otherwise a lossless PNG of the converted image).

    Raises:
      ImageError: if the file cannot be decoded, or holds a floating-point image.
    """
    img, raw = _decode(path)
    rgb, pixels = _pixels(img, path)
    if rgb is img and img.format in _PASS_THROUGH_FORMATS:
        return pixels, raw
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return pixels, buf.getvalue()


def stem(path: str) -> str:
    """The relative path without its extension: the key images are matched on."""
    return os.path.splitext(path)[0]


def unique_stems(files: list[str], folder: str, kind: str) -> dict[str, str]:
    """`{stem: file}`; two files with one stem (`X.png`, `X.jpg`) are an `ImageError`."""
    by_stem: dict[str, str] = {}
    for f in files:
        if stem(f) in by_stem:
            raise ImageError(
                f"Two {kind} images share the name {stem(f)!r} in {folder!r}: "
                f"{by_stem[stem(f)]!r} and {f!r}."
            )
        by_stem[stem(f)] = f
    return by_stem


def match_pairs(
    lq_dir: str, gt_dir: str, *, gt_stem_pattern: str = r"(.+)", gt_name_template: str = "{}"
) -> list[tuple[str, str]]:
    """Pairs every degraded image in `lq_dir` with its clean partner in `gt_dir`.

    Files are matched by relative path without extension, so `0001.jpg` pairs with `0001.png`.
    `gt_stem_pattern` is a regex that must match the whole degraded stem; its first group, put
    into `gt_name_template`, is the clean stem (Rain100H's original names: `rain-(\\d+)` and
    `norain-{}`). Several degraded images may share one clean image (RESIDE SOTS: `0001_0.8_0.2`
    -> `0001` with `r"(\\d+)_.*"`). Every clean image must be used by at least one pair.

    Returns:
      Sorted `(lq_path, gt_path)` pairs of paths relative to `lq_dir` and `gt_dir`.

    Raises:
      ImageError: naming the file with no partner, or whose name does not fit the pattern, or
        two files of one folder that share a name without extension (`X.png`, `X.jpg`).
    """
    lq_files, gt_files = list_images(lq_dir), list_images(gt_dir)
    gt_by_stem = unique_stems(gt_files, gt_dir, "clean")
    # Results, tables and saved images are keyed by the degraded file's stem.
    unique_stems(lq_files, lq_dir, "degraded")
    pattern = re.compile(gt_stem_pattern)
    pairs, used = [], set()
    for q in lq_files:
        directory, name = os.path.split(stem(q))
        m = pattern.fullmatch(name)
        if m is None:
            raise ImageError(
                f"Degraded image {os.path.join(lq_dir, q)!r}: name does not match the pattern "
                f"{gt_stem_pattern!r} that gives its clean partner's name."
            )
        key = os.path.join(directory, gt_name_template.format(m.group(1)))
        if key not in gt_by_stem:
            raise ImageError(
                f"Degraded image {os.path.join(lq_dir, q)!r} has no clean partner named "
                f"{key!r} (any extension) in {gt_dir!r}."
            )
        pairs.append((q, gt_by_stem[key]))
        used.add(key)
    unused = sorted(set(gt_by_stem) - used)
    if unused:
        raise ImageError(
            f"Clean image {os.path.join(gt_dir, gt_by_stem[unused[0]])!r} has no degraded partner "
            f"in {lq_dir!r} ({len(unused)} unmatched clean images in all)."
        )
    return pairs


def check_same_size(shapes: Iterable[tuple[str, tuple[int, ...]]]) -> None:
    """Raises `ImageError` naming the files when images that must align differ in size."""
    shapes = list(shapes)
    first_path, first_shape = shapes[0]
    for path, shape in shapes[1:]:
        if shape[:2] != first_shape[:2]:
            raise ImageError(
                f"Size mismatch: {path!r} is {shape[0]}x{shape[1]} but {first_path!r} is "
                f"{first_shape[0]}x{first_shape[1]}."
            )
