"""Restorer (kinds, buckets, tiling, automatic tiling) and the command's file handling."""

import logging
import os
import struct
import zlib

import jax
import numpy as np
import pytest
from PIL import Image

from ir_lora import inference, models, services
from ir_lora.data import images
from ir_lora.restore import Restorer, cli, files
from ir_lora.restore.restorer import architecture_forward

pytestmark = pytest.mark.usefixtures("fast_compilation")
VARIANT = "nafnet-tiny"  # pads to a multiple of 4 itself


@pytest.fixture(scope="module")
def params():
    rng = np.random.default_rng(0)
    shapes = models.param_shapes(VARIANT)
    return jax.tree.map(lambda s: 0.2 * rng.standard_normal(s.shape, np.float32) + 0.05, shapes)


@pytest.fixture(scope="module")
def restorer(params):
    return Restorer(architecture_forward(VARIANT), params, model_multiple=4)


@pytest.fixture(scope="module")
def export(params, tmp_path_factory):
    return services.export_params(params, str(tmp_path_factory.mktemp("export") / "params"))


def _network(params, x):
    """The network on the unpadded image: its own zero padding, as NAFNet's demo runs it."""
    return np.asarray(models.build(VARIANT).apply({"params": params}, x[None]))[0]


def test_whole_images_equal_the_network_and_share_a_bucket(params):
    model = models.build(VARIANT)  # a fresh jit, so that its compiled programs can be counted
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
    restorer = Restorer(forward, params, model_multiple=4)
    rng = np.random.default_rng(1)
    for h, w in ((13, 19), (14, 17), (16, 20)):  # all in the 16x20 bucket
        x = rng.random((h, w, 3), dtype=np.float32)
        np.testing.assert_allclose(restorer(x), _network(params, x), atol=1e-5)
    assert restorer.bucket(13, 19) == (16, 20)
    assert restorer.compiled_programs() == 1


def test_kinds_come_back_as_they_went_in(restorer, params):
    rng = np.random.default_rng(2)
    x = rng.random((12, 12, 3), dtype=np.float32)
    want = _network(params, x)
    for dtype in (np.float32, np.float64):
        out = restorer(x.astype(dtype))
        assert out.dtype == dtype
        np.testing.assert_allclose(out, want, atol=1e-5)  # unclipped
    u8 = np.rint(x * 255).astype(np.uint8)
    out8 = restorer(u8)
    assert out8.dtype == np.uint8
    want8 = np.rint(np.clip(_network(params, u8 / np.float32(255)), 0, 1) * 255)
    assert np.abs(out8.astype(int) - want8).max() <= 1
    out16 = restorer(u8.astype(np.uint16) * 257)
    assert out16.dtype == np.uint16 and np.abs((out16 >> 8).astype(int) - out8).max() <= 1
    with pytest.raises(ValueError, match=r"\(H, W, 3\).*\(12, 12\)"):
        restorer(x[..., 0])
    with pytest.raises(TypeError, match="int32"):
        restorer(u8.astype(np.int32))


def test_tiles_are_the_existing_tiled_inference(restorer, params):
    x = np.random.default_rng(3).random((40, 52, 3), dtype=np.float32)
    forward = jax.jit(lambda b: models.build(VARIANT).apply({"params": params}, b))
    want = inference.restore_image(forward, x, tile=16, tile_overlap=4, pad_multiple=1)
    np.testing.assert_allclose(restorer(x, tile=16, tile_overlap=4), want, atol=1e-5)


def test_automatic_tiling_when_the_image_does_not_fit(params, caplog):
    whole = Restorer(architecture_forward(VARIANT), params, model_multiple=4)
    need = whole._compile((1, 64, 64, 3))
    small = Restorer(
        architecture_forward(VARIANT), params, model_multiple=4, memory_limit=need // 2
    )
    x = np.random.default_rng(4).random((64, 64, 3), dtype=np.float32)
    plan = small.plan((64, 64), 8, 4)
    assert plan.tile is not None and plan.tile < 64 and plan.tile % 4 == 0
    with caplog.at_level(logging.WARNING):
        tiled = small(x, tile_overlap=8)
    assert "tiling with" in caplog.text and "XLA's accounting" in caplog.text
    np.testing.assert_allclose(tiled, whole(x, tile=plan.tile, tile_overlap=8), atol=1e-6)
    np.testing.assert_allclose(whole(x), _network(params, x), atol=1e-5)  # fits: whole
    # A large image is judged per pixel from a compiled program, without compiling its own.
    big = small.plan((1200, 1000), 8, 4)
    assert big.tile is not None and "per pixel" in big.reason
    assert (1, 1200, 1000, 3) not in small._needs


def test_png16_is_a_valid_16_bit_png(tmp_path):
    pixels = np.random.default_rng(5).integers(0, 65536, (7, 9, 3), dtype=np.uint16)
    data = files.png16(pixels)
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    assert (width, height, depth, colour) == (9, 7, 16, 2)
    (tmp_path / "x.png").write_bytes(data)
    # Pillow checks the chunks and CRCs, and reads 16-bit RGB as its high byte.
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "x.png")), pixels >> 8)
    length = struct.unpack(">I", data[33:37])[0]
    raw = np.frombuffer(zlib.decompress(data[41 : 41 + length]), np.uint8).reshape(7, -1)
    assert not raw[:, 0].any()
    np.testing.assert_array_equal(raw[:, 1:].copy().view(">u2").reshape(7, 9, 3), pixels)


def test_atomic_write_never_clobbers_without_overwrite(tmp_path):
    target = str(tmp_path / "sub" / "a.png")
    files.write_atomic(target, b"first", overwrite=False)
    with pytest.raises(FileExistsError):
        files.write_atomic(target, b"second", overwrite=False)
    assert (tmp_path / "sub" / "a.png").read_bytes() == b"first"
    files.write_atomic(target, b"third", overwrite=True)
    assert (tmp_path / "sub" / "a.png").read_bytes() == b"third"
    assert os.listdir(tmp_path / "sub") == ["a.png"]  # no temporary file left


def test_two_inputs_on_one_output_are_refused():
    with pytest.raises(images.ImageError, match=r"'a\.jpg' and 'a\.png'"):
        files.output_names(["a.jpg", "a.png"])


def _save(path, pixels, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path, **kw)


@pytest.fixture
def inputs(tmp_path):
    """Every kind the data layer reads, a corrupt file, and a rotated JPEG."""
    rng = np.random.default_rng(6)
    root = tmp_path / "in"
    rgb = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    _save(str(root / "rgb.png"), rgb)
    _save(str(root / "deep" / "grey.png"), rgb[..., 0])
    _save(str(root / "rgba.png"), np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)]))
    _save(str(root / "deep16.png"), (rgb[..., 1].astype(np.uint16) * 257))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    _save(str(root / "phone.jpg"), rgb, exif=exif, quality=95)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def _argv(inputs, out, export, *extra):
    return ["--input", str(inputs), "--output", str(out), "--export", export,
            "--variant", VARIANT, "--quiet", *extra]  # fmt: skip


def test_folder_of_every_kind_with_a_corrupt_file(inputs, export, params, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(_argv(inputs, out, export)) == cli.EXIT_SKIPPED
    report = capsys.readouterr()
    assert "broken.png" in report.out + report.err
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == ["deep/grey.png", "deep16.png", "phone.png", "rgb.png", "rgba.png"]
    for name in ("rgb", "rgba", "deep/grey", "deep16"):  # as the data layer converts them
        lq = images.read_rgb(str(next(inputs.glob(f"{name}.*")))) / np.float32(255)
        want = np.rint(np.clip(_network(params, lq), 0, 1) * 255)
        got = np.asarray(Image.open(out / f"{name}.png"))
        assert got.shape == lq.shape and np.abs(got - want).max() <= 1
    assert np.asarray(Image.open(out / "phone.png")).shape == (24, 20, 3)  # upright


def test_existing_outputs_are_kept_unless_asked(inputs, export, tmp_path, capsys):
    (inputs / "broken.png").unlink()
    out = tmp_path / "out"
    assert cli.main(_argv(inputs, out, export)) == cli.EXIT_OK
    first = (out / "rgb.png").read_bytes()
    (out / "rgb.png").write_bytes(b"mine")
    assert cli.main(_argv(inputs, out, export)) == cli.EXIT_ERROR
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "rgb.png").read_bytes() == b"mine"
    (out / "rgba.png").unlink()
    assert cli.main(_argv(inputs, out, export, "--skip_existing")) == cli.EXIT_OK
    assert (out / "rgb.png").read_bytes() == b"mine" and (out / "rgba.png").exists()
    assert cli.main(_argv(inputs, out, export, "--overwrite")) == cli.EXIT_OK
    assert (out / "rgb.png").read_bytes() == first


def test_single_file_and_16_bit_output(inputs, export, tmp_path):
    out = tmp_path / "out"
    argv = _argv(inputs / "rgb.png", out, export, "--save_16bit")
    assert cli.main(argv) == cli.EXIT_OK
    deep = (out / "rgb.png").read_bytes()
    assert struct.unpack(">B", deep[24:25])[0] == 16
    eight = tmp_path / "eight"
    assert cli.main(_argv(inputs / "rgb.png", eight, export)) == cli.EXIT_OK
    high = np.asarray(Image.open(out / "rgb.png")).astype(int)
    assert np.abs(high - np.asarray(Image.open(eight / "rgb.png"))).max() <= 1


def test_output_folder_inside_the_input_is_not_read_back(inputs, export):
    (inputs / "broken.png").unlink()
    out = inputs / "restored"
    assert cli.main(_argv(inputs, out, export)) == cli.EXIT_OK
    assert cli.main(_argv(inputs, out, export, "--skip_existing")) == cli.EXIT_OK
    assert not (out / "restored").exists()


def test_bad_arguments_exit_with_2(inputs, export, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert cli.main(["--input", str(inputs), "--output", out, "--torch", "x.pth"]) == 2
    assert "--variant" in capsys.readouterr().err
    argv = ["--input", str(inputs), "--output", out, "--adapter", "noequals"]
    assert cli.main(argv) == 2
    assert cli.main(_argv(tmp_path / "missing", out, export)) == 2
    assert "does not exist" in capsys.readouterr().err
