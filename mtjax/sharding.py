"""Data parallelism on JAX's own sharding: meshes, batch placement, multi-host start-up.

mtjax adds no layer of its own: a run is spread over a `jax.sharding.Mesh` with an axis
named ``"data"`` (`DATA_AXIS`); batches are `NamedSharding(mesh, P("data"))` (leading axis
split over the devices), parameters and optimizer state `NamedSharding(mesh, P())`
(replicated), and XLA inserts the gradient all-reduce. The same code runs on one CPU, on
several GPUs of one host, and on many hosts after `initialize_distributed`.

On CPU, ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (set before JAX starts)
exposes N host devices, which is how the multi-device paths are tested.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import PyTree

__all__ = [
    "DATA_AXIS",
    "DISTRIBUTED_ENV",
    "batch_sharding",
    "data_mesh",
    "default_mesh",
    "global_array",
    "initialize_distributed",
    "is_primary",
    "multi_process",
    "n_data",
    "replicate",
    "replicated",
    "shard_batch",
    "sync",
    "to_host",
]

DATA_AXIS = "data"
#: The environment variables `initialize_distributed` reads (all three or none).
DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
_CLUSTER_SIZE_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


# --------------------------------------------------------------------------- processes


def initialize_distributed(environ: dict[str, str] | None = None) -> bool:
    """Start multi-host JAX (`jax.distributed.initialize`) when the environment asks for it.

    With ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0), ``JAX_NUM_PROCESSES``
    and ``JAX_PROCESS_ID`` all set, initializes with them; with a Slurm or Open MPI job of
    more than one task (``SLURM_NTASKS`` / ``OMPI_COMM_WORLD_SIZE`` > 1), lets JAX detect the
    cluster; otherwise does nothing (one process). Returns whether JAX is now multi-process.
    Must run before any JAX computation; a partial or malformed environment raises
    ``ValueError`` naming the variable.
    """
    env = os.environ if environ is None else environ
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    given = [k for k in DISTRIBUTED_ENV if env.get(k)]
    if given:
        missing = [k for k in DISTRIBUTED_ENV if k not in given]
        if missing:
            raise ValueError(
                f"multi-host run: {', '.join(given)} set but {', '.join(missing)} missing "
                f"(set all of {', '.join(DISTRIBUTED_ENV)})"
            )
        address = env["JAX_COORDINATOR_ADDRESS"]
        n, pid = (_env_int(env, k) for k in DISTRIBUTED_ENV[1:])
        if n < 1 or not 0 <= pid < n:
            raise ValueError(f"JAX_PROCESS_ID={pid} must be in [0, JAX_NUM_PROCESSES={n})")
        if ":" not in address:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS must be host:port, got {address!r}")
        jax.distributed.initialize(address, num_processes=n, process_id=pid)
        return n > 1
    if any(_env_int(env, k, default=1) > 1 for k in _CLUSTER_SIZE_ENV if env.get(k)):
        jax.distributed.initialize()
        return jax.process_count() > 1
    return False


def _env_int(env, name: str, default: int | None = None) -> int:
    text = env.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {text!r}") from None


def multi_process() -> bool:
    """True in a multi-host (multi-process) JAX run."""
    return jax.distributed.is_initialized() and jax.process_count() > 1


def is_primary() -> bool:
    """True on process 0 (the one that writes run files); always True in one process."""
    return not multi_process() or jax.process_index() == 0


def sync(name: str) -> None:
    """Barrier across processes (no-op in one process)."""
    if multi_process():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# --------------------------------------------------------------------------- meshes


def data_mesh(devices: int | str | Sequence[jax.Device] = "all") -> Mesh:
    """A 1-D mesh with axis ``"data"`` over ``devices``: ``"all"`` (every device of every
    process, `jax.devices()`), the first ``n`` of them, or an explicit list."""
    every = jax.devices()
    if isinstance(devices, str):
        if devices != "all":
            raise ValueError(f"devices: expected 'all', a count or a device list, got {devices!r}")
        chosen = every
    elif isinstance(devices, int | np.integer) and not isinstance(devices, bool):
        if not 1 <= devices <= len(every):
            raise ValueError(
                f"devices: {devices} requested but {len(every)} available "
                f"({every[0].platform}; on CPU set "
                "XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts)"
            )
        chosen = every[: int(devices)]
    else:
        chosen = list(devices)
        if not chosen:
            raise ValueError("devices: empty device list")
    return Mesh(np.asarray(chosen), (DATA_AXIS,))


def default_mesh() -> Mesh | None:
    """`data_mesh("all")` when there is more than one device, else None (one device)."""
    return data_mesh("all") if jax.device_count() > 1 else None


def n_data(mesh: Mesh | None) -> int:
    """Number of shards of the data axis (1 without a mesh)."""
    return 1 if mesh is None else int(mesh.shape[DATA_AXIS])


def check_mesh(mesh: object) -> Mesh:
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh or None, got {type(mesh).__name__}")
    if DATA_AXIS not in mesh.axis_names:
        raise ValueError(
            f"mesh: needs an axis named {DATA_AXIS!r} (the batch axis), got {mesh.axis_names}"
        )
    return mesh


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over the data axis (replicated over any other mesh axis)."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


# --------------------------------------------------------------------------- placement


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def global_array(value, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global ``jax.Array`` with ``sharding`` from a host value that every process holds
    in full (only the shards of this process's devices are transferred). PRNG keys too.
    An array that already has ``sharding`` is returned as is."""
    if isinstance(value, jax.Array) and value.sharding.is_equivalent_to(sharding, value.ndim):
        return value
    if _is_key(value):
        data = global_array(jax.random.key_data(value), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(value))
    host = to_host(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _place(tree: PyTree, sharding_for) -> PyTree:
    def put(path, x):
        if not isinstance(x, jax.Array | np.ndarray | np.generic):
            return x
        return global_array(x, sharding_for(path, x))

    return jax.tree_util.tree_map_with_path(put, tree)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Every array leaf of ``tree`` copied to all devices of ``mesh`` (other leaves kept)."""
    s = replicated(mesh)
    return _place(tree, lambda path, x: s)


def shard_batch(tree: PyTree, mesh: Mesh) -> PyTree:
    """Every array leaf with a leading axis split along the ``"data"`` axis of ``mesh``
    (0-d leaves replicated), e.g. a batched `mtjax.DeviceParams` of one device per neuron.

    A leading axis that the data axis does not divide raises ``ValueError`` naming the leaf.
    Jitted functions of the result (`mtjax.nn.build_table`, `mtjax.pulse_ensemble`, ...)
    then run each device's share where it lives.
    """
    check_mesh(mesh)
    n = n_data(mesh)
    split, rep = batch_sharding(mesh), replicated(mesh)

    def choose(path, x):
        if np.ndim(x) == 0:
            return rep
        if x.shape[0] % n:
            raise ValueError(
                f"shard_batch: leaf {jax.tree_util.keystr(path) or 'tree'} has leading axis "
                f"{x.shape[0]}, not a multiple of the {n} devices of the data axis"
            )
        return split

    return _place(tree, choose)


def to_host(x: Any) -> np.ndarray:
    """A NumPy copy of a fully addressable or fully replicated array (any process)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if not x.is_fully_replicated:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        x = x.addressable_data(0)
    return np.asarray(x)
