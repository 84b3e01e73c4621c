"""Datasets (TFDS array_record, no TensorFlow) and grain input pipelines."""

from ir_lora.data.builders import (
    DATASETS,
    CleanConfig,
    IrCleanImages,
    IrCleanTiles,
    IrPairedImages,
    IrPairedTiles,
    PairedConfig,
)
from ir_lora.data.images import ImageError, load_rgb
from ir_lora.data.preparation import load, prepare
from ir_lora.data.samples import SAMPLE_PHOTOS, sample_photos, write_sample_folder
from ir_lora.data.sources import PreparedSplit

__all__ = [
    "DATASETS",
    "CleanConfig",
    "ImageError",
    "IrCleanImages",
    "IrCleanTiles",
    "IrPairedImages",
    "IrPairedTiles",
    "PairedConfig",
    "PreparedSplit",
    "SAMPLE_PHOTOS",
    "load",
    "load_rgb",
    "prepare",
    "sample_photos",
    "write_sample_folder",
]
