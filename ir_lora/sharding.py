"""Device mesh, batch and parameter shardings, multi-host start-up.

One mesh with axes `("data", "fsdp")` covers every device of every process. Batches are split
over both axes (all devices see different examples). Parameters and optimizer state are
replicated, unless `fsdp > 1`: then each large array is split over `"fsdp"` along its largest
dimension divisible by the fsdp size (big_vision's `fsdp` tactic), which XLA all-gathers where
the computation needs it.
"""

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp")
# Example axis of every batch array: split over all devices of the mesh.
BATCH_SPEC = P(("data", "fsdp"))


def maybe_initialize_distributed() -> bool:
    """Calls `jax.distributed.initialize()` when the environment describes several processes.

    Must run before any other JAX call. Recognised: `JAX_COORDINATOR_ADDRESS` (explicit set-up,
    with `JAX_NUM_PROCESSES`/`JAX_PROCESS_ID` or auto-detection), `IR_LORA_DISTRIBUTED=1` (e.g. a
    Cloud TPU pod, where JAX reads the topology from the metadata server), a Slurm job with more
    than one task, an Open MPI job with more than one rank, or a list of several TPU workers.

    Returns:
      Whether `jax.distributed.initialize` was called.
    """
    env = os.environ

    def _count(key: str) -> int:
        try:
            return int(env.get(key, "1"))
        except ValueError:
            return 1

    several = (
        "JAX_COORDINATOR_ADDRESS" in env
        or env.get("IR_LORA_DISTRIBUTED") == "1"
        or _count("SLURM_NTASKS") > 1
        or _count("OMPI_COMM_WORLD_SIZE") > 1
        or "," in env.get("TPU_WORKER_HOSTNAMES", env.get("TPU_PROCESS_ADDRESSES", ""))
    )
    if not several:
        return False
    kwargs = {}
    if "JAX_NUM_PROCESSES" in env:
        kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
    if "JAX_PROCESS_ID" in env:
        kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)
    logging.info(
        "Initialised distributed JAX: process %d of %d, %d local / %d global devices.",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def make_mesh(config: Mapping[str, Any] | None = None, *, devices=None) -> Mesh:
    """A `("data", "fsdp")` mesh over `devices` (default: all devices of all processes).

    Args:
      config: a mapping (e.g. `ml_collections.ConfigDict`) with an optional `fsdp` entry, the size
        of the "fsdp" axis (default 1). The "data" axis takes the remaining devices.
      devices: the devices to use; `jax.devices()` when None.

    Raises:
      ValueError: if `fsdp` does not divide the number of devices.
    """
    devices = jax.devices() if devices is None else list(devices)
    fsdp = int((config or {}).get("fsdp", 1) or 1)
    if fsdp < 1 or len(devices) % fsdp:
        raise ValueError(
            f"config.fsdp={fsdp} must be a positive divisor of the device count {len(devices)}"
        )
    shape = (len(devices) // fsdp, fsdp)
    try:
        # Orders devices along the physical interconnect on TPU/GPU; plain reshape elsewhere.
        device_grid = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
        device_grid = np.asarray(devices).reshape(shape)
    return Mesh(device_grid, MESH_AXES)


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of batch arrays: the leading (example) axis split over all mesh devices."""
    return NamedSharding(mesh, BATCH_SPEC)


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of an array copied on every device of `mesh`."""
    return NamedSharding(mesh, P())


def param_spec(shape: tuple[int, ...], *, fsdp_size: int, min_size_to_shard: int) -> P:
    """The `PartitionSpec` of one parameter (or optimizer moment) of `shape`.

    Replicated when `fsdp_size == 1`, when the array has fewer than `min_size_to_shard` elements,
    or when no dimension is divisible by `fsdp_size`; otherwise its largest divisible dimension
    (the first one on ties) is split over "fsdp".
    """
    if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size_to_shard:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def param_shardings(tree: Any, mesh: Mesh, *, min_size_to_shard: int = 2**18) -> Any:
    """`NamedSharding`s for every array leaf of `tree` (arrays or `jax.ShapeDtypeStruct`s).

    Applies `param_spec` leaf by leaf. Because the rule looks only at shapes, Adam moments get the
    same sharding as their parameter, and scalars (step, counters) are replicated.

    Args:
      tree: a pytree whose leaves have `.shape`.
      mesh: the mesh from `make_mesh`.
      min_size_to_shard: arrays with fewer elements stay replicated (2**18 floats = 1 MiB).
    """
    fsdp_size = mesh.shape["fsdp"]
    return jax.tree.map(
        lambda leaf: NamedSharding(
            mesh,
            param_spec(tuple(leaf.shape), fsdp_size=fsdp_size, min_size_to_shard=min_size_to_shard),
        ),
        tree,
    )


def make_global_batch(local_batch: Any, sharding: NamedSharding) -> Any:
    """Assembles this process's slice of a batch into global arrays split by `sharding`.

    Args:
      local_batch: a pytree of host arrays whose leading axis holds this process's examples
        (the global batch divided by `jax.process_count()`).
      sharding: usually `data_sharding(mesh)`.

    Raises:
      ValueError: if the global batch size is not divisible by the number of devices.
    """
    num_devices = sharding.mesh.size

    def _one(path, array):
        array = np.asarray(array)
        global_size = array.shape[0] * jax.process_count() if array.ndim else 0
        if array.ndim == 0 or global_size % num_devices:
            raise ValueError(
                f"Batch entry {jax.tree_util.keystr(path)} with local shape {array.shape}: the "
                f"global batch size {global_size} ({jax.process_count()} process(es)) must be "
                f"divisible by the number of devices {num_devices}"
            )
        return jax.make_array_from_process_local_data(sharding, array)

    return jax.tree_util.tree_map_with_path(_one, local_batch)
