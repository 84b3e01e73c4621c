"""PyTorch checkpoint import/export: key layout, round trips, the torch-free `.pth` reader."""

import collections
import os
import pickle
import zipfile

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util

from ir_lora import models
from ir_lora.models import torch_io

# Entries of TORCH_KEYS.md for nafnet-sidd-w32 (664 tensors, 29,159,715 values).
NAFNET_SIDD_W32_KEYS = {
    "intro.weight": (32, 3, 3, 3),
    "ending.bias": (3,),
    "encoders.0.0.beta": (1, 32, 1, 1),
    "encoders.0.0.conv2.weight": (64, 1, 3, 3),
    "encoders.0.0.sca.1.weight": (32, 32, 1, 1),
    "encoders.0.0.norm2.bias": (32,),
    "decoders.0.0.gamma": (1, 256, 1, 1),
    "decoders.0.0.conv1.weight": (512, 256, 1, 1),
    "middle_blks.0.conv5.weight": (512, 512, 1, 1),
    "middle_blks.11.norm1.weight": (512,),
    "encoders.3.7.conv4.bias": (512,),
    "ups.0.0.weight": (1024, 512, 1, 1),
    "downs.0.weight": (64, 32, 2, 2),
    "downs.0.bias": (64,),
}


def _torch_layout(variant) -> dict[str, tuple]:
    flat = traverse_util.flatten_dict(models.param_shapes(variant))
    rules = models.ARCHITECTURES[variant.split("-")[0]][1]
    return {torch_io.torch_key(p, rules): torch_io.torch_shape(p, s.shape) for p, s in flat.items()}


def test_nafnet_sidd_w32_layout_matches_torch_keys_md():
    layout = _torch_layout("nafnet-sidd-w32")
    assert len(layout) == 664
    assert sum(int(np.prod(s)) for s in layout.values()) == 29_159_715
    for key, shape in NAFNET_SIDD_W32_KEYS.items():
        assert layout[key] == shape, key
    assert not any("ups.0.0.bias" in k for k in layout)


@pytest.mark.parametrize("variant", ["nafnet-sidd-w32", "restormer", "restormer-real-denoise"])
def test_layout_equals_pytorch_state_dict(variant):
    """Every key and shape of the official full-size model (built on torch's meta device)."""
    torch = pytest.importorskip("torch")
    import torch_reference

    kwargs = dict(models.VARIANTS[variant])
    with torch.device("meta"):
        if variant.startswith("nafnet"):
            net = torch_reference.NAFNet(**kwargs)
        else:
            kwargs["bias"] = kwargs.pop("use_bias")
            kwargs["LayerNorm_type"] = kwargs.pop("layer_norm_type")
            net = torch_reference.Restormer(**kwargs)
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert _torch_layout(variant) == expected


def _random_state_dict(variant, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in _torch_layout(variant).items()}


@pytest.mark.parametrize("variant", ["nafnet-tiny", "restormer-tiny"])
def test_round_trip(variant):
    state_dict = _random_state_dict(variant)
    params = models.from_torch(variant, state_dict)
    shapes = models.param_shapes(variant)
    assert jax.tree.map(np.shape, params) == jax.tree.map(lambda s: s.shape, shapes)
    back = models.to_torch(variant, params)
    assert back.keys() == state_dict.keys()
    for key, value in state_dict.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_kernels_are_transposed_not_reshaped():
    state_dict = _random_state_dict("nafnet-tiny")
    params = models.from_torch("nafnet-tiny", state_dict)
    torch_kernel = state_dict["intro.weight"]  # (out, in, kh, kw)
    np.testing.assert_array_equal(params["intro"]["kernel"][1, 2, 0, 5], torch_kernel[5, 0, 1, 2])
    np.testing.assert_array_equal(
        params["encoders_0"]["blocks_0"]["beta"], state_dict["encoders.0.0.beta"].ravel()
    )


def test_mismatch_names_offending_keys():
    state_dict = _random_state_dict("nafnet-tiny")
    del state_dict["encoders.0.0.conv1.bias"]
    state_dict["encoders.0.0.extra"] = np.zeros(3, np.float32)
    state_dict["ending.weight"] = np.zeros((3, 8, 5, 5), np.float32)
    with pytest.raises(ValueError) as error:
        models.from_torch("nafnet-tiny", state_dict)
    message = str(error.value)
    assert "missing (1): encoders.0.0.conv1.bias" in message
    assert "unexpected (1): encoders.0.0.extra" in message
    assert "ending.weight (3, 8, 5, 5) (expected (3, 8, 3, 3))" in message
    with pytest.raises(ValueError, match="missing"):
        models.from_torch("nafnet-sidd-w32", _random_state_dict("nafnet-tiny"))


def test_module_prefix_is_stripped():
    state_dict = _random_state_dict("nafnet-tiny")
    wrapped = {f"module.{k}": v for k, v in state_dict.items()}
    got = models.from_torch("nafnet-tiny", wrapped)
    want = models.from_torch("nafnet-tiny", state_dict)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_pth_reader_matches_torch_load(tmp_path):
    torch = pytest.importorskip("torch")
    base = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5)
    tensors = collections.OrderedDict(
        dense=torch.randn(4, 3, 3, 3),
        transposed=base.transpose(0, 2),  # shares `base`'s storage, non-contiguous
        offset_slice=base[1:, 2],  # storage offset and strides
        half=torch.randn(5).half(),
        bfloat=torch.randn(2, 3).bfloat16(),
        int64=torch.arange(7),
        flags=torch.tensor([True, False, True]),
        scalar=torch.tensor(3.5),
        empty=torch.zeros(0, 4),
        parameter=torch.nn.Parameter(torch.randn(2, 2)),
    )
    path = tmp_path / "tensors.pth"
    torch.save(tensors, path)
    loaded = torch_io.load_pth(path)
    assert isinstance(loaded, collections.OrderedDict)
    assert list(loaded) == list(tensors)
    for name, tensor in tensors.items():
        if tensor.dtype == torch.bfloat16:
            want = tensor.float().numpy().astype(ml_dtypes.bfloat16)
        else:
            want = tensor.detach().numpy()
        assert loaded[name].dtype == want.dtype, name
        np.testing.assert_array_equal(loaded[name], want, err_msg=name)


def test_basicsr_checkpoint_and_from_torch_path(tmp_path):
    torch = pytest.importorskip("torch")
    state_dict = _random_state_dict("nafnet-tiny")
    ema = _random_state_dict("nafnet-tiny", seed=1)
    as_torch = lambda sd: collections.OrderedDict((k, torch.from_numpy(v)) for k, v in sd.items())
    path = tmp_path / "net_g_latest.pth"
    torch.save({"params": as_torch(state_dict), "params_ema": as_torch(ema)}, path)

    loaded = torch_io.load_state_dict(path)
    assert loaded.keys() == state_dict.keys()
    np.testing.assert_array_equal(loaded["intro.weight"], state_dict["intro.weight"])
    ema_loaded = torch_io.load_state_dict(path, key="params_ema")
    np.testing.assert_array_equal(ema_loaded["intro.weight"], ema["intro.weight"])
    with pytest.raises(KeyError, match="params_xyz"):
        torch_io.load_state_dict(path, key="params_xyz")

    from_file = models.from_torch("nafnet-tiny", path)
    jax.tree.map(np.testing.assert_array_equal, from_file, models.from_torch("nafnet-tiny", loaded))


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_reader_rejects_foreign_globals(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(2), "payload": _RunsCode()}, path)
    with pytest.raises(pickle.UnpicklingError, match=r"global (posix|nt)\.system"):
        torch_io.load_pth(path)
    torch.save({"weight": torch.zeros(2), "counts": collections.Counter("ab")}, path)
    with pytest.raises(pickle.UnpicklingError, match=r"collections\.Counter"):
        torch_io.load_pth(path)


def test_reader_rejects_non_zip_and_non_tensor_entries(tmp_path):
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(pickle.dumps({"weight": [1.0, 2.0]}))
    with pytest.raises(ValueError, match="not a zip-format"):
        torch_io.load_pth(legacy)
    # A zip checkpoint whose entries are not tensors (e.g. a whole training state).
    odd = tmp_path / "odd.pth"
    with zipfile.ZipFile(odd, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"iter": 5}, protocol=2))
    with pytest.raises(ValueError, match="'iter'"):
        torch_io.load_state_dict(odd)
