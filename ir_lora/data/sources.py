"""Random access to a prepared split: whole examples, and crops that read only what they cover.

`PreparedSplit` is what `prepare` and `load` return. Indexing it gives one image's example,
`{"gt": uint8 (H, W, 3), "lq": ... (paired), "name": bytes}`, the same for both storage forms
(ir_lora/data/builders.py). `window(i, top, left, height, width)` gives just a crop: from a
tiled (training) split it reads and copies the tiles the window covers, so its cost does not
grow with the photograph; from a whole-image split it decodes the image and slices it.

It pickles as `(dataset, data_dir, split)` and reopens the files where it is unpickled, which is
how grain's worker processes get it.
"""

from collections.abc import Sequence

import numpy as np

from ir_lora.data import builders


class PreparedSplit(Sequence):
    """One prepared split of a dataset; `len()` counts images, not tiles.

    Attributes:
      split: the split's name.
      dataset_info: TFDS's `DatasetInfo` (its `metadata` is described in builders.py).
      tiled: whether the split is stored as tiles.
      has_lq: whether examples hold a degraded image (paired data).
    """

    def __init__(self, dataset, data_dir: str, split: str):
        self._dataset, self._data_dir, self.split = dataset, str(data_dir), split
        builder = builders.builder_for(dataset, self._data_dir, split)
        self.dataset_info = builder.info
        self.tiled = builder.TILED
        self.has_lq = "lq" in builder.IMAGE_KEYS
        self._keys = builder.IMAGE_KEYS
        self._tile = int(builder.builder_config.tile_size)
        self._images = builder.info.metadata["splits"][split]["images"]
        self._records = builder.as_data_source(split)

    def __getstate__(self):
        return {"dataset": self._dataset, "data_dir": self._data_dir, "split": self.split}

    def __setstate__(self, state):
        self.__init__(state["dataset"], state["data_dir"], state["split"])

    def __repr__(self) -> str:
        form = "tiles" if self.tiled else "whole images"
        return f"PreparedSplit({self.dataset_info.full_name}, split={self.split!r}, {form})"

    def __len__(self) -> int:
        return len(self._images)

    def _check(self, index: int) -> int:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"Image {index} of a split of {len(self)} images.")
        return index % len(self)

    def name(self, index: int) -> str:
        """The image's name (its file's relative path without extension)."""
        return self._images[self._check(index)][0]

    def image_size(self, index: int) -> tuple[int, int]:
        """`(height, width)` of an image, from the prepared metadata (nothing is read)."""
        _, h, w = self._images[self._check(index)][:3]
        return int(h), int(w)

    def __getitem__(self, index):
        index = self._check(index)
        if not self.tiled:
            return self._records[index]
        h, w = self.image_size(index)
        return {**self.window(index, 0, 0, h, w), "name": self.name(index).encode()}

    def window(self, index: int, top: int, left: int, height: int, width: int) -> dict:
        """`{key: uint8 (height, width, 3)}` cut from image `index` at `(top, left)`.

        Raises:
          ValueError: if the window does not lie inside the image.
        """
        index = self._check(index)
        h, w = self.image_size(index)
        if min(top, left) < 0 or min(height, width) <= 0:
            raise ValueError(f"Bad window {(top, left, height, width)}.")
        if top + height > h or left + width > w:
            raise ValueError(
                f"Window {(top, left, height, width)} exceeds image {self.name(index)!r} ({h}x{w})."
            )
        rows, cols = (slice(top, top + height), slice(left, left + width))
        if not self.tiled:
            example = self._records[index]
            return {k: np.ascontiguousarray(example[k][rows, cols]) for k in self._keys}
        return self._from_tiles(index, top, left, height, width)

    def _from_tiles(self, index, top, left, height, width) -> dict:
        t = self._tile
        h, w = self.image_size(index)
        first = int(self._images[index][3])
        _, columns = builders.tile_grid(h, w, t)
        out = {k: np.empty((height, width, 3), np.uint8) for k in self._keys}
        for r in range(top // t, (top + height - 1) // t + 1):
            # The part of tile row r inside the window, in image and in window coordinates.
            y0, y1 = max(top, r * t), min(top + height, (r + 1) * t)
            for c in range(left // t, (left + width - 1) // t + 1):
                x0, x1 = max(left, c * t), min(left + width, (c + 1) * t)
                tile = self._records[first + r * columns + c]
                for k in self._keys:
                    out[k][y0 - top : y1 - top, x0 - left : x1 - left] = tile[k][
                        y0 - r * t : y1 - r * t, x0 - c * t : x1 - c * t
                    ]
        return out
