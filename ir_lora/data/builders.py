"""TFDS builders (array_record, no TensorFlow) for clean-image folders and degraded/clean pairs.

The user's folder is the builder's manual directory; a `BuilderConfig` names the sub-folders of
each split. `prepare` validates every image once, writes the dataset under `data_dir` (skipped
when already there) and returns TFDS's random-access data source; `load` reopens a prepared
dataset without the source folder. Examples are dicts

  clean:  {"gt": uint8 (H, W, 3), "name": bytes}
  paired: {"lq": uint8 (H, W, 3), "gt": uint8 (H, W, 3), "name": bytes}

where `name` is the (degraded) file's path relative to its split folder, without extension. The
dataset's `info.metadata` records the source folder and, per split, the smallest image, so that
the input pipeline can refuse a too large `gt_size` before training starts.
"""

import abc
import dataclasses
import os
from collections.abc import Mapping

import tensorflow_datasets as tfds

from ir_lora.data import images

_VERSION = tfds.core.Version("1.0.0")


@dataclasses.dataclass(eq=False)
class CleanConfig(tfds.core.BuilderConfig):
    """Clean images only: `splits` maps a split name to a sub-folder ("" = the whole folder)."""

    splits: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(eq=False)
class PairedConfig(tfds.core.BuilderConfig):
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


def _present_splits(root: str, folders: Mapping[str, tuple[str, ...]]) -> list[str]:
    present = [
        s for s, dirs in folders.items() if all(os.path.isdir(os.path.join(root, d)) for d in dirs)
    ]
    if not present:
        expected = "; ".join(f"{s}: {', '.join(d)}" for s, d in folders.items())
        raise images.ImageError(f"No split folders found under {root!r}. Expected ({expected}).")
    return present


class _Builder(tfds.core.GeneratorBasedBuilder):
    """Shared machinery: only the splits whose folders exist are built."""

    VERSION = _VERSION
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
    # Nothing is downloaded, so there is no checksums file to locate; TFDS's lookup of the code
    # path would import `importlib_resources`, which is not a dependency.
    code_path = None
    _IMAGE_KEYS: tuple[str, ...] = ()

    def _info(self) -> tfds.core.DatasetInfo:
        features = {k: tfds.features.Image(shape=(None, None, 3)) for k in self._IMAGE_KEYS}
        features["name"] = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.builder_config.description,
            features=tfds.features.FeaturesDict(features),
            metadata=tfds.core.MetadataDict(),
        )

    @abc.abstractmethod
    def _folders(self) -> dict[str, tuple[str, ...]]:
        """Split name -> the folders (relative to the source folder) the split is read from."""

    def _split_generators(self, dl_manager):
        root = os.path.abspath(os.fspath(dl_manager.manual_dir))
        folders = self._folders()
        self.info.metadata["source_dir"] = root
        self.info.metadata["splits"] = {}
        return {
            s: self._generate_examples(root, s, folders[s]) for s in _present_splits(root, folders)
        }

    def _record(self, split: str, name: str, shape) -> None:
        """Keeps the smallest side seen per split, for the pipeline's gt_size check."""
        stats = self.info.metadata["splits"].setdefault(
            split, {"num_examples": 0, "min_side": None, "smallest": None}
        )
        stats["num_examples"] += 1
        if stats["min_side"] is None or min(shape[:2]) < stats["min_side"]:
            stats["min_side"] = int(min(shape[:2]))
            stats["smallest"] = name


class IrCleanImages(_Builder):
    """Every image file under a folder (recursively), one clean image per example."""

    BUILDER_CONFIGS = list(CLEAN_CONFIGS)
    _IMAGE_KEYS = ("gt",)

    def _folders(self):
        return {s: (d,) for s, d in self.builder_config.splits.items()}

    def _generate_examples(self, root, split, folders):
        folder = os.path.join(root, folders[0])
        for rel in images.list_images(folder):
            path = os.path.join(folder, rel)
            pixels, encoded = images.load_rgb(path)
            self._record(split, path, pixels.shape)
            yield rel, {"gt": encoded, "name": images.stem(rel)}


class IrPairedImages(_Builder):
    """Degraded/clean pairs matched by file name; every pair must have the same size."""

    BUILDER_CONFIGS = list(PAIRED_CONFIGS)
    _IMAGE_KEYS = ("lq", "gt")

    def _folders(self):
        return dict(self.builder_config.splits)

    def _generate_examples(self, root, split, folders):
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
            self._record(split, lq_path, gt.shape)
            yield lq_rel, {"lq": lq_bytes, "gt": gt_bytes, "name": images.stem(lq_rel)}


DATASETS: dict[str, tuple[type[_Builder], tfds.core.BuilderConfig]] = {
    **{c.name: (IrCleanImages, c) for c in CLEAN_CONFIGS},
    **{c.name: (IrPairedImages, c) for c in PAIRED_CONFIGS},
}


def _builder(dataset, data_dir: str) -> _Builder:
    if isinstance(dataset, CleanConfig):
        cls, config = IrCleanImages, dataset
    elif isinstance(dataset, PairedConfig):
        cls, config = IrPairedImages, dataset
    elif dataset in DATASETS:
        cls, config = DATASETS[dataset]
    else:
        raise ValueError(
            f"Unknown dataset {dataset!r}; expected one of {sorted(DATASETS)} or a "
            "CleanConfig/PairedConfig."
        )
    return cls(data_dir=os.fspath(data_dir), config=config, file_format="array_record")


def _source(builder: tfds.core.DatasetBuilder, split: str):
    if split not in builder.info.splits:
        raise ValueError(
            f"Split {split!r} of {builder.name}/{builder.builder_config.name} was not prepared "
            f"(its folders were missing); prepared splits: {sorted(builder.info.splits)}. "
            "Add the folders and prepare again with overwrite=True."
        )
    return builder.as_data_source(split)


def prepare(
    dataset: str | CleanConfig | PairedConfig,
    *,
    source_dir: str,
    data_dir: str,
    split: str = "train",
    overwrite: bool = False,
):
    """Builds a dataset once from image folders and returns one split as a random-access source.

    Args:
      dataset: a name from `DATASETS` ("images", "paired", "sidd", "gopro", "rain100l",
        "rain100h", "sots", "lol", "cbsd68", "div2k"), or a custom `CleanConfig`/`PairedConfig`.
      source_dir: the dataset's root folder (layouts in data/README.md).
      data_dir: where the prepared array_record files go (TFDS `data_dir`).
      split: the split to return.
      overwrite: rebuild even if `data_dir` already holds this dataset.

    Returns:
      TFDS's array_record data source: `len(src)`, `src[i]` -> example dict (see module doc).

    Raises:
      images.ImageError: naming the file for an unreadable image, a missing partner or a size
        mismatch; or when no split folder exists.
      ValueError: when `data_dir` holds this dataset built from another folder, or `split` is
        not among the prepared splits.
    """
    source_dir = os.path.abspath(os.fspath(source_dir))
    if not os.path.isdir(source_dir):
        raise images.ImageError(f"Dataset folder {source_dir!r} does not exist.")
    builder = _builder(dataset, data_dir)
    if builder.is_prepared() and not overwrite:
        built_from = builder.info.metadata.get("source_dir")
        if built_from != source_dir:
            raise ValueError(
                f"{builder.data_dir} holds {builder.builder_config.name!r} prepared from "
                f"{built_from!r}, not {source_dir!r}: use another data_dir or overwrite=True."
            )
        return _source(builder, split)
    mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    if overwrite:
        mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=source_dir, download_mode=mode)
    )
    return _source(builder, split)


def load(dataset: str | CleanConfig | PairedConfig, *, data_dir: str, split: str = "train"):
    """Reopens a dataset that `prepare` built under `data_dir` (the source folder is not needed)."""
    builder = _builder(dataset, data_dir)
    if not builder.is_prepared():
        raise ValueError(f"{builder.data_dir} holds no prepared dataset; call prepare() first.")
    return _source(builder, split)
