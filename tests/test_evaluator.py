import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
        restore_image(_pointwise, img, tile=16, pad_multiple=8, tile_blend="gauss")
    with pytest.raises(ValueError, match="restore_fn must return"):
        restore_image(lambda x: x[:, :8], img, pad_multiple=8)
    with pytest.raises(ValueError, match=r"\(H, W, C\)"):
        restore_image(_pointwise, img[..., 0], pad_multiple=8)
