"""TMR read-out of the two junctions (P1 reads m.p1 ~ m_x, P2 reads m.p2 ~ m_z).

G = G0 (1 + TMR/(2+TMR) m.p) with G0 = (G_P + G_AP)/2, G_P = area/RA and
G_AP = G_P/(1+TMR): G = G_P for m = p and G_AP for m = -p.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from mtjax.params import DeviceParams
from mtjax.physics import unit


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
