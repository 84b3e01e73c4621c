"""Files of the restore command: which inputs, where each output goes, and atomic PNG writes.

* Inputs are every image file the data layer reads (`ir_lora.data.images.IMAGE_EXTENSIONS`),
  found recursively under a folder, or one file. They are decoded as the data layer decodes them
  (grey and palette to RGB, alpha dropped, 16-bit to its high byte), after turning the image
  upright by its EXIF orientation, as cv2's `imread` in the official demo scripts does.
* Outputs mirror the input's relative path with a `.png` suffix. Two inputs that would write
  the same output (`a.jpg` and `a.png`) are refused before anything runs.
* A PNG is encoded in memory, written to a temporary file in the target folder, flushed, and
  renamed onto its name, so a reader (or a killed run) never sees half a PNG. Without
  `overwrite` the rename is a hard link, which fails if the name exists, so even a file that
  appears while the command runs is not replaced.
* 8-bit PNGs come from Pillow; 16-bit RGB PNGs (which Pillow cannot write) from `png16`, a
  plain encoder of the PNG specification (IHDR bit depth 16, colour type 2, no filtering).
"""

import io
import os
import struct
import zlib

import numpy as np
from PIL import Image

from ir_lora.data import images

TMP_MARKER = ".ir_lora_tmp"


def find_inputs(path: str) -> tuple[str, list[str]]:
    """`(root, relative paths)` of the images to restore: `path` itself, or every image under it.

    Raises:
      ImageError: `path` does not exist, is a file of another kind, or a folder without images.
    """
    if os.path.isfile(path):
        if not images.is_image_file(path):
            raise images.ImageError(
                f"Input {path!r} is not an image file ({', '.join(images.IMAGE_EXTENSIONS)})."
            )
        return os.path.dirname(os.path.abspath(path)), [os.path.basename(path)]
    if not os.path.exists(path):
        raise images.ImageError(f"Input {path!r} does not exist.")
    return os.path.abspath(path), images.list_images(path)


def output_names(relative_paths: list[str]) -> dict[str, str]:
    """Input relative path -> output relative path (`.png`), refusing two inputs on one output.

    Raises:
      ImageError: naming both inputs that map to the same output.
    """
    out, claimed = {}, {}
    for rel in relative_paths:
        target = images.stem(rel) + ".png"
        if target in claimed:
            raise images.ImageError(
                f"Inputs {claimed[target]!r} and {rel!r} would both be written to {target!r}; "
                "rename one of them."
            )
        claimed[target] = rel
        out[rel] = target
    return out


def read_image(path: str) -> np.ndarray:
    """The `(H, W, 3)` uint8 RGB pixels of `path`, upright (see the module docstring)."""
    return images.read_rgb(path, exif_orientation=True)


def quantize(restored: np.ndarray, *, bits: int) -> np.ndarray:
    """A float image in [0, 1] (clamped) as uint8 (`bits=8`) or uint16 (`bits=16`), rounded.

    Rounding half to even after clamping is what the official scripts do (BasicSR's `tensor2img`,
    skimage's `img_as_ubyte` in Restormer's demo.py).
    """
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    peak = 255.0 if bits == 8 else 65535.0
    values = np.rint(np.clip(np.asarray(restored, np.float64), 0.0, 1.0) * peak)
    return values.astype(np.uint8 if bits == 8 else np.uint16)


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png16(pixels: np.ndarray, *, compress_level: int = 6) -> bytes:
    """A 16-bit RGB PNG of `(H, W, 3)` uint16 pixels."""
    if pixels.dtype != np.uint16 or pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ValueError(f"png16 expects (H, W, 3) uint16, got {pixels.shape} {pixels.dtype}")
    height, width = pixels.shape[:2]
    rows = pixels.astype(">u2").reshape(height, width * 3).view(np.uint8)
    # Every scanline starts with its filter type; 0 (none) keeps the encoder obviously correct.
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw, compress_level))
        + _chunk(b"IEND", b"")
    )


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of `(H, W, 3)` uint8 (Pillow) or uint16 (`png16`) pixels."""
    if pixels.dtype == np.uint16:
        return png16(pixels)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_atomic(path: str, data: bytes, *, overwrite: bool) -> None:
    """Writes `data` to `path` through a temporary file and a rename (module docstring).

    Raises:
      FileExistsError: `path` exists and `overwrite` is False (nothing is changed).
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}{TMP_MARKER}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails when `path` exists: no clobbering, even in a race
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links
                if os.path.exists(path):
                    raise FileExistsError(path) from None
                os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
