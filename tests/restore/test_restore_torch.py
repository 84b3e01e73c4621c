"""The restore command against the official PyTorch models run as their inference scripts do.

A `.pth` is built from the PyTorch reference (tests/torch_reference.py) with random weights; its
outputs are made as NAFNet's `basicsr/demo.py` (the network's own zero padding, `tensor2img`)
and Restormer's `demo.py` (reflection to a multiple of 8, the `--tile`/`--tile_overlap` loop with
uniform averaging, `img_as_ubyte`) make them. The command's PNGs must equal them up to one grey
level on more than 99.9% of the pixels.
"""

import numpy as np
import pytest
from PIL import Image

from ir_lora import models
from ir_lora.restore import cli

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from skimage import img_as_ubyte  # noqa: E402

from tests import torch_reference  # noqa: E402

pytestmark = pytest.mark.usefixtures("fast_compilation")
SIZES = ((45, 61), (40, 52))  # both sides above the tile: the demo's square-tile rule agrees
TILE, OVERLAP = 32, 8


def _torch_net(variant, seed):
    kwargs = dict(models.VARIANTS[variant])
    torch.manual_seed(seed)
    if variant.startswith("nafnet"):
        net = torch_reference.NAFNet(**kwargs)
    else:
        kwargs["bias"] = kwargs.pop("use_bias")
        kwargs["LayerNorm_type"] = kwargs.pop("layer_norm_type")
        net = torch_reference.Restormer(**kwargs)
    with torch.no_grad():  # beta/gamma start at 0, temperatures at 1: make every one count
        for name, param in net.named_parameters():
            if name.endswith(("beta", "gamma", "temperature")) or ".norm" in name:
                param.copy_(torch.rand_like(param) + 0.5)
    return net.eval()


def _demo_tiles(net, x, tile, overlap):
    """Restormer demo.py's tile loop (also SwinIR's), on an already padded NCHW batch."""
    _, _, h, w = x.shape
    tile = min(tile, h, w)
    stride = tile - overlap
    rows = list(range(0, h - tile, stride)) + [h - tile]
    cols = list(range(0, w - tile, stride)) + [w - tile]
    total, count = torch.zeros_like(x), torch.zeros_like(x)
    for i in rows:
        for j in cols:
            total[..., i : i + tile, j : j + tile] += net(x[..., i : i + tile, j : j + tile])
            count[..., i : i + tile, j : j + tile] += 1
    return total / count


def official_output(variant, net, pixels, tile=None):
    """uint8 output of the official inference script of `variant` on uint8 `pixels`."""
    x = torch.from_numpy(np.array(pixels)).float().div(255.0).permute(2, 0, 1)[None]
    h, w = pixels.shape[:2]
    if variant.startswith("restormer"):  # demo.py: reflect to a multiple of 8 first
        x = F.pad(x, (0, -w % 8, 0, -h % 8), "reflect")
    with torch.no_grad():
        y = net(x) if tile is None else _demo_tiles(net, x, tile, OVERLAP)
    return img_as_ubyte(torch.clamp(y, 0, 1)[0, :, :h, :w].permute(1, 2, 0).numpy())


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(SIZES):
        coarse = Image.fromarray(rng.integers(0, 256, (h // 4, w // 4, 3), dtype=np.uint8))
        Image.fromarray(np.asarray(coarse.resize((w, h), Image.BICUBIC))).save(folder / f"{i}.png")
    return folder


def _assert_matches(got, want):
    assert got.shape == want.shape
    close = np.abs(got.astype(np.int32) - want.astype(np.int32)) <= 1
    assert close.mean() > 0.999, f"{(~close).sum()} pixels differ by more than one grey level"


@pytest.mark.parametrize("variant", ["nafnet-tiny", "restormer-tiny"])
@pytest.mark.parametrize("tile", [None, TILE])
def test_command_equals_official_inference(variant, tile, photos, tmp_path):
    net = _torch_net(variant, seed=0)
    pth = tmp_path / "weights.pth"
    torch.save({"params": net.state_dict()}, pth)
    out = tmp_path / "out"
    argv = ["--input", str(photos), "--output", str(out), "--torch", str(pth), "--variant", variant]
    if tile:
        argv += ["--tile", str(tile), "--tile_overlap", str(OVERLAP)]
    assert cli.main(argv) == cli.EXIT_OK
    for i in range(len(SIZES)):
        pixels = np.asarray(Image.open(photos / f"{i}.png"))
        want = official_output(variant, net, pixels, tile)
        _assert_matches(np.asarray(Image.open(out / f"{i}.png")), want)


def test_torch_key_picks_the_ema_weights(photos, tmp_path):
    ema, other = _torch_net("nafnet-tiny", seed=1), _torch_net("nafnet-tiny", seed=2)
    pth = tmp_path / "weights.pth"
    torch.save({"params": other.state_dict(), "params_ema": ema.state_dict()}, pth)
    out = tmp_path / "out"
    argv = ["--input", str(photos / "0.png"), "--output", str(out), "--torch", str(pth)]
    argv += ["--variant", "nafnet-tiny", "--torch_key", "params_ema"]
    assert cli.main(argv) == cli.EXIT_OK
    pixels = np.asarray(Image.open(photos / "0.png"))
    _assert_matches(
        np.asarray(Image.open(out / "0.png")), official_output("nafnet-tiny", ema, pixels)
    )
