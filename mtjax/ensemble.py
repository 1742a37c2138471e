"""Large pulse ensembles: the batched `lax.scan` fast path with bounded memory.

The batch is laid out as (3, n) (device axis last), so XLA fuses a whole RK4/Heun step
into one vectorized loop; trajectories run in chunks of `chunk_size` (`lax.map`), and
chunks are spread with `jax.shard_map` over the mesh of the inputs when they carry a
`NamedSharding` (`mtjax.sharding.shard_batch`; a 1-device mesh keeps them on that device),
else over all local devices when there are several (GPUs, or CPU devices exposed with
XLA_FLAGS=--xla_force_host_platform_device_count=N).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from mtjax.constants import TIME_UNIT
from mtjax.integrators import SCAN_SOLVERS, scan_solve, steps_for, too_coarse
from mtjax.params import DeviceParams
from mtjax.physics import rotation_rate_bound, torque_coefficients
from mtjax.sharding import DATA_AXIS
from mtjax.solve import DEFAULT_STEPS, drift_ns, initial_state, noise_ns


def pulse_ensemble(
    params: DeviceParams,
    currents: Float[ArrayLike, "n ..."],
    *,
    key: PRNGKeyArray | None = None,
    m0: Float[ArrayLike, "3"] | None = None,
    solver: str | None = None,
    steps: int | None = None,
    chunk_size: int = 8192,
) -> Float[Array, "n 3"]:
    """m after one pulse for n trajectories: `currents` (n,) P1 currents or (n, 2) pairs.

    `params`: one shared device or a batch of n devices. With `key`, trajectory i gets the
    thermal noise of `jax.random.split(key, n)[i]` (same as `pulse_response(..., key=k_i,
    solver="heun_scan")`), so results do not depend on `chunk_size` or device count.
    Default solver `"rk4_scan"`, `"heun_scan"` when thermal. `steps`: fixed steps for every
    trajectory; default chosen from the dynamics (at least 1000) like `pulse_response`, and a
    count too small for some trajectory raises. Forward only; jit-compatible. Devices: the
    mesh of inputs placed with `mtjax.sharding.shard_batch`, else all local devices.
    """
    dtype = jnp.result_type(float)
    currents = jnp.asarray(currents, dtype=dtype)
    if currents.ndim == 1:
        currents = jnp.stack([currents, jnp.zeros_like(currents)], axis=1)
    if currents.ndim != 2 or currents.shape[1] != 2:
        raise ValueError(f"currents: expected shape (n,) or (n, 2), got {currents.shape}")
    if not isinstance(currents, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(currents))):
        raise ValueError("pulse_ensemble: non-finite current (NaN or inf)")
    n = currents.shape[0]
    if params.batch_shape not in ((), (n,)):
        raise ValueError(f"params: batch {params.batch_shape} must be () or ({n},)")
    if int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    solver = solver or ("rk4_scan" if key is None else "heun_scan")
    if solver not in SCAN_SOLVERS:
        raise ValueError(f"solver: unknown {solver!r}; choose from {SCAN_SOLVERS}")
    params = params.checked()
    m0 = initial_state(m0)

    shared = params.batch_shape == ()
    if shared:  # only v, w depend on the current: keep the rest unbatched
        base = torque_coefficients(params, jnp.zeros(2, dtype))
        vw = jax.vmap(lambda c: torque_coefficients(params, c))(currents)
        per_traj = {"v": vw.v, "w": vw.w}
    else:
        per_traj = {
            "c": jax.vmap(torque_coefficients)(params, currents),
            "t1": params.pulse_duration,
        }
    if key is not None:
        per_traj["key"] = jax.random.split(key, n)
    steps, coarse = _choose_steps(params, currents, solver, steps)

    def run_chunk(x):  # leaves of x: (chunk, ...) -> device axis last for the fused layout
        last = lambda a: jnp.moveaxis(a, 0, -1)
        if shared:
            c = eqx.tree_at(lambda c: (c.v, c.w), base, (last(x["v"]), last(x["w"])))
            t1 = params.pulse_duration
        else:
            c, t1 = jax.tree.map(last, x["c"]), x["t1"]
        draw = None
        if "key" in x:
            draw = lambda i: jax.vmap(
                lambda k: jax.random.normal(jax.random.fold_in(k, i), (3,), dtype), out_axes=1
            )(x["key"])
        m_start = jnp.broadcast_to(m0[:, None], (3, jax.tree.leaves(x)[0].shape[0]))
        ms = scan_solve(
            lambda t, m: drift_ns(c, m),
            lambda t, m, dw: noise_ns(c, m, dw),
            m_start, t1 / TIME_UNIT, steps, 2, solver, draw,
        )  # fmt: skip
        return ms[-1].T

    mesh = _input_mesh(params, currents)
    if mesh is None:  # axis named like mtjax.sharding.data_mesh's, so meshes agree under jit
        mesh = Mesh(np.asarray(jax.local_devices()), (DATA_AXIS,))
    n_dev = mesh.size if n >= 2 * mesh.size else 1
    chunk = int(min(chunk_size, -(-n // n_dev)))
    n_chunks = -(-n // (chunk * n_dev)) * n_dev
    pad = n_chunks * chunk - n

    def to_chunks(a):
        a = jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)]) if pad else a
        return a.reshape(n_chunks, chunk, *a.shape[1:])

    xs = jax.tree.map(to_chunks, per_traj)
    run_all = lambda xs: jax.lax.map(run_chunk, xs)
    if n_dev > 1:
        spec = PartitionSpec(mesh.axis_names)  # chunks split over every mesh axis
        run_all = jax.shard_map(run_all, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)
    out = run_all(xs).reshape(n_chunks * chunk, 3)[:n]
    bad = ~jnp.all(jnp.isfinite(currents)) | ~jnp.all(jnp.isfinite(out))
    out = eqx.error_if(out, bad, "pulse_ensemble: non-finite current or magnetization")
    if coarse is not None:
        out = eqx.error_if(out, coarse, "pulse_ensemble: too few steps for some trajectory")
    return out


def _input_mesh(*trees) -> Mesh | None:
    """The mesh of the first concrete input array with a `NamedSharding`, if any."""
    for leaf in jax.tree.leaves(trees):
        if isinstance(leaf, jax.core.Tracer) or not isinstance(leaf, jax.Array):
            continue
        if isinstance(leaf.sharding, NamedSharding):
            return leaf.sharding.mesh
    return None


def _choose_steps(params: DeviceParams, currents, solver: str, steps: int | None):
    """(steps, traced guard or None): the step rule over all trajectories."""
    if steps is not None and (isinstance(steps, bool) or int(steps) != steps or steps < 1):
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    rate = jax.vmap(
        lambda p, c: rotation_rate_bound(torque_coefficients(p, c)),
        in_axes=(None if params.batch_shape == () else 0, 0),
    )(params, currents)
    theta = jnp.max(rate * params.pulse_duration)
    if not isinstance(theta, jax.core.Tracer):
        need = steps_for(theta, solver)
        if steps is None:
            return max(DEFAULT_STEPS, need), None
        if bool(too_coarse(theta, steps, solver)):
            raise ValueError(
                f"steps={steps} is too coarse: the largest rotation bound over one pulse is "
                f"{float(theta):.3g} rad, which needs steps >= {need} with solver={solver!r}"
            )
        return int(steps), None
    steps = DEFAULT_STEPS if steps is None else int(steps)
    return steps, too_coarse(theta, steps, solver)
