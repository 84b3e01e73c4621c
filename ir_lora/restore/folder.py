"""Restoring a folder (or one file) of photographs to PNGs with one or several models.

    summary = restore_folder(Restorer.from_workdir("runs/quickstart"), "photos", "restored")
    print(summary.describe())

Each input is read once and restored by every model; with several models (`{name: Restorer}`)
the outputs of model NAME go to `OUTPUT/NAME/`. An input that cannot be read (or restored for
lack of memory) is reported and skipped, and the rest are still written; `Summary.failed` lists
them. Reading the next image and encoding the last outputs run in threads beside the network.
"""

import collections
import concurrent.futures
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Mapping

import jax
import tqdm

from ir_lora.data import images
from ir_lora.restore import files
from ir_lora.restore.restorer import Restorer

_log = logging.getLogger(__name__)
MAX_PENDING_WRITES = 4


@dataclasses.dataclass
class Summary:
    """What a `restore_folder` call did."""

    output: str
    written: list[str] = dataclasses.field(default_factory=list)
    skipped_existing: list[str] = dataclasses.field(default_factory=list)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)  # input -> why
    seconds: float = 0.0
    restored_images: int = 0

    @property
    def images_per_second(self) -> float:
        return self.restored_images / self.seconds if self.seconds else 0.0

    def describe(self) -> str:
        lines = [
            f"Restored {self.restored_images} images in {self.seconds:.1f} s "
            f"({self.images_per_second:.2f} images/s): {len(self.written)} PNGs in {self.output}"
        ]
        if self.skipped_existing:
            lines.append(f"{len(self.skipped_existing)} existing outputs left as they were")
        for path, why in self.failed.items():
            lines.append(f"FAILED {path}: {why}")
        return "\n".join(lines)


def plan_outputs(
    input_path: str, output_dir: str, names: list[str] | None
) -> tuple[str, dict[str, dict[str, str]]]:
    """`(input root, {input relative path: {model name: output path}})`.

    `names` None: one model, outputs directly in `output_dir`.
    """
    root, relative = files.find_inputs(input_path)
    targets = files.output_names(relative)
    output_dir = os.path.abspath(output_dir)
    if os.path.commonpath([output_dir, root]) == root and os.path.isdir(input_path):
        inside = os.path.relpath(output_dir, root)
        relative = [r for r in relative if not r.startswith(inside + os.sep)]
    per_input = {}
    for rel in relative:
        if names is None:
            per_input[rel] = {"": os.path.join(output_dir, targets[rel])}
        else:
            per_input[rel] = {n: os.path.join(output_dir, n, targets[rel]) for n in names}
    return root, per_input


def restore_folder(
    models: Restorer | Mapping[str, Restorer],
    input_path: str,
    output_dir: str,
    *,
    tile: int | None = None,
    tile_overlap: int | None = None,
    batch_size: int | None = None,
    save_16bit: bool = False,
    overwrite: bool = False,
    skip_existing: bool = False,
    progress: bool | None = None,
) -> Summary:
    """Restores every image under `input_path` into PNGs under `output_dir` (module docstring).

    Args:
      models: one `Restorer`, or several by name (outputs in `output_dir/<name>/`).
      input_path: an image file or a folder (searched recursively).
      output_dir: where the PNGs go, mirroring the input's relative paths.
      tile, tile_overlap, batch_size: as `Restorer.restore` (None: each model's defaults; a
        model without a default tile restores whole images unless they do not fit the device).
      save_16bit: write 16-bit PNGs instead of 8-bit ones.
      overwrite: replace existing outputs.
      skip_existing: leave existing outputs and restore only the missing ones.
      progress: show a progress bar (default: when stderr is a terminal).

    Raises:
      FileExistsError: outputs exist and neither `overwrite` nor `skip_existing` is set
        (checked before anything runs; the message names the first ones).
      ImageError: the input has no images, or two inputs would share one output.
    """
    named = models if isinstance(models, Mapping) else None
    restorers = dict(named) if named is not None else {"": models}
    root, per_input = plan_outputs(input_path, output_dir, list(named) if named else None)
    summary = Summary(output=os.path.abspath(output_dir))
    existing = [p for outs in per_input.values() for p in outs.values() if os.path.exists(p)]
    if existing and not (overwrite or skip_existing):
        shown = ", ".join(repr(p) for p in existing[:3])
        raise FileExistsError(
            f"{len(existing)} outputs exist already ({shown}{', ...' if len(existing) > 3 else ''}"
            "): pass --overwrite to replace them or --skip_existing to keep them"
        )
    if skip_existing and not overwrite:
        summary.skipped_existing = existing
        done = set(existing)
        per_input = {
            rel: {n: p for n, p in outs.items() if p not in done} for rel, outs in per_input.items()
        }
        per_input = {rel: outs for rel, outs in per_input.items() if outs}
    bits = 16 if save_16bit else 8
    show = sys.stderr.isatty() if progress is None else progress
    start = time.perf_counter()
    with (
        concurrent.futures.ThreadPoolExecutor(1) as reader,
        concurrent.futures.ThreadPoolExecutor(2) as writer,
        tqdm.tqdm(total=len(per_input), unit="img", disable=not show) as bar,
    ):
        order = list(per_input)
        read = lambda rel: reader.submit(files.read_image, os.path.join(root, rel))
        pending_read = read(order[0]) if order else None
        writes: collections.deque = collections.deque()
        for i, rel in enumerate(order):
            source = os.path.join(root, rel)
            try:
                pixels = pending_read.result()
            except images.ImageError as error:
                pixels, summary.failed[source] = None, str(error)
                _log.error("Skipping %s", error)
            if i + 1 < len(order):
                pending_read = read(order[i + 1])
            if pixels is not None:
                x = pixels.astype("float32") / 255.0
                for name, target in per_input[rel].items():
                    try:
                        model = restorers[name]
                        restored = model.restore(
                            x, tile=model.tile if tile is None else tile,
                            tile_overlap=tile_overlap, batch_size=batch_size, label=source,
                        )  # fmt: skip
                    except (MemoryError, jax.errors.JaxRuntimeError) as error:
                        if isinstance(error, jax.errors.JaxRuntimeError) and (
                            "RESOURCE_EXHAUSTED" not in str(error)
                        ):
                            raise
                        summary.failed[source] = f"out of memory ({error}); try --tile"
                        _log.error("Skipping %s: out of memory (%s)", source, error)
                        break
                    data = files.quantize(restored, bits=bits)
                    future = writer.submit(_encode_and_write, data, target, overwrite)
                    writes.append((target, future))
                    while len(writes) > MAX_PENDING_WRITES:  # bounded memory when writing lags
                        summary.written.append(_finish(*writes.popleft()))
                else:
                    summary.restored_images += 1
            bar.update(1)
        while writes:
            summary.written.append(_finish(*writes.popleft()))
    summary.seconds = time.perf_counter() - start
    _log.info("%s", summary.describe())
    return summary


def _finish(target: str, future: concurrent.futures.Future) -> str:
    future.result()  # re-raises a failed write
    return target


def _encode_and_write(pixels, target: str, overwrite: bool) -> None:
    files.write_atomic(target, files.encode_png(pixels), overwrite=overwrite)
