"""`Restorer`: a restore model as a function of photographs of any size, kind and number.

    restorer = Restorer.from_torch("NAFNet-SIDD-width32.pth", "nafnet-sidd-w32")
    clean = restorer(noisy)            # (H, W, 3) uint8 in -> uint8 out; float in -> float out
    clean = restorer(big, tile=512)    # tiled, windows overlapping by tile_overlap (32)

**Padding and shape buckets.** A network pads its input with zeros itself, to a multiple of
`model_multiple` (NAFNet: `2 ** len(enc_blk_nums)`, `check_image_size`; Restormer: 8). Padding
every call with zeros to that multiple beforehand therefore changes no output, and it means one
compiled program per padded shape (a bucket), not per image size. Whole images may be
reflect-padded first, to a multiple of `reflect_multiple`, as Restormer's `demo.py` does (8) and
`eval.py` does (`config.eval.pad_multiple`); a larger multiple means fewer buckets (the output
stays exact for that padding rule, but differs near the border from another rule's).

The defaults follow each source's official inference: `from_torch` and `from_export` pad NAFNet
with its own zeros and reflect Restormer to 8; `from_workdir` pads as the run's `eval.py` did.

**Tiling.** `tile=N` runs `ir_lora.inference.restore_image`'s SwinIR/Restormer tiling: windows of
N x N at origins `range(0, H - N, N - overlap) + [H - N]`, averaged where they overlap, in
batches of `batch_size` windows (one program for every batch). With `tile=None` an image is
tiled only when whole-image inference would not fit the device (`plan`, logged).

The weights are a jit argument (never baked into a program), and one jitted forward is shared by
every `Restorer` built on it, so adapters merged into one architecture share their programs.
"""

import dataclasses
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ir_lora import inference, models
from ir_lora.restore import files, memory
from ir_lora.restore.networks import (  # noqa: F401  (part of the restorer API)
    Forward,
    architecture_forward,
    network_multiple,
    official_reflect_multiple,
)

_log = logging.getLogger(__name__)

# Share of the free device memory that whole-image inference (or one batch of tiles) may use.
MEMORY_FRACTION = 0.8
# Below this many pixels an image is compiled as it is without estimating first.
PROBE_SIDE = 256
_UNSET = object()


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one image is restored: `tile` None means whole; `reason` says why, for the log."""

    tile: int | None
    tile_overlap: int
    reason: str = ""


def _lcm(a: int, b: int | None) -> int:
    return a if not b else a * b // math.gcd(a, b)


class Restorer:
    """A restore function with its weights, called on single images (module docstring).

    Args:
      forward: `(params, images) -> images` on `(N, h, w, 3)` float32 in [0, 1]; jitted here
        unless it is a jitted function already (share one to share compiled programs).
      params: its weights (any pytree), placed on the device once.
      model_multiple: the network zero-pads its input to a multiple of this by itself.
      reflect_multiple: reflect-pad whole images to a multiple of this first; None: do not.
      tile: default tile side (None: whole images unless they do not fit the device).
      tile_overlap: default minimum overlap of neighbouring tiles.
      batch_size: tiles per call of the network.
      memory_limit: bytes whole-image inference may use (None: a share of the free memory).
      name: how the logs call this model.
    """

    def __init__(
        self,
        forward: Forward,
        params: Any,
        *,
        model_multiple: int,
        reflect_multiple: int | None = None,
        tile: int | None = None,
        tile_overlap: int = 32,
        batch_size: int = 4,
        memory_limit: int | None = None,
        name: str = "model",
    ):
        if model_multiple < 1 or (reflect_multiple is not None and reflect_multiple < 1):
            raise ValueError(
                f"model_multiple ({model_multiple}) and reflect_multiple ({reflect_multiple}) "
                "must be positive"
            )
        self.forward = forward if hasattr(forward, "lower") else jax.jit(forward)
        self.params = jax.device_put(params)
        self.model_multiple = int(model_multiple)
        self.reflect_multiple = reflect_multiple
        self.tile, self.tile_overlap, self.batch_size = tile, int(tile_overlap), int(batch_size)
        self.memory_limit = memory_limit
        self.name = name
        self._settings(tile, self.tile_overlap, self.batch_size)
        self._resident = sum(x.nbytes for x in jax.tree.leaves(self.params))
        self._needs: dict[tuple[int, ...], int | None] = {}  # exact, per compiled shape

    # --- construction from the three sources (restore.runs for workdirs) ---------------------

    @classmethod
    def from_torch(cls, path: str, variant: str, *, key: str | None = None, overrides=None, **kw):
        """Official PyTorch weights (`.pth`, read without PyTorch; `key`: e.g. "params_ema")."""
        overrides = dict(overrides or {})
        params = models.from_torch(variant, path, key=key, **overrides)
        return cls._of_architecture(variant, overrides, params, name=kw.pop("name", path), **kw)

    @classmethod
    def from_export(cls, path: str, variant: str | None = None, *, overrides=None, **kw):
        """Plain params exported by a run (`<workdir>/export/params`, or the workdir itself).

        Without `variant` the model is the one the run's checkpoints recorded.
        """
        from ir_lora.restore import runs  # orbax and the run layout only for this source

        variant, overrides, params, where = runs.load_export(path, variant, overrides)
        return cls._of_architecture(variant, overrides, params, name=kw.pop("name", where), **kw)

    @classmethod
    def from_workdir(cls, path: str, *, backbone: str | None = None, config=None, **kw):
        """The newest checkpoint of a finished `train.py` run, adapters merged where possible.

        Args:
          path: the run's workdir (its config is the one its checkpoints recorded).
          backbone: where the backbone lives now, if it moved (its hash must still match).
          config: the run's config, for runs that record none (UIR-LoRA compositions).
          **kw: `Restorer` options; padding and tiling default to the run's `config.eval`.
        """
        from ir_lora.restore import runs

        return cls.from_run(runs.load_run(path, backbone_path=backbone, config=config), **kw)

    @classmethod
    def from_run(cls, run, **kw):
        """A `restore.runs.TrainedRun`: padding and tiling from its config's eval section."""
        section = run.config.get("eval", {})
        kw.setdefault("reflect_multiple", int(section.get("pad_multiple", 16)) or None)
        kw.setdefault("tile", int(section.get("tile", 0)) or None)
        kw.setdefault("tile_overlap", int(section.get("tile_overlap", 32)))
        kw.setdefault("name", run.workdir)
        return cls(run.forward, run.params, model_multiple=run.model_multiple, **kw)

    @classmethod
    def _of_architecture(cls, variant, overrides, params, **kw):
        kw.setdefault("reflect_multiple", official_reflect_multiple(variant))
        return cls(
            architecture_forward(variant, **overrides),
            params,
            model_multiple=network_multiple(variant, **overrides),
            **kw,
        )

    # --- restoring --------------------------------------------------------------------------

    def __call__(self, image, *, tile=_UNSET, tile_overlap=None, batch_size=None):
        """Restores one `(H, W, 3)` image; uint8 and uint16 come back quantised, floats as
        float (unclipped) of the input's dtype. `tile` None forces the automatic choice."""
        array = np.asarray(image)
        if array.ndim != 3 or array.shape[-1] != 3 or min(array.shape[:2]) < 1:
            raise ValueError(f"Restorer expects an (H, W, 3) RGB image, got shape {array.shape}")
        if array.dtype in (np.uint8, np.uint16):
            bits = 8 if array.dtype == np.uint8 else 16
            x = array.astype(np.float32) / float(2**bits - 1)
        elif np.issubdtype(array.dtype, np.floating):
            bits, x = None, array.astype(np.float32)
        else:
            raise TypeError(f"Restorer expects uint8, uint16 or float pixels, got {array.dtype}")
        out = self.restore(
            x,
            tile=self.tile if tile is _UNSET else tile,
            tile_overlap=tile_overlap,
            batch_size=batch_size,
        )
        return out.astype(array.dtype) if bits is None else files.quantize(out, bits=bits)

    def restore(self, x: np.ndarray, *, tile=None, tile_overlap=None, batch_size=None, label=""):
        """Float32 `(H, W, 3)` in [0, 1] -> the restored float32 image, unclipped."""
        overlap = self.tile_overlap if tile_overlap is None else int(tile_overlap)
        batch = self.batch_size if batch_size is None else int(batch_size)
        self._settings(tile, overlap, batch)
        plan = Plan(tile, overlap) if tile else self.plan(x.shape[:2], overlap, batch, label)
        return inference.restore_image(
            self._run,
            x,
            tile=plan.tile,
            tile_overlap=plan.tile_overlap,
            pad_multiple=self.reflect_multiple or 1,
            tile_batch_size=batch,
        )

    def _settings(self, tile, overlap, batch) -> None:
        inference.check_settings(
            tile=tile,
            tile_overlap=overlap,
            pad_multiple=self.reflect_multiple or 1,
            tile_batch_size=batch,
            tile_blend="average",
        )

    def _run(self, batch: np.ndarray) -> np.ndarray:
        """One call of the network on a batch, zero-padded to its own multiple (a bucket)."""
        h, w = batch.shape[1:3]
        m = self.model_multiple
        padded = np.pad(batch, ((0, 0), (0, -h % m), (0, -w % m), (0, 0)))
        return np.asarray(self.forward(self.params, jnp.asarray(padded)))[:, :h, :w]

    def bucket(self, height: int, width: int) -> tuple[int, int]:
        """The padded shape an `height x width` image runs at whole (its compiled program)."""
        m = _lcm(self.model_multiple, self.reflect_multiple)
        return -(-height // m) * m, -(-width // m) * m

    def compiled_programs(self) -> int:
        """How many programs the shared forward has compiled so far (all its buckets)."""
        return int(self.forward._cache_size())

    # --- automatic tiling -------------------------------------------------------------------

    def _compile(self, shape: tuple[int, ...]) -> int | None:
        if shape not in self._needs:
            spec = jax.ShapeDtypeStruct(shape, jnp.float32)
            compiled = self.forward.lower(self.params, spec).compile()
            self._needs[shape] = memory.program_bytes(compiled, resident_bytes=self._resident)
        return self._needs[shape]

    def _bytes_per_pixel(self) -> tuple[float | None, str]:
        known = [(s, b) for s, b in self._needs.items() if b is not None]
        if not known:
            side = -(-PROBE_SIDE // self.model_multiple) * self.model_multiple
            known = [((1, side, side, 3), self._compile((1, side, side, 3)))]
        shape, need = max(known, key=lambda item: math.prod(item[0]))
        if need is None:
            return None, "no memory accounting on this backend"
        pixels = math.prod(shape[:3])
        return need / pixels, f"extrapolated per pixel from the {shape[1]}x{shape[2]} program"

    def _budget(self) -> tuple[float, str]:
        if self.memory_limit is not None:
            return float(self.memory_limit), "the given memory limit"
        free, where = memory.free_bytes(jax.devices()[0])
        return MEMORY_FRACTION * free, f"{MEMORY_FRACTION:.0%} of the free {where}"

    def plan(self, size: tuple[int, int], overlap: int, batch: int, label: str = "") -> Plan:
        """Whole-image inference if XLA says it fits the device, else tiles that do (logged)."""
        shape = (1, *self.bucket(*size), 3)
        budget, where = self._budget()
        if shape[1] * shape[2] <= PROBE_SIDE**2 or shape in self._needs:
            need, how = self._compile(shape), "XLA's accounting of its program"
        else:
            per_pixel, how = self._bytes_per_pixel()
            need = None if per_pixel is None else per_pixel * math.prod(shape[:3])
            if need is not None and need <= budget:  # worth compiling: check it exactly
                need, how = self._compile(shape), "XLA's accounting of its program"
        if need is None or need <= budget:
            return Plan(None, overlap)
        per_pixel = need / math.prod(shape[:3])
        step = _lcm(self.model_multiple, self.reflect_multiple)
        tile = int(math.sqrt(budget / (per_pixel * batch)) // step * step)
        if tile <= overlap or tile < step:
            raise MemoryError(
                f"{label or self.name}: even {max(step, overlap + 1)}-pixel tiles need more than "
                f"{memory.gib(budget)} ({where}); free memory or lower --tile_overlap"
            )
        reason = (
            f"{label or self.name} ({size[0]}x{size[1]}): whole-image inference needs about "
            f"{memory.gib(need)} ({how}), more than {memory.gib(budget)} ({where}); tiling "
            f"with {tile}x{tile} windows overlapping by {overlap}"
        )
        _log.warning(reason)
        return Plan(tile, overlap, reason)
