"""PROD: pre-training with random-order degradations, sampled inside a jitted program.

Each image of a batch gets its own number of degradations m in [min, max], its own ordered subset
of the configured operators (without replacement) and its own parameters. The chain runs as a
`lax.fori_loop` over `max_degradations` slots; slot i applies operator `order[i]` through
`lax.switch`, or the identity once i >= m. No Python branching depends on a sampled value, so one
compiled program covers every count, order and parameter.

Under `vmap` a `lax.switch` evaluates every branch in every slot, so each operator draws its
randomness (noise fields, rain layers, kernels) once per image before the loop, and blur and
motion share one FFT convolution per slot. benchmarks/prod_throughput.py measures the result
against a host numpy/scipy/Pillow pipeline and a nafnet-sidd-w32 training step.

Defaults come from ../shared/reference/METHODS.md section 2. The paper (CoLoRA, ECCV 2024) shows
the five PROD operators (blur, noise, rain, JPEG, motion) and "one to N" degradations in random
order but publishes no ranges: every range and probability below is a recommended default [R]
following BSRGAN / DegAE (`bsrgan_degradation_transfer.py`), not a value from the paper.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
from jax import lax

from ir_lora.degradations._util import clip01, convolve
from ir_lora.degradations.blur import gaussian_kernel, line_kernel, trajectory_kernel
from ir_lora.degradations.jpeg import jpeg
from ir_lora.degradations.noise import add_gaussian, add_poisson, add_speckle, shape_noise
from ir_lora.degradations.resample import apply_resample, resample_matrix
from ir_lora.degradations.weather import add_haze, add_rain, darken, haze_depth, rain_streaks

NAMES = ("blur", "motion", "noise", "rain", "jpeg", "haze", "low_light", "resample")
MODES = ("random_order", "fixed_order", "single")


def default_config() -> ml_collections.ConfigDict:
    """PROD sampler configuration. Ranges are `(low, high)`, drawn uniformly.

    Fields:
      ops: operators PROD draws from, a subset of `NAMES`; their order here is the canonical
        order of `mode="fixed_order"`. Default: the paper's five (haze and low light are left
        out because they serve as novel fine-tuning tasks).
      mode: "random_order" (PROD), "fixed_order" (same draws, canonical order) or "single" (one
        degradation per image): the paper's ablations "PROD", "Fixed" and "Single".
      min_degradations, max_degradations: m ~ Uniform{min..max} [R: METHODS.md, 1..5].
      blur: isotropic with probability `p_isotropic`, sigma ~ U(sigma); else anisotropic with
        covariance eigenvalues ~ U(eigenvalue) (variances, px^2) and angle ~ U(0, pi); square
        support ~ odd U{support} inside a static `kernel_size` window [R: BSRGAN, support 7-25,
        capped at 21 here].
      motion: length ~ U(length) px, a straight line with probability `p_line`, else a random
        shake trajectory; static `kernel_size` window [R].
      noise: type ~ `type_probs` over (Gaussian, Poisson, speckle) [R]; Gaussian sigma ~ U(sigma)
        (2/255-30/255, BSRGAN), kind ~ `gaussian_kinds` over (colour, grey, correlated) = 0.4,
        0.4, 0.2 [BSRGAN]; Poisson scale = 10**U(poisson_log10_scale) [BSRGAN]; speckle sigma ~
        U(speckle_sigma) [R].
      rain: seed density, streak length (10-40 px), tilt from vertical (+-45 deg) and brightness
        [R: Rain100L-style `add_rain`].
      jpeg: quality ~ U{quality} (30-95, BSRGAN).
      haze, low_light, resample: ranges for the operators outside default PROD [R].
    """
    c = ml_collections.ConfigDict()
    c.ops = ("blur", "motion", "noise", "rain", "jpeg")
    c.mode = "random_order"
    c.min_degradations = 1
    c.max_degradations = 5
    c.blur = dict(
        kernel_size=21, support=(7, 21), p_isotropic=0.5, sigma=(0.0, 2.2), eigenvalue=(0.0, 5.0)
    )
    c.motion = dict(kernel_size=31, length=(7.0, 31.0), p_line=0.5)
    c.noise = dict(
        type_probs=(0.8, 0.1, 0.1),
        sigma=(2 / 255, 30 / 255),
        gaussian_kinds=(0.4, 0.4, 0.2),
        poisson_log10_scale=(2.0, 4.0),
        speckle_sigma=(0.02, 0.15),
    )
    c.rain = dict(
        kernel_size=41,
        density=(0.001, 0.006),
        length=(10.0, 40.0),
        angle=(-math.pi / 4, math.pi / 4),
        brightness=(0.25, 0.6),
    )
    c.jpeg = dict(quality=(30, 95))
    c.haze = dict(beta=(0.5, 2.0), airlight=(0.7, 1.0), depth_mix=(0.3, 0.9))
    c.low_light = dict(gamma=(1.2, 2.5), gain=(0.2, 0.6), shot=(1e-3, 1e-2), read=(2e-3, 1e-2))
    c.resample = dict(factor=(1.5, 4.0), method_probs=(1 / 3, 1 / 3, 1 / 3))
    return c


class _Uniforms:
    """Hands out scalars from one vector of U(0, 1) draws.

    One `jax.random.uniform` call per operator instead of one per scalar: every threefry call
    adds to the compiled program, and XLA:CPU compiles them slowly.
    """

    def __init__(self, key, n: int):
        self._u = jax.random.uniform(key, (n,))
        self._i = 0

    def _next(self):
        u = self._u[self._i]
        self._i += 1
        return u

    def uniform(self, bounds):
        lo, hi = bounds
        return lo + (hi - lo) * self._next()

    def integer(self, bounds):
        """Integer uniform on the closed range `bounds`."""
        lo, hi = bounds
        return jnp.minimum(lo + jnp.floor(self._next() * (hi - lo + 1)), hi).astype(jnp.int32)

    def categorical(self, probs):
        """Index drawn with probabilities `probs` (a Python sequence, normalised here)."""
        cdf = jnp.cumsum(jnp.asarray(probs, jnp.float32))
        return jnp.sum(self._next() * cdf[-1] >= cdf[:-1]).astype(jnp.int32)

    def bernoulli(self, p):
        return self._next() < p


# Each operator is split into `draw(key, (H, W, C), cfg) -> params`, which holds all its
# randomness and runs once per image outside the slot loop, and `apply(params, x)`. Under `vmap` a
# `lax.switch` evaluates every branch in every slot, so drawing (normal fields, streak layers,
# kernels) once and convolving once per slot (blur and motion share one FFT convolution with the
# selected kernel) keeps the per-slot work to one convolution plus cheap element-wise branches.


def _draw_blur(key, shape, c):
    u = _Uniforms(key, 6)
    iso = u.bernoulli(c.p_isotropic)
    sigma = u.uniform(c.sigma)
    eig = (u.uniform(c.eigenvalue), u.uniform(c.eigenvalue))
    lo, hi = c.support
    support = lo + 2 * u.integer((0, (hi - lo) // 2))
    kernel = gaussian_kernel(
        sigma_x=jnp.where(iso, sigma, jnp.sqrt(eig[0])),
        sigma_y=jnp.where(iso, sigma, jnp.sqrt(eig[1])),
        angle=jnp.where(iso, 0.0, u.uniform((0.0, math.pi))),
        support=support,
        kernel_size=c.kernel_size,
    )
    return {"kernel": kernel}


def _draw_motion(key, shape, c):
    k_path, k_u = jax.random.split(key)
    u = _Uniforms(k_u, 3)
    length, angle = u.uniform(c.length), u.uniform((0.0, math.pi))
    line = line_kernel(length=length, angle=angle, kernel_size=c.kernel_size)
    shake = trajectory_kernel(k_path, length=length, kernel_size=c.kernel_size)
    return {"kernel": jnp.where(u.bernoulli(c.p_line), line, shake)}


def _draw_noise(key, shape, c):
    k_z, k_mix, k_u = jax.random.split(key, 3)
    u = _Uniforms(k_u, 6)
    z = jax.random.normal(k_z, shape)
    return {
        "type": u.categorical(c.type_probs),
        "z": z,
        "gaussian_z": shape_noise(k_mix, z, u.categorical(c.gaussian_kinds)),
        "sigma": u.uniform(c.sigma),
        "scale": 10.0 ** u.uniform(c.poisson_log10_scale),
        "speckle": u.uniform(c.speckle_sigma),
    }


def _apply_noise(p, x):
    g = add_gaussian(x, p["gaussian_z"], p["sigma"])
    poisson = add_poisson(x, p["z"], p["scale"])
    speckle = add_speckle(x, p["z"], p["speckle"])
    return jnp.where(p["type"] == 0, g, jnp.where(p["type"] == 1, poisson, speckle))


def _draw_rain(key, shape, c):
    k_streaks, k_u = jax.random.split(key)
    u = _Uniforms(k_u, 4)
    streaks = rain_streaks(
        k_streaks,
        shape[:2],
        density=u.uniform(c.density),
        length=u.uniform(c.length),
        angle=u.uniform(c.angle),
        kernel_size=c.kernel_size,
    )
    return {"streaks": streaks, "brightness": u.uniform(c.brightness)}


def _draw_jpeg(key, shape, c):
    return {"quality": _Uniforms(key, 1).integer(c.quality)}


def _draw_haze(key, shape, c):
    k_depth, k_u = jax.random.split(key)
    u = _Uniforms(k_u, 3)
    return {
        "depth": haze_depth(k_depth, shape[:2], u.uniform(c.depth_mix)),
        "beta": u.uniform(c.beta),
        "airlight": u.uniform(c.airlight),
    }


def _draw_low_light(key, shape, c):
    k_z, k_u = jax.random.split(key)
    u = _Uniforms(k_u, 4)
    p = {n: u.uniform(c[n]) for n in ("gamma", "gain", "shot", "read")}
    return {"z": jax.random.normal(k_z, shape), **p}


def _draw_resample(key, shape, c):
    u = _Uniforms(key, 2)
    factor, method = u.uniform(c.factor), u.categorical(c.method_probs)
    h, w, _ = shape
    return {"mh": resample_matrix(h, factor, method), "mw": resample_matrix(w, factor, method)}


# Full float32 in small matmuls: TF32 on GPUs would perturb kernels and noise by ~1e-3.
_EXACT = lax.Precision.HIGHEST
_CONVOLUTIONS = ("blur", "motion")  # applied by the slot's shared convolution
_DRAW = dict(
    blur=_draw_blur,
    motion=_draw_motion,
    noise=_draw_noise,
    rain=_draw_rain,
    jpeg=_draw_jpeg,
    haze=_draw_haze,
    low_light=_draw_low_light,
    resample=_draw_resample,
)
_APPLY = dict(
    noise=_apply_noise,
    rain=lambda p, x: add_rain(x, p["streaks"], p["brightness"]),
    jpeg=lambda p, x: jpeg(x, quality=p["quality"]),
    haze=lambda p, x: add_haze(x, p["depth"], p["beta"], p["airlight"]),
    low_light=lambda p, x: darken(x, p["z"], p["gamma"], p["gain"], p["shot"], p["read"]),
    resample=lambda p, x: apply_resample(x, p["mh"], p["mw"]),
)


def _embed(kernel, size):
    """Zero-pads an odd square kernel to `size`, centred."""
    pad = (size - kernel.shape[0]) // 2
    return jnp.pad(kernel, pad)


def _validate(config) -> tuple[list[str], str, int, int]:
    ops = list(config.ops)
    unknown = [o for o in ops if o not in NAMES]
    if unknown or not ops or len(set(ops)) != len(ops):
        raise ValueError(f"prod: config.ops={ops} must be distinct names from {NAMES}")
    if config.mode not in MODES:
        raise ValueError(f"prod: config.mode={config.mode!r} must be one of {MODES}")
    lo, hi = int(config.min_degradations), int(config.max_degradations)
    if not 1 <= lo <= hi <= len(ops):
        raise ValueError(
            f"prod: need 1 <= config.min_degradations ({lo}) <= config.max_degradations ({hi})"
            f" <= len(config.ops) ({len(ops)})"
        )
    return ops, config.mode, lo, hi


def prod(key, images, config) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """Degrades a batch with a random number of degradations in a random order.

    Args:
      key: PRNG key. Same key, same output.
      images: `(B, H, W, 3)` clean images in [0, 1].
      config: `default_config()` or a modified copy; read at trace time (static).

    Returns:
      `(degraded, labels)`: the `(B, H, W, 3)` degraded batch in [0, 1] and a dict with `order`
      `(B, N)` int32 indices into `NAMES` in application order, padded with -1
      (N = `config.max_degradations`); `count` `(B,)` int32, the number applied; `present`
      `(B, len(NAMES))` float32 multi-hot of the operators applied.
    """
    ops, mode, lo, hi = _validate(config)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"prod: images must be (B, H, W, 3), got shape {images.shape}")
    n_ops = len(ops)
    slots = 1 if mode == "single" else hi
    op_ids = jnp.asarray([NAMES.index(o) for o in ops] + [-1], jnp.int32)
    conv_slots = [j for j, o in enumerate(ops) if o in _CONVOLUTIONS]
    size = max([config[ops[j]].kernel_size for j in conv_slots], default=1)

    def one(key, image):
        k_count, k_perm, k_ops = jax.random.split(key, 3)
        image = image.astype(jnp.float32)
        if mode == "single":
            count = jnp.ones((), jnp.int32)
        else:
            count = jax.random.randint(k_count, (), lo, hi + 1)
        chosen = jax.random.permutation(k_perm, n_ops)[:slots]
        local = jnp.where(jnp.arange(slots) < count, chosen, n_ops)
        if mode == "fixed_order":
            local = jnp.sort(local)  # canonical order; unused slots (n_ops) sort last
        # Keys follow the operator, not the slot: fixed and random order draw equal parameters.
        params = [
            _DRAW[o](jax.random.fold_in(k_ops, NAMES.index(o)), image.shape, config[o]) for o in ops
        ]
        if conv_slots:
            kernels = jnp.stack([_embed(params[j]["kernel"], size) for j in conv_slots])
            delta = jnp.zeros((size, size)).at[size // 2, size // 2].set(1.0)

        def branch(j):
            if ops[j] in _CONVOLUTIONS:
                return lambda x, convolved: convolved
            return lambda x, convolved: _APPLY[ops[j]](params[j], x)

        branches = [branch(j) for j in range(n_ops)] + [lambda x, convolved: x]

        def body(i, x):
            op = local[i]
            if conv_slots:
                hit = (op == jnp.asarray(conv_slots)).astype(jnp.float32)
                kernel = (
                    jnp.tensordot(hit, kernels, 1, precision=_EXACT) + (1.0 - hit.sum()) * delta
                )
                convolved = clip01(convolve(x, kernel))
            else:
                convolved = x
            return lax.switch(op, branches, x, convolved)

        out = lax.fori_loop(0, slots, body, image)
        order = jnp.full((hi,), -1, jnp.int32).at[:slots].set(op_ids[local])
        return out, order, count

    keys = jax.random.split(key, images.shape[0])
    out, order, count = jax.vmap(one)(keys, images)
    present = jax.nn.one_hot(order, len(NAMES), dtype=jnp.float32).sum(axis=1)
    return out, {"order": order, "count": count, "present": present}
