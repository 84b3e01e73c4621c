"""Synthetic degradations and the PROD random-order sampler, pure JAX on the device.

Every operator takes `(key, image, **params)` (`jpeg` takes `(image, quality=...)`) on a float32
`(H, W, C)` or `(N, H, W, C)` image in [0, 1], returns the same shape clipped to [0, 1], and accepts
each parameter as a Python number, a scalar or one value per image.
"""

from ir_lora.degradations.blur import (
    gaussian_blur,
    gaussian_kernel,
    line_kernel,
    motion_blur,
    trajectory_kernel,
)
from ir_lora.degradations.jpeg import jpeg, quantization_tables
from ir_lora.degradations.noise import (
    COLOUR,
    CORRELATED,
    GREY,
    gaussian_noise,
    poisson_noise,
    speckle_noise,
)
from ir_lora.degradations.resample import AREA, BICUBIC, BILINEAR, resample
from ir_lora.degradations.sampler import MODES, NAMES, default_config, prod
from ir_lora.degradations.weather import haze, low_light, rain

__all__ = [
    "AREA",
    "BICUBIC",
    "BILINEAR",
    "COLOUR",
    "CORRELATED",
    "GREY",
    "MODES",
    "NAMES",
    "default_config",
    "gaussian_blur",
    "gaussian_kernel",
    "gaussian_noise",
    "haze",
    "jpeg",
    "line_kernel",
    "low_light",
    "motion_blur",
    "poisson_noise",
    "prod",
    "quantization_tables",
    "rain",
    "resample",
    "speckle_noise",
    "trajectory_kernel",
]
