"""Shared machinery of the degradation operators: batching, clipping and full-image convolution.

Every operator is written for one `(H, W, C)` image with scalar parameters. `per_image` lifts it to
`(N, H, W, C)` batches: the key is split per image and every parameter is broadcast to `(N,)`, so a
parameter may be a Python number, a scalar array or one value per image.
"""

import functools
import inspect

import jax
import jax.numpy as jnp


def clip01(x: jnp.ndarray) -> jnp.ndarray:
    return jnp.clip(x, 0.0, 1.0)


def _check_image(image: jnp.ndarray, name: str) -> None:
    if image.ndim not in (3, 4):
        raise ValueError(
            f"{name}: image must be (H, W, C) or (N, H, W, C), got shape {image.shape}"
        )


def per_image(fn=None, *, keyed: bool = True):
    """Lifts `fn(key, image, **params)` on one HWC image to HWC or NHWC input.

    Args:
      fn: the single-image operator.
      keyed: False for deterministic operators written as `fn(image, **params)`.
    """
    if fn is None:
        return functools.partial(per_image, keyed=keyed)
    positional = "key, image" if keyed else "image"
    keywords = [
        name
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    usage = f"{fn.__name__}({', '.join([positional, *(f'{k}=...' for k in keywords)])})"

    @functools.wraps(fn)
    def wrapped(*args, **params):
        if len(args) != (2 if keyed else 1):
            # Without this, a parameter passed by position fails deep inside as "too many values
            # to unpack".
            raise TypeError(
                f"{fn.__name__} takes ({positional}) by position and its parameters by keyword: "
                f"{usage}; got {len(args)} positional argument(s)"
            )
        if keyed:
            key, image = args
        else:
            (image,) = args
        image = jnp.asarray(image, jnp.float32)
        _check_image(image, fn.__name__)
        if image.ndim == 3:
            return fn(key, image, **params) if keyed else fn(image, **params)
        n = image.shape[0]
        arrays = {k: jnp.broadcast_to(jnp.asarray(v), (n,)) for k, v in params.items()}

        def one(k, x, p):
            return fn(k, x, **p) if keyed else fn(x, **p)

        keys = jax.random.split(key, n) if keyed else jnp.zeros((n,))
        return jax.vmap(one)(keys, image, arrays)

    return wrapped


def _fft_size(n: int) -> int:
    """Smallest size >= n whose prime factors are 2, 3 and 5 (fast FFT lengths)."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def convolve(image: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """Convolves every channel of an `(H, W, C)` image by a `(K, K)` kernel, reflect-padded.

    The product of FFTs: with one kernel per image (vmapped) it beat `lax.conv` on this CPU for
    21x21 and 31x31 kernels (benchmarks/prod_throughput.py --conv measures both). The kernel's
    centre is element `(K // 2, K // 2)`; K must be odd.
    """
    k = kernel.shape[0]
    if kernel.shape != (k, k) or k % 2 == 0:
        raise ValueError(f"convolve: kernel must be square with odd size, got {kernel.shape}")
    h, w, _ = image.shape
    r = k // 2
    padded = jnp.pad(image, ((r, r), (r, r), (0, 0)), mode="reflect")
    fh, fw = _fft_size(h + 2 * r), _fft_size(w + 2 * r)
    spec = jnp.fft.rfft2(padded, s=(fh, fw), axes=(0, 1))
    kspec = jnp.fft.rfft2(kernel, s=(fh, fw))
    full = jnp.fft.irfft2(spec * kspec[:, :, None], s=(fh, fw), axes=(0, 1))
    # Linear convolution of the padded image; output pixel (i, j) of the valid part sits at
    # (i + 2r, j + 2r) because the kernel's centre is offset by r.
    return full[2 * r : 2 * r + h, 2 * r : 2 * r + w]


def convolve_direct(image: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """`convolve` by `lax.conv` (depthwise over channels); the reference for tests and timing."""
    k = kernel.shape[0]
    r = k // 2
    c = image.shape[-1]
    padded = jnp.pad(image, ((r, r), (r, r), (0, 0)), mode="reflect")[None]
    # lax.conv is a correlation: flip the kernel to convolve.
    rhs = jnp.broadcast_to(kernel[::-1, ::-1, None, None], (k, k, 1, c))
    out = jax.lax.conv_general_dilated(
        padded,
        rhs,
        (1, 1),
        "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=c,
        precision=jax.lax.Precision.HIGHEST,
    )
    return out[0]
