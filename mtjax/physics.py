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

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from mtjax.constants import E_CHARGE, HBAR, KB, MU0
from mtjax.params import DeviceParams

_STT_PREFACTOR = HBAR / (2 * E_CHARGE * MU0)  # (A/m) per (A/m^2) * m  = hbar/(2 e mu0)


def unit(v: Float[ArrayLike, "... 3"]) -> Float[Array, "... 3"]:
    """`v / |v|` along the last axis."""
    v = jnp.asarray(v)
    return v / jnp.linalg.norm(v, axis=-1, keepdims=True)


def sech(x: Float[ArrayLike, "*shape"]) -> Float[Array, "*shape"]:
    """1 / cosh(x) with a finite value and gradient for any finite x (1 / jnp.cosh's
    gradient is NaN beyond |x| ~ 89 in float32)."""
    e = jnp.exp(-jnp.abs(jnp.asarray(x)))
    return 2 * e / (1 + e * e)


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


class TorqueCoefficients(eqx.Module):
    """Everything `llgs_rhs` needs for one device at fixed currents, computed once.

    With V = H + sum_k g_k (b_k - alpha a_k) p_k and W = alpha H + sum_k g_k (a_k + alpha b_k) p_k
    the LL equation reads dm/dt = -gamma0/(1+alpha^2) [m x V + m x (m x W)]."""

    rate: Float[Array, ""]  # gamma0 / (1 + alpha^2), m/(A s)
    alpha: Float[Array, ""]
    demag_ms: Float[Array, "3"]  # N_i Ms, A/m
    hk: Float[Array, ""]
    k: Float[Array, "3"]
    h_bias: Float[Array, "3"]
    p: Float[Array, "2 3"]  # unit polarizer directions
    lam2: Float[Array, "2"]  # lambda_k^2
    v: Float[Array, "2"]  # b_k - alpha a_k at g = 1, A/m  (only v, w depend on the currents)
    w: Float[Array, "2"]  # a_k + alpha b_k at g = 1, A/m
    noise: Float[Array, ""]  # -rate * thermal_diffusion, 1/sqrt(s)


def torque_coefficients(
    params: DeviceParams, currents: Float[ArrayLike, "2"]
) -> TorqueCoefficients:
    """Precompute the LLGS coefficients of one device for currents (I1, I2) in A."""
    alpha = params.alpha
    a = jnp.stack([stt_amplitude(params, currents[0], 1), stt_amplitude(params, currents[1], 2)])
    b = jnp.stack([params.xi1, params.xi2]) * a
    return TorqueCoefficients(
        rate=gamma0(params) / (1 + alpha * alpha),
        alpha=alpha,
        demag_ms=params.demag * params.Ms,
        hk=params.hk,
        k=unit(params.hk_axis),
        h_bias=params.h_bias,
        p=jnp.stack([unit(params.p1), unit(params.p2)]),
        lam2=jnp.square(jnp.stack([params.lambda1, params.lambda2])),
        v=b - alpha * a,
        w=a + alpha * b,
        noise=-gamma0(params) / (1 + alpha * alpha) * thermal_diffusion(params),
    )


def torque(
    c: TorqueCoefficients,
    m: Float[Array, "3 ..."],
    h_extra: Float[Array, "3 ..."] | None = None,
) -> Float[Array, "3 ..."]:
    """dm/dt (1/s) from precomputed coefficients; `h_extra` (A/m) adds to the field.

    Component-wise arithmetic only, so it also runs on a batch laid out with the device
    axes LAST (m of shape (3, n), coefficients with trailing axis n): the lax.scan fast path
    uses that layout, where XLA fuses a whole step into one vectorized loop."""
    km = m[0] * c.k[0] + m[1] * c.k[1] + m[2] * c.k[2]
    h = [-c.demag_ms[i] * m[i] + c.hk * km * c.k[i] + c.h_bias[i] for i in range(3)]
    if h_extra is not None:
        h = [h[i] + h_extra[i] for i in range(3)]
    big_v, big_w = h, [c.alpha * hi for hi in h]
    for j in range(2):
        p, lam2 = c.p[j], c.lam2[j]
        cos = m[0] * p[0] + m[1] * p[1] + m[2] * p[2]
        g = 2 * lam2 / ((lam2 + 1) + (lam2 - 1) * cos)  # Slonczewski factor
        gv, gw = g * c.v[j], g * c.w[j]
        big_v = [big_v[i] + gv * p[i] for i in range(3)]
        big_w = [big_w[i] + gw * p[i] for i in range(3)]
    m_w = m[0] * big_w[0] + m[1] * big_w[1] + m[2] * big_w[2]
    m_m = m[0] * m[0] + m[1] * m[1] + m[2] * m[2]
    v, w = big_v, big_w
    return -c.rate * jnp.stack(
        [
            m[1] * v[2] - m[2] * v[1] + m[0] * m_w - w[0] * m_m,
            m[2] * v[0] - m[0] * v[2] + m[1] * m_w - w[1] * m_m,
            m[0] * v[1] - m[1] * v[0] + m[2] * m_w - w[2] * m_m,
        ]
    )


def rotation_rate_bound(c: TorqueCoefficients) -> Float[Array, ""]:
    """Upper bound (rad/s) of |dm/dt| over the unit sphere for one device's coefficients.

    |m x V| <= |V| and |m x (m x W)| <= |W| with |H| <= max N_i Ms + |hk| + |h_bias| and the
    Slonczewski factor g <= max(1, lambda^2). The thermal field is not included."""
    h = jnp.max(jnp.abs(c.demag_ms)) + jnp.abs(c.hk) + jnp.linalg.norm(c.h_bias)
    return c.rate * (1 + c.alpha) * h + spin_rotation_bound(c)


def spin_rotation_bound(c: TorqueCoefficients) -> Float[Array, ""]:
    """The spin-torque part of `rotation_rate_bound` (rad/s); linear in the currents."""
    g = jnp.maximum(1.0, c.lam2)
    return c.rate * jnp.sum(g * (jnp.abs(c.v) + jnp.abs(c.w)))


def thermal_torque(
    c: TorqueCoefficients, m: Float[Array, "3 ..."], dw: Float[Array, "3 ..."]
) -> Float[Array, "3 ..."]:
    """Increment of m from a Brownian increment `dw` (sqrt(s)) of the thermal field:
    `field_torque` of H_th dt = thermal_diffusion * dW (Stratonovich). Layout as `torque`."""
    mxw = _cross3(m, dw)
    mxmxw = _cross3(m, mxw)
    return c.noise * jnp.stack([mxw[i] + c.alpha * mxmxw[i] for i in range(3)])


def _cross3(a, b):
    return [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]]


def llgs_rhs(
    params: DeviceParams,
    m: Float[Array, "3"],
    currents: Float[ArrayLike, "2"],
    h_thermal: Float[Array, "3"] | None = None,
) -> Float[Array, "3"]:
    """LLGS vector field dm/dt (1/s). `h_thermal` (A/m) is added to the effective field.

    Same equation as `field_torque(effective_field) + spin_torque`, in the fused form of
    `torque` (tests check the two against each other)."""
    return torque(torque_coefficients(params, jnp.asarray(currents)), m, h_thermal)


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
    pos = var > 0  # T = 0: exactly 0 with a zero (not NaN) derivative
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, var, 1.0)), 0.0)
