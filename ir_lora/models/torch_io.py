"""PyTorch checkpoints: a torch-free `.pth` reader and the state_dict <-> flax params mapping.

A `.pth` written by `torch.save` (PyTorch >= 1.6) is a zip archive holding `<prefix>/data.pkl`,
a pickle whose tensors are `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`
calls with persistent ids `('storage', storage_type, key, location, numel)`, and one raw storage
per key in `<prefix>/data/<key>`. `load_pth` reads that with a restricted unpickler that knows only
the globals a state_dict needs and returns numpy arrays: no PyTorch, and no arbitrary code runs.

Key mapping: flax parameter paths are joined with "/" and rewritten by a list of regular
expressions per architecture (`NAFNET_KEY_RULES`, `RESTORMER_KEY_RULES`), then "/" becomes ".".
Values: conv kernels go HWIO <-> OIHW, and vectors that PyTorch stores with singleton axes
(NAFNet's `beta`/`gamma` `(1, c, 1, 1)`, Restormer's `temperature` `(heads, 1, 1)`) are reshaped.
"""

import collections
import os
import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np
from flax import traverse_util

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}

# Rewrites of the "/"-joined flax path, applied in order; "/" becomes "." afterwards.
_COMMON_KEY_RULES = (
    (r"(^|/)blocks_(\d+)/", r"\1\2/"),  # a stage's blocks are an nn.Sequential in PyTorch
    (r"/kernel$", "/weight"),
    (r"/scale$", "/weight"),
)
NAFNET_KEY_RULES = (
    (r"^(encoders|decoders|downs)_(\d+)/", r"\1/\2/"),
    (r"^ups_(\d+)/", r"ups/\1/0/"),  # ups.i = Sequential(conv, PixelShuffle)
    (r"/sca/", "/sca/1/"),  # sca = Sequential(AdaptiveAvgPool2d, conv)
    *_COMMON_KEY_RULES,
)
RESTORMER_KEY_RULES = (
    (r"/norm([12])/", r"/norm\1/body/"),
    (r"^patch_embed/", "patch_embed/proj/"),
    (r"^(down\d_\d|up\d_\d)/conv/", r"\1/body/0/"),
    *_COMMON_KEY_RULES,
)

# Flax vectors that PyTorch stores with singleton axes: leaf name -> torch shape from the length.
_TORCH_VECTOR_SHAPES = {
    "beta": lambda n: (1, n, 1, 1),
    "gamma": lambda n: (1, n, 1, 1),
    "temperature": lambda n: (n, 1, 1),
}


# ----------------------------------------------------------------------------- .pth reader


class _StorageType:
    def __init__(self, name: str):
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *unused_args):
    size, stride = tuple(size), tuple(stride)
    if len(size) != len(stride):
        raise pickle.UnpicklingError(f"tensor size {size} and stride {stride} differ in length")
    if 0 in size:
        return np.zeros(size, storage.dtype)
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if storage_offset < 0 or min(stride, default=0) < 0 or last >= storage.size:
        raise pickle.UnpicklingError(
            f"tensor (offset {storage_offset}, size {size}, stride {stride}) reads outside its "
            f"storage of {storage.size} elements"
        )
    view = np.lib.stride_tricks.as_strided(
        storage[storage_offset:], size, [s * storage.itemsize for s in stride], writeable=False
    )
    return np.array(view)


def _rebuild_parameter(data, unused_requires_grad, unused_backward_hooks, *unused_state):
    return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, *, archive: zipfile.ZipFile, prefix: str, byteorder: str, path: str):
        super().__init__(file)
        self._archive, self._prefix, self._byteorder, self._path = archive, prefix, byteorder, path
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[module, name]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(
            f"{self._path}: the pickle refers to global {module}.{name}, which a state_dict does "
            f"not need; only {sorted('.'.join(g) for g in _ALLOWED_GLOBALS)} and "
            "torch.<Type>Storage are allowed"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"{self._path}: unsupported persistent id {pid!r}")
        _, storage_type, key, _, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"{self._path}: bad storage type {storage_type!r}")
        if key not in self._storages:
            member = f"{self._prefix}data/{key}"
            try:
                raw = self._archive.read(member)
            except KeyError:
                raise pickle.UnpicklingError(f"{self._path}: storage {member} is missing") from None
            dtype = storage_type.dtype.newbyteorder("<" if self._byteorder == "little" else ">")
            if len(raw) != numel * dtype.itemsize:
                raise pickle.UnpicklingError(
                    f"{self._path}: storage {member} has {len(raw)} bytes, expected {numel} "
                    f"{storage_type.name} elements"
                )
            self._storages[key] = np.frombuffer(raw, dtype).astype(storage_type.dtype)
        return self._storages[key]


def load_pth(path: str | os.PathLike) -> Any:
    """Reads a zip-format `torch.save` file without PyTorch; tensors come back as numpy arrays.

    Raises:
      ValueError: the file is not a zip-format `.pth` (e.g. the legacy format of PyTorch < 1.6).
      pickle.UnpicklingError: the pickle needs a global other than those of a state_dict.
    """
    path = os.fspath(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path}: not a zip-format .pth (PyTorch >= 1.6); re-save it with a recent torch.save"
        )
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if re.fullmatch(r"[^/]+/data\.pkl", n)]
        if len(pickles) != 1:
            raise ValueError(f"{path}: expected one <name>/data.pkl in the archive, got {pickles}")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if f"{prefix}byteorder" in archive.namelist():
            byteorder = archive.read(f"{prefix}byteorder").decode().strip()
        with archive.open(pickles[0]) as file:
            unpickler = _RestrictedUnpickler(
                file, archive=archive, prefix=prefix, byteorder=byteorder, path=path
            )
            return unpickler.load()


def load_state_dict(path: str | os.PathLike, *, key: str | None = None) -> dict[str, np.ndarray]:
    """Reads the state_dict of a `.pth` file, unwrapping BasicSR's `{"params": state_dict}`.

    Args:
      path: the `.pth` file.
      key: the entry holding the state_dict (e.g. "params_ema"). By default the first of "params",
        "params_ema", "state_dict" that the file has, else the whole file.

    Returns:
      Parameter name -> numpy array, with any "module." (DataParallel) prefix removed.
    """
    checkpoint = load_pth(path)
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path}: expected a dict, got {type(checkpoint).__name__}")
    if key is not None:
        if key not in checkpoint:
            raise KeyError(f"{path}: no entry {key!r}; the file has {sorted(checkpoint)}")
        checkpoint = checkpoint[key]
    else:
        for candidate in ("params", "params_ema", "state_dict"):
            if isinstance(checkpoint.get(candidate), Mapping):
                checkpoint = checkpoint[candidate]
                break
    for name, value in checkpoint.items():
        if not isinstance(value, np.ndarray):
            raise ValueError(
                f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor; pass key= to "
                "pick the entry that holds the state_dict"
            )
    return normalize_state_dict(checkpoint)


def normalize_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Numpy copies of the values (torch tensors accepted), without a "module." prefix."""
    out = {}
    for name, value in state_dict.items():
        if hasattr(value, "detach"):  # a torch.Tensor, without importing torch
            value = value.detach().cpu().numpy()
        out[name.removeprefix("module.")] = np.asarray(value)
    return out


# ----------------------------------------------------------------------------- key mapping


def torch_key(path: Sequence[str], key_rules) -> str:
    """The PyTorch state_dict key of the flax parameter at `path` (a tuple of names)."""
    name = "/".join(path)
    for pattern, replacement in key_rules:
        name = re.sub(pattern, replacement, name)
    return name.replace("/", ".")


def torch_shape(path: Sequence[str], shape: Sequence[int]) -> tuple[int, ...]:
    """The PyTorch shape of the flax parameter at `path` with shape `shape`."""
    leaf = path[-1]
    if leaf == "kernel" and len(shape) == 4:
        kh, kw, cin, cout = shape
        return (cout, cin, kh, kw)
    if leaf in _TORCH_VECTOR_SHAPES and len(shape) == 1:
        return _TORCH_VECTOR_SHAPES[leaf](shape[0])
    return tuple(shape)


def _as_torch(path, value: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel" and value.ndim == 4:
        return np.ascontiguousarray(value.transpose(3, 2, 0, 1))
    return value.reshape(torch_shape(path, value.shape))


def _as_flax(path, value: np.ndarray, shape) -> np.ndarray:
    if path[-1] == "kernel" and len(shape) == 4:
        return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
    return value.reshape(shape)


def _names(names, limit: int = 20) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _check_keys(expected: Mapping[str, tuple], got: Mapping[str, tuple], what: str) -> None:
    missing = expected.keys() - got.keys()
    unexpected = got.keys() - expected.keys()
    wrong = [
        f"{k} {tuple(got[k])} (expected {tuple(expected[k])})"
        for k in expected.keys() & got.keys()
        if tuple(got[k]) != tuple(expected[k])
    ]
    if missing or unexpected or wrong:
        lines = [f"{what} does not match the model:"]
        if missing:
            lines.append(f"  missing ({len(missing)}): {_names(missing)}")
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): {_names(unexpected)}")
        if wrong:
            lines.append(f"  wrong shape ({len(wrong)}): {_names(wrong)}")
        raise ValueError("\n".join(lines))


def state_dict_to_params(state_dict: Mapping[str, Any], param_shapes, key_rules) -> dict:
    """Converts a PyTorch state_dict into a flax params tree shaped like `param_shapes`.

    Args:
      state_dict: PyTorch key -> array (numpy or torch); a "module." prefix is ignored.
      param_shapes: the flax params tree of `jax.ShapeDtypeStruct`s (from `jax.eval_shape`).
      key_rules: `NAFNET_KEY_RULES` or `RESTORMER_KEY_RULES`.

    Raises:
      ValueError: naming the missing, unexpected and wrong-shape state_dict entries.
    """
    state_dict = normalize_state_dict(state_dict)
    flat_shapes = traverse_util.flatten_dict(param_shapes)
    paths = {torch_key(path, key_rules): path for path in flat_shapes}
    expected = {k: torch_shape(p, flat_shapes[p].shape) for k, p in paths.items()}
    _check_keys(expected, {k: v.shape for k, v in state_dict.items()}, "The PyTorch state_dict")
    flat = {
        path: _as_flax(path, state_dict[key], flat_shapes[path].shape).astype(
            flat_shapes[path].dtype
        )
        for key, path in paths.items()
    }
    return traverse_util.unflatten_dict(flat)


def params_to_state_dict(params, param_shapes, key_rules) -> dict[str, np.ndarray]:
    """Converts flax params (shaped like `param_shapes`) into a PyTorch-layout numpy state_dict."""
    flat = traverse_util.flatten_dict(params)
    flat_shapes = traverse_util.flatten_dict(param_shapes)
    _check_keys(
        {"/".join(p): s.shape for p, s in flat_shapes.items()},
        {"/".join(p): np.shape(v) for p, v in flat.items()},
        "The flax params",
    )
    return {torch_key(path, key_rules): _as_torch(path, np.asarray(flat[path])) for path in flat}
