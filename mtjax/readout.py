"""TMR read-out of the two junctions (P1 reads m.p1 ~ m_x, P2 reads m.p2 ~ m_z).

G = G0 (1 + TMR/(2+TMR) m.p) with G0 = (G_P + G_AP)/2, G_P = area/RA and
G_AP = G_P/(1+TMR): G = G_P for m = p and G_AP for m = -p.
`response_curves`: the noise-free (or thermal) m.p1, m.p2 after one pulse, over a current grid.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from mtjax.params import DeviceParams
from mtjax.physics import unit
from mtjax.solve import SOLVERS, pulse_response

#: heun_scan steps of thermal `response_curves` (5 ps at tau = 1 ns, as MTJActivation "sde").
THERMAL_STEPS = 200


def _junction(params: DeviceParams, polarizer: int):
    if polarizer not in (1, 2):
        raise ValueError(f"polarizer must be 1 or 2, got {polarizer!r}")
    if polarizer == 1:
        return params.p1, params.tmr1, params.ra1
    return params.p2, params.tmr2, params.ra2


def mean_conductance(params: DeviceParams, polarizer: int) -> Float[Array, "*batch"]:
    """G0 = (G_P + G_AP)/2 in siemens."""
    _, tmr, ra = _junction(params, polarizer)
    g_p = params.area / ra
    return g_p * (2 + tmr) / (2 * (1 + tmr))


def conductance(
    params: DeviceParams, m: Float[ArrayLike, "*batch 3"], polarizer: int
) -> Float[Array, "*batch"]:
    """Conductance (S) of junction `polarizer` (1 or 2) at magnetization `m`."""
    p, tmr, _ = _junction(params, polarizer)
    cos = jnp.sum(jnp.asarray(m) * unit(p), axis=-1)
    return mean_conductance(params, polarizer) * (1 + tmr / (2 + tmr) * cos)


def read_current(
    params: DeviceParams, m: Float[ArrayLike, "*batch 3"], polarizer: int, v_read: float = 0.05
) -> Float[Array, "*batch"]:
    """Read current (A) at read voltage `v_read` (V)."""
    return v_read * conductance(params, m, polarizer)


def projection_from_conductance(
    params: DeviceParams, g: Float[ArrayLike, "*batch"], polarizer: int
) -> Float[Array, "*batch"]:
    """Inverse of `conductance`: m.p recovered from a (possibly noisy) conductance (S)."""
    _, tmr, _ = _junction(params, polarizer)
    return (jnp.asarray(g) / mean_conductance(params, polarizer) - 1) * (2 + tmr) / tmr


def response_curves(
    params: DeviceParams,
    currents: Float[ArrayLike, " n"],
    *,
    key: PRNGKeyArray | None = None,
    solver: str | None = None,
    steps: int | None = None,
) -> Float[Array, "*batch n 2"]:
    """(m.p1, m.p2) after one pulse from +z for each P1 current (A) in `currents`.

    `params`: one device or a batch (every device sees every current). Noise-free by default
    (adaptive "tsit5"); with `key` the thermal field is on ("heun_scan", `THERMAL_STEPS`
    steps) and every (device, current) pair gets its own noise."""
    currents = jnp.asarray(currents, dtype=jnp.result_type(float))
    if currents.ndim != 1 or currents.shape[0] < 1:
        raise ValueError(
            f"currents: expected a non-empty 1-D array (A), got shape {currents.shape}"
        )
    if solver is None:
        solver = "tsit5" if key is None else "heun_scan"
    if solver not in SOLVERS:
        raise ValueError(f"solver: unknown {solver!r}; choose from {SOLVERS}")
    if steps is None and key is not None:
        steps = THERMAL_STEPS
    batch = params.batch_shape
    n_dev = math.prod(batch)
    flat = jax.tree.map(lambda x: x.reshape(n_dev, *x.shape[len(batch) :]), params)
    out = _response_curves(flat, currents, key, solver, steps)
    return out.reshape(*batch, currents.shape[0], 2)


@eqx.filter_jit
def _response_curves(params, currents, key, solver, steps):
    n_dev, n = params.batch_shape[0], currents.shape[0]
    keys = None if key is None else jax.random.split(key, (n_dev, n))

    def one(p, current, k):
        m = pulse_response(p, current, key=k, solver=solver, steps=steps)
        return jnp.stack([jnp.dot(m, unit(p.p1)), jnp.dot(m, unit(p.p2))])

    k_axis = None if key is None else 0
    per_device = jax.vmap(one, in_axes=(None, 0, k_axis))
    return jax.vmap(per_device, in_axes=(0, None, k_axis))(params, currents, keys)
