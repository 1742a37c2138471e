"""Fixed-step `lax.scan` integrators: the fast path for large forward ensembles.

Classical RK4 (deterministic) and Stratonovich Heun (deterministic or thermal). The state
is renormalized to |m| = 1 after every step. Equivalent Diffrax runs are the reference in
tests; benchmarks/device_throughput.py measures the speed difference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _rk4_step(drift, m, t, h, args):
    k1 = drift(t, m, args)
    k2 = drift(t + h / 2, m + h / 2 * k1, args)
    k3 = drift(t + h / 2, m + h / 2 * k2, args)
    k4 = drift(t + h, m + h * k3, args)
    return m + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


def _heun_step(drift, diffusion, m, t, h, dw, args):
    f0 = drift(t, m, args)
    if dw is None:
        pred = m + h * f0
        return m + h / 2 * (f0 + drift(t + h, pred, args))
    g0 = diffusion(t, m, args) @ dw
    pred = m + h * f0 + g0
    return (
        m + h / 2 * (f0 + drift(t + h, pred, args)) + (g0 + diffusion(t + h, pred, args) @ dw) / 2
    )


def scan_solve(drift, diffusion, m0, t1, n_steps: int, n_save: int, args, solver: str, key):
    """States at `n_save` evenly spaced times of [0, t1] (t1 in the drift's time unit).

    `n_steps` must be a multiple of `n_save - 1`. Thermal increments (if `key`) are drawn
    per step from `fold_in(key, step)`, so results do not depend on batching.
    """
    if solver not in ("rk4_scan", "heun_scan"):
        raise ValueError(f"solver: unknown scan solver {solver!r}")
    if solver == "rk4_scan" and key is not None:
        raise ValueError("solver='rk4_scan' is deterministic: use 'heun_scan' with a key")
    if n_save < 2 or n_steps % (n_save - 1):
        raise ValueError(f"steps ({n_steps}) must be a multiple of saveat - 1 ({n_save - 1})")
    per_save = n_steps // (n_save - 1)
    h = t1 / n_steps

    def step(carry, i):
        m = carry
        t = i * h
        if solver == "rk4_scan":
            m = _rk4_step(drift, m, t, h, args)
        else:
            dw = None
            if key is not None:
                dw = jnp.sqrt(h) * jax.random.normal(jax.random.fold_in(key, i), (3,), m.dtype)
            m = _heun_step(drift, diffusion, m, t, h, dw, args)
        return m / jnp.linalg.norm(m), None

    def segment(m, j):
        m, _ = jax.lax.scan(step, m, j * per_save + jnp.arange(per_save))
        return m, m

    _, ms = jax.lax.scan(segment, m0, jnp.arange(n_save - 1))
    return jnp.concatenate([m0[None], ms], axis=0)
