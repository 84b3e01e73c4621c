"""Image loading rules, TFDS preparation without TensorFlow, and the grain pipelines."""

import io
import json
import os
import runpy
import struct
import sys
import zlib
from pathlib import Path

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from ir_lora import data
from ir_lora.data import images, pipeline


def _save(path, pixels, **kwargs):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path, **kwargs)
    return path


def _png16_rgb(path, pixels):
    """Writes a 16-bit RGB PNG by hand (Pillow cannot write one)."""
    h, w, _ = pixels.shape
    rows = b"".join(b"\x00" + pixels[i].astype(">u2").tobytes() for i in range(h))

    def chunk(kind, body):
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)))
        f.write(chunk(b"IEND", b""))


def _rand(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# ---------------------------------------------------------------------------- image loading rules


def test_rgb_png_and_jpeg_bytes_pass_through(tmp_path):
    rgb = _rand((9, 7, 3))
    png = _save(str(tmp_path / "a.png"), rgb)
    jpg = _save(str(tmp_path / "b.jpg"), rgb, quality=90)
    pixels, encoded = images.load_rgb(png)
    np.testing.assert_array_equal(pixels, rgb)
    assert encoded == Path(png).read_bytes()
    pixels, encoded = images.load_rgb(jpg)
    assert encoded == Path(jpg).read_bytes()
    np.testing.assert_array_equal(pixels, np.asarray(Image.open(jpg)))


def test_grey_alpha_palette_and_16_bit_become_8_bit_rgb(tmp_path):
    grey = _rand((6, 5))
    rgba = _rand((6, 5, 4))
    wide = (np.arange(6 * 5 * 3).reshape(6, 5, 3) * 4000 % 65536).astype(np.uint16)
    cases = {
        "grey.png": (_save(str(tmp_path / "grey.png"), grey), np.stack([grey] * 3, -1)),
        "rgba.png": (_save(str(tmp_path / "rgba.png"), rgba), rgba[..., :3]),
        "grey16.png": (
            _save(str(tmp_path / "grey16.png"), wide[..., 0]),
            np.stack([(wide[..., 0] >> 8).astype(np.uint8)] * 3, -1),
        ),
    }
    rgb16 = str(tmp_path / "rgb16.png")
    _png16_rgb(rgb16, wide)
    cases["rgb16.png"] = (rgb16, (wide >> 8).astype(np.uint8))
    palette = Image.fromarray(_rand((6, 5, 3))).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.save(tmp_path / "p.png")
    cases["p.png"] = (str(tmp_path / "p.png"), np.asarray(palette.convert("RGB")))
    for name, (path, expected) in cases.items():
        pixels, encoded = images.load_rgb(path)
        assert pixels.dtype == np.uint8 and pixels.shape == (6, 5, 3), name
        np.testing.assert_array_equal(pixels, expected, err_msg=name)
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(encoded))), expected)


def test_unreadable_and_float_images_are_refused_naming_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(images.ImageError, match="broken.png"):
        images.load_rgb(str(bad))
    good = _save(str(tmp_path / "cut.png"), _rand((64, 64, 3)))
    raw = Path(good).read_bytes()
    (tmp_path / "cut.png").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(images.ImageError, match="cut.png"):
        images.load_rgb(good)
    Image.fromarray(np.zeros((4, 4), np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(images.ImageError, match="f.tif.*floating-point"):
        images.load_rgb(str(tmp_path / "f.tif"))


def test_match_pairs_by_name_pattern_and_errors(tmp_path):
    lq, gt = tmp_path / "hazy", tmp_path / "gt"
    for n in ("0001_0.8_0.2.jpg", "0001_0.9_0.1.jpg", "0002_0.8_0.2.jpg"):
        _save(str(lq / n), _rand((4, 4, 3)))
    for n in ("0001.png", "0002.png"):
        _save(str(gt / n), _rand((4, 4, 3)))
    pairs = images.match_pairs(str(lq), str(gt), gt_stem_pattern=r"(\d+)_.*")
    assert pairs == [
        ("0001_0.8_0.2.jpg", "0001.png"),
        ("0001_0.9_0.1.jpg", "0001.png"),
        ("0002_0.8_0.2.jpg", "0002.png"),
    ]
    with pytest.raises(images.ImageError, match="0001_0.8_0.2.jpg.*no clean partner"):
        images.match_pairs(str(lq), str(gt))
    _save(str(gt / "0003.png"), _rand((4, 4, 3)))
    with pytest.raises(images.ImageError, match="0003.png.*no degraded partner"):
        images.match_pairs(str(lq), str(gt), gt_stem_pattern=r"(\d+)_.*")


# --------------------------------------------------------------------------------- preparation


def _paired_folder(root, sizes=((20, 24), (18, 26), (22, 22)), split="train"):
    """BasicSR layout <split>/lq, <split>/gt with lq = 255 - gt, so alignment is checkable."""
    for i, (h, w) in enumerate(sizes):
        gt = _rand((h, w, 3), seed=i)
        _save(f"{root}/{split}/gt/{i:03d}.png", gt)
        _save(f"{root}/{split}/lq/{i:03d}.png", 255 - gt)
    return str(root)


def test_prepare_clean_folder_of_sample_photos(tmp_path):
    folder = data.write_sample_folder(str(tmp_path / "photos"), max_side=48)
    src = data.prepare("images", source_dir=folder, data_dir=str(tmp_path / "tfds"))
    assert len(src) == len(data.SAMPLE_PHOTOS)
    by_name = {src[i]["name"].decode(): src[i]["gt"] for i in range(len(src))}
    assert set(by_name) == set(data.SAMPLE_PHOTOS)
    for name, pixels in by_name.items():
        np.testing.assert_array_equal(pixels, np.asarray(Image.open(f"{folder}/{name}.png")))
    assert "tensorflow" not in sys.modules
    # A prepared split is reopened without the source folder ...
    assert len(data.load("images", data_dir=str(tmp_path / "tfds"))) == 6
    # ... and refuses to pass off another folder's data as this one's.
    other = data.write_sample_folder(str(tmp_path / "other"), max_side=16)
    with pytest.raises(ValueError, match="prepared from"):
        data.prepare("images", source_dir=other, data_dir=str(tmp_path / "tfds"))
    rebuilt = data.prepare(
        "images", source_dir=other, data_dir=str(tmp_path / "tfds"), overwrite=True
    )
    assert max(rebuilt[0]["gt"].shape[:2]) == 16


def test_sample_photos_are_colour_uint8():
    photos = data.sample_photos()
    assert [n for n, _ in photos] == list(data.SAMPLE_PHOTOS)
    for _, p in photos:
        assert p.dtype == np.uint8 and p.ndim == 3 and p.shape[-1] == 3


def test_prepare_paired_named_config_and_split_errors(tmp_path):
    root = tmp_path / "SOTS"
    _save(f"{root}/outdoor/hazy/0001_0.8_0.2.jpg", _rand((12, 10, 3)))
    _save(f"{root}/outdoor/gt/0001.png", _rand((12, 10, 3)))
    src = data.prepare("sots", source_dir=str(root), data_dir=str(tmp_path / "t"), split="outdoor")
    assert len(src) == 1 and src[0]["name"] == b"0001_0.8_0.2"
    assert src[0]["lq"].shape == src[0]["gt"].shape == (12, 10, 3)
    with pytest.raises(images.ImageError, match="Split 'indoor' of dataset 'sots' .*missing: .*"
                       "indoor/hazy', .*indoor/gt'"):  # fmt: skip
        data.prepare("sots", source_dir=str(root), data_dir=str(tmp_path / "t"), split="indoor")
    with pytest.raises(ValueError, match="Unknown dataset 'nope'"):
        data.prepare("nope", source_dir=str(root), data_dir=str(tmp_path / "t"))
    with pytest.raises(ValueError, match="'sots' has no split 'train'; its splits: .*outdoor"):
        data.prepare("sots", source_dir=str(root), data_dir=str(tmp_path / "t"))
    with pytest.raises(images.ImageError, match="Split 'train' of dataset 'lol' .*our485/low"):
        data.prepare("lol", source_dir=str(root), data_dir=str(tmp_path / "t"))


@pytest.mark.parametrize("fault", ["size", "partner", "unreadable"])
def test_bad_pairs_fail_at_prepare_time_naming_the_file(tmp_path, fault):
    root = _paired_folder(tmp_path / "set")
    if fault == "size":
        _save(f"{root}/train/lq/001.png", _rand((18, 25, 3)))
        match = "Size mismatch.*001.png"
    elif fault == "partner":
        os.remove(f"{root}/train/gt/002.png")
        match = "002.png.*no clean partner"
    else:
        with open(f"{root}/train/gt/000.png", "wb") as f:
            f.write(b"\x89PNG garbage")
        match = "Cannot read image.*000.png"
    with pytest.raises(images.ImageError, match=match):
        data.prepare("paired", source_dir=root, data_dir=str(tmp_path / "t"))


def test_custom_paired_config(tmp_path):
    root = tmp_path / "rain"
    rainy, clean = _rand((8, 9, 3), seed=1), _rand((8, 9, 3), seed=2)
    _save(f"{root}/rainy/rain-001.png", rainy)
    _save(f"{root}/clean/norain-001.png", clean)
    config = data.PairedConfig(
        name="rain100h_original",
        splits={"test": ("rainy", "clean")},
        gt_stem_pattern=r"rain-(\d+)",
        gt_name_template="norain-{}",
    )
    src = data.prepare(config, source_dir=str(root), data_dir=str(tmp_path / "t"), split="test")
    np.testing.assert_array_equal(src[0]["lq"], rainy)
    np.testing.assert_array_equal(src[0]["gt"], clean)
    assert src[0]["name"] == b"rain-001"
    without_template = data.PairedConfig(
        name="no_template", splits={"test": ("rainy", "clean")}, gt_stem_pattern=r"rain-(\d+)"
    )
    with pytest.raises(images.ImageError, match="no clean partner named '001'"):
        data.prepare(
            without_template, source_dir=str(root), data_dir=str(tmp_path / "t"), split="test"
        )


# ----------------------------------------------------------------------------------- pipelines


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_paired_training_batches_are_aligned_crops(tmp_path):
    src = data.prepare(
        "paired", source_dir=_paired_folder(tmp_path / "set"), data_dir=str(tmp_path / "t")
    )
    ds = pipeline.train_dataset(src, gt_size=16, global_batch_size=4, seed=0)
    for batch in _take(iter(ds), 3):
        assert set(batch) == {"lq", "gt"}
        for v in batch.values():
            assert v.shape == (4, 16, 16, 3) and v.dtype == np.float32
            assert v.min() >= 0.0 and v.max() <= 1.0
        np.testing.assert_allclose(batch["lq"], 1.0 - batch["gt"], atol=1e-6)


def test_crops_too_large_fail_before_training_naming_the_smallest_image(tmp_path):
    src = data.prepare(
        "paired", source_dir=_paired_folder(tmp_path / "set"), data_dir=str(tmp_path / "t")
    )
    with pytest.raises(ValueError, match="gt_size=20 .*train/lq/001.png"):
        pipeline.train_dataset(src, gt_size=20, global_batch_size=2, seed=0)
    with pytest.raises(ValueError, match="multiple of the process count 2"):
        pipeline.train_dataset(src, gt_size=8, global_batch_size=3, seed=0, process_count=2)


def _numbered(n, size=8):
    """Clean examples whose pixels all equal their index: crops reveal which example they are."""
    return [{"gt": np.full((size, size, 3), i, np.uint8), "name": f"{i}"} for i in range(n)]


def _ids(batch):
    return [round(float(x) * 255) for x in batch["gt"][:, 0, 0, 0]]


def test_shuffle_repeat_and_host_sharding():
    src = _numbered(6)
    one = pipeline.train_dataset(src, gt_size=4, global_batch_size=4, seed=3, process_count=1)
    stream = [i for b in _take(iter(one), 6) for i in _ids(b)]
    # Every epoch is a permutation, and epochs are shuffled differently.
    epochs = [stream[k : k + 6] for k in (0, 6, 12, 18)]
    assert all(sorted(e) == list(range(6)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1
    hosts = [
        pipeline.train_dataset(
            src, gt_size=4, global_batch_size=4, seed=3, process_index=p, process_count=2
        )
        for p in range(2)
    ]
    per_host = [[i for b in _take(iter(h), 6) for i in _ids(b)] for h in hosts]
    assert all(len(b["gt"]) == 2 for b in _take(iter(hosts[0]), 2))
    assert per_host[0] == stream[0::2] and per_host[1] == stream[1::2]


def test_augmentations_are_the_eight_dihedral_transforms():
    pattern = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    src = [{"gt": pattern, "name": "p"}]
    expected = {
        np.ascontiguousarray(t).tobytes()
        for k in range(4)
        for t in (np.rot90(pattern, k), np.rot90(pattern[:, ::-1], k))
    }

    def seen(**flags):
        ds = pipeline.train_dataset(src, gt_size=4, global_batch_size=1, seed=0, **flags)
        return {np.round(b["gt"][0] * 255).astype(np.uint8).tobytes() for b in _take(iter(ds), 200)}

    assert seen() == expected
    assert seen(use_rot=False) == {pattern.tobytes(), pattern[:, ::-1].copy().tobytes()}
    assert seen(use_hflip=False, use_rot=False) == {pattern.tobytes()}


def test_iterator_state_restores_the_exact_batches():
    src = _numbered(5, size=12)
    ds = pipeline.train_dataset(src, gt_size=6, global_batch_size=2, seed=7)
    it = iter(ds)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # must survive a round trip through a file
    expected = _take(it, 4)
    restored = iter(ds)
    restored.set_state(state)
    for a, b in zip(expected, _take(restored, 4)):
        np.testing.assert_array_equal(a["gt"], b["gt"])


def test_clean_data_gives_gt_only_or_synthetic_noise():
    src = _numbered(3, size=32)
    batch = next(iter(pipeline.train_dataset(src, gt_size=32, global_batch_size=3, seed=0)))
    assert set(batch) == {"gt"}
    ds = pipeline.train_dataset(src, gt_size=32, global_batch_size=3, seed=0, noise_sigma=25)
    batch = next(iter(ds))
    residual = batch["lq"] - batch["gt"]
    assert residual.std() == pytest.approx(25 / 255, rel=0.05)


def test_eval_dataset_full_images_with_names_and_fixed_noise(tmp_path):
    src = data.prepare(
        "paired", source_dir=_paired_folder(tmp_path / "set"), data_dir=str(tmp_path / "t")
    )
    items = list(pipeline.eval_dataset(src))
    assert sorted(x["name"] for x in items) == ["000", "001", "002"]
    for x in items:
        assert x["gt"].shape[0] == 1 and x["gt"].shape == x["lq"].shape
        np.testing.assert_allclose(x["lq"], 1.0 - x["gt"], atol=1e-6)
    clean = _numbered(2, size=16)
    first = list(pipeline.eval_dataset(clean, noise_sigma=15, seed=1))
    again = list(pipeline.eval_dataset(clean, noise_sigma=15, seed=1))
    np.testing.assert_array_equal(first[1]["lq"], again[1]["lq"])
    assert not np.array_equal(first[0]["lq"] - first[0]["gt"], first[1]["lq"] - first[1]["gt"])
    assert set(next(iter(pipeline.eval_dataset(clean)))) == {"gt", "name"}


def test_iterator_state_round_trips_through_orbax(tmp_path):
    src = _numbered(5, size=8)
    ds = pipeline.train_dataset(src, gt_size=4, global_batch_size=2, seed=1)
    it = iter(ds)
    _take(it, 2)
    manager = ocp.CheckpointManager(str(tmp_path / "ckpt"))
    manager.save(2, args=ocp.args.Composite(iter=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    expected = [_ids(b) for b in _take(it, 3)]
    resumed = iter(ds)
    manager.restore(2, args=ocp.args.Composite(iter=grain.checkpoint.CheckpointRestore(resumed)))
    assert [_ids(b) for b in _take(resumed, 3)] == expected
    manager.close()


def test_sidd_validation_blocks_become_a_prepared_val_split(tmp_path):
    from scipy.io import savemat

    script = runpy.run_path(str(Path(__file__).parents[2] / "data" / "prepare_sidd_val.py"))
    noisy, gt = _rand((2, 3, 16, 16, 3), seed=1), _rand((2, 3, 16, 16, 3), seed=2)
    savemat(tmp_path / "noisy.mat", {"ValidationNoisyBlocksSrgb": noisy})
    savemat(tmp_path / "gt.mat", {"ValidationGtBlocksSrgb": gt})
    root = tmp_path / "SIDD"
    assert script["write_pairs"](str(tmp_path / "noisy.mat"), str(tmp_path / "gt.mat"), root) == 6
    src = data.prepare("sidd", source_dir=str(root), data_dir=str(tmp_path / "t"), split="val")
    example = next(x for x in (src[i] for i in range(len(src))) if x["name"] == b"01_02")
    np.testing.assert_array_equal(example["lq"], noisy[1, 2])
    np.testing.assert_array_equal(example["gt"], gt[1, 2])


# ---------------------------------------------------------------------- storage forms (tiles)


def _whole_image_config(kind, name, **fields):
    """The same layout as a named configuration, but every split kept as whole images."""
    return kind(name=name, tiled_splits=(), **fields)


def test_tiles_give_the_pixels_and_crops_of_whole_images(tmp_path):
    # Sizes that the tile size does not divide, and a tile size smaller than every crop.
    root = _paired_folder(tmp_path / "set", sizes=((23, 31), (17, 40), (30, 30)))
    tiled_config = data.PairedConfig(
        name="paired_tiles_7", splits={"train": ("train/lq", "train/gt")}, tile_size=7
    )
    whole_config = _whole_image_config(
        data.PairedConfig, "paired_whole", splits={"train": ("train/lq", "train/gt")}
    )
    tiled = data.prepare(tiled_config, source_dir=root, data_dir=str(tmp_path / "t"))
    whole = data.prepare(whole_config, source_dir=root, data_dir=str(tmp_path / "t"))
    assert tiled.tiled and not whole.tiled and len(tiled) == len(whole) == 3
    rng = np.random.default_rng(0)
    for i in range(3):
        a, b = tiled[i], whole[i]
        assert a["name"] == b["name"]
        for key in ("lq", "gt"):
            np.testing.assert_array_equal(a[key], b[key])
        h, w = tiled.image_size(i)
        assert (h, w) == b["gt"].shape[:2]
        for _ in range(20):
            size_h, size_w = rng.integers(1, h + 1), rng.integers(1, w + 1)
            top, left = rng.integers(0, h - size_h + 1), rng.integers(0, w - size_w + 1)
            got = tiled.window(i, top, left, size_h, size_w)
            for key in ("lq", "gt"):
                np.testing.assert_array_equal(
                    got[key], b[key][top : top + size_h, left : left + size_w]
                )
    with pytest.raises(ValueError, match="exceeds image"):
        tiled.window(0, 20, 0, 10, 10)
    # The training stream is the same batch for batch: tiles only change how pixels are read.
    kwargs = dict(gt_size=16, global_batch_size=3, seed=5)
    for a, b in zip(
        _take(iter(pipeline.train_dataset(tiled, **kwargs)), 4),
        _take(iter(pipeline.train_dataset(whole, **kwargs)), 4),
    ):
        for key in ("lq", "gt"):
            np.testing.assert_array_equal(a[key], b[key])
        np.testing.assert_allclose(a["lq"], 1.0 - a["gt"], atol=1e-6)


def test_training_split_is_tiled_and_evaluation_splits_keep_whole_images(tmp_path):
    root = _paired_folder(tmp_path / "set")
    _paired_folder(tmp_path / "set", split="val", sizes=((12, 14),))
    train = data.prepare("paired", source_dir=root, data_dir=str(tmp_path / "t"))
    val = data.prepare("paired", source_dir=root, data_dir=str(tmp_path / "t"), split="val")
    assert train.tiled and not val.tiled
    # The evaluation split stores each file's own PNG bytes, as before.
    builder = data.IrPairedImages(data_dir=str(tmp_path / "t"), config="paired")
    import tensorflow_datasets as tfds

    (record,) = builder.as_data_source("val", decoders={"gt": tfds.decode.SkipDecoding()})
    assert record["gt"] == Path(f"{root}/val/gt/000.png").read_bytes()
    # A split prepared once can be read back in another process (it pickles by reference).
    import pickle

    again = pickle.loads(pickle.dumps(train))
    np.testing.assert_array_equal(again[1]["gt"], train[1]["gt"])


# --------------------------------------------------------------- stale data and missing splits


def test_a_changed_source_folder_is_prepared_again(tmp_path, caplog):
    folder = data.write_sample_folder(str(tmp_path / "photos"), max_side=32)
    tfds_dir = str(tmp_path / "tfds")
    assert len(data.prepare("images", source_dir=folder, data_dir=tfds_dir)) == 6
    _save(f"{folder}/extra.png", _rand((40, 36, 3)))  # a file added after the first run
    with caplog.at_level("WARNING"):
        src = data.prepare("images", source_dir=folder, data_dir=tfds_dir)
    assert len(src) == 7 and "extra" in {src.name(i) for i in range(7)}
    assert "changed since it was prepared" in caplog.text and "6 files" in caplog.text
    # A file rewritten with other pixels (same name) is noticed too, and nothing else is.
    _save(f"{folder}/extra.png", _rand((40, 36, 3), seed=9))
    os.utime(f"{folder}/extra.png", ns=(1, 1))
    src = data.prepare("images", source_dir=folder, data_dir=tfds_dir)
    index = [src.name(i) for i in range(7)].index("extra")
    np.testing.assert_array_equal(src[index]["gt"], _rand((40, 36, 3), seed=9))
    caplog.clear()
    with caplog.at_level("WARNING"):
        data.prepare("images", source_dir=folder, data_dir=tfds_dir)
    assert "changed" not in caplog.text


def test_a_split_folder_added_later_is_prepared(tmp_path):
    root = _paired_folder(tmp_path / "set")
    tfds_dir = str(tmp_path / "t")
    data.prepare("paired", source_dir=root, data_dir=tfds_dir, split="train")
    with pytest.raises(images.ImageError, match=r"Split 'val' .*missing: .*set/val/lq"):
        data.prepare("paired", source_dir=root, data_dir=tfds_dir, split="val")
    _paired_folder(tmp_path / "set", split="val", sizes=((12, 14),))
    val = data.prepare("paired", source_dir=root, data_dir=tfds_dir, split="val")
    assert len(val) == 1 and val[0]["gt"].shape == (12, 14, 3)


def test_finetune_without_val_folder_fails_before_training(tmp_path):
    from configs import finetune_lora
    from ir_lora.stages import registry

    root = _paired_folder(tmp_path / "set", sizes=((40, 40), (40, 40)))
    config = finetune_lora.get_config()
    config.unlock()
    config.data.source_dir = root
    config.data.data_dir = str(tmp_path / "tfds")
    config.eval.datasets.val.source_dir = root
    config.init.checkpoint = str(tmp_path / "no_backbone_needed_yet")
    config.lock()
    workdir = tmp_path / "run"
    with pytest.raises(images.ImageError, match=r"Split 'val' of dataset 'paired'.*set/val/lq"):
        registry.train(config, str(workdir))
    assert not (workdir / "checkpoints").exists()


# ------------------------------------------------------------------------ errors and messages


def test_empty_folder_and_empty_file_errors_name_the_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(images.ImageError, match="No image files .*empty"):
        data.prepare("images", source_dir=str(tmp_path / "empty"), data_dir=str(tmp_path / "t"))
    (tmp_path / "zero").mkdir()
    (tmp_path / "zero" / "blank.png").write_bytes(b"")
    with pytest.raises(images.ImageError, match=r"blank.png.*empty \(0 bytes\)") as info:
        data.prepare("images", source_dir=str(tmp_path / "zero"), data_dir=str(tmp_path / "t"))
    assert "BytesIO" not in str(info.value)
    (tmp_path / "zero" / "blank.png").write_bytes(b"definitely not an image")
    with pytest.raises(images.ImageError, match="blank.png.*not an image") as info:
        images.load_rgb(str(tmp_path / "zero" / "blank.png"))
    assert "BytesIO" not in str(info.value)
    with pytest.raises(images.ImageError, match="source_dir is empty"):
        data.prepare("images", source_dir="", data_dir=str(tmp_path / "t"))


def test_two_degraded_files_with_one_name_are_refused(tmp_path):
    root = _paired_folder(tmp_path / "set")
    _save(f"{root}/train/lq/001.jpg", _rand((18, 26, 3)))
    with pytest.raises(images.ImageError, match="Two degraded images share the name '001'"):
        data.prepare("paired", source_dir=root, data_dir=str(tmp_path / "t"))
    clean = tmp_path / "clean"
    _save(f"{clean}/a.png", _rand((8, 8, 3)))
    _save(f"{clean}/a.jpg", _rand((8, 8, 3)))
    with pytest.raises(images.ImageError, match="Two clean images share the name 'a'"):
        data.prepare("images", source_dir=str(clean), data_dir=str(tmp_path / "t"))


def test_preparing_a_local_folder_prints_no_download_message(tmp_path, capfd):
    folder = data.write_sample_folder(str(tmp_path / "photos"), max_side=16)
    data.prepare("images", source_dir=folder, data_dir=str(tmp_path / "tfds"))
    out, err = capfd.readouterr()
    assert "Downloading" not in out + err and "downloaded" not in out + err
