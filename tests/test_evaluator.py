import csv
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ir_lora import data, evaluator, metrics
from ir_lora.data import pipeline
from ir_lora.inference import pad_to_multiple, restore_image, tile_origins


def _rand(shape, seed=0):
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def _pointwise(x):
    return jnp.tanh(2.0 * x) * 0.5 + x**2


def _conv_net(layers: int, seed: int = 1):
    """`layers` 3x3 zero-padded convs with a ReLU between: receptive-field radius `layers`."""
    kernels = [jnp.asarray(_rand((3, 3, 3, 3), seed + i) - 0.5) / 3 for i in range(layers)]

    def apply(x):
        for i, k in enumerate(kernels):
            x = jax.lax.conv_general_dilated(
                x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
            x = jax.nn.relu(x) if i < layers - 1 else x
        return x

    return jax.jit(apply)


def _swinir_tiled(fn, img, tile, overlap):
    """SwinIR's `test` loop (main_test_swinir.py) transcribed to numpy, for (1, H, W, C)."""
    _, h, w, _ = img.shape
    tile = min(tile, h, w)
    stride = tile - overlap
    h_idx = list(range(0, h - tile, stride)) + [h - tile]
    w_idx = list(range(0, w - tile, stride)) + [w - tile]
    e, wsum = np.zeros(img.shape, np.float64), np.zeros(img.shape, np.float64)
    for i in h_idx:
        for j in w_idx:
            e[:, i : i + tile, j : j + tile] += np.asarray(fn(img[:, i : i + tile, j : j + tile]))
            wsum[:, i : i + tile, j : j + tile] += 1
    return e / wsum


def test_pad_is_reflect_and_tile_origins_match_swinir():
    x = np.arange(5, dtype=np.float32).reshape(1, 1, 5, 1).repeat(2, axis=1)
    padded = pad_to_multiple(x, 4)
    assert padded.shape == (1, 4, 8, 1)
    np.testing.assert_array_equal(padded[0, 0, :, 0], [0, 1, 2, 3, 4, 3, 2, 1])
    np.testing.assert_array_equal(padded[0, :, 0, 0], [0, 0, 0, 0])  # rows 0,1 then 0,1 reflected
    assert tile_origins(100, 32, 8) == [0, 24, 48, 68]
    assert tile_origins(32, 32, 8) == [0]
    with pytest.raises(ValueError, match="tile_overlap"):
        tile_origins(100, 32, 32)


@pytest.mark.parametrize("shape", [(37, 53, 3), (16, 16, 3), (1, 29, 3), (45, 7, 3)])
@pytest.mark.parametrize("blend", ["average", "trim"])
def test_tiling_equals_untiled_for_pointwise_fn(shape, blend):
    img = _rand(shape)
    fn = jax.jit(_pointwise)
    untiled = restore_image(fn, img, pad_multiple=8)
    np.testing.assert_allclose(untiled, np.asarray(_pointwise(img)), rtol=1e-6, atol=1e-6)
    tiled = restore_image(
        fn, img, tile=16, tile_overlap=6, pad_multiple=8, tile_batch_size=3, tile_blend=blend
    )
    assert tiled.shape == shape and tiled.dtype == np.float32
    np.testing.assert_array_equal(tiled, untiled)


@pytest.mark.parametrize("layers", [1, 2])
def test_trim_tiling_equals_untiled_for_conv_net(layers):
    img = _rand((1, 70, 43, 3), seed=3)
    fn = _conv_net(layers)
    untiled = restore_image(fn, img, pad_multiple=8)
    assert untiled.shape == img.shape
    tiled = restore_image(
        fn, img, tile=24, tile_overlap=2 * layers, pad_multiple=8, tile_blend="trim"
    )
    np.testing.assert_allclose(tiled, untiled, atol=1e-5)


def test_average_tiling_matches_swinir_loop_and_is_exact_away_from_tile_edges():
    img = _rand((1, 64, 56, 3), seed=4)
    fn = _conv_net(1)
    tiled = restore_image(fn, img, tile=24, tile_overlap=8, pad_multiple=8, tile_batch_size=5)
    np.testing.assert_allclose(tiled, _swinir_tiled(fn, img, 24, 8), atol=1e-6)
    # Away from the inner tile edges (radius 1), every tile sees the whole 3x3 neighbourhood.
    untiled = restore_image(fn, img, pad_multiple=8)
    near_edge = np.zeros(img.shape[1:3], bool)
    for axis, size in ((0, 64), (1, 56)):
        for origin in tile_origins(size, 24, 8):
            for edge in (origin, origin + 24):
                if 0 < edge < size:
                    index = [slice(None), slice(None)]
                    index[axis] = slice(edge - 1, edge + 1)
                    near_edge[tuple(index)] = True
    diff = np.abs(tiled - untiled)[0].max(-1)
    assert diff[~near_edge].max() < 1e-5
    assert diff[near_edge].max() > 1e-3  # the uniform average does see the tile padding


def test_shape_buckets_bound_compilations():
    traces = []

    def fn(x):
        traces.append(x.shape)
        return x * 2.0

    jitted = jax.jit(fn)
    for h, w in [(17, 23), (20, 30), (31, 31), (33, 12)]:
        out = restore_image(jitted, _rand((h, w, 3)), pad_multiple=32)
        assert out.shape == (h, w, 3)
    assert sorted(set(traces)) == [(1, 32, 32, 3), (1, 64, 32, 3)]
    traces.clear()
    for h, w in [(50, 70), (61, 90)]:  # tiled: every call has the shape (batch, tile, tile, C)
        restore_image(jitted, _rand((h, w, 3)), tile=32, tile_overlap=8, pad_multiple=8)
    assert set(traces) == {(4, 32, 32, 3)}


def test_restore_image_errors():
    img = _rand((20, 20, 3))
    with pytest.raises(ValueError, match="multiple of pad_multiple"):
        restore_image(_pointwise, img, tile=20, pad_multiple=8)
    with pytest.raises(ValueError, match="tile_blend"):
        restore_image(_pointwise, img, tile=16, tile_overlap=4, pad_multiple=8, tile_blend="gauss")
    with pytest.raises(ValueError, match="restore_fn must return"):
        restore_image(lambda x: x[:, :8], img, pad_multiple=8)
    with pytest.raises(ValueError, match=r"\(H, W, C\)"):
        restore_image(_pointwise, img[..., 0], pad_multiple=8)


def _pair(h, w, seed, offset=4):
    gt = np.random.default_rng(seed).integers(10, 240, (h, w, 3)).astype(np.uint8)
    return gt, (gt + offset).astype(np.uint8)


def _source(sizes, seed=0, offset=4):
    """A stand-in for a TFDS data source: a sequence of raw uint8 examples."""
    out = []
    for i, (h, w) in enumerate(sizes):
        gt, lq = _pair(h, w, seed + i, offset)
        out.append({"lq": lq, "gt": gt, "name": f"img{i}"})
    return out


def test_identity_restore_scores_the_input(tmp_path):
    src = _source([(23, 31), (40, 17)])
    results = evaluator.evaluate(lambda x: x, {"toy": src}, crop_border=1)
    entry = results["datasets"]["toy"]
    assert results["complete"] and entry["num_images"] == 2
    for row, example in zip(entry["images"], src, strict=True):
        assert row["psnr"] == row["input_psnr"] and row["ssim"] == row["input_ssim"]
        assert row["psnr"] == metrics.psnr(example["lq"], example["gt"], crop_border=1)
        assert row["ssim"] == metrics.ssim(example["lq"], example["gt"], crop_border=1)
        assert (row["height"], row["width"]) == example["gt"].shape[:2]
    assert entry["mean"]["psnr"] == pytest.approx(np.mean([r["psnr"] for r in entry["images"]]))


def test_known_degradation_gives_known_psnr():
    # lq = gt + 4 levels; restoring by -2 levels leaves an error of exactly 2 levels everywhere.
    src = _source([(19, 27), (32, 32)], offset=4)
    results = evaluator.evaluate(
        lambda x: x - 2.0 / 255.0, {"shift": src}, tile=16, tile_overlap=4, pad_multiple=8
    )
    mean = results["datasets"]["shift"]["mean"]
    assert mean["input_psnr"] == pytest.approx(10 * np.log10(255.0**2 / 16), abs=1e-9)
    assert mean["psnr"] == pytest.approx(10 * np.log10(255.0**2 / 4), abs=1e-9)
    exact = evaluator.evaluate(lambda x: x - 4.0 / 255.0, {"shift": src}, pad_multiple=8)
    assert exact["datasets"]["shift"]["mean"]["psnr"] == np.inf
    assert exact["datasets"]["shift"]["mean"]["ssim"] == pytest.approx(1.0)


def test_prepared_paired_dataset_writes_tables_images_and_comparisons(tmp_path):
    sizes = {"a": (29, 37), "b": (48, 21)}
    for name, (h, w) in sizes.items():
        gt, lq = _pair(h, w, seed=len(name) + h, offset=6)
        for folder, img in (("lq", lq), ("gt", gt)):
            os.makedirs(tmp_path / "src" / "test" / folder, exist_ok=True)
            Image.fromarray(img).save(tmp_path / "src" / "test" / folder / f"{name}.png")
    src = data.prepare(
        "paired", source_dir=str(tmp_path / "src"), data_dir=str(tmp_path / "tfds"), split="test"
    )
    out = str(tmp_path / "eval")
    fn = _conv_net(1)
    results = evaluator.evaluate(
        lambda x: x + 0.1 * fn(x),
        {"paired": src, "toy": _source([(24, 24)])},
        crop_border=2,
        test_y_channel=True,
        tile=16,
        tile_overlap=4,
        tile_blend="trim",
        pad_multiple=8,
        out_dir=out,
        save_images=True,
        save_comparisons=True,
    )
    # Tables parse back and agree with the returned results.
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f) == results
    with open(os.path.join(out, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    # TFDS stores examples in a shuffled order; the rows of a dataset follow it.
    assert sorted((r["dataset"], r["row"], r["image"]) for r in rows) == [
        ("paired", "image", "a"),
        ("paired", "image", "b"),
        ("paired", "mean", ""),
        ("toy", "image", "img0"),
        ("toy", "mean", ""),
    ]
    for r in rows:
        entry = results["datasets"][r["dataset"]]
        by_name = {row["name"]: row for row in entry["images"]}
        expected = entry["mean"] if r["row"] == "mean" else by_name[r["image"]]
        for key in evaluator.METRICS:
            assert float(r[key]) == pytest.approx(expected[key], rel=1e-12)
    markdown = (tmp_path / "eval" / "results.md").read_text()
    assert evaluator.format_table(results) in markdown and "Incomplete" not in markdown
    table_row = next(line for line in markdown.splitlines() if line.startswith("| paired "))
    mean = results["datasets"]["paired"]["mean"]
    assert table_row == (
        f"| paired | 2 | {mean['psnr']:.2f} | {mean['ssim']:.4f} | "
        f"{mean['input_psnr']:.2f} | {mean['input_ssim']:.4f} |"
    )
    assert "mean of 2 datasets" in markdown and "crop_border=2" in markdown
    # Restored images: saved as BasicSR quantises them; their scores match the table.
    for name, (h, w) in sizes.items():
        example = next(e for e in src if e["name"] == name.encode())
        restored = np.asarray(Image.open(os.path.join(out, "paired", f"{name}.png")))
        assert restored.shape == (h, w, 3)
        row = next(r for r in results["datasets"]["paired"]["images"] if r["name"] == name)
        opts = {"crop_border": 2, "test_y_channel": True}
        assert row["psnr"] == metrics.psnr(restored, example["gt"], **opts)
        assert row["input_psnr"] == metrics.psnr(example["lq"], example["gt"], **opts)
        grid = Image.open(os.path.join(out, "comparisons", "paired", f"{name}.png"))
        assert grid.size == (3 * w + 2 * evaluator.PANEL_GAP, h + evaluator.HEADER_HEIGHT)
        grid = np.asarray(grid)
        np.testing.assert_array_equal(grid[evaluator.HEADER_HEIGHT :, :w], example["lq"])
        right = grid[evaluator.HEADER_HEIGHT :, 2 * (w + evaluator.PANEL_GAP) :]
        np.testing.assert_array_equal(right, example["gt"])
        assert (grid[: evaluator.HEADER_HEIGHT] < 128).any()  # the label text
    assert os.path.exists(os.path.join(out, "toy", "img0.png"))


def test_interrupted_run_leaves_only_finished_datasets(tmp_path):
    out = str(tmp_path / "eval")
    bad = _source([(24, 24), (8, 8)])  # SSIM needs 11x11: the second image fails
    datasets = {"good": _source([(16, 16)]), "good2": _source([(16, 16)], seed=3), "bad": bad}
    with pytest.raises(ValueError, match="Dataset 'bad', image 'img1': ssim"):
        evaluator.evaluate(lambda x: x, datasets, out_dir=out)
    with open(os.path.join(out, "results.json")) as f:
        partial = json.load(f)
    assert not partial["complete"] and partial["pending"] == ["bad"]
    assert list(partial["datasets"]) == ["good", "good2"]
    markdown = (tmp_path / "eval" / "results.md").read_text()
    assert "**Incomplete**" in markdown and "pending: bad" in markdown
    assert "| bad " not in markdown and "mean of" not in markdown
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_clean_dataset_needs_noise_and_noisy_eval_dataset_works():
    clean = [{"gt": e["gt"], "name": e["name"]} for e in _source([(20, 20)])]
    with pytest.raises(ValueError, match="'clean'.*noise_sigma"):
        evaluator.evaluate(lambda x: x, {"clean": clean})
    noisy = pipeline.eval_dataset(clean, noise_sigma=25, seed=1)
    results = evaluator.evaluate(lambda x: x, {"clean": noisy})
    example = noisy[0]
    row = results["datasets"]["clean"]["images"][0]
    assert row["input_psnr"] == metrics.psnr(example["lq"][0], example["gt"][0])
    assert 19 < row["input_psnr"] < 23  # sigma 25 noise, clipped by the uint8 quantisation
    with pytest.raises(ValueError, match="out_dir"):
        evaluator.evaluate(lambda x: x, {"clean": noisy}, save_images=True)


def test_params_are_jit_arguments_not_constants():
    seen = []

    def restore_fn(params, x):
        seen.append(isinstance(params["scale"], jax.core.Tracer))
        return x * params["scale"]

    src = _source([(20, 24)])
    results = evaluator.evaluate(restore_fn, {"toy": src}, params={"scale": jnp.float32(0.9)})
    closure = evaluator.evaluate(lambda x: x * jnp.float32(0.9), {"toy": src})
    assert seen == [True]
    assert results["datasets"] == {
        "toy": {**closure["datasets"]["toy"], "seconds": results["datasets"]["toy"]["seconds"]}
    }
