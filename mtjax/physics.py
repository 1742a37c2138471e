"""Macrospin physics of one device: effective field, spin torques, LLGS vector field.

Landau-Lifshitz form with gamma0 = gamma mu0 (all fields in A/m)::

    (1+alpha^2) dm/dt = - gamma0 [m x H + alpha m x (m x H)]
                        - sum_k gamma0 [(a_k + alpha b_k) m x (m x p_k) + (b_k - alpha a_k) m x p_k]

with a_k = hbar eta_k J_k g_k(m.p_k) / (2 e mu0 Ms t) (damping-like, A/m), b_k = xi_k a_k
(field-like), J_k = I_k / area and g the normalized Slonczewski angular factor
g = 2 lambda^2 / ((lambda^2 + 1) + (lambda^2 - 1) m.p) (g = 1 for lambda = 1).

Sign convention: a positive current I_k drives m towards +p_k, so from m = +z a positive
P1 current gives m_x = +tanh(u). Every term is a cross product with m, so dm/dt is
tangent to the sphere and |m| is conserved by the exact flow.

Functions here act on ONE device (unbatched `DeviceParams`); use `jax.vmap` for batches.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from mtjax.constants import E_CHARGE, HBAR, KB, MU0
from mtjax.params import DeviceParams

_STT_PREFACTOR = HBAR / (2 * E_CHARGE * MU0)  # (A/m) per (A/m^2) * m  = hbar/(2 e mu0)


def unit(v: Float[ArrayLike, "... 3"]) -> Float[Array, "... 3"]:
    """`v / |v|` along the last axis."""
    v = jnp.asarray(v)
    return v / jnp.linalg.norm(v, axis=-1, keepdims=True)


def gamma0(params: DeviceParams) -> Float[Array, ""]:
    """gamma * mu0 (m / (A s))."""
    return params.gamma * MU0


def effective_field(params: DeviceParams, m: Float[Array, "3"]) -> Float[Array, "3"]:
    """Demagnetizing + uniaxial anisotropy + bias field (A/m) at magnetization `m`."""
    k = unit(params.hk_axis)
    h_demag = -params.demag * params.Ms * m
    h_anis = params.hk * jnp.dot(m, k) * k
    return h_demag + h_anis + params.h_bias


def stt_amplitude(params: DeviceParams, current: ArrayLike, polarizer: int) -> Float[Array, ""]:
    """Damping-like amplitude a_k (A/m) of polarizer 1 or 2 for `current` (A), g = 1."""
    eta = params.eta1 if polarizer == 1 else params.eta2
    return _STT_PREFACTOR * eta * (current / params.area) / (params.Ms * params.thickness)


def slonczewski_factor(lam: ArrayLike, cos: ArrayLike) -> Float[Array, "..."]:
    """Normalized Slonczewski angular factor 2 l^2 / ((l^2+1) + (l^2-1) cos); 1 at l = 1."""
    l2 = jnp.square(lam)
    return 2 * l2 / ((l2 + 1) + (l2 - 1) * cos)


def field_torque(
    params: DeviceParams, m: Float[Array, "3"], h: Float[Array, "3"]
) -> Float[Array, "3"]:
    """dm/dt (1/s) caused by a field `h` (A/m): -gamma0/(1+a^2) [m x h + a m x (m x h)].

    Linear in `h`, so it also maps the thermal field to the SDE diffusion term."""
    a = params.alpha
    mxh = jnp.cross(m, h)
    return -gamma0(params) / (1 + a * a) * (mxh + a * jnp.cross(m, mxh))


def spin_torque(
    params: DeviceParams, m: Float[Array, "3"], currents: Float[Array, "2"]
) -> Float[Array, "3"]:
    """dm/dt (1/s) from the spin-transfer torques of both polarizers, currents in A."""
    alpha = params.alpha
    total = jnp.zeros_like(m)
    polarizers = (
        (params.p1, params.lambda1, params.xi1),
        (params.p2, params.lambda2, params.xi2),
    )
    for k, (p, lam, xi) in enumerate(polarizers, start=1):
        p = unit(p)
        a = stt_amplitude(params, currents[k - 1], k) * slonczewski_factor(lam, jnp.dot(m, p))
        b = xi * a
        mxp = jnp.cross(m, p)
        total = total - (a + alpha * b) * jnp.cross(m, mxp) - (b - alpha * a) * mxp
    return gamma0(params) / (1 + alpha * alpha) * total


def llgs_rhs(
    params: DeviceParams,
    m: Float[Array, "3"],
    currents: Float[Array, "2"],
    h_thermal: Float[Array, "3"] | None = None,
) -> Float[Array, "3"]:
    """LLGS vector field dm/dt (1/s). `h_thermal` (A/m) is added to the effective field."""
    h = effective_field(params, m)
    if h_thermal is not None:
        h = h + h_thermal
    return field_torque(params, m, h) + spin_torque(params, m, currents)


def thermal_diffusion(params: DeviceParams) -> Float[Array, ""]:
    """sqrt(2 alpha kB T / (mu0 Ms gamma0 V)) in A/m sqrt(s).

    The thermal field over a step dt has per-component variance
    2 alpha kB T / (mu0 Ms gamma0 V dt) = thermal_diffusion**2 / dt (Stratonovich)."""
    var = (
        2
        * params.alpha
        * (KB / MU0)
        * params.temperature
        / (params.Ms * gamma0(params) * params.volume)
    )
    return jnp.sqrt(var)
