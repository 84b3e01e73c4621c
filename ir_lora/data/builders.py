"""TFDS builders (array_record, no TensorFlow) for clean-image folders and degraded/clean pairs.

The user's folder is the builder's manual directory; a `BuilderConfig` names the sub-folders of
each split. Each split is stored in one of two forms, by the configuration's `tiled_splits`
(default: only "train"):

* whole images (evaluation splits; builders `IrCleanImages`, `IrPairedImages`): one record per
  image, `{"gt": image, "lq": image (paired), "name": text}`, the file's own PNG/JPEG bytes (or a
  lossless PNG of the converted pixels);
* tiles (training splits; `IrCleanTiles`, `IrPairedTiles`): every image cut into raw uint8 tiles
  of `tile_size` x `tile_size` pixels (smaller at the right and bottom borders), row by row, one
  record `{"gt": tile, "lq": tile}` per tile, so that a random crop reads the few tiles it
  covers and decodes nothing (`ir_lora.data.sources.PreparedSplit` puts them together).

Records are in sorted file order (TFDS's shuffling is off). `info.metadata` records the source
folder, a fingerprint of its files per split (`source_fingerprint`: names, sizes, mtimes), and per
split every image's `[name, height, width]` (plus its first tile record), the number of images and
the smallest one, for the pipeline's `gt_size` check. `name` is the (degraded) file's path
relative to its split folder, without extension.
"""

import abc
import dataclasses
import hashlib
import logging
import os
from collections.abc import Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds

from ir_lora.data import images

_VERSION = tfds.core.Version("2.0.0")
_RELEASE_NOTES = {
    "2.0.0": "Training splits as raw uint8 tiles; records in file order; source fingerprints.",
    "1.0.0": "Whole images only.",
}
DEFAULT_TILE_SIZE = 128


@dataclasses.dataclass(eq=False)
class _StorageConfig(tfds.core.BuilderConfig):
    """Attributes shared by both kinds:

    tiled_splits: splits stored as tiles (the training splits); the others keep whole images.
    tile_size: side of a tile in pixels.
    """

    tiled_splits: tuple[str, ...] = ("train",)
    tile_size: int = DEFAULT_TILE_SIZE


@dataclasses.dataclass(eq=False)
class CleanConfig(_StorageConfig):
    """Clean images only: `splits` maps a split name to a sub-folder ("" = the whole folder)."""

    splits: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(eq=False)
class PairedConfig(_StorageConfig):
    """Degraded/clean pairs.

    Attributes:
      splits: split name -> (degraded sub-folder, clean sub-folder).
      gt_stem_pattern: regex matching a whole degraded file name (no extension); group 1 is
        put into `gt_name_template` to give the clean file's name (no extension).
      gt_name_template: `str.format` template of the clean name, "{}" by default.
    """

    splits: Mapping[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
    gt_stem_pattern: str = r"(.+)"
    gt_name_template: str = "{}"


def _standard(split_names, lq="input", gt="target"):
    return {s: (f"{s}/{lq}", f"{s}/{gt}") for s in split_names}


CLEAN_CONFIGS = (
    CleanConfig(name="images", splits={"train": ""}, description="Every image under a folder."),
    CleanConfig(name="cbsd68", splits={"test": ""}, description="CBSD68 colour test images."),
    CleanConfig(
        name="div2k",
        splits={"train": "DIV2K_train_HR", "validation": "DIV2K_valid_HR"},
        description="DIV2K high-resolution images.",
    ),
)
PAIRED_CONFIGS = (
    PairedConfig(
        name="paired",
        splits=_standard(("train", "val", "test"), lq="lq", gt="gt"),
        description="BasicSR folder pairs: <split>/lq and <split>/gt.",
    ),
    PairedConfig(
        name="sidd", splits=_standard(("train", "val")), description="SIDD sRGB denoising."
    ),
    PairedConfig(
        name="gopro", splits=_standard(("train", "test")), description="GoPro deblurring."
    ),
    PairedConfig(
        name="rain100l", splits={"test": ("input", "target")}, description="Rain100L deraining."
    ),
    PairedConfig(
        name="rain100h", splits={"test": ("input", "target")}, description="Rain100H deraining."
    ),
    PairedConfig(
        name="sots",
        splits={"outdoor": ("outdoor/hazy", "outdoor/gt"), "indoor": ("indoor/hazy", "indoor/gt")},
        gt_stem_pattern=r"(\d+)_.*",
        description="RESIDE SOTS dehazing: hazy 0001_0.8_0.2.jpg -> clear 0001.png.",
    ),
    PairedConfig(
        name="lol",
        splits={"train": ("our485/low", "our485/high"), "test": ("eval15/low", "eval15/high")},
        description="LOL low-light enhancement.",
    ),
)

_INSTRUCTIONS = "Pass the dataset's root folder as `source_dir`; layouts are in data/README.md."


def split_present(root: str, folders: tuple[str, ...]) -> bool:
    return all(os.path.isdir(os.path.join(root, d)) for d in folders)


def source_fingerprint(root: str, folders: Mapping[str, tuple[str, ...]]) -> dict:
    """Per split: None if a folder is missing, else `{"files", "bytes", "digest"}` of the names,
    sizes and modification times of its image files.

    Raises:
      images.ImageError: for a split folder that holds no image file.
    """
    out = {}
    for split, dirs in sorted(folders.items()):
        if not split_present(root, dirs):
            out[split] = None
            continue
        digest, count, size = hashlib.sha256(), 0, 0
        for d in dirs:
            folder = os.path.join(root, d)
            for rel in images.list_images(folder):
                stat = os.stat(os.path.join(folder, rel))
                digest.update(f"{d}\0{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
                count, size = count + 1, size + stat.st_size
        out[split] = {"files": count, "bytes": size, "digest": digest.hexdigest()}
    return out


def tile_grid(height: int, width: int, tile_size: int) -> tuple[int, int]:
    """(rows, columns) of tiles that cover an image."""
    return -(-height // tile_size), -(-width // tile_size)


class _Builder(tfds.core.GeneratorBasedBuilder):
    """Shared machinery: only the splits of this storage form whose folders exist are built."""

    VERSION = _VERSION
    RELEASE_NOTES = _RELEASE_NOTES
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
    # Nothing is downloaded, so there is no checksums file to locate; TFDS's lookup of the code
    # path would import `importlib_resources`, which is not a dependency.
    code_path = None
    IMAGE_KEYS: tuple[str, ...] = ()
    TILED = False

    def _info(self) -> tfds.core.DatasetInfo:
        if self.TILED:
            features = {
                k: tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding="bytes")
                for k in self.IMAGE_KEYS
            }
        else:
            features = {k: tfds.features.Image(shape=(None, None, 3)) for k in self.IMAGE_KEYS}
            features["name"] = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.builder_config.description,
            features=tfds.features.FeaturesDict(features),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,  # Record i is the i-th image (or tile) in file order.
        )

    @abc.abstractmethod
    def _all_folders(self) -> dict[str, tuple[str, ...]]:
        """Split name -> the folders (relative to the source folder) the split is read from."""

    @abc.abstractmethod
    def _images(self, root: str, folders) -> Iterator[tuple[str, str, dict, dict]]:
        """`(name, path, {key: pixels}, {key: encoded bytes})` per image, validated."""

    def split_folders(self) -> dict[str, tuple[str, ...]]:
        """The splits this builder holds (those of its storage form), with their folders."""
        tiled = set(self.builder_config.tiled_splits)
        return {s: d for s, d in self._all_folders().items() if (s in tiled) == self.TILED}

    # TFDS prints "Downloading and preparing ..." to stdout; nothing is downloaded here.
    def _log_download_bytes(self) -> None:
        logging.info("Preparing %s/%s into %s.", self.name, self.builder_config.name, self.data_dir)

    def _log_download_done(self) -> None:
        logging.info("Prepared %s/%s.", self.name, self.builder_config.name)

    def _split_generators(self, dl_manager):
        root = os.path.abspath(os.fspath(dl_manager.manual_dir))
        folders = self.split_folders()
        self.info.metadata["source_dir"] = root
        self.info.metadata["source_files"] = source_fingerprint(root, folders)
        self.info.metadata["splits"] = {}
        present = [s for s, dirs in folders.items() if split_present(root, dirs)]
        return {s: self._generate_examples(root, s, folders[s]) for s in present}

    def _generate_examples(self, root, split, folders):
        stats = {"num_examples": 0, "min_side": None, "smallest": None, "images": []}
        self.info.metadata["splits"][split] = stats
        key, size = 0, self.builder_config.tile_size
        for name, path, pixels, encoded in self._images(root, folders):
            h, w = pixels["gt"].shape[:2]
            stats["num_examples"] += 1
            if stats["min_side"] is None or min(h, w) < stats["min_side"]:
                stats["min_side"], stats["smallest"] = int(min(h, w)), path
            if not self.TILED:
                stats["images"].append([name, int(h), int(w)])
                yield key, {**encoded, "name": name}
                key += 1
                continue
            stats["images"].append([name, int(h), int(w), key])
            for top in range(0, h, size):
                for left in range(0, w, size):
                    window = (slice(top, top + size), slice(left, left + size))
                    yield key, {k: np.ascontiguousarray(v[window]) for k, v in pixels.items()}
                    key += 1


class IrCleanImages(_Builder):
    """Every image file under a folder (recursively), one clean image per example."""

    BUILDER_CONFIGS = list(CLEAN_CONFIGS)
    IMAGE_KEYS = ("gt",)

    def _all_folders(self):
        return {s: (d,) for s, d in self.builder_config.splits.items()}

    def _images(self, root, folders):
        folder = os.path.join(root, folders[0])
        files = images.list_images(folder)
        images.unique_stems(files, folder, "clean")
        for rel in files:
            path = os.path.join(folder, rel)
            pixels, encoded = images.load_rgb(path)
            yield images.stem(rel), path, {"gt": pixels}, {"gt": encoded}


class IrPairedImages(_Builder):
    """Degraded/clean pairs matched by file name; every pair must have the same size."""

    BUILDER_CONFIGS = list(PAIRED_CONFIGS)
    IMAGE_KEYS = ("lq", "gt")

    def _all_folders(self):
        return dict(self.builder_config.splits)

    def _images(self, root, folders):
        lq_dir, gt_dir = (os.path.join(root, d) for d in folders)
        pairs = images.match_pairs(
            lq_dir,
            gt_dir,
            gt_stem_pattern=self.builder_config.gt_stem_pattern,
            gt_name_template=self.builder_config.gt_name_template,
        )
        for lq_rel, gt_rel in pairs:
            lq_path, gt_path = os.path.join(lq_dir, lq_rel), os.path.join(gt_dir, gt_rel)
            lq, lq_bytes = images.load_rgb(lq_path)
            gt, gt_bytes = images.load_rgb(gt_path)
            images.check_same_size([(gt_path, gt.shape), (lq_path, lq.shape)])
            yield (
                images.stem(lq_rel),
                lq_path,
                {"lq": lq, "gt": gt},
                {"lq": lq_bytes, "gt": gt_bytes},
            )


class IrCleanTiles(IrCleanImages):
    """The training splits of `IrCleanImages`' configurations, as raw tiles."""

    TILED = True


class IrPairedTiles(IrPairedImages):
    """The training splits of `IrPairedImages`' configurations, as raw tiles."""

    TILED = True


DATASETS: dict[str, tuple[type[_Builder], tfds.core.BuilderConfig]] = {
    **{c.name: (IrCleanImages, c) for c in CLEAN_CONFIGS},
    **{c.name: (IrPairedImages, c) for c in PAIRED_CONFIGS},
}
_TILED = {IrCleanImages: IrCleanTiles, IrPairedImages: IrPairedTiles}


def config_of(dataset) -> tuple[type[_Builder], tfds.core.BuilderConfig]:
    """`(whole-image builder class, config)` of a dataset name or custom config."""
    if isinstance(dataset, CleanConfig):
        return IrCleanImages, dataset
    if isinstance(dataset, PairedConfig):
        return IrPairedImages, dataset
    if isinstance(dataset, str) and dataset in DATASETS:
        return DATASETS[dataset]
    raise ValueError(
        f"Unknown dataset {dataset!r}; expected one of {sorted(DATASETS)} or a "
        "CleanConfig/PairedConfig."
    )


def builder_for(dataset, data_dir: str, split: str) -> _Builder:
    """The builder that holds `split` of `dataset` (tiles for a training split) in `data_dir`.

    Raises:
      ValueError: for an unknown dataset or a split its configuration does not have.
    """
    cls, config = config_of(dataset)
    if split not in config.splits:
        raise ValueError(
            f"Dataset {config.name!r} has no split {split!r}; its splits: {sorted(config.splits)}."
        )
    if split in config.tiled_splits:
        cls = _TILED[cls]
    # A named configuration goes by name: a copy of its object (as pickled into grain's worker
    # processes) would be refused by TFDS as a custom config that reuses a registered name.
    by_name = isinstance(dataset, str)
    return cls(
        data_dir=os.fspath(data_dir), config=config.name if by_name else config,
        file_format="array_record",
    )  # fmt: skip
