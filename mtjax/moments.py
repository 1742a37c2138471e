"""Thermal statistics of one pulse in the linear-noise (moment) approximation.

The Stratonovich LLGS SDE dm = f(m) dt + B(m) o dW (f the deterministic torque, B the
thermal-field torque, `mtjax.physics.thermal_torque`) is expanded around the noise-free
trajectory m_det(t): m = m_det + delta + fluctuations of order sqrt(D), D the thermal
diffusion. To first order in D the mean and the covariance obey

    d m_det / dt = f(m_det)
    d delta / dt = J delta + 1/2 H : Sigma + c_ito         (mean shift, O(D))
    d Sigma / dt = J Sigma + Sigma J^T + B B^T               (covariance, O(D))

with J = df/dm and H = d2f/dm2 at m_det, and c_ito_i = 1/2 sum_jk dB_ij/dm_k B_kj the
Stratonovich-to-Ito drift. The mean is E[m] = m_det + delta. All four integrate together
with the same fixed RK4 steps as the deterministic tables (m_det renormalized each step,
exactly like `integrators.scan_solve`), so the cost is a small multiple of one pulse.

Valid while the spread is small (Gaussian statistics); see README for the measured range
(it fails for very small devices, whose thermal spread is no longer small).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from mtjax.constants import TIME_UNIT
from mtjax.integrators import normalize
from mtjax.params import DeviceParams
from mtjax.physics import TorqueCoefficients, torque, torque_coefficients
from mtjax.solve import as_drive, drift_ns, initial_state, noise_ns


class PulseMoments(eqx.Module):
    """Mean `mean` (3,), covariance `cov` (3, 3) and noise-free state `m_det` (3,) of m after
    one pulse (mean = m_det + O(D))."""

    mean: Float[Array, "3"]
    cov: Float[Array, "3 3"]
    m_det: Float[Array, "3"]


def _basis(m, k):
    """Unit vector e_k laid out like m (3, *batch)."""
    return jnp.zeros_like(m).at[k].set(1.0)


def _moment_rhs(c: TorqueCoefficients, state):
    """Time derivatives (1/ns) of (m_det, delta, Sigma); m (3, *b), Sigma (3, 3, *b).

    Component-wise arithmetic only (directional derivatives, no Jacobian matrices), so a
    whole batch in the (3, n) layout fuses like the ensemble fast path."""
    m, delta, sigma = state
    f = lambda x: TIME_UNIT * torque(c, x)  # 1/ns; no restoring term (exactly tangent)
    basis = jnp.stack([_basis(m, k) for k in range(3)])  # (k, 3, *b)
    cols = jnp.moveaxis(sigma, 1, 0)  # (k, 3, *b): Sigma e_k

    def jvp_f(x, v):
        return jax.jvp(f, (x,), (v,))[1]

    jac = jax.vmap(lambda v: jvp_f(m, v), out_axes=1)(basis)  # (i, k, *b) = df_i/dm_k
    # H : Sigma = sum_k D^2 f [e_k, Sigma e_k]
    second = lambda e, se: jax.jvp(lambda x: jvp_f(x, e), (m,), (se,))[1]
    h_sigma = jnp.sum(jax.vmap(second)(basis, cols), axis=0)
    b_cols = jax.vmap(lambda e: noise_ns(c, m, e))(basis)  # (j, 3, *b): column j of B
    # c_ito = 1/2 sum_j D B_j [B_j]
    dbj = lambda e, bj: jax.jvp(lambda x: noise_ns(c, x, e), (m,), (bj,))[1]
    ito = 0.5 * jnp.sum(jax.vmap(dbj)(basis, b_cols), axis=0)
    bbt = jnp.einsum("ji...,jk...->ik...", b_cols, b_cols)
    j_sigma = jnp.einsum("ik...,kj...->ij...", jac, sigma)
    d_sigma = j_sigma + jnp.swapaxes(j_sigma, 0, 1) + bbt
    d_delta = jnp.einsum("ik...,k...->i...", jac, delta) + 0.5 * h_sigma + ito
    return drift_ns(c, m), d_delta, d_sigma


def moments_scan(c: TorqueCoefficients, m0, t1n, n_steps: int):
    """RK4 of (m_det, delta, Sigma) from m0 over t1n ns; layout as `_moment_rhs`.
    Returns (m_det, delta, Sigma) at t1n."""
    h = t1n / n_steps

    def add(s, k, a):
        return jax.tree.map(lambda x, y: x + a * y, s, k)

    def step(state, _):
        k1 = _moment_rhs(c, state)
        k2 = _moment_rhs(c, add(state, k1, h / 2))
        k3 = _moment_rhs(c, add(state, k2, h / 2))
        k4 = _moment_rhs(c, add(state, k3, h))
        m, delta, sigma = jax.tree.map(
            lambda s, a, b, cc, d: s + h / 6 * (a + 2 * b + 2 * cc + d), state, k1, k2, k3, k4
        )
        return (normalize(m), delta, 0.5 * (sigma + jnp.swapaxes(sigma, 0, 1))), None

    zero = jnp.zeros_like(m0)
    state0 = (m0, zero, jnp.zeros((3,) + m0.shape, m0.dtype))
    (m, delta, sigma), _ = jax.lax.scan(step, state0, None, length=n_steps)
    return m, delta, sigma


def pulse_moments(
    params: DeviceParams,
    currents: ArrayLike,
    *,
    m0: Float[ArrayLike, "3"] | None = None,
    steps: int,
) -> PulseMoments:
    """Mean and covariance of m after one pulse of `params.pulse_duration` at the device's
    temperature (linear-noise approximation), from `m0` (default +z), with `steps` RK4 steps.

    One device and a constant drive: a P1 current (A) or a (P1, P2) pair; `jax.vmap` for
    batches. Differentiable w.r.t. every params leaf and the current."""
    drive = as_drive(currents)
    if not hasattr(drive, "currents"):
        raise ValueError("currents: pulse_moments needs a constant drive (a number or a pair)")
    if params.batch_shape != ():
        raise ValueError(f"params: one device expected, got batch {params.batch_shape}")
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    params = params.checked()
    m0 = initial_state(m0)
    c = torque_coefficients(params, drive.currents)
    t1n = params.pulse_duration.astype(m0.dtype) / TIME_UNIT
    m, delta, sigma = moments_scan(c, m0, t1n, int(steps))
    return PulseMoments(mean=m + delta, cov=sigma, m_det=m)
