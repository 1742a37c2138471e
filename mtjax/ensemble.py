"""Large batched pulse ensembles with bounded memory (chunked `lax.map` over devices)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from mtjax.params import DeviceParams
from mtjax.solve import pulse_response


def pulse_ensemble(
    params: DeviceParams,
    currents: Float[ArrayLike, "n ..."],
    *,
    key: PRNGKeyArray | None = None,
    m0: Float[ArrayLike, "3"] | None = None,
    solver: str | None = None,
    steps: int = 1000,
    chunk_size: int = 16384,
) -> Float[Array, "n 3"]:
    """m after one pulse for n trajectories: `currents` (n,) P1 currents or (n, 2) pairs.

    `params`: one shared device or a batch of n devices. With `key`, each trajectory gets
    its own thermal noise (`jax.random.split(key, n)`). Runs the `lax.scan` fast path
    (default `"rk4_scan"`, `"heun_scan"` when thermal) in chunks of `chunk_size`
    trajectories, so memory stays bounded for any n. Forward only; jit-compatible.
    """
    currents = jnp.asarray(currents, dtype=jnp.result_type(float))
    n = currents.shape[0]
    if currents.ndim not in (1, 2) or (currents.ndim == 2 and currents.shape[1] != 2):
        raise ValueError(f"currents: expected shape (n,) or (n, 2), got {currents.shape}")
    if params.batch_shape not in ((), (n,)):
        raise ValueError(f"params: batch {params.batch_shape} must be () or ({n},)")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if solver is None:
        solver = "rk4_scan" if key is None else "heun_scan"
    keys = None if key is None else jax.random.split(key, n)
    shared = params.batch_shape == ()

    def one(xs):
        p = params if shared else xs["params"]
        return pulse_response(p, xs["current"], m0, key=xs.get("key"), solver=solver, steps=steps)

    xs = {"current": currents}
    if not shared:
        xs["params"] = params
    if keys is not None:
        xs["key"] = keys
    return jax.lax.map(one, xs, batch_size=min(chunk_size, n))
