"""Throughput of the jitted PROD sampler against a host (numpy/scipy/Pillow) pipeline.

    python -m benchmarks.prod_throughput [--batch 16] [--size 256] [--steps 5] [--no-step]

Rows, on the current JAX backend: the jitted sampler (default config); a host pipeline doing the
same operators per image with numpy, scipy.signal.fftconvolve and Pillow's real JPEG (one CPU
process; slightly lighter than the sampler: colour Gaussian noise only, line motion kernels);
per-image Gaussian blur as FFT against `lax.conv` (vmapped), for 21x21 and 31x31 kernels; and one
full fine-tuning step of `nafnet-sidd-w32` (value_and_grad + optax.adamw, jitted) at the same
batch, with the sampler's time as a fraction of it. Times are medians over `--steps` runs after
one warm-up (compilation) run.
"""

import argparse
import io
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from scipy import signal

from ir_lora import degradations
from ir_lora.degradations import _util


def _time(fn, steps: int) -> tuple[float, float]:
    """(compile+first run, median of `steps` runs) in seconds; `fn` must block."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    runs = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return first, statistics.median(runs)


# ----------------------------------------------------------------------------- host pipeline
def _np_gaussian(size, sx, sy, theta):
    ax = np.arange(size) - size // 2
    y, x = np.meshgrid(ax, ax, indexing="ij")
    u, v = np.cos(theta) * x + np.sin(theta) * y, -np.sin(theta) * x + np.cos(theta) * y
    k = np.exp(-0.5 * ((u / max(sx, 1e-3)) ** 2 + (v / max(sy, 1e-3)) ** 2))
    return k / k.sum()


def _np_line(size, length, theta):
    ax = np.arange(size) - size // 2
    y, x = np.meshgrid(ax, ax, indexing="ij")
    along, across = np.cos(theta) * x + np.sin(theta) * y, -np.sin(theta) * x + np.cos(theta) * y
    k = np.clip(1 - np.abs(across), 0, 1) * np.clip(length / 2 + 0.5 - np.abs(along), 0, 1)
    return k / max(k.sum(), 1e-6)


def _np_conv(image, kernel):
    r = kernel.shape[0] // 2
    padded = np.pad(image, ((r, r), (r, r), (0, 0)), mode="reflect")
    return signal.fftconvolve(padded, kernel[:, :, None], mode="valid", axes=(0, 1))


def _np_jpeg(image, quality):
    buf = io.BytesIO()
    Image.fromarray(np.round(image * 255).astype(np.uint8)).save(
        buf, "JPEG", quality=int(quality), subsampling=2
    )
    return np.asarray(Image.open(buf), np.float32) / 255.0


def _host_op(name, rng, x, c):
    if name == "blur":
        s = rng.uniform(*c.blur.sigma)
        sx, sy = (s, s) if rng.random() < 0.5 else np.sqrt(rng.uniform(*c.blur.eigenvalue, 2))
        return _np_conv(x, _np_gaussian(21, sx, sy, rng.uniform(0, np.pi)))
    if name == "motion":
        return _np_conv(x, _np_line(31, rng.uniform(*c.motion.length), rng.uniform(0, np.pi)))
    if name == "noise":
        return x + rng.uniform(*c.noise.sigma) * rng.standard_normal(x.shape, np.float32)
    if name == "rain":
        h, w, _ = x.shape
        drops = (rng.random((h, w)) < rng.uniform(*c.rain.density)) * rng.uniform(0.5, 1, (h, w))
        line = _np_line(41, rng.uniform(*c.rain.length), np.pi / 2 + rng.uniform(*c.rain.angle))
        streaks = np.clip(_np_conv(drops[:, :, None], line / line.max()), 0, 1)
        return x + rng.uniform(*c.rain.brightness) * streaks
    if name == "jpeg":
        return _np_jpeg(np.clip(x, 0, 1), rng.integers(c.jpeg.quality[0], c.jpeg.quality[1] + 1))
    raise ValueError(f"host pipeline has no operator {name!r}")


def host_pipeline(rng, images, config):
    out = []
    for x in images:
        m = rng.integers(config.min_degradations, config.max_degradations + 1)
        for name in rng.permutation(list(config.ops))[:m]:
            x = np.clip(_host_op(name, rng, x, config), 0, 1).astype(np.float32)
        out.append(x)
    return np.stack(out)


# ----------------------------------------------------------------------------- training step
def nafnet_step_seconds(batch, size, steps):
    try:
        from ir_lora import models

        build = models.build
    except (ImportError, AttributeError) as e:
        return None, f"skipped: ir_lora.models.build is not importable yet ({e})"
    import optax

    model = build("nafnet-sidd-w32")
    x = jax.random.uniform(jax.random.key(0), (batch, size, size, 3))
    params = model.init(jax.random.key(1), x[:1])["params"]
    tx = optax.adamw(1e-3, b1=0.9, b2=0.9, weight_decay=0.0)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            return jnp.mean(jnp.abs(model.apply({"params": p}, x) - y))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    state = {"p": params, "o": opt_state}

    def run():
        state["p"], state["o"], loss = step(state["p"], state["o"], x, x)
        loss.block_until_ready()

    try:
        return _time(run, steps), None
    except jax.errors.JaxRuntimeError as error:  # e.g. batch 16 of 256x256 on a 24 GiB host
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        return None, f"does not fit in this host's memory ({str(error).splitlines()[0]})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed repetitions per row")
    parser.add_argument("--no-step", action="store_true", help="skip the NAFNet training step")
    parser.add_argument("--no-host", action="store_true", help="skip the host pipeline")
    args = parser.parse_args()
    b, s = args.batch, args.size
    config = degradations.default_config()
    images = jax.random.uniform(jax.random.key(0), (b, s, s, 3))
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), batch {b}x{s}x{s}x3")
    print("| what | compile+first (s) | per batch (ms) | images/s |")
    print("|---|---|---|---|")

    def row(name, first, per):
        print(f"| {name} | {first:.1f} | {per * 1e3:.1f} | {b / per:.0f} |", flush=True)

    sampler = jax.jit(lambda k, x: degradations.prod(k, x, config))
    keys = iter(jax.random.split(jax.random.key(1), args.steps + 1))
    first, sampler_s = _time(lambda: sampler(next(keys), images)[0].block_until_ready(), args.steps)
    row("PROD sampler, jitted (default config)", first, sampler_s)

    if not args.no_host:
        rng = np.random.default_rng(0)
        host_images = np.asarray(images)
        first, per = _time(lambda: host_pipeline(rng, host_images, config), args.steps)
        row("host pipeline, numpy/scipy/Pillow, 1 process", first, per)

    for k in (21, 31):
        kernels = jnp.broadcast_to(
            degradations.gaussian_kernel(
                sigma_x=2.0, sigma_y=2.0, angle=0.0, support=k, kernel_size=k
            ),
            (b, k, k),
        )
        for name, conv in (("FFT", _util.convolve), ("lax.conv", _util.convolve_direct)):
            fn = jax.jit(jax.vmap(conv))
            first, per = _time(
                lambda fn=fn, kernels=kernels: fn(images, kernels).block_until_ready(), args.steps
            )
            row(f"per-image {k}x{k} blur, {name}", first, per)

    if args.no_step:
        return
    result, message = nafnet_step_seconds(b, s, max(2, args.steps // 2))
    if message:
        print(f"nafnet-sidd-w32 step: {message}")
        return
    first, step_s = result
    row("nafnet-sidd-w32 full fine-tune step (adamw)", first, step_s)
    print(f"sampler / training step: {100 * sampler_s / step_s:.1f}% (target <= 5%)")


if __name__ == "__main__":
    main()
