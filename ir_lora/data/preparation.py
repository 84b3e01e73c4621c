"""`prepare` and `load`: image folders to prepared TFDS splits, kept in step with their folders.

`prepare` validates every image once and writes the split's storage (builders.py) under
`data_dir`. A later call reuses it while the source files are unchanged (names, sizes and
modification times, per split); when they changed, or a split's folders appeared, it says what
changed and prepares again. Several processes of one run prepare once (multihost.py).
"""

import logging
import os

import tensorflow_datasets as tfds

from ir_lora.data import builders, images, multihost
from ir_lora.data.sources import PreparedSplit


def _describe(split: str, then: dict | None, now: dict | None) -> str:
    def state(s):
        if s is None:
            return "absent"
        return f"{s['files']} files, {s['bytes'] / 1e6:.1f} MB"

    same_totals = then and now and (then["files"], then["bytes"]) == (now["files"], now["bytes"])
    detail = " (same totals; names or modification times changed)" if same_totals else ""
    return f"split {split!r}: {state(then)} when prepared, {state(now)} now{detail}"


def _changes(recorded: dict | None, current: dict) -> list[str]:
    recorded = recorded or {}
    return [
        _describe(s, recorded.get(s), current[s])
        for s in sorted(current)
        if recorded.get(s) != current[s]
    ]


def _missing_split_error(builder, root: str, split: str, folders) -> images.ImageError:
    missing = [os.path.join(root, d) for d in folders if not os.path.isdir(os.path.join(root, d))]
    return images.ImageError(
        f"Split {split!r} of dataset {builder.builder_config.name!r} is read from "
        f"{', '.join(repr(os.path.join(root, d)) for d in folders)}; missing: "
        f"{', '.join(repr(m) for m in missing)}. Layouts are in data/README.md."
    )


def _prepare_here(dataset, source_dir: str, data_dir: str, split: str, overwrite: bool):
    builder = builders.builder_for(dataset, data_dir, split)
    folders = builder.split_folders()
    current = builders.source_fingerprint(source_dir, folders)
    if current[split] is None:
        raise _missing_split_error(builder, source_dir, split, folders[split])
    if builder.is_prepared() and not overwrite:
        built_from = builder.info.metadata.get("source_dir")
        if built_from != source_dir:
            raise ValueError(
                f"{builder.data_dir} holds {builder.builder_config.name!r} prepared from "
                f"{built_from!r}, not {source_dir!r}: use another data_dir or overwrite=True."
            )
        changes = _changes(builder.info.metadata.get("source_files"), current)
        if not changes:
            return PreparedSplit(dataset, data_dir, split)
        logging.warning(
            "The source folder %s changed since it was prepared into %s (%s): preparing it "
            "again. A resumed run continues on the new data.",
            source_dir,
            builder.data_dir,
            "; ".join(changes),
        )
        overwrite = True
    mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    if overwrite:
        mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=source_dir, download_mode=mode)
    )
    return PreparedSplit(dataset, data_dir, split)


def prepare(
    dataset: str | builders.CleanConfig | builders.PairedConfig,
    *,
    source_dir: str,
    data_dir: str,
    split: str = "train",
    overwrite: bool = False,
) -> PreparedSplit:
    """Builds a split from image folders (once, and again when they change) and returns it.

    With several JAX processes (`jax.distributed.initialize()`), process 0 prepares first and
    the others wait for it, then open what it wrote (or, on per-host storage, prepare their own
    copy); every process must make the same calls in the same order.

    Args:
      dataset: a name from `DATASETS` ("images", "paired", "sidd", "gopro", "rain100l",
        "rain100h", "sots", "lol", "cbsd68", "div2k"), or a custom `CleanConfig`/`PairedConfig`.
      source_dir: the dataset's root folder (layouts in data/README.md).
      data_dir: where the prepared array_record files go (TFDS `data_dir`).
      split: the split to return.
      overwrite: rebuild even if `data_dir` holds this dataset, unchanged.

    Returns:
      A `PreparedSplit`: `len(src)` images, `src[i]` -> example dict, `src.window(...)` crops.

    Raises:
      images.ImageError: naming the file for an unreadable image, a missing partner, a size
        mismatch or two files with one name; naming the folders of a split that are missing or
        hold no image.
      ValueError: for an unknown dataset or split, or when `data_dir` holds this dataset
        built from another folder.
    """
    if not os.fspath(source_dir):
        raise images.ImageError(
            f"No source folder given for split {split!r} of {dataset!r} (source_dir is empty; "
            "with train.py: --config.data.source_dir or --config.eval.datasets.<name>.source_dir)."
        )
    source_dir = os.path.abspath(os.fspath(source_dir))
    if not os.path.isdir(source_dir):
        raise images.ImageError(f"Dataset folder {source_dir!r} does not exist.")
    data_dir = os.path.abspath(os.fspath(data_dir))
    builders.builder_for(dataset, data_dir, split)  # Unknown dataset or split: fail at once.
    return multihost.first_process_then_others(
        lambda: _prepare_here(dataset, source_dir, data_dir, split, overwrite),
        folder=data_dir,
        what=f"prepare split {split!r} of {source_dir}",
    )


def load(
    dataset: str | builders.CleanConfig | builders.PairedConfig, *, data_dir: str, split="train"
) -> PreparedSplit:
    """Reopens a split that `prepare` built under `data_dir` (the source folder is not needed)."""
    builder = builders.builder_for(dataset, data_dir, split)
    if not builder.is_prepared():
        raise ValueError(f"{builder.data_dir} holds no prepared dataset; call prepare() first.")
    if split not in builder.info.splits:
        raise ValueError(
            f"Split {split!r} of {builder.builder_config.name!r} was not prepared in "
            f"{builder.data_dir} (its folders were missing); prepared: "
            f"{sorted(builder.info.splits)}."
        )
    return PreparedSplit(dataset, data_dir, split)
