"""Time integration of the (stochastic) LLGS equation for one device.

Two backends, tested against each other:

- Diffrax (`solver="tsit5"`, adaptive, default for deterministic runs; `solver="heun"`,
  fixed step, ODE or Stratonovich SDE driven by a `VirtualBrownianTree`; or any Diffrax
  solver instance). Differentiable with Diffrax's adjoints.
- `lax.scan` fast path (`solver="rk4_scan"`, classical RK4, ODE; `solver="heun_scan"`,
  Stratonovich Heun, ODE or SDE with per-step Gaussian increments). Each step is
  renormalized to |m| = 1. Forward-only ensembles; see benchmarks/device_throughput.py.

Thermal noise is on iff a PRNG `key` is passed; `params.temperature` sets its strength.
Fixed-step solvers take `steps` (default 1000) or `dt`: the step is t1 / steps.
Internally time is in nanoseconds (`TIME_UNIT`); every public argument is in seconds.
"""

from __future__ import annotations

from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from mtjax.constants import TIME_UNIT
from mtjax.integrators import scan_solve
from mtjax.params import DeviceParams
from mtjax.physics import TorqueCoefficients, thermal_torque, torque, torque_coefficients

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


def as_drive(currents: ArrayLike | Drive) -> Drive:
    """A scalar (P1 current), a pair (P1, P2) in A, or a callable t[s] -> (2,) currents."""
    if callable(currents):
        return currents
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


def _n_steps(t1, steps: int | None, dt: float | None) -> int:
    if steps is not None and dt is not None:
        raise ValueError("give either steps or dt, not both")
    if dt is not None:
        if isinstance(t1, jax.core.Tracer):
            raise ValueError("dt needs a concrete t1 (e.g. pulse_duration under vmap): pass steps")
        if not dt > 0:
            raise ValueError(f"dt must be > 0, got {dt}")
        return max(1, round(float(t1) / dt))
    steps = DEFAULT_STEPS if steps is None else steps
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    return int(steps)


def _solve(
    params: DeviceParams,
    drive: Drive,
    t1,
    m0,
    save_n: int | None,
    save_ts,
    solver,
    steps,
    dt,
    rtol,
    atol,
    max_steps,
    key,
    adjoint,
):
    """Return (ts_internal, ms) with ms of shape (n_save, 3)."""
    _check_single(params)
    m0 = jnp.asarray(M_UP if m0 is None else m0, dtype=jnp.result_type(float))
    if m0.shape != (3,):
        raise ValueError(f"m0: expected shape (3,), got {m0.shape}")
    m0 = m0 / jnp.linalg.norm(m0)
    t1n = jnp.asarray(t1, dtype=m0.dtype) / TIME_UNIT
    args = _make_args(params, drive)

    if isinstance(solver, str) and solver.endswith("_scan"):
        n = _n_steps(t1, steps, dt)
        if save_ts is not None:
            raise ValueError(f"solver={solver!r} saves on a uniform grid: pass saveat as an int")
        n_save = 2 if save_n is None else save_n
        draw = None if key is None else scan_noise_draw(key, m0.dtype)
        ms = scan_solve(
            lambda t, m: _drift(t, m, args),
            lambda t, m, dw: _noise(t, m, args, dw),
            m0, t1n, n, n_save, solver, draw,
        )  # fmt: skip
        ts = jnp.linspace(0.0, t1n, n_save)
        return (ts[-1:], ms[-1:]) if save_n is None else (ts, ms)

    if isinstance(solver, str):
        if solver not in SOLVERS:
            raise ValueError(
                f"solver: unknown {solver!r}; choose from {SOLVERS} or a Diffrax solver"
            )
        solver_obj = {"tsit5": diffrax.Tsit5, "heun": diffrax.Heun}[solver]()
    else:
        solver_obj = solver
    adaptive = (
        isinstance(solver, str)
        and solver in ADAPTIVE_SOLVERS
        or (not isinstance(solver, str) and steps is None and dt is None)
    )
    if key is not None and adaptive:
        raise ValueError(
            "thermal runs (key given) need a fixed-step solver: use 'heun' or 'heun_scan'"
        )

    if adaptive:
        controller = diffrax.PIDController(rtol=rtol, atol=atol)
        dt0 = None
    else:
        n = _n_steps(t1, steps, dt)
        controller = diffrax.ConstantStepSize()
        dt0 = t1n / n
        max_steps = max(max_steps, n + 1)

    terms = diffrax.ODETerm(_drift)
    if key is not None:
        bm = diffrax.VirtualBrownianTree(0.0, t1n, tol=dt0 / 4, shape=(3,), key=key)
        terms = diffrax.MultiTerm(terms, diffrax.ControlTerm(_diffusion, bm))

    if save_ts is not None:
        saveat = diffrax.SaveAt(ts=save_ts / TIME_UNIT)
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
    )
    return sol.ts, sol.ys


def simulate(
    params: DeviceParams,
    currents: ArrayLike | Drive,
    t1: ArrayLike,
    *,
    m0: Float[ArrayLike, "3"] | None = None,
    saveat: int | Float[ArrayLike, " n"] = 101,
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
    `saveat`: number of evenly spaced save points, or an array of times (s).
    `key`: enables the thermal field (needs a fixed-step solver).
    """
    drive = as_drive(currents)
    if isinstance(saveat, int):
        if saveat < 2:
            raise ValueError(f"saveat: need at least 2 points, got {saveat}")
        save_n, save_ts = saveat, None
    else:
        save_n, save_ts = None, jnp.asarray(saveat)
    ts, ms = _solve(
        params,
        drive,
        t1,
        m0,
        save_n,
        save_ts,
        solver,
        steps,
        dt,
        rtol,
        atol,
        max_steps,
        key,
        adjoint or diffrax.RecursiveCheckpointAdjoint(),
    )
    return Trajectory(ts=ts * TIME_UNIT, ms=_finite(ms))


def pulse_response(
    params: DeviceParams,
    current: ArrayLike | Drive,
    m0: Float[ArrayLike, "3"] | None = None,
    *,
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

    One device; `jax.vmap` over currents and/or batched params. Differentiable w.r.t. the
    current and every params leaf (Diffrax solvers)."""
    drive = as_drive(current)
    _, ms = _solve(
        params,
        drive,
        params.pulse_duration,
        m0,
        None,
        None,
        solver,
        steps,
        dt,
        rtol,
        atol,
        max_steps,
        key,
        adjoint or diffrax.RecursiveCheckpointAdjoint(),
    )
    return _finite(ms[-1])


def _finite(m):
    return eqx.error_if(
        m, ~jnp.all(jnp.isfinite(m)), "non-finite magnetization: check DeviceParams and currents"
    )
