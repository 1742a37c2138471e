"""Closed-form pulse response of the ideal device (zero effective field, lambda1 = 1).

From m = +z, a P1 (= +x) pulse of duration tau gives exactly
m_x = tanh(u), m_y = -sech(u) sin(psi), m_z = sech(u) cos(psi) with
u = gamma0 (a + alpha b) tau / (1+alpha^2) and psi = gamma0 (b - alpha a) tau / (1+alpha^2).
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from mtjax.params import DeviceParams
from mtjax.physics import gamma0, stt_amplitude


def pulse_angles(
    params: DeviceParams, current: ArrayLike
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """(u, psi) of one P1 pulse of `current` (A) for one device."""
    a = stt_amplitude(params, current, 1)
    b = params.xi1 * a
    scale = gamma0(params) * params.pulse_duration / (1 + params.alpha**2)
    return scale * (a + params.alpha * b), scale * (b - params.alpha * a)


def analytic_response(params: DeviceParams, current: ArrayLike) -> Float[Array, "3"]:
    """m after one P1 pulse from +z, ideal device, in the lab frame (P1 = +x, P2 = +z)."""
    u, psi = pulse_angles(params, current)
    sech = 1 / jnp.cosh(u)
    return jnp.stack([jnp.tanh(u), -sech * jnp.sin(psi), sech * jnp.cos(psi)])


def current_scale(params: DeviceParams) -> Float[Array, "*batch"]:
    """Input scale I_s (A): the P1 current that gives u = 1 in one pulse."""
    u_per_amp, _ = pulse_angles(params, 1.0)
    return 1.0 / u_per_amp
