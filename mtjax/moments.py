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
from mtjax.physics import TorqueCoefficients, sech, torque_coefficients
from mtjax.solve import as_drive, drift_ns, initial_state


class PulseMoments(eqx.Module):
    """Mean `mean` (3,), covariance `cov` (3, 3) and noise-free state `m_det` (3,) of m after
    one pulse (mean = m_det + O(D))."""

    mean: Float[Array, "3"]
    cov: Float[Array, "3 3"]
    m_det: Float[Array, "3"]


def _skew(v):
    """[v]_x with [v]_x a = v x a."""
    z = jnp.zeros_like(v[0])
    return jnp.stack(
        [jnp.stack([z, -v[2], v[1]]), jnp.stack([v[2], z, -v[0]]), jnp.stack([-v[1], v[0], z])]
    )


def _moment_rhs(c: TorqueCoefficients, state):
    """Time derivatives (1/ns) of (m_det, delta, Sigma) for ONE lane: m (3,), Sigma (3, 3).

    The torque T = -rate [m x V + m (m.W) - W |m|^2] (`mtjax.physics.torque`) with
    V = H + sum_j g_j v_j p_j, W = alpha H + sum_j g_j w_j p_j (H affine in m, g_j the
    Slonczewski factor of m.p_j) is differentiated in closed form: J = dT/dm and the
    contraction H : Sigma = sum_ab Sigma_ab d2T/dm_a dm_b (tests check both against
    autodiff). Thermal terms: B B^T = s^2 (1 + alpha^2 |m|^2)(|m|^2 I - m m^T) and the Ito
    drift -s^2 (1 + alpha^2 |m|^2) m of dm = s (m x dW + alpha m x (m x dW))."""
    m, delta, sigma = state
    eye = jnp.eye(3, dtype=m.dtype)
    dh = -jnp.diag(c.demag_ms) + c.hk * jnp.outer(c.k, c.k)  # dH/dm
    h = dh @ m + c.h_bias
    big_v, big_w = h, c.alpha * h
    dv, dw = dh, c.alpha * dh
    d2v = d2w = jnp.zeros(3, m.dtype)  # H : Sigma parts of V, W
    d2w_m = 0.0
    for j in range(2):
        p, lam2 = c.p[j], c.lam2[j]
        den = (lam2 + 1) + (lam2 - 1) * (m @ p)
        g = 2 * lam2 / den
        g1 = -g * (lam2 - 1) / den  # dg/d(m.p)
        g2 = 2 * g * (lam2 - 1) ** 2 / den**2
        ppt = jnp.outer(p, p)
        big_v, big_w = big_v + g * c.v[j] * p, big_w + g * c.w[j] * p
        dv, dw = dv + g1 * c.v[j] * ppt, dw + g1 * c.w[j] * ppt
        q = g2 * (p @ sigma @ p)
        d2v, d2w = d2v + q * c.v[j] * p, d2w + q * c.w[j] * p
        d2w_m = d2w_m + q * c.w[j] * (m @ p)
    mm, mw = m @ m, m @ big_w
    scale = -TIME_UNIT * c.rate
    jac = scale * (
        -_skew(big_v) + _skew(m) @ dv + mw * eye + jnp.outer(m, big_w)
        + jnp.outer(m, m @ dw) - mm * dw - 2 * jnp.outer(big_w, m)
    )  # fmt: skip
    dvs = dv @ sigma
    axial = jnp.stack([dvs[2, 1] - dvs[1, 2], dvs[0, 2] - dvs[2, 0], dvs[1, 0] - dvs[0, 1]])
    h_sigma = scale * (
        2 * axial + jnp.cross(m, d2v) + 2 * sigma @ (big_w + dw.T @ m)
        + m * (2 * jnp.trace(dw @ sigma) + d2w_m) - mm * d2w - 4 * dw @ sigma @ m
        - 2 * big_w * jnp.trace(sigma)
    )  # fmt: skip
    s2 = TIME_UNIT * c.noise**2 * (1 + c.alpha**2 * mm)
    bbt = s2 * (mm * eye - jnp.outer(m, m))
    js = jac @ sigma
    d_sigma = js + js.T + bbt
    d_delta = jac @ delta + 0.5 * h_sigma - s2 * m
    return drift_ns(c, m), d_delta, d_sigma


def moments_scan(c: TorqueCoefficients, m0, t1n, n_steps: int):
    """RK4 of (m_det, delta, Sigma) of one lane from m0 over t1n ns (vmap for batches).
    Returns (m_det, delta, Sigma) at t1n.

    After each step Sigma is projected on the tangent plane of m_det, (I - m m^T) Sigma
    (I - m m^T): the exact Sigma stays there (the drift is tangent, so m^T J = -f^T and
    d(Sigma m)/dt = J Sigma m), and without it the step error's normal part dominated the
    tiny variance of m.p near saturation (m.p1's std at |z| = 6.5: 184 % off at the
    response's 19 steps; 0.05 % with it, paper device, tested)."""
    h = t1n / n_steps
    # RK4 as a scan over its four stages: the (large) right-hand side appears once in the
    # program, which keeps compile times of forward and reverse passes short
    stage_a = jnp.array([0.0, 0.5, 0.5, 1.0], m0.dtype)
    stage_b = jnp.array([1.0, 2.0, 2.0, 1.0], m0.dtype) / 6

    def step(state, _):
        # rematerialized in the reverse pass: stacking the right-hand side's many intermediates
        # per stage costs more than recomputing them (a live co-design step ~25 % faster on CPU)
        @jax.checkpoint
        def stage(carry, ab):
            acc, k_prev = carry
            a, b = ab
            k = _moment_rhs(c, jax.tree.map(lambda s, d: s + a * h * d, state, k_prev))
            return (jax.tree.map(lambda x, y: x + b * y, acc, k), k), None

        zeros = jax.tree.map(jnp.zeros_like, state)
        (acc, _), _ = jax.lax.scan(stage, (zeros, zeros), (stage_a, stage_b))
        m, delta, sigma = jax.tree.map(lambda s, d: s + h * d, state, acc)
        m = normalize(m)
        tangent = jnp.eye(3, dtype=m.dtype) - jnp.outer(m, m)
        return (m, delta, tangent @ (0.5 * (sigma + sigma.T)) @ tangent), None

    zero = jnp.zeros_like(m0)
    state0 = (m0, zero, jnp.zeros((3, 3), m0.dtype))
    (m, delta, sigma), _ = jax.lax.scan(step, state0, None, length=n_steps)
    return m, delta, sigma


def _sinhc(x):
    """sinh(x) / x, 1 at 0 (series below 1e-3: float32-exact, finite gradient)."""
    small = jnp.abs(x) < 1e-3
    safe = jnp.where(small, 1.0, x)
    return jnp.where(small, 1.0 + x * x / 6.0, jnp.sinh(safe) / safe)


def field_free_rotation(c: TorqueCoefficients, polarizer: int, t1n):
    """Damping-like rotation A t towards P(polarizer + 1) of a field-free pulse of t1n ns
    (tan(theta/2) shrinks by exp(-A t); Slonczewski factor 1)."""
    return TIME_UNIT * c.rate * c.w[polarizer] * t1n


def field_free_pulse(p, m0, at, phi):
    """Noise-free state after a field-free pulse through polarizer p: polar rotation `at`
    (`field_free_rotation`) and precession `phi` (rad) about p, from m0 (not along p).
    Returns (m, x, c0, e): m = tanh(x) p + sech(x) e with x = at + c0, c0 = artanh(m0.p)
    (as ln((1 + m0.p) / s) = ln(s / (1 - m0.p)), s = |m0 - (m0.p) p|, whichever has no
    cancellation: exact near +p and -p), e the unit azimuthal direction."""
    cos0 = jnp.dot(m0, p)
    side = m0 - cos0 * p
    norm = jnp.linalg.norm(side)
    e0 = side / norm
    c0 = jnp.where(cos0 >= 0, jnp.log((1 + cos0) / norm), jnp.log(norm / (1 - cos0)))
    e = jnp.cos(phi) * e0 + jnp.sin(phi) * jnp.cross(p, e0)
    x = at + c0
    return jnp.tanh(x) * p + sech(x) * e, x, c0, e


def field_free_moments(c: TorqueCoefficients, m0, t1n):
    """Closed form of `moments_scan` for a device with zero effective field (hk = 0,
    demag = 0, h_bias = 0), Slonczewski lambda1 = 1 and a constant P1 drive only: the
    same (m_det, delta, Sigma) of one lane, exact in the linear-noise approximation (no
    time steps). The caller checks those conditions; see `field_free_violations`.

    In polar coordinates about p = P1 (theta from p) the torque is -A m x (m x p) - B m x p,
    so theta' = -A sin theta and the azimuth precesses at B; the thermal term is Brownian
    motion on the sphere with diffusion q = noise^2 (1 + alpha^2). With x = A t + c0,
    c0 = artanh(m0.p), cos theta = tanh x. The tangent fluctuations are isotropic,
    Sigma = V (I - m m^T), and the mean shrinks along m, delta = -V m, with
    V = sech^2(x) q int_0^t cosh^2(A s + c0) ds
      = q t/2 sech^2(x) [1 + cosh(2 c0 + A t) sinhc(A t)]      (used for |A t| < 1)
      = q t/2 [sech^2(x) + (tanh x - sech^2(x) sinh(2 c0)/2) / (A t)]   (beyond: no
    exponentials, finite for any drive; V -> q / (2A), the Ornstein-Uhlenbeck variance
    at the pole). Tests check all three against `moments_scan`."""
    p, at, t = c.p[0], field_free_rotation(c, 0, t1n), t1n
    q = TIME_UNIT * c.noise**2 * (1 + c.alpha**2)
    m, _, c0, _ = field_free_pulse(p, m0, at, TIME_UNIT * c.rate * c.v[0] * t)
    small = jnp.abs(at) < 1
    a_s = jnp.where(small, at, 0.0)  # each branch sees finite inputs (finite gradients)
    a_l = jnp.where(small, 1.0, at)
    sh_s, sh_l = sech(a_s + c0), sech(a_l + c0)
    near = sh_s**2 * (1 + jnp.cosh(2 * c0 + a_s) * _sinhc(a_s))
    far = sh_l**2 + (jnp.tanh(a_l + c0) - 0.5 * sh_l**2 * jnp.sinh(2 * c0)) / a_l
    v = 0.5 * q * t * jnp.where(small, near, far)
    sigma = v * (jnp.eye(3, dtype=m.dtype) - jnp.outer(m, m))
    return m, -v * m, sigma


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
