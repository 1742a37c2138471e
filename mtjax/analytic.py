"""Closed-form pulse response of the ideal device (zero effective field, lambda1 = 1).

From m = +z, a P1 (= +x) pulse of duration tau gives exactly
m_x = tanh(u), m_y = -sech(u) sin(psi), m_z = sech(u) cos(psi) with
u = gamma0 (a + alpha b) tau / (1+alpha^2) and psi = gamma0 (b - alpha a) tau / (1+alpha^2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from mtjax.params import DeviceParams
from mtjax.physics import gamma0, sech, stt_amplitude, unit


def field_free_violations(params: DeviceParams) -> list[str]:
    """Why `params` are not field-free (empty list: they are): zero effective field
    (hk = 0, demag = 0, h_bias = 0) and lambda1 = 1, what the closed forms of a P1 pulse
    need (`mtjax.moments.field_free_moments`). Traced params cannot be checked and give []."""
    leaves = [params.hk, params.demag, params.h_bias, params.lambda1]
    if any(isinstance(v, jax.core.Tracer) for v in leaves):
        return []
    checks = {
        "hk != 0": np.any(np.asarray(params.hk) != 0),
        "demag != 0": np.any(np.asarray(params.demag) != 0),
        "h_bias != 0": np.any(np.asarray(params.h_bias) != 0),
        "lambda1 != 1": np.any(np.asarray(params.lambda1) != 1),
    }
    return [what for what, bad in checks.items() if bad]


def not_field_free(params: DeviceParams) -> Array:
    """True where a device of `params` is not field-free (`field_free_violations`);
    array and tracer friendly, shape `params.batch_shape`."""
    return (
        (params.hk != 0)
        | jnp.any(params.demag != 0, axis=-1)
        | jnp.any(params.h_bias != 0, axis=-1)
        | (params.lambda1 != 1)
    )


def closed_form_violations(params: DeviceParams) -> list[str]:
    """Why the closed form does not describe `params` (empty list: it does).

    It needs zero effective field (hk = 0, demag = 0, h_bias = 0), lambda1 = 1 and
    P2 = +z with P1 perpendicular to it (the pulse starts from m = +z). Traced params
    cannot be checked and give []."""
    if any(isinstance(v, jax.core.Tracer) for v in (params.p1, params.p2)):
        return []
    p1 = np.asarray(params.p1) / np.linalg.norm(np.asarray(params.p1), axis=-1, keepdims=True)
    p2 = np.asarray(params.p2) / np.linalg.norm(np.asarray(params.p2), axis=-1, keepdims=True)
    checks = {
        "p2 != +z": np.any(np.abs(p2 - np.array([0.0, 0.0, 1.0])) > 1e-6),
        "p1 not perpendicular to z": np.any(np.abs(p1[..., 2]) > 1e-6),
    }
    return field_free_violations(params) + [what for what, bad in checks.items() if bad]


def pulse_angles(
    params: DeviceParams, current: ArrayLike
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """(u, psi) of one P1 pulse of `current` (A) for one device."""
    a = stt_amplitude(params, current, 1)
    b = params.xi1 * a
    scale = gamma0(params) * params.pulse_duration / (1 + params.alpha**2)
    return scale * (a + params.alpha * b), scale * (b - params.alpha * a)


def analytic_response(params: DeviceParams, current: ArrayLike) -> Float[Array, "3"]:
    """m after one P1 pulse from +z, ideal device, in the lab frame (P1 = +x, P2 = +z).

    Raises ValueError when `closed_form_violations(params)` is not empty."""
    bad = closed_form_violations(params)
    p1 = params.p1
    if not isinstance(p1, jax.core.Tracer) and np.any(np.abs(unit(p1) - jnp.eye(3)[0]) > 1e-6):
        bad.append("p1 != +x")
    if bad:
        raise ValueError(
            "analytic_response: the closed form assumes an ideal device with P1 = +x, P2 = +z; "
            f"these params have {', '.join(bad)} (use pulse_response)"
        )
    u, psi = pulse_angles(params, current)
    s = sech(u)
    return jnp.stack([jnp.tanh(u), -s * jnp.sin(psi), s * jnp.cos(psi)])


def current_scale(params: DeviceParams) -> Float[Array, "*batch"]:
    """Input scale I_s (A): the P1 current that gives u = 1 in one pulse."""
    u_per_amp, _ = pulse_angles(params, 1.0)
    return 1.0 / u_per_amp
