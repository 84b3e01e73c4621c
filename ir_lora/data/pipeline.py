"""grain input pipelines: random training crops with BasicSR's augmentations, and full-image eval.

Training (`train_dataset`): shuffle with `seed` (a new order every epoch), repeat, a random crop of
`gt_size` (the same window for `lq` and `gt`), then BasicSR's `augment`: horizontal flip if
`use_hflip`, and if `use_rot` a vertical flip and a transpose (together the 8 rotations and
flips), each with probability 1/2. Each process takes every `process_count`-th example
(`jax.process_index()`), and batches of `global_batch_size // process_count` are formed with the
remainder dropped. Every random choice is a function of `seed` and the example's global position,
so the stream is reproducible, and the iterator's `get_state()`/`set_state()` (or
`grain.checkpoint.CheckpointSave/CheckpointRestore` with orbax) resume it exactly.

Batches are dicts of float32 NHWC arrays in [0, 1]: `{"lq", "gt"}` for paired data, `{"gt"}` for
clean data. With `noise_sigma` (on the 0..255 scale, or a list to choose from per example) an
`lq = gt + N(0, sigma/255)` is made on the fly from clean data, without clipping, as Restormer
does for Gaussian denoising.

From a prepared (tiled) training split a crop reads only the tiles it covers, so loading costs
about the same for a 256x256 crop of a 2K photograph as of a small image; `worker_count` grain
processes can share the work (ir_lora/data/prefetch.py overlaps it with the training step).

An image smaller than `gt_size` is an error when the pipeline is built (the prepared dataset
records its smallest image); it is not padded, since padding would teach the model the padding.
"""

import functools
import os
import sys
from collections.abc import Sequence

import grain
import jax
import numpy as np
from absl import flags

from ir_lora.data.batch_stream import BatchStream
from ir_lora.data.sources import PreparedSplit


def _examples_have_lq(source) -> bool:
    if len(source) == 0:
        raise ValueError("The dataset is empty.")
    if isinstance(source, PreparedSplit):
        return source.has_lq
    return "lq" in source[0]


def _check_min_size(source, gt_size: int) -> None:
    """Refuses a gt_size larger than the smallest image, using the prepared dataset's record."""
    info = getattr(source, "dataset_info", None)
    split = str(getattr(source, "split", ""))
    stats = info.metadata.get("splits", {}).get(split) if info is not None else None
    if stats and stats["min_side"] < gt_size:
        raise ValueError(
            f"gt_size={gt_size} is larger than the image {stats['smallest']!r} "
            f"(shorter side {stats['min_side']}); lower gt_size or remove small images."
        )


def _name(example) -> str:
    name = example.get("name", b"?")
    return name.decode() if isinstance(name, bytes) else str(name)


def augment(images: list[np.ndarray], rng: np.random.Generator, *, use_hflip: bool, use_rot: bool):
    """BasicSR's `augment`: the same flips/transpose on every image of a pair."""
    hflip = use_hflip and rng.random() < 0.5
    vflip = use_rot and rng.random() < 0.5
    rot90 = use_rot and rng.random() < 0.5
    out = []
    for img in images:
        if hflip:
            img = img[:, ::-1]
        if vflip:
            img = img[::-1]
        if rot90:
            img = img.transpose(1, 0, 2)
        out.append(np.ascontiguousarray(img))
    return out


def _noise_sigma(noise_sigma, rng: np.random.Generator) -> float:
    if isinstance(noise_sigma, int | float):
        return float(noise_sigma)
    return float(noise_sigma[rng.integers(len(noise_sigma))])


def _to_float(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float32) / np.float32(255.0)


def _make_lq(example, gt: np.ndarray, noise_sigma, rng) -> np.ndarray | None:
    if noise_sigma is not None:
        sigma = _noise_sigma(noise_sigma, rng)
        noise = rng.standard_normal(gt.shape, dtype=np.float32) * np.float32(sigma / 255.0)
        return gt + noise
    if "lq" in example:
        return _to_float(example["lq"])
    return None


def _collate(crops: Sequence[dict]) -> dict:
    """Stacks uint8 crops into float32 batches in [0, 1], each value written once; with noise,
    `lq = gt + noise` (the same values as converting crop by crop)."""
    shape = (len(crops), *crops[0]["gt"].shape)
    batch = {}
    for key in ("gt", "lq"):
        if key in crops[0]:
            out = np.empty(shape, np.float32)
            for i, crop in enumerate(crops):
                np.divide(crop[key], np.float32(255.0), out=out[i], dtype=np.float32)
            batch[key] = out
    if "noise" in crops[0]:
        lq = np.empty(shape, np.float32)
        for i, crop in enumerate(crops):
            np.add(batch["gt"][i], crop["noise"], out=lq[i])
        batch["lq"] = lq
    return batch


def default_worker_count() -> int:
    """Worker processes for `worker_count=-1`: none where the step runs on the CPU itself (the
    cores are the step's), else up to 8, leaving half the host's cores to the training process."""
    if jax.default_backend() == "cpu":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, (cores or 2) // 2))


def resolve_worker_count(worker_count: int) -> int:
    """`worker_count`, with -1 meaning `default_worker_count()`."""
    worker_count = int(worker_count)
    if worker_count == -1:
        return default_worker_count()
    if worker_count < 0:
        raise ValueError(f"worker_count must be >= 0, or -1 for the default; got {worker_count}.")
    return worker_count


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, count: int) -> np.ndarray:
    """The example order of one epoch: a permutation of `range(count)` drawn from (seed, epoch).

    One permutation per epoch, cached; grain's per-element index shuffle costs milliseconds per
    element for datasets of a few images.
    """
    return np.random.default_rng([seed % 2**64, epoch, 0x5EED]).permutation(count)


def _random_window(source, index: int, size: int, rng: np.random.Generator) -> dict:
    """A random `size` x `size` window of example `index` (the same for `gt` and `lq`).

    A `PreparedSplit` reads only the window; any other sequence of example dicts is indexed
    whole and sliced. The random draws are the same either way.
    """
    if isinstance(source, PreparedSplit):
        (h, w), name, example = source.image_size(index), source.name(index), None
    else:
        example = source[index]
        h, w = example["gt"].shape[:2]
        name = _name(example)
    if min(h, w) < size:
        raise ValueError(f"gt_size={size} is larger than image {name!r} ({h}x{w}).")
    top, left = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
    if example is None:
        return source.window(index, int(top), int(left), size, size)
    window = (slice(top, top + size), slice(left, left + size))
    return {k: example[k][window] for k in ("gt", "lq") if k in example}


def _ensure_flags_parsed() -> None:
    # grain's worker processes read absl flags; outside `absl.app.run` nothing parsed them.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def train_dataset(
    source,
    *,
    gt_size: int,
    global_batch_size: int,
    seed: int,
    use_hflip: bool = True,
    use_rot: bool = True,
    noise_sigma: float | Sequence[float] | None = None,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
) -> BatchStream:
    """The training stream of one process: shuffled, repeated, cropped, augmented, batched.

    Args:
      source: random-access examples: `prepare(...)`'s `PreparedSplit` (crops read only the
        tiles they cover), or any sequence of dicts with uint8 `"gt"` and optionally `"lq"` HWC
        arrays.
      gt_size: side of the square training crop (BasicSR `gt_size`).
      global_batch_size: examples per step over all processes.
      seed: shuffling and augmentation seed.
      use_hflip: random horizontal flips.
      use_rot: random vertical flips and transposes (the 90-degree rotations).
      noise_sigma: make `lq = gt + N(0, sigma/255)` on the fly (clean data only); a sequence
        draws sigma per example.
      num_epochs: passes over the data; None repeats forever.
      process_index: this process (default `jax.process_index()`).
      process_count: number of processes (default `jax.process_count()`).
      worker_count: grain worker processes that read, crop, augment and batch (each makes whole
        batches); 0 works in the calling thread, -1 is `default_worker_count()`. The batches are
        the same either way. Close an iterator with workers with `it.close()`.

    Returns:
      A `BatchStream`; `iter(...)` gives a checkpointable `grain.DatasetIterator` of
      `{"lq": (B, gt_size, gt_size, 3), "gt": ...}` float32 batches (`{"gt"}` only for clean
      data without `noise_sigma`), `B = global_batch_size // process_count`. Its state,
      `{"next_index": batches consumed}`, does not depend on `worker_count`.

    Raises:
      ValueError: for a bad gt_size or batch size, or an image smaller than gt_size.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    worker_count = resolve_worker_count(worker_count)
    if gt_size <= 0:
        raise ValueError(f"gt_size must be positive, got {gt_size}.")
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of the "
            f"process count {process_count}."
        )
    paired = _examples_have_lq(source)
    if paired and noise_sigma is not None:
        raise ValueError("noise_sigma makes lq from clean images; this dataset already has lq.")
    _check_min_size(source, gt_size)

    count = len(source)

    def crop_and_augment(position, rng: np.random.Generator):
        epoch, offset = divmod(int(position), count)
        index = int(epoch_order(seed, epoch, count)[offset])
        window = _random_window(source, index, gt_size, rng)
        crops = [window["gt"]] + ([window["lq"]] if paired else [])
        crops = augment(crops, rng, use_hflip=use_hflip, use_rot=use_rot)
        # uint8 until the batch is put together (`_collate`): a quarter of the bytes to copy.
        out = {"gt": crops[0]}
        if paired:
            out["lq"] = crops[1]
        elif noise_sigma is not None:
            sigma = _noise_sigma(noise_sigma, rng)
            noise = rng.standard_normal(crops[0].shape, dtype=np.float32)
            out["noise"] = noise * np.float32(sigma / 255.0)
        return out

    # Element i is the i-th example of the endless (or num_epochs long) shuffled stream.
    ds = grain.MapDataset.range(sys.maxsize if num_epochs is None else count * num_epochs)
    # Augment before sharding, so that the randomness follows the global position of an example.
    ds = ds.random_map(crop_and_augment, seed=seed)
    ds = ds[process_index::process_count]
    # Batching on the map dataset makes batch k a pure function of k, so that the workers (each
    # taking every worker_count-th batch) give the same stream as the calling thread.
    ds = ds.batch(global_batch_size // process_count, drop_remainder=True, batch_fn=_collate)
    if worker_count > 0:
        _ensure_flags_parsed()
    return BatchStream(ds, worker_count)


def eval_dataset(source, *, noise_sigma: float | None = None, seed: int = 0) -> grain.MapDataset:
    """Full images one at a time, each with a batch axis of 1 and its name.

    Args:
      source: random-access examples (see `train_dataset`).
      noise_sigma: for clean test sets (CBSD68): `lq = gt + N(0, sigma/255)`, unclipped; the
        noise of image `i` depends only on `seed` and `i`, so every evaluation sees the same.
      seed: noise seed.

    Returns:
      A `grain.MapDataset` (index it or iterate it) of `{"lq": (1, H, W, 3) float32, "gt": ...,
      "name": str}`; `"lq"` is absent for clean data without `noise_sigma`.
    """
    if noise_sigma is not None and _examples_have_lq(source):
        raise ValueError("noise_sigma makes lq from clean images; this dataset already has lq.")

    def full_image(example, rng: np.random.Generator):
        out = {"gt": _to_float(example["gt"])[None]}
        lq = _make_lq(example, out["gt"][0], noise_sigma, rng)
        if lq is not None:
            out["lq"] = lq[None]
        out["name"] = _name(example)
        return out

    return grain.MapDataset.source(source).random_map(full_image, seed=seed)
