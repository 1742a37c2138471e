"""Time integration of the (stochastic) LLGS equation for one device.

Two backends, tested against each other:

- Diffrax (`solver="tsit5"`, adaptive, default for deterministic runs; `solver="heun"`,
  fixed step, ODE or Stratonovich SDE driven by a `VirtualBrownianTree`; or any Diffrax
  solver instance). Differentiable with Diffrax's adjoints.
- `lax.scan` fast path (`solver="rk4_scan"`, classical RK4, ODE; `solver="heun_scan"`,
  Stratonovich Heun, ODE or SDE with per-step Gaussian increments). Each step is
  renormalized to |m| = 1. Forward-only ensembles; see benchmarks/device_throughput.py.

Thermal noise is on iff a PRNG `key` is passed; `params.temperature` sets its strength.
Fixed-step solvers take `steps` or `dt` (the step is t1 / steps); by default the count is
chosen from the dynamics (`mtjax.integrators.STEP_RULES`, at least 1000), and a count too
small for the drive is refused (concrete inputs) or raises inside jit, never silently wrong.
Internally time is in nanoseconds (`TIME_UNIT`); every public argument is in seconds.
"""

from __future__ import annotations

from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from mtjax.constants import TIME_UNIT
from mtjax.integrators import scan_solve, steps_for, too_coarse
from mtjax.params import DeviceParams
from mtjax.physics import (
    TorqueCoefficients,
    rotation_rate_bound,
    thermal_torque,
    torque,
    torque_coefficients,
)

ADAPTIVE_SOLVERS = ("tsit5",)
FIXED_SOLVERS = ("heun", "rk4_scan", "heun_scan")
SOLVERS = ADAPTIVE_SOLVERS + FIXED_SOLVERS
DEFAULT_STEPS = 1000
M_UP = (0.0, 0.0, 1.0)


class Trajectory(eqx.Module):
    """Magnetization `ms` (n, 3) at times `ts` (n,) in seconds."""

    ts: Float[Array, " n"]
    ms: Float[Array, "n 3"]


class ConstantDrive(eqx.Module):
    """Currents (A) through P1 and P2, constant in time."""

    currents: Float[Array, "2"]

    def __call__(self, t):
        return self.currents


Drive = Callable[[Float[Array, ""]], Float[Array, "2"]]


class CheckedDrive(eqx.Module):
    """A user drive t[s] -> (I1, I2) whose output is checked for shape and finiteness."""

    fn: Callable

    def __call__(self, t):
        c = jnp.asarray(self.fn(t), dtype=jnp.result_type(float))
        if c.shape != (2,):
            raise ValueError(f"currents: a drive must return (I1, I2), got shape {c.shape}")
        return eqx.error_if(c, ~jnp.all(jnp.isfinite(c)), "currents: the drive returned NaN/inf")


def as_drive(currents: ArrayLike | Drive) -> Drive:
    """A scalar (P1 current), a pair (P1, P2) in A, or a callable t[s] -> (2,) currents."""
    if callable(currents):
        return CheckedDrive(currents)
    c = jnp.asarray(currents, dtype=jnp.result_type(float))
    if c.shape == ():
        c = jnp.stack([c, jnp.zeros_like(c)])
    if c.shape != (2,):
        raise ValueError(
            f"currents: expected a scalar P1 current or a (P1, P2) pair, got shape {c.shape}; "
            "use jax.vmap for batches"
        )
    c = eqx.error_if(c, ~jnp.all(jnp.isfinite(c)), "currents: non-finite current (NaN or inf)")
    return ConstantDrive(c)


def _check_single(params: DeviceParams) -> None:
    if params.batch_shape != ():
        raise ValueError(
            f"params: batched DeviceParams {params.batch_shape} given to a single-device solver; "
            "map with jax.vmap (or use mtjax.ensemble)"
        )


class _Args(eqx.Module):
    params: DeviceParams
    drive: Drive
    coeffs: TorqueCoefficients | None  # precomputed when the drive is constant


def _make_args(params: DeviceParams, drive: Drive) -> _Args:
    const = isinstance(drive, ConstantDrive)
    return _Args(params, drive, torque_coefficients(params, drive.currents) if const else None)


def _coeffs(t, args: _Args) -> TorqueCoefficients:
    if args.coeffs is not None:
        return args.coeffs
    return torque_coefficients(args.params, args.drive(t * TIME_UNIT))


def drift_ns(c: TorqueCoefficients, m):
    """dm/dt in 1/ns, plus (1 - |m|^2) m / ns: zero on the sphere, it pulls the solver's
    norm drift back to |m| = 1 instead of letting it accumulate. Layout as `torque`."""
    return TIME_UNIT * torque(c, m) + (1 - jnp.sum(m * m, axis=0)) * m


def noise_ns(c: TorqueCoefficients, m, dw):
    """Thermal increment of m for a Brownian increment dw in sqrt(ns)."""
    return jnp.sqrt(TIME_UNIT) * thermal_torque(c, m, dw)


def _drift(t, m, args: _Args):
    return drift_ns(_coeffs(t, args), m)


def _noise(t, m, args: _Args, dw):
    return noise_ns(_coeffs(t, args), m, dw)


def _diffusion(t, m, args: _Args):
    """Matrix G with dm = G dW for Diffrax: `_noise` is linear in dW."""
    return jax.jacfwd(lambda dw: _noise(t, m, args, dw))(jnp.zeros_like(m))


def scan_noise_draw(key: PRNGKeyArray, dtype) -> Callable:
    """Brownian increments (unit variance) for step i: normal(fold_in(key, i), (3,)), so a
    trajectory's noise depends only on its own key, not on batching or chunking."""
    return lambda i: jax.random.normal(jax.random.fold_in(key, i), (3,), dtype)


def _n_steps(t1, steps: int | None, dt: float | None) -> int | None:
    """Fixed step count from `steps` or `dt`; None when neither is given."""
    if steps is not None and dt is not None:
        raise ValueError("give either steps or dt, not both")
    if dt is not None:
        if isinstance(t1, jax.core.Tracer):
            raise ValueError("dt needs a concrete t1 (e.g. pulse_duration under vmap): pass steps")
        if not dt > 0:
            raise ValueError(f"dt must be > 0, got {dt}")
        return max(1, round(float(t1) / dt))
    if steps is None:
        return None
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    return int(steps)


def _concrete(*trees) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(trees))


def _total_rotation(params: DeviceParams, drive: Drive, t1n, n_probe: int):
    """Rotation bound (rad) of the run: max rate bound over the drive x duration."""
    if isinstance(drive, ConstantDrive):
        rate = rotation_rate_bound(torque_coefficients(params, drive.currents))
    else:  # time-dependent drive: bound at the step start and end times
        ts = jnp.linspace(0.0, t1n * TIME_UNIT, n_probe + 1)
        rate = jnp.max(
            jax.vmap(lambda t: rotation_rate_bound(torque_coefficients(params, drive(t))))(ts)
        )
    return rate * t1n * TIME_UNIT


def _fixed_steps(params, drive, t1, t1n, solver: str, n: int | None):
    """Step count of a fixed-step run, chosen from the dynamics when not given, and a guard.

    Returns (n, coarse): `coarse` is a traced bool (or None) that is True when `n` steps
    would exceed the error guard; concrete runs are checked here and raise ValueError."""
    n_probe = DEFAULT_STEPS if n is None else n
    theta = _total_rotation(params, drive, t1n, n_probe)
    if _concrete(theta):
        if n is None:
            n = max(DEFAULT_STEPS, steps_for(theta, solver))
        elif bool(too_coarse(theta, n, solver)):
            raise ValueError(
                f"steps={n} is too coarse for this drive: the rotation bound over the run is "
                f"{float(theta):.3g} rad, which needs steps >= {steps_for(theta, solver)} "
                f"with solver={solver!r} (or use solver='tsit5')"
            )
        return n, None
    n = DEFAULT_STEPS if n is None else n
    return n, too_coarse(theta, n, solver)


def initial_state(m0: Float[ArrayLike, "3"] | None) -> Float[Array, "3"]:
    """`m0` (default +z) checked (finite, non-zero; error_if when traced) and normalized."""
    m0 = jnp.asarray(M_UP if m0 is None else m0, dtype=jnp.result_type(float))
    if m0.shape != (3,):
        raise ValueError(f"m0: expected shape (3,), got {m0.shape}")
    norm = jnp.linalg.norm(m0)
    if _concrete(m0):  # checked on the host (inside jit, jnp ops on constants are traced)
        host = np.asarray(m0)
        if not (np.all(np.isfinite(host)) and np.linalg.norm(host) > 0):
            raise ValueError(f"m0: must be a finite non-zero vector, got {host}")
    else:
        bad = ~jnp.all(jnp.isfinite(m0)) | ~(norm > 0)
        m0 = eqx.error_if(m0, bad, "m0: must be a finite non-zero vector")
    return m0 / norm


def _check_t1(t1):
    t1 = jnp.asarray(t1, dtype=jnp.result_type(float))
    if t1.shape != ():
        raise ValueError(f"t1: expected a scalar duration (s), got shape {t1.shape}")
    if _concrete(t1):
        if not (np.isfinite(float(t1)) and float(t1) > 0):
            raise ValueError(f"t1: must be a finite duration > 0 (s), got {float(t1)}")
        return t1
    return eqx.error_if(t1, ~(jnp.isfinite(t1) & (t1 > 0)), "t1: must be finite and > 0 (s)")


def _solve(
    params: DeviceParams,
    drive: Drive,
    t1,
    *,
    m0,
    save_n: int | None,
    save_ts,
    save_t0: bool,
    solver,
    steps,
    dt,
    rtol,
    atol,
    max_steps,
    key,
    adjoint,
):
    """Return (ts_internal, ms) with ms of shape (n_save, 3).

    Saves at `save_n` uniform times of [0, t1], or at `save_ts` (s; with t0 first when
    `save_t0`), or only at t1 when both are None."""
    _check_single(params)
    params = params.checked()
    m0 = initial_state(m0)
    t1 = _check_t1(t1)
    t1n = t1.astype(m0.dtype) / TIME_UNIT
    args = _make_args(params, drive)
    n = _n_steps(t1, steps, dt)
    coarse = None

    if isinstance(solver, str) and solver.endswith("_scan"):
        if solver not in SOLVERS:
            raise ValueError(f"solver: unknown {solver!r}; choose from {SOLVERS}")
        if save_ts is not None:
            raise ValueError(f"solver={solver!r} saves on a uniform grid: pass saveat as an int")
        n_save = 2 if save_n is None else save_n
        n, coarse = _fixed_steps(params, drive, t1, t1n, solver, n)
        if n % (n_save - 1):  # round up to a multiple of the save intervals
            n += (n_save - 1) - n % (n_save - 1)
        draw = None if key is None else scan_noise_draw(key, m0.dtype)
        ms = scan_solve(
            lambda t, m: _drift(t, m, args),
            lambda t, m, dw: _noise(t, m, args, dw),
            m0, t1n, n, n_save, solver, draw,
        )  # fmt: skip
        ts = jnp.linspace(0.0, t1n, n_save)
        ts, ms = (ts[-1:], ms[-1:]) if save_n is None else (ts, ms)
        return ts, _guard_steps(ms, coarse)

    if isinstance(solver, str):
        if solver not in SOLVERS:
            raise ValueError(
                f"solver: unknown {solver!r}; choose from {SOLVERS} or a Diffrax solver"
            )
        solver_obj = {"tsit5": diffrax.Tsit5, "heun": diffrax.Heun}[solver]()
    else:
        solver_obj = solver
    adaptive = (solver in ADAPTIVE_SOLVERS) if isinstance(solver, str) else n is None
    if key is not None and adaptive:
        raise ValueError(
            "thermal runs (key given) need a fixed-step solver: use 'heun' or 'heun_scan'"
        )

    if adaptive:
        controller = diffrax.PIDController(rtol=rtol, atol=atol)
        dt0 = None
    else:
        if isinstance(solver, str):  # our step rule knows Heun; other solvers: the user's n
            n, coarse = _fixed_steps(params, drive, t1, t1n, solver, n)
        elif n is None:
            n = DEFAULT_STEPS
        controller = diffrax.ConstantStepSize()
        dt0 = t1n / n
        max_steps = max(max_steps, n + 1)

    terms = diffrax.ODETerm(_drift)
    if key is not None:
        bm = diffrax.VirtualBrownianTree(0.0, t1n, tol=dt0 / 4, shape=(3,), key=key)
        terms = diffrax.MultiTerm(terms, diffrax.ControlTerm(_diffusion, bm))

    if save_ts is not None:
        saveat = diffrax.SaveAt(t0=save_t0, ts=save_ts / TIME_UNIT)
    elif save_n is not None:
        saveat = diffrax.SaveAt(ts=jnp.linspace(0.0, t1n, save_n))
    else:
        saveat = diffrax.SaveAt(t1=True)
    sol = diffrax.diffeqsolve(
        terms,
        solver_obj,
        0.0,
        t1n,
        dt0,
        m0,
        args=args,
        saveat=saveat,
        stepsize_controller=controller,
        max_steps=max_steps,
        adjoint=adjoint,
        throw=False,
    )
    ms = _finite(sol.ys)
    ms = eqx.error_if(
        ms,
        sol.result != diffrax.RESULTS.successful,
        "solver failed (e.g. max_steps reached): raise max_steps, loosen rtol/atol, "
        "or use a fixed-step solver",
    )
    # the restoring term keeps |m| near 1 for the solver; return states on the sphere
    ms = ms / jnp.linalg.norm(ms, axis=-1, keepdims=True)
    return sol.ts, _guard_steps(ms, coarse)


def _guard_steps(ms, coarse):
    if coarse is None:
        return ms
    return eqx.error_if(
        ms,
        coarse,
        "fixed-step solver: too few steps for this drive (rotation bound per step exceeds "
        "the error guard); pass more steps, steps=None (chosen from the dynamics when params "
        "and currents are concrete) or solver='tsit5'",
    )


def _saveat(saveat):
    """(save_n, save_ts, save_t0) from an int, an array of times (s) or a diffrax.SaveAt."""
    if isinstance(saveat, diffrax.SaveAt):
        sub = saveat.subs
        if (
            not isinstance(sub, diffrax.SubSaveAt)
            or saveat.dense
            or sub.steps
            or sub.fn is not diffrax.SaveAt(t1=True).subs.fn
        ):
            raise ValueError(
                "saveat: a diffrax.SaveAt may only use t0, t1 and ts (times in seconds); "
                "for every step pass an int count instead"
            )
        ts = [] if sub.ts is None else [jnp.asarray(sub.ts)]
        if sub.t1:
            ts.append(jnp.array([jnp.inf]))  # replaced by t1 in simulate
        if not ts:
            return None, None, True
        return None, jnp.concatenate(ts), sub.t0
    if isinstance(saveat, int | np.integer) and not isinstance(saveat, bool):
        if saveat < 2:
            raise ValueError(f"saveat: need at least 2 points, got {saveat}")
        return int(saveat), None, False
    ts = jnp.asarray(saveat)
    if ts.ndim != 1 or ts.shape[0] < 1 or not jnp.issubdtype(ts.dtype, jnp.number):
        raise ValueError(
            "saveat: expected a point count (int), a 1-D array of times (s) or a diffrax.SaveAt, "
            f"got {saveat!r}"
        )
    return None, ts, False


def simulate(
    params: DeviceParams,
    currents: ArrayLike | Drive,
    t1: ArrayLike,
    *,
    m0: Float[ArrayLike, "3"] | None = None,
    saveat: int | Float[ArrayLike, " n"] | diffrax.SaveAt = 101,
    solver: str | diffrax.AbstractSolver = "tsit5",
    steps: int | None = None,
    dt: float | None = None,
    rtol: float = 1e-6,
    atol: float = 1e-6,
    max_steps: int = 2**16,
    key: PRNGKeyArray | None = None,
    adjoint: diffrax.AbstractAdjoint | None = None,
) -> Trajectory:
    """Integrate one device from `m0` (default +z) over [0, t1] seconds.

    `currents`: P1 current (A), a (P1, P2) pair, or a callable t[s] -> (2,).
    `saveat`: number of evenly spaced save points, an array of times (s), or a
    `diffrax.SaveAt` using t0/t1/ts (times in seconds).
    `key`: enables the thermal field (needs a fixed-step solver). Fixed-step solvers take
    `steps` or `dt`; without either, the step count is chosen from the dynamics (at least
    1000) when params and currents are concrete, and too few steps raise an error.
    """
    drive = as_drive(currents)
    save_n, save_ts, save_t0 = _saveat(saveat)
    if save_ts is not None:
        t1_arr = jnp.asarray(t1, dtype=jnp.result_type(float))
        save_ts = jnp.where(jnp.isinf(save_ts), t1_arr, save_ts)
    elif save_n is None:  # SaveAt(t0=True) alone
        save_ts = jnp.zeros((0,), jnp.result_type(float))
    ts, ms = _solve(
        params, drive, t1, m0=m0, save_n=save_n, save_ts=save_ts, save_t0=save_t0,
        solver=solver, steps=steps, dt=dt, rtol=rtol, atol=atol, max_steps=max_steps,
        key=key, adjoint=adjoint or diffrax.RecursiveCheckpointAdjoint(),
    )  # fmt: skip
    return Trajectory(ts=ts * TIME_UNIT, ms=_finite(ms))


def pulse_response(
    params: DeviceParams,
    currents: ArrayLike | Drive,
    *,
    m0: Float[ArrayLike, "3"] | None = None,
    key: PRNGKeyArray | None = None,
    solver: str | diffrax.AbstractSolver = "tsit5",
    steps: int | None = None,
    dt: float | None = None,
    rtol: float = 1e-6,
    atol: float = 1e-6,
    max_steps: int = 4096,
    adjoint: diffrax.AbstractAdjoint | None = None,
) -> Float[Array, "3"]:
    """m at the end of one pulse of `params.pulse_duration`, from `m0` (default +z).

    `currents`: P1 current (A), a (P1, P2) pair, or a callable t[s] -> (2,); other
    arguments as `simulate`. One device; `jax.vmap` over currents and/or batched params.
    Differentiable w.r.t. the current and every params leaf (Diffrax solvers)."""
    drive = as_drive(currents)
    _, ms = _solve(
        params, drive, params.pulse_duration, m0=m0, save_n=None, save_ts=None, save_t0=False,
        solver=solver, steps=steps, dt=dt, rtol=rtol, atol=atol, max_steps=max_steps,
        key=key, adjoint=adjoint or diffrax.RecursiveCheckpointAdjoint(),
    )  # fmt: skip
    return _finite(ms[-1])


def _finite(m):
    return eqx.error_if(
        m, ~jnp.all(jnp.isfinite(m)), "non-finite magnetization: check DeviceParams and currents"
    )
