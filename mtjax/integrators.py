"""Fixed-step `lax.scan` integrators: the fast path for large forward ensembles.

Classical RK4 (deterministic) and Stratonovich Heun (deterministic or thermal). States have
their 3 components on axis 0 and any batch axes after it, so one scan can advance a whole
batch laid out as (3, n). The state is renormalized to |m| = 1 after every step. Diffrax
runs are the reference in tests; benchmarks/device_throughput.py measures the speed.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

SCAN_SOLVERS = ("rk4_scan", "heun_scan")

#: Step-size rule of the fixed-step solvers: method -> (order p, C, cap). With Theta the
#: rotation bound over the run (`mtjax.physics.rotation_rate_bound` x duration) and
#: theta = Theta / n the bound per step, the global error is at most about
#: C * Theta * theta**p, and theta <= cap. C was measured against Tsit5 at rtol = atol = 1e-12
#: (x64) on the worst of: the paper device up to |u| = 6, hk = 8e3 A/m, strong bias fields
#: (2e5 A/m, precessing), xi = 0.3 with lambda = 2: RK4 C = 1e-3, Heun C = 2e-2.
STEP_RULES = {"rk4": (4, 1e-3, 0.6), "heun": (2, 2e-2, 0.3)}
#: Error targets: `required_steps` picks steps for AUTO_TOL; a run whose predicted error
#: exceeds GUARD_TOL is refused (before jit) or raises (inside jit).
AUTO_TOL = 1e-4
GUARD_TOL = 1e-3


def _method(solver: str) -> str:
    return "rk4" if solver.startswith("rk4") else "heun"


def required_steps(total_rotation, solver: str, tol: float = AUTO_TOL):
    """Fewest fixed steps whose predicted global error is <= `tol` for a run whose rotation
    bound is `total_rotation` (rad). Works on arrays and tracers (float result, not rounded)."""
    p, c, cap = STEP_RULES[_method(solver)]
    theta = jnp.asarray(total_rotation)
    return jnp.maximum(theta / cap, theta ** (1 + 1 / p) * (c / tol) ** (1 / p))


def steps_for(total_rotation, solver: str, tol: float = AUTO_TOL) -> int:
    """`required_steps` of a concrete rotation bound, as an int >= 1."""
    return max(1, int(np.ceil(float(np.max(required_steps(total_rotation, solver, tol))))))


def too_coarse(total_rotation, n_steps, solver: str):
    """True where `n_steps` fixed steps would exceed GUARD_TOL (array/tracer friendly)."""
    return required_steps(total_rotation, solver, GUARD_TOL) > n_steps


def normalize(m):
    """m / |m| over axis 0."""
    return m * jax.lax.rsqrt(jnp.sum(m * m, axis=0))


def rk4_step(f, m, t, h):
    """One classical RK4 step of dm/dt = f(t, m)."""
    k1 = f(t, m)
    k2 = f(t + h / 2, m + h / 2 * k1)
    k3 = f(t + h / 2, m + h / 2 * k2)
    k4 = f(t + h, m + h * k3)
    return m + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


def heun_step(f, g, m, t, h, dw):
    """One Stratonovich Heun step of dm = f(t, m) dt + g(t, m, dW); `dw=None`: ODE Heun."""
    f0 = f(t, m)
    if dw is None:
        return m + h / 2 * (f0 + f(t + h, m + h * f0))
    g0 = g(t, m, dw)
    pred = m + h * f0 + g0
    return m + h / 2 * (f0 + f(t + h, pred)) + (g0 + g(t + h, pred, dw)) / 2


def scan_solve(
    drift: Callable,
    noise: Callable | None,
    m0,
    t1,
    n_steps: int,
    n_save: int,
    solver: str,
    draw: Callable | None = None,
):
    """States at `n_save` evenly spaced times of [0, t1] (t1 in the drift's time unit).

    `drift(t, m)`, `noise(t, m, dw)` (the diffusion applied to an increment), and
    `draw(step) -> dW` (Brownian increments with unit variance per time unit; None: no
    noise). `n_steps` must be a multiple of `n_save - 1`. Returns (n_save, *m0.shape).
    """
    if solver not in SCAN_SOLVERS:
        raise ValueError(f"solver: unknown scan solver {solver!r}; choose from {SCAN_SOLVERS}")
    if solver == "rk4_scan" and draw is not None:
        raise ValueError("solver='rk4_scan' is deterministic: use 'heun_scan' with a key")
    if n_save < 2 or n_steps % (n_save - 1):
        raise ValueError(f"steps ({n_steps}) must be a multiple of saveat - 1 ({n_save - 1})")
    per_save = n_steps // (n_save - 1)
    h = t1 / n_steps

    def step(m, i):
        t = i * h
        if solver == "rk4_scan":
            m = rk4_step(drift, m, t, h)
        else:
            dw = None if draw is None else jnp.sqrt(h) * draw(i)
            m = heun_step(drift, noise, m, t, h, dw)
        return normalize(m), None

    def segment(m, j):
        m, _ = jax.lax.scan(step, m, j * per_save + jnp.arange(per_save))
        return m, m

    _, ms = jax.lax.scan(segment, m0, jnp.arange(n_save - 1))
    return jnp.concatenate([m0[None], ms], axis=0)
