"""`MTJActivation`: a layer of dual-polarizer MTJ neurons used as a neural-network activation.

Signal chain, per neuron and per evaluation:

1. Driver: the pre-activation z (dimensionless) is clipped to [-z_max, z_max] and converted
   into a P1 current I = z * input_scale (A). The driver saturates at
   I_max = z_max * input_scale; beyond it the output is flat and the gradient w.r.t. z is 0.
   `input_scale` defaults to `current_scale` of the (nominal / mean) device, so the nominal
   device sees u = z and device-to-device variation shows up as a gain u/z != 1.
2. Device: one pulse from m = +z gives the magnetization m (mode-dependent model below).
3. Read-out: both junctions are read through their TMR conductance
   G_k = G0_k (1 + TMR_k/(2+TMR_k) m.p_k) and converted back with
   `mtjax.readout.projection_from_conductance`. The activation is the P1 read-out m.p1
   (normalized so that the ideal paper device gives exactly tanh(z)); the P2 read-out
   m.p2 (~ sech(z) cos(psi)) is the device's own derivative signal.

Read noise: additive Gaussian noise on each read conductance with standard deviation
`read_noise * G0_k * TMR_k/(2+TMR_k)`, i.e. `read_noise` is the noise standard deviation in
units of the normalized signal m.p_k, whose range is [-1, 1] (read_noise = 0.01: the
activation fluctuates by 0.01 rms). It is drawn per call from `key`, independently for both
junctions and every neuron, and also enters the "mz"/"mz2" derivatives.

Modes (same API, different fidelity and speed):

- "ode": `pulse_response` for every neuron and every call, vmapped (default `rk4_scan`,
  steps chosen from the devices' dynamics, see `pulse_steps`; `chunk` > 0 solves that many
  neurons at a time with `lax.map`).
- "sde": the same with the thermal field (`heun_scan`, >= 200 steps; needs `key`).
- "table": m.p1(z), m.p2(z) precomputed per device by the "ode" solver on a uniform grid
  over [-z_max, z_max] and evaluated by cubic Hermite interpolation (129 nodes; slopes from
  4th-order differences; max error vs "ode" ~1.5e-6). `rebuild()` recomputes the tables
  from the current params (differentiably).
- "thermal": "table" plus thermal noise at table speed: the mean shift, standard deviations
  and correlation of both read-outs after one pulse at the device's temperature
  (linear-noise moment approximation, `mtjax.moments`; `build_noise_table`) are tabulated on
  the same grid, and each evaluation draws one correlated Gaussian sample per neuron from
  `key`. Equals "table" exactly at T = 0 (a `rebuild()`, e.g. in co-design, takes the
  noise-free curves from the same moment integration: equal to float round-off); valid
  while the thermal spread is small (README). `field_free=True` (devices with zero
  effective field and lambda1 = 1) takes the statistics from their closed form
  (`mtjax.moments.field_free_moments`) instead of RK4: exact, and far cheaper to rebuild
  and differentiate (co-design uses it whenever the design allows; "table" too).
- "analytic": closed form m.p1 = tanh(u), m.p2 = sech(u) cos(psi) with the per-device
  (u, psi) of `mtjax.pulse_angles` (per-device gain u/z = input_scale / I_s(device) and
  precession psi/u; no offset: the closed form assumes zero effective field).
- "ideal": software tanh(z) and sech(z), ignoring params.

Derivative (gradient of the activation w.r.t. z):

- "mz2": m.p2**2 of the same evaluation (incl. its read noise); ~ sech^2(u) = d tanh/du.
- "mz": m.p2 (~ sech(u)), the literal read-out of the paper.
- "autodiff": true derivative of the simulated forward curve.

"mz2"/"mz" use the raw device signal, as hardware would: no factor du/dz = input_scale /
I_s(device) is applied, so for a device whose gain differs from 1 they are d tanh/du, not
dy/dz. Gradients w.r.t. device parameters (and `input_scale`) always flow through the
physics by autodiff when `train_device=True`; with the default `train_device=False` every
device-side array is wrapped in `jax.lax.stop_gradient`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from mtjax.analytic import (
    closed_form_violations,
    current_scale,
    field_free_violations,
    not_field_free,
    pulse_angles,
)
from mtjax.constants import TIME_UNIT
from mtjax.draws import normals
from mtjax.integrators import required_steps, steps_for, too_coarse
from mtjax.moments import field_free_moments, moments_scan
from mtjax.params import DeviceParams, over_devices
from mtjax.physics import (
    rotation_rate_bound,
    sech,
    spin_rotation_bound,
    torque_coefficients,
    unit,
)
from mtjax.readout import mean_conductance, projection_from_conductance
from mtjax.solve import M_UP, SOLVERS, pulse_response

MODES = ("ode", "sde", "table", "thermal", "analytic", "ideal")
#: Modes whose evaluation is stochastic through the device (need a key at T > 0).
THERMAL_MODES = ("sde", "thermal")
DERIVATIVES = ("mz2", "mz", "autodiff")
#: Fewest pulse steps of the "ode"/"table" (rk4_scan) and "sde" (heun_scan) modes. The
#: count actually used is chosen at construction from the dynamics of every device over the
#: whole input range (`mtjax.integrators.STEP_RULES`, error target 1e-4; e.g. 17 RK4 steps
#: for the paper device at z_max = 6); traced params keep these and are guarded instead.
DEFAULT_ODE_STEPS = 10
DEFAULT_SDE_STEPS = 200
DEFAULT_N_GRID = 129
#: Largest node spacing in s = asinh(z / z0) of `TableGrid.for_devices`.
MAX_DS = 0.06
#: Resolution test of every table build: the largest |4th difference| d4 of the node values
#: (both read-outs, in s). The Hermite error at the interval midpoints was 0.004-0.08 x d4
#: on under- and well-resolved devices (paper, hk up to 5e4 A/m, bias, field-like torque,
#: 17-129 nodes; `tests/test_nn.py`), so d4 <= 1e-2 keeps a table within ~1e-3 of the ODE.
#: Above it `MTJActivation` doubles its nodes (up to MAX_N_GRID), a given grid raises
#: ValueError, and a traced build (co-design) raises at run time.
TABLE_D4_MAX = 1e-2
MAX_N_GRID = 4097
DEFAULT_Z_MAX = 6.0
#: Neurons per `lax.map` chunk in "ode"/"sde"; 0 = one vmap over all neurons (fastest on
#: CPU with the current solver; a chunk bounds memory, e.g. for "autodiff" through "sde").
DEFAULT_CHUNK = 0
#: Largest read-out std the "thermal" mode accepts: the Gaussian approximation passes the SDE
#: check at 15 nm, 300 K (table std 0.235) and fails at 10 nm (0.352); README.
THERMAL_STD_LIMIT = 0.25


def own_kernel(fn, *args):
    """`fn(*args)`, on XLA CPU computed by a kernel of its own instead of inside its consumers.

    XLA CPU fuses elementwise producers into their consumers; a consumer that gathers (a
    table lookup) is a scalar loop, so fused math (log, sqrt, polynomials) runs there
    unvectorized, once per consumer. A conditional whose predicate the compiler cannot see
    is a fusion boundary (both branches are `fn`, so the value never depends on it). For
    the thermal draws and the table coordinates: 784-256-10 training step with thermal
    neurons 1.79x -> 1.34x tanh, table 1.19x -> 1.15x (one core, same-run A/B). Other
    platforms (GPU gathers are cheap) compute `fn(*args)` as it is."""

    def cpu(*a):
        opaque = jax.lax.optimization_barrier(jnp.bool_(True))
        return jax.lax.cond(opaque, fn, fn, *a)

    return jax.lax.platform_dependent(*args, cpu=cpu, default=fn)


class TableGrid(eqx.Module):
    """Nodes of the response tables: z_i = z0 sinh(s_i) with s uniform on [-S, S],
    S = asinh(z_max / z0).

    The spacing grows with |z| (about z0 ds near 0, |z| ds far out), so one grid resolves a
    steep device (gain u/z = G, features at |z| ~ 1/G) and the slow tails of all devices:
    `for_devices` takes z0 = min(1, 1/G_max) and enough nodes for ds <= MAX_DS."""

    z_max: float = eqx.field(static=True)
    n_grid: int = eqx.field(static=True)
    z0: float = eqx.field(static=True)

    @classmethod
    def for_devices(
        cls, params: DeviceParams, input_scale, z_max: float, n_grid: int | None = None
    ) -> TableGrid:
        """Grid for every device of `params` (traced params: z0 = 1, n_grid default 129)."""
        g = _max_gain(params, input_scale)
        z0 = 1.0 if g is None else min(1.0, 1.0 / max(g, 1e-12))
        if n_grid is None:
            s_max = math.asinh(z_max / z0)
            n_grid = max(DEFAULT_N_GRID, math.ceil(2 * s_max / MAX_DS) + 1)
        return cls(float(z_max), int(n_grid), float(z0))

    @property
    def s_max(self) -> float:
        return math.asinh(self.z_max / self.z0)

    @property
    def ds(self) -> float:
        return 2 * self.s_max / (self.n_grid - 1)

    @property
    def reach(self) -> float:
        """Largest |z| evaluated while building: two nodes beyond z_max."""
        return self.z0 * math.sinh(self.s_max + 2 * self.ds)

    def nodes(self) -> Float[Array, " n_grid_plus_4"]:
        """z of the n_grid nodes plus two extra on each side (for the slopes)."""
        s = jnp.linspace(
            -self.s_max - 2 * self.ds, self.s_max + 2 * self.ds, self.n_grid + 4,
            dtype=jnp.result_type(float),
        )  # fmt: skip
        return self.z0 * jnp.sinh(s)

    def locate(self, z: Array) -> tuple[Array, Array]:
        """Interval index and local coordinate t in [0, 1] of each z (|z| <= z_max)."""
        return own_kernel(self._locate, z)

    def _locate(self, z: Array) -> tuple[Array, Array]:
        a = jnp.abs(z) / self.z0  # asinh by its log form: cheaper than jnp.arcsinh on CPU
        s = jnp.where(z < 0, -1.0, 1.0) * jnp.log(a + jnp.sqrt(1.0 + a * a))
        pos = (s + self.s_max) / self.ds
        i = jnp.clip(jnp.floor(pos), 0, self.n_grid - 2).astype(jnp.int32)
        return i, pos - i


def _max_gain(params: DeviceParams, input_scale) -> float | None:
    """Largest spin-torque rotation per pulse per unit z over the devices (None if traced)."""

    def gain(p):
        c = torque_coefficients(p, jnp.stack([input_scale, jnp.zeros_like(input_scale)]))
        return spin_rotation_bound(c) * p.pulse_duration

    g = jnp.max(over_devices(gain, params))
    return None if isinstance(g, jax.core.Tracer) else float(g)


def hermite_coefficients(y: Array) -> Array:
    """Cubic Hermite coefficients (c0..c3 in the local t) from values at the nodes of a
    `TableGrid` plus two extra on each side: `y` (n_grid + 4, k) -> (n_grid - 1, k, 4).
    Node slopes are 4th-order central differences in s."""
    d = (y[:-4] - 8 * y[1:-3] + 8 * y[3:-1] - y[4:]) / 12  # ds * dy/ds at the nodes
    y = y[2:-2]
    y0, y1, d0, d1 = y[:-1], y[1:], d[:-1], d[1:]
    return jnp.stack([y0, d0, 3 * (y1 - y0) - 2 * d0 - d1, 2 * (y0 - y1) + d0 + d1], axis=-1)


def hermite_curves(
    coef: Array, grid: TableGrid, z: Array, curves: Sequence[int] | None = None, where=None
) -> tuple[Array, ...]:
    """Tabulated curves at z, one array of z's shape per curve: `coef` (n_int, k, 4) for a
    shared device, or (n, n_int, k, 4) with z of shape (n,) for per-neuron devices;
    `curves` picks some of the k (default all); `where`: `grid.locate(z)` if already known."""
    i, t = grid.locate(z) if where is None else where
    if coef.ndim == 4:  # per-neuron devices: flat index into (n * n_int) entries
        i = jnp.arange(coef.shape[0]) * coef.shape[1] + i
        coef = coef.reshape(-1, *coef.shape[2:])
    if curves is not None:
        coef = coef[:, tuple(curves), :]
    return _cubic_curves(coef, i, t)


@jax.custom_jvp
def _cubic_curves(coef: Array, i: Array, t: Array) -> tuple[Array, ...]:
    """c0 + c1 t + c2 t^2 + c3 t^3 of each curve of `coef` (n_int, k, 4) on interval i.

    Each coefficient is gathered as a scalar: on XLA CPU a gather of whole rows (k x 4) is
    a loop of its own, while scalar gathers fuse into the evaluation (784-256-10 training
    step: thermal 5-7 % faster, table ~2 %; stacking the curves would cost a copy as large
    as the gathers, so they stay apart). When `coef` itself is differentiated (live
    co-design), value and tangent gather rows: there XLA left the scalar gathers unfused
    (that step was ~12 % slower), and the gradient is one scatter of rows."""
    out = []
    for k in range(coef.shape[1]):
        c0, c1, c2, c3 = (coef[:, k, j][i] for j in range(4))
        out.append(c0 + t * (c1 + t * (c2 + t * c3)))
    return tuple(out)


def _rows_cubic(coef: Array, i: Array, t: Array) -> Array:
    """The curves of `_cubic_curves` stacked on a last axis, by one gather of rows."""
    c, t = coef[i], t[..., None]
    return c[..., 0] + t * (c[..., 1] + t * (c[..., 2] + t * c[..., 3]))


def _cubic_curves_jvp(primals, tangents):
    coef, i, t = primals
    d_coef, _, d_t = tangents
    if isinstance(d_coef, SymbolicZero):
        out = _cubic_curves(coef, i, t)
        d_out = [jnp.zeros_like(y) for y in out]
    else:  # the table is differentiated: rows (the scalar gathers would not fuse here)
        y = _rows_cubic(coef, i, t)
        d_y = _rows_cubic(d_coef, i, t)
        out = tuple(jnp.moveaxis(y, -1, 0))
        d_out = list(jnp.moveaxis(d_y, -1, 0))
    if not isinstance(d_t, SymbolicZero):
        slope = jnp.stack([coef[..., 1], 2 * coef[..., 2], 3 * coef[..., 3]], -1)
        slope = jnp.concatenate([slope, jnp.zeros_like(slope[..., :1])], -1)
        d_out = [d + s * d_t for d, s in zip(d_out, _cubic_curves(slope, i, t), strict=True)]
    return out, tuple(d_out)


_cubic_curves.defjvp(_cubic_curves_jvp, symbolic_zeros=True)


def hermite_eval(coef: Array, grid: TableGrid, z: Array) -> Array:
    """Evaluate tabulated curves at z: `coef` (n_int, k, 4) for a shared device, or
    (n, n_int, k, 4) with z of shape (n,) for per-neuron devices. Returns (*z.shape, k)."""
    return jnp.stack(hermite_curves(coef, grid, z), axis=-1)


class ResponseTable(eqx.Module):
    """Piecewise-cubic response curves of one device or a batch.

    `coef[..., i, k, :]` holds the cubic coefficients (c0, c1, c2, c3) of curve k on interval
    i of `grid`, in the local coordinate t in [0, 1]: value = c0 + c1 t + c2 t^2 + c3 t^3.
    Curves: 0 m.p1, 1 m.p2 (noise-free); thermal tables add the sampling curves of
    (m.p1, m.p2) = mean + L e, e ~ N(0, I_2) (`build_noise_table`): 2, 3 the means, 4 the
    std of m.p1 (L11), 5 and 6 the Cholesky factors L21 = rho s2, L22 = sqrt(1 - rho^2) s2
    (s2: std of m.p2, rho: their correlation)."""

    coef: Float[Array, "*batch n_interval k 4"]
    grid: TableGrid

    @property
    def thermal(self) -> bool:
        return self.coef.shape[-2] == 7


def _reset_states(params: DeviceParams, m0, mode: str):
    """(params, m0): m0 as unit vectors, (3,) shared or (n, 3) with params broadcast to n."""
    if m0 is None:
        m0 = jnp.asarray(M_UP, dtype=jnp.result_type(float))
        return params, (
            m0 if params.batch_shape == () else jnp.broadcast_to(m0, (*params.batch_shape, 3))
        )
    m0 = jnp.asarray(m0, dtype=jnp.result_type(float))
    if m0.ndim not in (1, 2) or m0.shape[-1] != 3:
        raise ValueError(f"m0: expected shape (3,) or (n, 3), got {m0.shape}")
    traced = isinstance(m0, jax.core.Tracer)
    if mode in ("analytic", "ideal") and (traced or not np.allclose(np.asarray(m0), M_UP)):
        raise ValueError(f"m0: mode={mode!r} assumes the reset state +z")
    norm = jnp.linalg.norm(m0, axis=-1, keepdims=True)
    if not traced:  # on the host: inside jit, jnp ops on constants are traced
        host = np.asarray(m0)
        if not (np.all(np.isfinite(host)) and np.all(np.linalg.norm(host, axis=-1) > 0)):
            raise ValueError("m0: must hold finite non-zero vectors")
    m0 = m0 / norm
    if m0.ndim == 2:
        n = m0.shape[0]
        if params.batch_shape == ():
            params = jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), params)
        elif params.batch_shape != (n,):
            raise ValueError(f"m0: {n} reset states for a batch of {params.batch_shape} devices")
    elif params.batch_shape:
        m0 = jnp.broadcast_to(m0, (*params.batch_shape, 3))
    return params, m0


def _check_mode_args(mode, derivative, solver, steps, n_grid, z_max, read_noise):
    if mode not in MODES:
        raise ValueError(f"mode: unknown {mode!r}; choose from {MODES}")
    if derivative not in DERIVATIVES:
        raise ValueError(f"derivative: unknown {derivative!r}; choose from {DERIVATIVES}")
    if mode == "sde" and solver not in ("heun", "heun_scan"):
        raise ValueError(f"solver: mode='sde' needs 'heun' or 'heun_scan', got {solver!r}")
    if solver not in SOLVERS:
        raise ValueError(f"solver: unknown {solver!r}; choose from {SOLVERS}")
    if steps is not None and (int(steps) != steps or steps < 1):
        raise ValueError(f"steps: must be a positive integer, got {steps!r}")
    if n_grid is not None and (int(n_grid) != n_grid or n_grid < 5):
        raise ValueError(f"n_grid: must be an integer >= 5, got {n_grid!r}")
    if not (np.isfinite(z_max) and z_max > 0):
        raise ValueError(f"z_max: must be finite and > 0, got {z_max!r}")
    if not (np.isfinite(read_noise) and read_noise >= 0):
        raise ValueError(f"read_noise: must be finite and >= 0, got {read_noise!r}")


def rotation_per_pulse(params: DeviceParams, max_current) -> Float[Array, ""]:
    """Largest rotation bound (rad per pulse) over the devices of `params` for pulses of
    |I| <= `max_current` (A): what the step rule (`mtjax.integrators.required_steps`) reads."""

    def theta(p):
        c = torque_coefficients(p, jnp.stack([max_current, jnp.zeros_like(max_current)]))
        return rotation_rate_bound(c) * p.pulse_duration

    return jnp.max(over_devices(theta, params))


def pulse_steps(
    params: DeviceParams, max_current, solver: str, steps: int | None, floor: int
) -> int:
    """Fixed steps for pulses of |I| <= `max_current` (A) on every device of `params`.

    `steps=None`: chosen from the dynamics (at least `floor`). A given count that is too
    small for some device raises ValueError. Traced params: `steps` or `floor`, guarded at
    run time by `pulse_response`."""
    if solver == "tsit5":
        return floor if steps is None else int(steps)
    th = rotation_per_pulse(params, max_current)
    if isinstance(th, jax.core.Tracer):
        return floor if steps is None else int(steps)
    if steps is None:
        return max(floor, steps_for(th, solver))
    if bool(too_coarse(th, steps, solver)):
        raise ValueError(
            f"steps={steps} is too coarse for these devices at the driver's maximum current "
            f"{float(max_current):.3g} A (rotation bound {float(th):.3g} rad per pulse): "
            f"use steps >= {steps_for(th, solver)} or leave steps=None"
        )
    return int(steps)


def _pulse(params: DeviceParams, current, key, solver: str, steps: int, m0=None):
    """m.p1, m.p2 after one pulse of one device from `m0` (default +z)."""
    m = pulse_response(
        params, current, m0=m0, key=key, solver=solver,
        steps=None if solver == "tsit5" else steps,
    )  # fmt: skip
    return jnp.stack([jnp.dot(m, unit(params.p1)), jnp.dot(m, unit(params.p2))])


def build_table(
    params: DeviceParams,
    input_scale: Float[ArrayLike, ""],
    z_max: float = DEFAULT_Z_MAX,
    n_grid: int | None = None,
    *,
    solver: str = "rk4_scan",
    steps: int | None = None,
    grid: TableGrid | None = None,
    m0: Float[ArrayLike, "*batch 3"] | None = None,
) -> ResponseTable:
    """Tabulate m.p1(z), m.p2(z) of every device on a `TableGrid` over [-z_max, z_max].

    Pure and differentiable w.r.t. `params` and `input_scale` (call it inside a loss for
    co-design). `grid` (default `TableGrid.for_devices`), `steps`: see `pulse_steps`.
    `m0`: state each pulse starts from (default +z), one per device or shared."""
    input_scale = jnp.asarray(input_scale, dtype=jnp.result_type(float))
    if grid is None:
        grid = TableGrid.for_devices(params, input_scale, float(z_max), n_grid)
    steps = pulse_steps(params, grid.reach * input_scale, solver, steps, DEFAULT_ODE_STEPS)
    m0 = jnp.broadcast_to(jnp.asarray(M_UP if m0 is None else m0), (*params.batch_shape, 3))
    table, d4 = _build_table(params, input_scale, grid, solver, steps, m0)
    return _checked_resolution(table, d4)


def resolved_table(
    params: DeviceParams,
    input_scale,
    grid: TableGrid,
    solver: str,
    steps: int,
    m0,
    *,
    refine: bool = True,
) -> ResponseTable:
    """`build_table` on `grid`, its nodes doubled (2n - 1) until the resolution test passes
    (`TABLE_D4_MAX`); ValueError beyond MAX_N_GRID nodes (or at once without `refine`).
    Concrete params only;
    `input_scale` may hold one value per device."""
    m0 = jnp.broadcast_to(jnp.asarray(M_UP if m0 is None else m0), (*params.batch_shape, 3))
    input_scale = jnp.asarray(input_scale, dtype=jnp.result_type(float))
    while True:
        table, d4 = _build_table(params, input_scale, grid, solver, steps, m0)
        if not refine or float(d4) <= TABLE_D4_MAX or 2 * grid.n_grid - 1 > MAX_N_GRID:
            return _checked_resolution(table, d4)
        grid = TableGrid(grid.z_max, 2 * grid.n_grid - 1, grid.z0)


def _checked_resolution(table: ResponseTable, d4) -> ResponseTable:
    n = table.grid.n_grid
    why = (
        f"the {n}-node response table does not resolve these devices (largest 4th difference"
        f" of the node values {{}} > {TABLE_D4_MAX:g}: the response varies faster in z than"
        " the grid, e.g. strong anisotropy/bias fields with long pulses, or jumps at a"
        " switching threshold)"
    )
    if isinstance(d4, jax.core.Tracer):
        coef = eqx.error_if(table.coef, d4 > TABLE_D4_MAX, why.format("above the limit"))
        return ResponseTable(coef, table.grid)
    if float(d4) > TABLE_D4_MAX:
        raise ValueError(
            why.format(f"{float(d4):.3g}") + "; use more nodes (n_grid), or "
            "MTJActivation(n_grid=None), which refines its grid until the test passes"
            + (f" (here beyond MAX_N_GRID = {MAX_N_GRID})" if n * 2 - 1 > MAX_N_GRID else "")
        )
    return table


def fourth_difference(y: Array) -> Array:
    """Central 4th differences along the first axis (n + 4, ...) -> (n, ...)."""
    return y[:-4] - 4 * y[1:-3] + 6 * y[2:-2] - 4 * y[3:-1] + y[4:]


@eqx.filter_jit
def _build_table(params, input_scale, grid: TableGrid, solver, steps, m0):
    """(table, largest |4th difference| of its node values over devices and read-outs)."""
    zs = grid.nodes()

    def one_device(p, m, scale):
        y = jax.vmap(lambda z: _pulse(p, z * scale, None, solver, steps, m))(zs)
        return hermite_coefficients(y), jnp.max(jnp.abs(fourth_difference(y)))

    scales = jnp.broadcast_to(input_scale, params.batch_shape)  # one, or one per device
    coef, d4 = over_devices(one_device, params, m0, scales)
    return ResponseTable(coef=coef, grid=grid), jnp.max(d4)


def build_noise_table(
    params: DeviceParams,
    input_scale: Float[ArrayLike, ""],
    grid: TableGrid,
    *,
    steps: int,
    m0: Float[ArrayLike, "*batch 3"] | None = None,
) -> Float[Array, "*batch n_interval 5 4"]:
    """Thermal statistics of the two read-outs on `grid` (moment approximation,
    `mtjax.moments`): cubic coefficients of the curves (mean shift of m.p1, of m.p2, std of
    m.p1, std of m.p2, their correlation), layout as `ResponseTable.coef`. The variances
    include the sphere's curvature term 1/2 (p.m)(q.m) tr(Sigma^2), the leading
    contribution where the first-order one vanishes (m.p2 near z = 0). Exactly zero at
    T = 0. Differentiable w.r.t. params and input_scale."""
    input_scale = jnp.asarray(input_scale, dtype=jnp.result_type(float))
    m0 = jnp.broadcast_to(jnp.asarray(M_UP if m0 is None else m0), (*params.batch_shape, 3))
    return hermite_coefficients_over(_noise_nodes(params, input_scale, grid, int(steps), m0))


def hermite_coefficients_over(y: Array) -> Array:
    """`hermite_coefficients` of node values `y` (*batch, n_grid + 4, k)."""
    flat = y.reshape(-1, *y.shape[-2:])
    return jax.vmap(hermite_coefficients)(flat).reshape(*y.shape[:-2], -1, y.shape[-1], 4)


def sampling_curves(stats: Array) -> Array:
    """Node values of the thermal sampling curves (mean shift 1, 2, L11, L21, L22) from
    those of `build_noise_table`'s statistics (d1, d2, s1, s2, rho); last axis 5."""
    d1, d2, s1, s2, rho = jnp.moveaxis(stats, -1, 0)
    rho = jnp.clip(rho, -1.0, 1.0)
    return jnp.stack([d1, d2, s1, rho * s2, _safe_sqrt(1.0 - rho * rho) * s2], axis=-1)


def _safe_sqrt(x):
    pos = x > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), 0.0)


def _noise_nodes(params, input_scale, grid: TableGrid, steps, m0):
    """(d1, d2, s1, s2, rho) at the nodes of `grid` plus two on each side, per device."""
    return _moment_nodes(params, input_scale, grid, steps, m0)[..., 2:]


@jax.custom_jvp
def _held(leaves):
    """Identity on the field leaves of a field-free build; differentiating through it raises
    (the closed form has no derivative with respect to them)."""
    return leaves


def _held_jvp(primals, tangents):
    from jax.custom_derivatives import SymbolicZero

    if not all(isinstance(t, SymbolicZero) for t in jax.tree.leaves(tangents[0])):
        raise ValueError(
            "field_free=True: the closed-form tables (response, energy) have no derivative with "
            "respect to hk, demag, h_bias or lambda1/lambda2; build with field_free=False to "
            "differentiate with respect to them"
        )
    return primals[0], tangents[0]


_held.defjvp(_held_jvp, symbolic_zeros=True)


def held_field_free(params: DeviceParams, with_lambda2: bool = False) -> DeviceParams:
    """`params` whose field leaves (hk, demag, h_bias, lambda1, and lambda2 if asked) raise
    ValueError when differentiated: the field-free closed forms have no derivative there."""
    names = ("hk", "demag", "h_bias", "lambda1") + (("lambda2",) if with_lambda2 else ())
    held = _held(tuple(getattr(params, n) for n in names))
    return params.replace(**dict(zip(names, held, strict=True)))


@eqx.filter_jit
def _moment_nodes(params, input_scale, grid: TableGrid, steps, m0, field_free: bool = False):
    """(m.p1, m.p2 of the noise-free pulse, d1, d2, s1, s2, rho) at the nodes of `grid` plus
    two on each side, per device: one moment integration gives the response and its noise
    (`field_free`: the closed form instead of `steps` RK4 steps; devices that are not
    field-free, or reset along P1, raise).

    The inputs pass an optimization barrier: when the device is a compile-time constant (a
    model closed over by `jax.jit`), XLA's constant folding otherwise turned the gradient
    of these statistics w.r.t. diameter and thickness into NaN (tested)."""
    if field_free:
        params = held_field_free(params)
    params, input_scale, m0 = jax.lax.optimization_barrier((params, input_scale, m0))
    zs = grid.nodes()

    def one_device(p, m_start):
        t1n = p.pulse_duration / TIME_UNIT
        pol = jnp.stack([unit(p.p1), unit(p.p2)])  # (2, 3)

        def one_node(z):
            c = torque_coefficients(p, jnp.stack([z * input_scale, jnp.zeros_like(z)]))
            if field_free:
                m, delta, sigma = field_free_moments(c, m_start, t1n)
            else:
                m, delta, sigma = moments_scan(c, m_start, t1n, steps)
            pm = pol @ m
            cov = pol @ sigma @ pol.T + 0.5 * jnp.outer(pm, pm) * jnp.sum(sigma * sigma)
            s1, s2 = _safe_sqrt(cov[0, 0]), _safe_sqrt(cov[1, 1])
            den = s1 * s2
            rho = jnp.where(den > 0, cov[0, 1] / jnp.where(den > 0, den, 1.0), 0.0)
            d1, d2 = pol @ delta
            return jnp.stack([pm[0], pm[1], d1, d2, s1, s2, rho])

        if field_free:  # no time steps; the closed form's own conditions instead
            along_p1 = jnp.abs(m_start @ pol[0]) > 1 - 1e-6
            nodes = jax.vmap(one_node)(zs)  # (finite for any finite drive; NaN params not)
            return nodes, not_field_free(p) | along_p1 | ~jnp.all(jnp.isfinite(nodes))
        # the run-time step guard of `pulse_response`, at the largest drive of the grid
        c_max = torque_coefficients(p, jnp.stack([zs[-1] * input_scale, jnp.zeros_like(t1n)]))
        coarse = too_coarse(rotation_rate_bound(c_max) * p.pulse_duration, steps, "rk4_scan")
        return jax.vmap(one_node)(zs), coarse

    out, bad = over_devices(one_device, params, m0)
    if field_free:
        msg = (
            "response tables (field_free=True): a device has hk, demag or h_bias != 0, "
            "lambda1 != 1, or a reset state along P1, or non-finite statistics; the closed "
            "form does not describe it (field_free=False)"
        )
    else:
        msg = (
            f"thermal tables: steps={steps} too coarse for these devices at the driver's "
            "maximum current (rotation bound per step above the error guard)"
        )
    return eqx.error_if(out, jnp.any(bad), msg)


class _Config(eqx.Module):
    """Static settings of one evaluation (hashable; passed as a non-differentiable arg)."""

    mode: str = eqx.field(static=True)
    derivative: str = eqx.field(static=True)
    z_max: float = eqx.field(static=True)
    read_noise: float = eqx.field(static=True)
    solver: str = eqx.field(static=True)
    steps: int = eqx.field(static=True)
    chunk: int = eqx.field(static=True)


def _device_projections(cfg: _Config, dev, z: Array, sde_key, with_p2: bool):
    """Noise-free m.p1, m.p2 of every neuron (p2 may be None when not needed)."""
    params, input_scale, table, m0 = dev
    if cfg.mode == "ideal":
        return jnp.tanh(z), (sech(z) if with_p2 else None)
    if cfg.mode == "analytic":
        u, psi = pulse_angles(params, z * input_scale)
        return jnp.tanh(u), (jnp.cos(psi) * sech(u) if with_p2 else None)
    if cfg.mode in ("table", "thermal"):
        if cfg.mode == "thermal" and sde_key is not None:  # no key: T = 0 (checked)
            return _thermal_sample(table, z, sde_key, with_p2)
        if not with_p2:
            return hermite_curves(table.coef, table.grid, z, (0,))[0], None
        return hermite_curves(table.coef, table.grid, z, (0, 1))
    # "ode" / "sde": one solve per neuron
    shared = params.batch_shape == ()
    flat = z.reshape(-1) if shared else z
    if cfg.mode == "sde":
        keys = jax.random.split(sde_key, flat.shape[0])
    else:
        keys = None

    def solve(p, zz, k, m):
        return _pulse(p, zz * input_scale, k, cfg.solver, cfg.steps, m)

    if cfg.chunk and flat.shape[0] > cfg.chunk:
        # lax.map over chunks of neurons (vmapped inside a chunk); under an outer jax.vmap
        # over examples a chunk also spans the batch.
        def solve_chunk(args):
            zz, k, per = args
            p, m = (params, m0) if shared else per
            return solve(p, zz, k, m)

        per = None if shared else (params, m0)
        m = jax.lax.map(solve_chunk, (flat, keys, per), batch_size=cfg.chunk)
    else:
        in_axes = (None if shared else 0, 0, None if keys is None else 0, None if shared else 0)
        m = jax.vmap(solve, in_axes=in_axes)(params, flat, keys, m0)
    p1, p2 = m[:, 0].reshape(z.shape), m[:, 1].reshape(z.shape)
    return p1, (p2 if with_p2 else None)


def _thermal_sample(table: ResponseTable, z: Array, key, with_p2: bool):
    """One correlated Gaussian draw of both read-outs from the sampling curves of a thermal
    table: (m.p1, m.p2) = mean + L e, e from `mtjax.draws.normals(key, (2, *z.shape))`
    (m.p2 None if not `with_p2`; m.p1 is the same either way). Not clipped: near
    saturation a draw can pass |m.p| = 1 slightly (README, "The draws are Gaussian")."""
    # m.p1's two curves are gathered apart from m.p2's: a gradient reaching the table (live
    # co-design) then scatters 2 curves per evaluation instead of 5 (the step ~20 % faster).
    coef, grid = table.coef, table.grid
    where = grid.locate(z)
    e = own_kernel(lambda k: normals(k, (2, *z.shape), z.dtype), key)
    mean1, l11 = hermite_curves(coef, grid, z, (2, 4), where)
    p1 = mean1 + jnp.maximum(l11, 0.0) * e[0]
    if not with_p2:
        return p1, None
    m2, l21, l22 = hermite_curves(coef, grid, z, (3, 5, 6), where)
    return p1, m2 + l21 * e[0] + jnp.maximum(l22, 0.0) * e[1]


def _read(params: DeviceParams, proj: Array, polarizer: int, read_noise: float, noise):
    """TMR read-out of m.p with Gaussian conductance noise, back in units of m.p."""
    if read_noise == 0:
        return proj
    tmr = params.tmr1 if polarizer == 1 else params.tmr2
    g0 = mean_conductance(params, polarizer)
    swing = g0 * tmr / (2 + tmr)
    g = g0 + swing * proj + read_noise * swing * noise
    return projection_from_conductance(params, g, polarizer)


def _response(cfg: _Config, dev, z: Array, noise, sde_key, with_p2: bool):
    """(activation, m.p2 read-out) of one evaluation; the second is None if not `with_p2`."""
    p1, p2 = _device_projections(cfg, dev, z, sde_key, with_p2)
    if cfg.read_noise == 0:
        return p1, p2
    if cfg.mode == "ideal":
        p1 = p1 + cfg.read_noise * noise[0]
        return p1, (p2 + cfg.read_noise * noise[1] if with_p2 else None)
    params = dev[0]
    p1 = _read(params, p1, 1, cfg.read_noise, noise[0])
    if with_p2:
        p2 = _read(params, p2, 2, cfg.read_noise, noise[1])
    return p1, p2


@eqx.filter_custom_jvp
def _custom_activation(z, dev, *, cfg, noise, sde_key):
    return _response(cfg, dev, z, noise, sde_key, with_p2=False)[0]


@_custom_activation.def_jvp
def _custom_activation_jvp(primals, tangents, *, cfg, noise, sde_key):
    """d(activation) = factor(m.p2) dz + (device part by autodiff through the physics),
    from one evaluation. A jvp rule (linear in the tangents), so reverse mode (by JAX's
    transposition) and forward mode (`jax.jvp`, `jax.jacfwd`) both use the device-supplied
    derivative."""
    z, dev = primals
    t_z, t_dev = tangents
    if jax.tree_util.tree_leaves(t_dev):  # some device tangent (None leaves are zeros)
        # Same evaluation for the output, the m.p2 signal and the device-parameter tangent.
        def f(d):
            return _response(cfg, d, z, noise, sde_key, with_p2=True)

        (y, p2), (t_y, _) = eqx.filter_jvp(f, (dev,), (t_dev,))
    else:
        (y, p2), t_y = _response(cfg, dev, z, noise, sde_key, with_p2=True), None
    if t_z is not None:
        factor = p2 * p2 if cfg.derivative == "mz2" else p2
        t_y = factor * t_z if t_y is None else t_y + factor * t_z
    return y, t_y


class MTJActivation(eqx.Module):
    """A layer of MTJ neurons: `act(z, key=key)` maps pre-activations z to the P1 read-out.

    `z` is one example's pre-activation vector (n,) (any shape for a shared device); map
    over a batch with `jax.vmap`. See the module docstring for the signal chain, the modes,
    the derivative choices and the read-noise units.
    """

    params: DeviceParams
    input_scale: Float[Array, ""]
    m0: Float[Array, "*batch 3"]
    table: ResponseTable | None
    mode: str = eqx.field(static=True)
    derivative: str = eqx.field(static=True)
    z_max: float = eqx.field(static=True)
    read_noise: float = eqx.field(static=True)
    solver: str = eqx.field(static=True)
    steps: int = eqx.field(static=True)
    fast_steps: int | None = eqx.field(static=True)  # see `with_fast_steps`
    grid: TableGrid
    chunk: int = eqx.field(static=True)
    train_device: bool = eqx.field(static=True)
    given_tables: bool = eqx.field(static=True)
    thermal_std_limit: float | None = eqx.field(static=True)
    field_free: bool = eqx.field(static=True)
    accepts_key = True  # `mtjax.nn.MLP` passes each layer its key

    def __init__(
        self,
        params: DeviceParams | None = None,
        *,
        mode: str = "table",
        derivative: str = "mz2",
        input_scale: Float[ArrayLike, ""] | None = None,
        z_max: float = DEFAULT_Z_MAX,
        read_noise: float = 0.0,
        solver: str | None = None,
        steps: int | None = None,
        n_grid: int | None = None,
        chunk: int = DEFAULT_CHUNK,
        train_device: bool = False,
        m0: Float[ArrayLike, "3"] | Float[ArrayLike, "n 3"] | None = None,
        grid: TableGrid | None = None,
        thermal_std_limit: float | None = THERMAL_STD_LIMIT,
        field_free: bool = False,
    ):
        """`params`: one device (shared by all neurons) or a batch (n,) of devices, one per
        neuron; default `DeviceParams.paper()`. `input_scale` (A per unit z): default
        `current_scale` of the device (mean over a batch). `z_max`: driver saturation,
        I_max = z_max * input_scale. `read_noise`: std of the read-out noise in units of the
        normalized signal. `solver`/`steps`: pulse solver of "ode"/"table" (default rk4_scan)
        and "sde" (heun_scan); steps default to a count chosen from the dynamics of every
        device over the input range (`pulse_steps`), and too few raise. `n_grid`: table nodes
        (default: enough for the steepest device, see `TableGrid.for_devices`); or `grid`.
        `chunk`: "ode"/"sde" solve this many neurons at a time (`lax.map`; 0 = all).
        `train_device`: let gradients reach params/input_scale (sensitivities by `jax.grad`;
        table/thermal modes then rebuild their tables from params at every call, so the
        gradient is never that of a stale table). Devices are optimized through
        `mtjax.codesign`, whose bounded design variables keep them physical. `m0`: the state
        the free layer is reset to before each pulse (default +z): one (3,) for all neurons
        or (n, 3), one per neuron (imperfect reset, e.g. `mtjax.sample_reset_states`).
        `thermal_std_limit`: "thermal" refuses devices whose read-out std (`thermal_std`)
        exceeds it anywhere on the grid, where the Gaussian approximation is not validated
        (README; use mode="sde"); None accepts them (checked on concrete params only).
        `field_free`: "table" and "thermal" build their tables from the closed form of
        devices with zero effective field and lambda1 = 1 (`mtjax.moments.field_free_moments`:
        exact, no RK4 steps); other devices raise, and so does differentiating with respect
        to hk, demag, h_bias or lambda1."""
        params = DeviceParams.paper() if params is None else params
        if not isinstance(params, DeviceParams):
            raise TypeError(f"params: expected DeviceParams, got {type(params).__name__}")
        if len(params.batch_shape) > 1:
            raise ValueError(
                f"params: expected one device or a 1-D batch (one per neuron), "
                f"got batch shape {params.batch_shape}"
            )
        if solver is None:
            solver = "heun_scan" if mode == "sde" else "rk4_scan"
        if mode == "thermal" and solver != "rk4_scan":
            raise ValueError(f"solver: mode='thermal' integrates with 'rk4_scan', got {solver!r}")
        params, m0 = _reset_states(params, m0, mode)
        z_max, read_noise = float(z_max), float(read_noise)
        _check_mode_args(mode, derivative, solver, steps, n_grid, z_max, read_noise)
        if mode == "analytic" and (bad := closed_form_violations(params)):
            raise ValueError(
                f"mode='analytic': the closed form does not describe these params "
                f"({', '.join(bad)}); use mode='table' or 'ode'"
            )
        if field_free and mode not in ("table", "thermal"):
            raise ValueError(f"field_free: only modes 'table' and 'thermal' use it, not {mode!r}")
        if field_free and (bad := field_free_violations(params)):
            raise ValueError(f"field_free: these params are not field-free ({', '.join(bad)})")
        if input_scale is None:
            input_scale = jnp.mean(current_scale(params))
        input_scale = jnp.asarray(input_scale, dtype=jnp.result_type(float))
        if input_scale.shape != ():
            raise ValueError(f"input_scale: expected a scalar (A), got shape {input_scale.shape}")
        if not isinstance(input_scale, jax.core.Tracer) and not float(input_scale) > 0:
            raise ValueError(f"input_scale: must be > 0 (A), got {float(input_scale)}")
        refine = grid is None and n_grid is None
        if grid is None:
            grid = TableGrid.for_devices(params, input_scale, z_max, n_grid)
        elif grid.z_max != z_max:
            raise ValueError(f"grid: its z_max {grid.z_max} differs from z_max {z_max}")
        floor = DEFAULT_SDE_STEPS if mode == "sde" else DEFAULT_ODE_STEPS
        steps = pulse_steps(params, grid.reach * input_scale, solver, steps, floor)
        self.params = params
        self.input_scale = input_scale
        self.m0 = m0
        self.mode = mode
        self.derivative = derivative
        self.z_max = z_max
        self.read_noise = read_noise
        self.solver = solver
        self.steps = int(steps)
        self.fast_steps = None
        self.grid = grid
        if int(chunk) != chunk or chunk < 0:
            raise ValueError(f"chunk: must be an integer >= 0, got {chunk!r}")
        self.chunk = int(chunk)
        self.train_device = bool(train_device)
        self.given_tables = False
        if thermal_std_limit is not None and not thermal_std_limit > 0:
            raise ValueError(f"thermal_std_limit: must be > 0 or None, got {thermal_std_limit}")
        self.thermal_std_limit = thermal_std_limit
        self.field_free = bool(field_free)
        self.table = None
        if mode in ("table", "thermal"):
            traced = any(isinstance(v, jax.core.Tracer) for v in jax.tree.leaves(params))
            if refine and not traced:
                det = resolved_table(params, input_scale, grid, solver, self.steps, m0)
                self.grid = det.grid
            else:
                det = None
            # field_free: the exact closed-form curves (det only chose the grid)
            self.table = self._tables(None if self.field_free else det)

    def thermal_std(self) -> Float[Array, "*n 2"]:
        """Largest std of (m.p1, m.p2) over the input range, per device, from the thermal
        tables (sampled at 4x the table resolution)."""
        if self.mode != "thermal":
            raise ValueError(f"thermal_std: needs mode='thermal', not {self.mode!r}")
        z = jnp.linspace(-self.z_max, self.z_max, 4 * self.grid.n_grid + 1)
        if self.n_devices is not None:
            z = jnp.broadcast_to(z[:, None], (z.shape[0], self.n_devices))
        curves = hermite_eval(self.table.coef[..., 4:, :], self.grid, z)  # L11, L21, L22
        l11, l21, l22 = jnp.moveaxis(curves, -1, 0)
        std = jnp.stack([jnp.abs(l11), jnp.hypot(l21, l22)], axis=-1)
        return std.max(axis=0)

    @property
    def n_devices(self) -> int | None:
        """Number of per-neuron devices, or None for one shared device."""
        return self.params.batch_shape[0] if self.params.batch_shape else None

    @property
    def n_grid(self) -> int:
        """Number of table nodes."""
        return self.grid.n_grid

    @property
    def max_current(self) -> Float[Array, ""]:
        """Driver saturation current I_max = z_max * input_scale (A)."""
        return self.z_max * self.input_scale

    def _tables(self, table: ResponseTable | None = None) -> ResponseTable:
        """Response tables of the current params; `table`: the deterministic one, if built.
        A thermal rebuild takes its noise-free curves from the moment integration (the
        same RK4 steps; equal to a "table" build to float round-off, and a third cheaper
        to differentiate than two integrations of the pulse). Built with `fast_steps` RK4
        steps if set (`with_fast_steps`; params that need more by the step rule raise), else
        `steps`."""
        if self.fast_steps is None or table is not None or self.field_free:
            return self._tables_at(self.steps, table)  # (field_free: steps unused)
        need = self.needed_steps()
        msg = (
            f"with_fast_steps: {self.fast_steps} RK4 steps are too coarse for these devices by "
            "the step rule (their design moved); rebuild with more (mtjax.codesign: set_live "
            "or refresh choose the steps again)"
        )
        if not isinstance(need, jax.core.Tracer) and float(need) > self.fast_steps:
            raise ValueError(f"{msg}: {float(need):.1f} needed")
        out = self._tables_at(self.fast_steps)
        if isinstance(need, jax.core.Tracer):
            out = eqx.error_if(out, need > self.fast_steps, msg)
        return out

    def _tables_at(self, steps: int, table: ResponseTable | None = None) -> ResponseTable:
        """`_tables` with `steps` RK4 steps per pulse (`field_free`: none, closed forms)."""
        if self.mode != "thermal" and (table is not None or not self.field_free):
            if table is None:
                table = build_table(
                    self.params, self.input_scale, solver=self.solver, steps=steps,
                    grid=self.grid, m0=self.m0,
                )  # fmt: skip
            return table
        input_scale = jnp.asarray(self.input_scale, dtype=jnp.result_type(float))
        m0 = jnp.broadcast_to(
            jnp.asarray(M_UP if self.m0 is None else self.m0), (*self.params.batch_shape, 3)
        )
        nodes = _moment_nodes(self.params, input_scale, self.grid, steps, m0, self.field_free)
        if table is None:
            det = nodes[..., :2]
            table = _checked_resolution(
                ResponseTable(hermite_coefficients_over(det), self.grid),
                jnp.max(jnp.abs(fourth_difference(jnp.moveaxis(det, -2, 0)))),
            )
        if self.mode != "thermal":  # "table", field-free: the noise-free curves only
            return table
        stats = self._checked_spread(nodes[..., 2:])
        noise = hermite_coefficients_over(sampling_curves(stats))
        means = table.coef + noise[..., :2, :]  # exact at T = 0 (zero shifts)
        coef = jnp.concatenate([table.coef, means, noise[..., 2:, :]], axis=-2)
        return ResponseTable(coef, table.grid)

    def _checked_spread(self, stats: Array) -> Array:
        """`stats` (d1, d2, s1, s2, rho at the nodes), refused where a std exceeds
        `thermal_std_limit`: ValueError on concrete params, `eqx.error_if` when traced
        (co-design moving the device out of the validated range)."""
        limit = self.thermal_std_limit
        if limit is None:
            return stats
        worst = jnp.max(stats[..., 2:4])
        msg = (
            f"mode='thermal': a read-out's thermal std exceeds thermal_std_limit={limit}, "
            "beyond the validated range of the Gaussian approximation (device too small or "
            "too hot); use mode='sde', or thermal_std_limit=None to accept it"
        )
        if isinstance(worst, jax.core.Tracer):
            return eqx.error_if(stats, worst > limit, msg)
        if float(worst) > limit:
            raise ValueError(f"{msg} (largest std {float(worst):.3f})")
        return stats

    def rebuild(self) -> MTJActivation:
        """Copy with the tables recomputed from the current params and input_scale
        (differentiable: call inside a loss for co-design). No-op unless the mode is
        "table" or "thermal"."""
        if self.mode not in ("table", "thermal"):
            return self
        return eqx.tree_at(lambda a: a.table, self, self._tables())

    def with_devices(self, params: DeviceParams, input_scale) -> MTJActivation:
        """Copy driving `params` (same batch shape) at `input_scale`, with gradients to both
        (`train_device=True`) and tables derived from them; the static settings (mode,
        steps, grid, ...) are kept. Used by `mtjax.codesign` inside a loss."""
        new = self._copy(train_device=True)
        return eqx.tree_at(lambda a: (a.params, a.input_scale), new, (params, input_scale))

    def needed_steps(self) -> Float[Array, ""]:
        """Steps the step rule asks for these devices over the driver's reach (float, not
        rounded; `mtjax.integrators.required_steps`)."""
        theta = rotation_per_pulse(self.params, self.grid.reach * self.input_scale)
        return required_steps(theta, self.solver)

    def with_fast_steps(self, fast_steps: int | None) -> MTJActivation:
        """Copy whose table rebuilds use `fast_steps` RK4 steps per pulse instead of `steps`
        (None, or a count >= `steps`: `steps`). Used by `mtjax.codesign`, where `steps`
        covers a whole design box and the current design usually needs fewer. Rebuilds stay
        guarded: params that need more steps raise at run time."""
        if fast_steps is None or fast_steps >= self.steps:
            return self._copy(fast_steps=None)
        if self.mode not in ("table", "thermal") or self.solver != "rk4_scan":
            raise ValueError("with_fast_steps: needs mode 'table' or 'thermal' with rk4_scan")
        if isinstance(fast_steps, bool) or int(fast_steps) != fast_steps or fast_steps < 1:
            raise ValueError(f"fast_steps: must be a positive integer, got {fast_steps!r}")
        return self._copy(fast_steps=int(fast_steps))

    def with_given_tables(self) -> MTJActivation:
        """Copy of a `train_device` activation whose calls use its `table` leaf as it is (no
        rebuild), with gradients reaching it as well as params and input_scale. For pulling
        a gradient summed over many batches back through one table build (`jax.vjp` of the
        build; `mtjax.sensitivity`): the cotangent is only right if `table` was built from
        these params (e.g. `rebuild()` inside the function being vjp'd)."""
        if not self.train_device:
            raise ValueError("with_given_tables: needs a train_device=True activation")
        return self._copy(given_tables=True)

    def noise_free(self) -> MTJActivation:
        """Copy reading the noise-free response of the same devices (same tables, steps and
        reset states): no read noise, and "thermal" reads its tables' deterministic curves
        ("table"), "sde" integrates without noise ("ode"). For drawing device curves."""
        mode = {"thermal": "table", "sde": "ode"}.get(self.mode, self.mode)
        return self._copy(read_noise=0.0, mode=mode)

    def _copy(self, **static) -> MTJActivation:
        """Shallow copy with some static fields replaced (no table rebuild)."""
        new = object.__new__(type(self))
        for f in dataclasses.fields(self):
            object.__setattr__(new, f.name, static.get(f.name, getattr(self, f.name)))
        return new

    @property
    def stochastic(self) -> bool:
        """True when an evaluation needs a PRNG key (read noise, or thermal noise)."""
        if self.read_noise > 0 or self.mode == "sde":
            return True
        if self.mode != "thermal":
            return False
        t = self.params.temperature
        return isinstance(t, jax.core.Tracer) or bool(np.any(np.asarray(t) > 0))

    def _prepare(self, z, key):
        z = jnp.asarray(z)
        if not jnp.issubdtype(z.dtype, jnp.floating):
            z = z.astype(jnp.result_type(float))
        n = self.n_devices
        if n is not None and z.shape != (n,):
            raise ValueError(
                f"z: shape {z.shape} does not match the {n} per-neuron devices; expected ({n},)"
                " (map over a batch with jax.vmap)"
            )
        if self.mode in THERMAL_MODES and key is None and self.stochastic:
            raise ValueError(f"key: mode={self.mode!r} (thermal noise) needs a PRNG key")
        if self.read_noise > 0 and key is None:
            raise ValueError(f"key: read_noise={self.read_noise} > 0 needs a PRNG key")
        z = eqx.error_if(
            z, ~jnp.all(jnp.isfinite(z)), "MTJActivation: non-finite pre-activation z (NaN/inf)"
        )
        # driver saturation: flat (zero gradient) strictly beyond +-z_max
        z = jnp.where(jnp.abs(z) <= self.z_max, z, jnp.sign(z) * self.z_max)
        noise, sde_key = None, None
        if key is not None and (self.read_noise > 0 or self.mode in THERMAL_MODES):
            k_noise, sde_key = jax.random.split(key)
            if self.read_noise > 0:
                noise = jax.random.normal(k_noise, (2,) + z.shape, z.dtype)
        table = self.table
        if self.train_device and self.mode in ("table", "thermal") and not self.given_tables:
            table = self._tables()  # derived from the (differentiated) params: never stale
        dev = (self.params, self.input_scale, table, self.m0)
        if not self.train_device:
            dev = jax.lax.stop_gradient(dev)
        cfg = _Config(
            self.mode,
            self.derivative,
            self.z_max,
            self.read_noise,
            self.solver,
            self.steps,
            self.chunk,
        )
        return cfg, dev, z, noise, sde_key

    def __call__(
        self, z: Float[ArrayLike, "*n"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*n"]:
        """Activation m.p1 read from the device(s) for pre-activations `z`."""
        cfg, dev, z, noise, sde_key = self._prepare(z, key)
        if self.derivative == "autodiff":
            return _response(cfg, dev, z, noise, sde_key, with_p2=False)[0]
        return _custom_activation(z, dev, cfg=cfg, noise=noise, sde_key=sde_key)

    def read(
        self, z: Float[ArrayLike, "*n"], *, key: PRNGKeyArray | None = None
    ) -> tuple[Float[Array, "*n"], Float[Array, "*n"]]:
        """Both read-outs (m.p1, m.p2) of one evaluation; with the same `key` the first equals
        `self(z, key=key)` and the second is the signal the "mz"/"mz2" derivatives use."""
        cfg, dev, z, noise, sde_key = self._prepare(z, key)
        return _response(cfg, dev, z, noise, sde_key, with_p2=True)
