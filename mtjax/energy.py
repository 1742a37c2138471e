"""Energy and latency of MTJ neurons, from the same macrospin physics as the activation.

One activation (one neuron, one evaluation) is three phases, all in SI units (J, s, A, V):

1. Write: the driver current I1 = z * input_scale (z clipped to [-z_max, z_max], as
   `MTJActivation` does) flows through the P1 junction for `pulse_duration`, starting from
   the reset state m0 (+z). E_write = integral of I1^2 R1(m(t)) dt over the pulse.
2. Read: both junctions are biased at `v_read` for `t_read` right after the pulse (state m
   after the write): E_read = v_read^2 (G1(m) + G2(m)) t_read. The read current's own
   torque is not simulated; `read_disturb` reports the rotation u it would add through P1.
3. Reset (`ResetModel`): a P2 current pulse (positive P2 current drives m to +p2 = +z) of
   `duration` (default `pulse_duration`) whose amplitude brings a free layer at polar angle
   `theta_start` (default pi/2: the equator, where |m_x| -> 1 puts the worst post-pulse
   state) to within `eps` (default 0.01 rad) of +z. For the ideal device the damping-like
   torque gives tan(theta/2) = tan(theta0/2) exp(-u) exactly, so the amplitude is
   I2 = u_r / (du/dI2) with u_r = ln(tan(theta_start/2) / tan(eps/2)) (5.30 for the
   defaults) and du/dI2 the damping-like rotation per ampere over `duration` through P2
   (`rotation_per_amp`; for the paper device, eta2 = eta1 and a 1 ns reset, I2 = 5.30 I_s =
   449 uA). The pulse is then simulated from the actual post-write state: E_reset = integral
   of I2^2 R2(m(t)) dt; `residual_angle` is the angle between the final m and +z (<= eps
   for the ideal device). `adaptive=True`: the amplitude uses the state's own angle to +p2
   (read by the P2 junction) instead of `theta_start` (zero when already within eps).

Latency = pulse_duration + t_read + reset duration (no gaps). Resistances follow the
bias-independent TMR model of `mtjax.readout` (R_k = 1 / G_k, G_k = G0_k (1 +
TMR_k/(2+TMR_k) m.p_k)); only Joule dissipation in the two junctions is counted: no driver,
sense-amplifier, wiring, crossbar or clock energy. Trajectories are noise-free (T = 0).

Both pulses are one fixed-step RK4 scan (as the "table" mode) whose state carries, next to
m, the accumulator integral of R dt; everything is differentiable w.r.t. `DeviceParams`,
the current / `input_scale` and the reset model. Step counts: at least
`DEFAULT_ENERGY_STEPS` per pulse, more when the drive needs them (`mtjax.integrators`
step rule, concrete inputs), and too few raise (ValueError, or an Equinox runtime error
when traced).

Per network (`network_energy`): the MTJ layers of an `MLP` (or a `HeadedClassifier` head)
are run on real inputs, each neuron's energy is taken at the pre-activation it actually
sees (from `energy_table`, the same `TableGrid` as the activation, or directly), summed over
neurons and layers and averaged over examples. Software activations, the linear layers and
the feature extractor contribute nothing. MTJ layers run in series, all neurons of a layer
in parallel: the latency per inference is the sum over MTJ layers of the slowest device.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from mtjax.analytic import field_free_violations, not_field_free
from mtjax.constants import TIME_UNIT
from mtjax.integrators import normalize, required_steps, rk4_step, steps_for, too_coarse
from mtjax.moments import field_free_pulse, field_free_rotation
from mtjax.nn.activation import (
    DEFAULT_Z_MAX,
    MTJActivation,
    TableGrid,
    held_field_free,
    hermite_coefficients,
    hermite_curves,
)
from mtjax.nn.cnn import HeadedClassifier
from mtjax.nn.models import MLP, apply_activation
from mtjax.params import DeviceParams, over_devices
from mtjax.physics import (
    gamma0,
    rotation_rate_bound,
    stt_amplitude,
    torque_coefficients,
    unit,
)
from mtjax.readout import conductance, mean_conductance
from mtjax.solve import M_UP, drift_ns

__all__ = [
    "DEFAULT_ENERGY_STEPS",
    "DEFAULT_T_READ",
    "DEFAULT_V_READ",
    "EnergyBreakdown",
    "EnergyTable",
    "NetworkEnergy",
    "ResetModel",
    "activation_energy",
    "energy_field_free_violations",
    "energy_table",
    "needed_energy_steps",
    "network_energy",
    "reset_current",
    "rotation_per_amp",
]

#: Read bias (V) of both junctions: the default of `mtjax.readout.read_current`, at the low
#: end of STT-MRAM read biases (~0.05-0.2 V), chosen low because this soft free layer
#: (I_s = 85 uA) is disturbed by the read current (see `EnergyBreakdown.read_disturb`).
DEFAULT_V_READ = 0.05
#: Read time (s).
DEFAULT_T_READ = 1e-9
#: Fewest RK4 steps per pulse (write and reset). A fixed floor keeps the step count the same
#: for concrete and traced (differentiated) evaluations of ordinary drives.
DEFAULT_ENERGY_STEPS = 64
#: Curves of an `EnergyTable`, in this order.
TABLE_CURVES = ("write", "reset", "read", "residual_angle", "reset_current", "read_disturb")


def _concrete(*trees) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(trees))


def _scalar(name: str, value, *, positive: bool = True) -> Array:
    """A float scalar, checked (finite, > 0 or >= 0) when concrete."""
    a = jnp.asarray(value, dtype=jnp.result_type(float))
    if a.shape != ():
        raise ValueError(f"{name}: expected a scalar, got shape {a.shape}")
    if _concrete(a):
        v = float(a)
        if not (math.isfinite(v) and (v > 0 if positive else v >= 0)):
            raise ValueError(f"{name}: must be finite and {'> 0' if positive else '>= 0'}, got {v}")
    return a


class ResetModel(eqx.Module):
    """P2 current pulse that resets the free layer to +z after each evaluation.

    `duration` (s; None: the device's `pulse_duration`), `eps` (rad): target angle to +z,
    `theta_start` (rad, in (eps, pi)): the starting angle the fixed amplitude is designed
    for (default pi/2, the equator), `adaptive`: size the amplitude from each state's own
    angle to +p2 (capped at `theta_start`) instead. Amplitude: `reset_current`; see the
    module docstring for the model."""

    duration: Float[Array, ""] | None
    eps: Float[Array, ""]
    theta_start: Float[Array, ""]
    adaptive: bool = eqx.field(static=True)
    never_trained = True  # a circuit setting: `mtjax.nn.trainable` leaves it out

    def __init__(
        self,
        duration: Float[ArrayLike, ""] | None = None,
        *,
        eps: Float[ArrayLike, ""] = 0.01,
        theta_start: Float[ArrayLike, ""] = math.pi / 2,
        adaptive: bool = False,
    ):
        self.duration = None if duration is None else _scalar("ResetModel.duration", duration)
        self.eps = _scalar("ResetModel.eps", eps)
        self.theta_start = _scalar("ResetModel.theta_start", theta_start)
        if _concrete(self.eps, self.theta_start) and not (
            0 < float(self.eps) < float(self.theta_start) < math.pi
        ):
            raise ValueError(
                "ResetModel: need 0 < eps < theta_start < pi (rad), got "
                f"eps={float(self.eps)}, theta_start={float(self.theta_start)}"
            )
        self.adaptive = bool(adaptive)

    def time(self, params: DeviceParams) -> Float[Array, "*batch"]:
        """Reset pulse duration (s) for `params` (one device or a batch)."""
        if self.duration is None:
            return params.pulse_duration
        return jnp.broadcast_to(self.duration, params.pulse_duration.shape)


class EnergyBreakdown(eqx.Module):
    """Energy (J) and latency (s) of one activation; a pytree, so arrays under vmap.

    `write`, `reset`, `read`, `total` = write + reset + read (J); `latency` = pulse + read +
    reset (s); `residual_angle` (rad) between m after the reset and +z; `reset_current`
    (A) the P2 reset amplitude; `read_disturb` (rad): the damping-like rotation u the P1
    read current would add over `t_read` (not simulated; compare with the write's u = z)."""

    write: Float[Array, "*n"]
    reset: Float[Array, "*n"]
    read: Float[Array, "*n"]
    total: Float[Array, "*n"]
    latency: Float[Array, "*n"]
    residual_angle: Float[Array, "*n"]
    reset_current: Float[Array, "*n"]
    read_disturb: Float[Array, "*n"]


def _breakdown(write, reset, read, latency, residual, i2, disturb) -> EnergyBreakdown:
    return EnergyBreakdown(
        write=write,
        reset=reset,
        read=read,
        total=write + reset + read,
        latency=latency,
        residual_angle=residual,
        reset_current=i2,
        read_disturb=disturb,
    )


def rotation_per_amp(
    params: DeviceParams, polarizer: int, duration: Float[ArrayLike, "*batch"]
) -> Float[Array, "*batch"]:
    """Damping-like rotation u per ampere (rad/A) of a pulse of `duration` (s) through
    polarizer 1 or 2 (ideal device, Slonczewski factor 1): tan(theta/2) towards +p_k shrinks
    by exp(-u). For polarizer 1 and `pulse_duration` it is 1 / `mtjax.current_scale`."""
    if polarizer not in (1, 2):
        raise ValueError(f"polarizer must be 1 or 2, got {polarizer!r}")
    xi = params.xi1 if polarizer == 1 else params.xi2
    a = stt_amplitude(params, 1.0, polarizer)
    return gamma0(params) * a * (1 + params.alpha * xi) * duration / (1 + params.alpha**2)


def reset_current(
    params: DeviceParams,
    reset: ResetModel | None = None,
    m: Float[ArrayLike, "3"] | None = None,
) -> Float[Array, ""]:
    """P2 reset amplitude (A) of one device: u_r / `rotation_per_amp` with
    u_r = ln(tan(theta/2) / tan(eps/2)), theta = `theta_start`, or (adaptive reset, `m`
    given: the post-write state) the angle of `m` to +p2 capped at `theta_start`; 0 when
    theta <= eps."""
    reset = ResetModel() if reset is None else reset
    per_amp = rotation_per_amp(params, 2, reset.time(params))
    per_amp = eqx.error_if(
        per_amp,
        ~(per_amp > 0),
        "reset: P2 exerts no damping-like torque (eta2 = 0 or 1 + alpha xi2 <= 0); "
        "the reset pulse cannot reach +z",
    )
    tan2_max = jnp.tan(reset.theta_start / 2) ** 2
    if reset.adaptive and m is not None:
        c = jnp.dot(jnp.asarray(m), unit(params.p2))
        pos = 1 + c > 0
        tan2 = jnp.where(pos, (1 - c) / jnp.where(pos, 1 + c, 1.0), tan2_max)
        tan2 = jnp.minimum(tan2, tan2_max)
    else:
        tan2 = tan2_max
    ratio = tan2 / jnp.tan(reset.eps / 2) ** 2
    big = ratio > 1
    u = jnp.where(big, 0.5 * jnp.log(jnp.where(big, ratio, 1.0)), 0.0)
    return u / per_amp


def _resistance_fn(params: DeviceParams, polarizer: int):
    """m -> R_k(m) (Ohm), constants hoisted out of the integration loop."""
    tmr = params.tmr1 if polarizer == 1 else params.tmr2
    g0 = mean_conductance(params, polarizer)
    k = tmr / (2 + tmr)
    p = unit(params.p1 if polarizer == 1 else params.p2)
    return lambda m: 1.0 / (g0 * (1 + k * jnp.dot(m, p)))


def _pulse_energy(params: DeviceParams, currents, m_start, duration, n_steps: int, polarizer):
    """RK4 pulse of constant (I1, I2) for `duration` (s) from `m_start`: returns (m at the end,
    integral of R_polarizer dt in Ohm s). Traced drives are checked against the step rule."""
    c = torque_coefficients(params, currents)
    t1n = duration / TIME_UNIT
    h = t1n / n_steps
    resistance = _resistance_fn(params, polarizer)

    def f(t, y):
        m = y[:3]
        return jnp.concatenate([drift_ns(c, m), resistance(m)[None]])

    def step(y, _):
        y = rk4_step(f, y, 0.0, h)
        return jnp.concatenate([normalize(y[:3]), y[3:]]), None

    y0 = jnp.concatenate([m_start, jnp.zeros((1,), m_start.dtype)])
    y, _ = jax.lax.scan(step, y0, None, length=n_steps)
    theta = rotation_rate_bound(c) * duration
    y = eqx.error_if(
        y,
        too_coarse(theta, n_steps, "rk4_scan"),
        "energy: too few RK4 steps for this drive (rotation bound per step exceeds the error "
        "guard); pass more steps",
    )
    return y[:3], y[3] * TIME_UNIT


def _field_free_pulse_energy(params: DeviceParams, currents, m_start, duration, polarizer):
    """`_pulse_energy` in closed form for a field-free device (zero effective field,
    Slonczewski factor 1) driven through `polarizer` alone: m.p = tanh(A t + c0)
    (`mtjax.moments.field_free_pulse`) and, with k = TMR/(2 + TMR),
    int dt / (1 + k tanh(A t + c0)) = t (1 - k Q) / (1 - k^2),
    Q = ln(cosh d + rho sinh d) / d, d = A t, rho = (tanh c0 + k) / (1 + k tanh c0).
    A state within 1e-6 rad of +-p stays there (R constant)."""
    j = polarizer - 1
    c = torque_coefficients(params, currents)
    p = c.p[j]
    t1n = duration / TIME_UNIT
    d = field_free_rotation(c, j, t1n)
    phi = TIME_UNIT * c.rate * c.v[j] * t1n
    cos0 = jnp.dot(m_start, p)
    along = jnp.linalg.norm(m_start - cos0 * p) < 1e-6
    safe = jnp.where(along, jnp.cross(p, _other_axis(p)), m_start)  # any state off p
    m = field_free_pulse(p, safe, d, phi)[0]
    tmr = params.tmr1 if polarizer == 1 else params.tmr2
    k = tmr / (2 + tmr)
    t0 = jnp.clip(cos0, -1.0, 1.0)  # m.p at the start (= tanh c0 off p)
    rho = (t0 + k) / (1 + k * t0)
    # ln(cosh d + rho sinh d) / d: a series below |d| = 1e-3, log1p below |d| = 1, and
    # beyond, sign(d) + ln(w+ + w- exp(-2|d|)) / d with w+- = (1 +- rho sign d) / 2 (no
    # overflow for any drive; w+ = 0 only for a state exactly opposite the drive)
    small, mid = jnp.abs(d) < 1e-3, jnp.abs(d) < 1
    dm = jnp.where(small | ~mid, 0.5, d)
    dl = jnp.where(mid, 1.0, d)
    rs = rho * jnp.sign(dl)
    tail = jnp.maximum(0.5 * (1 + rs) + 0.5 * (1 - rs) * jnp.exp(-2 * jnp.abs(dl)), 1e-30)
    big_q = jnp.where(
        small,
        rho + 0.5 * d * (1 - rho * rho),
        jnp.where(
            mid,
            jnp.log1p(2 * jnp.sinh(dm / 2) ** 2 + rho * jnp.sinh(dm)) / dm,
            jnp.sign(dl) + jnp.log(tail) / dl,
        ),
    )
    r_dt = duration * (1 - k * big_q) / ((1 - k * k) * mean_conductance(params, polarizer))
    return jnp.where(along, m_start, m), r_dt


def _other_axis(p):
    """A unit axis not parallel to p."""
    return jnp.where(jnp.abs(p[0]) < 0.9, jnp.array([1.0, 0.0, 0.0]), jnp.array([0.0, 1.0, 0.0]))


def _rotations(params: DeviceParams, currents, duration) -> Array:
    """Rotation bound (rad) of a pulse with |I1|, |I2| = `currents` (A) for `duration` (s),
    per device of `params`."""

    def theta(p, c, t):
        return rotation_rate_bound(torque_coefficients(p, c)) * t

    batch = params.batch_shape
    return over_devices(
        theta,
        params,
        jnp.broadcast_to(jnp.abs(jnp.asarray(currents)), (*batch, 2)),
        jnp.broadcast_to(jnp.asarray(duration), batch),
    )


def needed_energy_steps(
    params: DeviceParams, max_current: Float[ArrayLike, ""], reset: ResetModel | None = None
) -> Float[Array, ""]:
    """RK4 steps per pulse that the step rule (`mtjax.integrators.required_steps`; a float,
    not rounded) asks for the write pulse at |I1| <= `max_current` (A) and for the reset
    pulse of `reset`, the larger of the two, over the devices of `params`. Traceable."""
    reset = ResetModel() if reset is None else reset
    i1 = jnp.asarray(max_current, dtype=jnp.result_type(float))
    zero = jnp.zeros_like(i1)
    write = _rotations(params, jnp.stack([i1, zero]), params.pulse_duration)
    i2 = _max_reset_current(params, reset)
    reset_rot = _rotations(params, jnp.stack([zero, i2]), reset.time(params))
    return required_steps(jnp.maximum(jnp.max(write), jnp.max(reset_rot)), "rk4_scan")


def _steps(params: DeviceParams, currents, duration, steps: int | None) -> int:
    """RK4 steps of a pulse with |I1|, |I2| up to `currents` (A) for `duration` (s) on every
    device of `params`: given (checked when concrete) or chosen (>= DEFAULT_ENERGY_STEPS)."""
    if steps is not None:
        if isinstance(steps, bool) or int(steps) != steps or steps < 1:
            raise ValueError(f"steps: must be a positive integer, got {steps!r}")
        steps = int(steps)
    th = _rotations(params, currents, duration)
    if not _concrete(th):
        return DEFAULT_ENERGY_STEPS if steps is None else steps
    if steps is None:
        return max(DEFAULT_ENERGY_STEPS, steps_for(jnp.max(th), "rk4_scan"))
    if bool(jnp.any(too_coarse(th, steps, "rk4_scan"))):
        raise ValueError(
            f"steps={steps} is too coarse for this drive (rotation bound "
            f"{float(jnp.max(th)):.3g} rad per pulse): use steps >= "
            f"{steps_for(jnp.max(th), 'rk4_scan')} or leave steps=None"
        )
    return steps


def _start_state(m0, batch=()) -> Array:
    m0 = jnp.asarray(M_UP if m0 is None else m0, dtype=jnp.result_type(float))
    if m0.shape[-1:] != (3,):
        raise ValueError(f"m0: expected shape (3,) or (n, 3), got {m0.shape}")
    if _concrete(m0):
        a = np.asarray(m0)
        if not (np.all(np.isfinite(a)) and np.all(np.linalg.norm(a, axis=-1) > 0)):
            raise ValueError("m0: must hold finite non-zero vectors")
    norm = jnp.linalg.norm(m0, axis=-1, keepdims=True)
    return jnp.broadcast_to(m0 / norm, (*batch, 3))


def _check_read(v_read, t_read):
    return _scalar("v_read", v_read, positive=False), _scalar("t_read", t_read, positive=False)


def _one_activation(
    params, current, m0, reset, v_read, t_read, n_write, n_reset, field_free: bool = False
):
    """`EnergyBreakdown` of one device at a P1 current (A); all arguments checked.
    `field_free`: both pulses in closed form (`_field_free_pulse_energy`; no steps)."""
    zero = jnp.zeros_like(current)

    def pulse(currents, m_start, duration, n_steps, polarizer):
        if field_free:
            return _field_free_pulse_energy(params, currents, m_start, duration, polarizer)
        return _pulse_energy(params, currents, m_start, duration, n_steps, polarizer)

    # write
    m, r1_dt = pulse(jnp.stack([current, zero]), m0, params.pulse_duration, n_write, 1)
    e_write = current * current * r1_dt
    # read (state after the write, before the reset)
    g1, g2 = conductance(params, m, 1), conductance(params, m, 2)
    e_read = v_read * v_read * (g1 + g2) * t_read
    disturb = rotation_per_amp(params, 1, t_read) * v_read * g1
    # reset
    t_reset = reset.time(params)
    i2 = reset_current(params, reset, m)
    m_end, r2_dt = pulse(jnp.stack([zero, i2]), m, t_reset, n_reset, 2)
    e_reset = i2 * i2 * r2_dt
    s2 = m_end[0] ** 2 + m_end[1] ** 2
    pos = s2 > 0
    sin = jnp.where(pos, jnp.sqrt(jnp.where(pos, s2, 1.0)), 0.0)
    residual = jnp.arctan2(sin, m_end[2])
    latency = params.pulse_duration + t_read + t_reset
    return _breakdown(e_write, e_reset, e_read, latency, residual, i2, disturb)


_one_activation_jit = eqx.filter_jit(_one_activation)


def _max_reset_current(params: DeviceParams, reset: ResetModel):
    """Largest reset amplitude (A) over the devices (the adaptive one is capped by it)."""
    # m=None: the theta_start amplitude
    return jnp.max(over_devices(lambda p: reset_current(p, reset), params))


def activation_energy(
    params: DeviceParams,
    current: Float[ArrayLike, ""],
    *,
    reset: ResetModel | None = None,
    v_read: Float[ArrayLike, ""] = DEFAULT_V_READ,
    t_read: Float[ArrayLike, ""] = DEFAULT_T_READ,
    m0: Float[ArrayLike, "3"] | None = None,
    steps: int | None = None,
) -> EnergyBreakdown:
    """Write + read + reset energy (J) and latency (s) of one activation of ONE device at
    P1 current `current` (A; I = z * input_scale), starting from `m0` (default +z).

    `reset`: `ResetModel` (default: P2 pulse of `pulse_duration` to 0.01 rad from the
    equator); `v_read` (V), `t_read` (s): read of both junctions after the pulse; `steps`:
    RK4 steps per pulse (default: `DEFAULT_ENERGY_STEPS` or more when the drive needs it).
    Differentiable w.r.t. params, current and the reset model; `jax.vmap` for batches."""
    if not isinstance(params, DeviceParams):
        raise TypeError(f"params: expected DeviceParams, got {type(params).__name__}")
    if params.batch_shape != ():
        raise ValueError(
            f"params: batched DeviceParams {params.batch_shape}; activation_energy takes one "
            "device (use jax.vmap, or energy_table for a batch)"
        )
    params = params.checked()
    reset = ResetModel() if reset is None else reset
    current = jnp.asarray(current, dtype=jnp.result_type(float))
    if current.shape != ():
        raise ValueError(f"current: expected a scalar P1 current (A), got shape {current.shape}")
    current = eqx.error_if(current, ~jnp.isfinite(current), "current: non-finite (NaN or inf)")
    v_read, t_read = _check_read(v_read, t_read)
    m0 = _start_state(m0)
    zero = jnp.zeros_like(current)
    n_write = _steps(params, jnp.stack([current, zero]), params.pulse_duration, steps)
    i2_max = _max_reset_current(params, reset)
    n_reset = _steps(params, jnp.stack([zero, i2_max]), reset.time(params), steps)
    return _one_activation_jit(params, current, m0, reset, v_read, t_read, n_write, n_reset)


class EnergyTable(eqx.Module):
    """Per-activation energy curves of one device or a batch on a `TableGrid`, as functions
    of the pre-activation z. `coef[..., i, k, :]`: cubic coefficients of curve k
    (`TABLE_CURVES`: write, reset, read (J), residual_angle (rad), reset_current (A),
    read_disturb (rad)) on interval i; `latency` (s) per device."""

    coef: Float[Array, "*batch n_interval 6 4"]
    grid: TableGrid
    latency: Float[Array, "*batch"]
    never_trained = True  # derived from the devices: `mtjax.nn.trainable` leaves it out

    def _checked(self, z) -> Array:
        z = _clip(jnp.asarray(z, dtype=jnp.result_type(float)), self.grid.z_max)
        if self.coef.ndim == 4 and z.shape != self.coef.shape[:1]:
            raise ValueError(
                f"z: shape {z.shape} does not match the table's {self.coef.shape[0]} devices"
            )
        return z

    def __call__(self, z: Float[ArrayLike, "*n"]) -> EnergyBreakdown:
        """`EnergyBreakdown` at pre-activations `z` (clipped to +-z_max like the activation;
        for a batch of devices z has shape (n,), one per device)."""
        z = self._checked(z)
        write, reset, read, residual, i2, disturb = hermite_curves(self.coef, self.grid, z)
        latency = jnp.broadcast_to(self.latency, z.shape)
        return _breakdown(write, reset, read, latency, residual, i2, disturb)

    def total(self, z: Float[ArrayLike, "*n"]) -> Float[Array, "*n"]:
        """`self(z).total` (J) from one interpolated curve: the write, reset and read
        coefficients summed first (the interpolation is linear in them), so a gradient
        scatters a sixth of the coefficients."""
        z = self._checked(z)
        coef = jnp.sum(self.coef[..., :3, :], axis=-2, keepdims=True)
        return hermite_curves(coef, self.grid, z)[0]


def _clip(z, z_max: float):
    """The activation's driver saturation: flat (zero gradient) beyond +-z_max."""
    return jnp.where(jnp.abs(z) <= z_max, z, jnp.sign(z) * z_max)


def energy_table(
    params: DeviceParams,
    input_scale: Float[ArrayLike, ""],
    grid: TableGrid | None = None,
    *,
    z_max: float = DEFAULT_Z_MAX,
    reset: ResetModel | None = None,
    v_read: Float[ArrayLike, ""] = DEFAULT_V_READ,
    t_read: Float[ArrayLike, ""] = DEFAULT_T_READ,
    m0: Float[ArrayLike, "*batch 3"] | None = None,
    steps: int | None = None,
    field_free: bool = False,
) -> EnergyTable:
    """Tabulate the per-activation energy of every device of `params` (one, or a 1-D batch)
    against the pre-activation z (I1 = z * `input_scale`, A per unit z) on `grid` (default
    `TableGrid.for_devices(params, input_scale, z_max)`, the grid `MTJActivation` uses).
    Cubic Hermite interpolation as the response tables. Pure and differentiable w.r.t.
    params, input_scale and the reset model. Other arguments: `activation_energy`.
    `field_free`: both pulses in closed form (devices with zero effective field and
    lambda1 = lambda2 = 1; others raise, and so does differentiating w.r.t. those fields):
    exact, no RK4 steps (`steps` unused)."""
    if not isinstance(params, DeviceParams):
        raise TypeError(f"params: expected DeviceParams, got {type(params).__name__}")
    if len(params.batch_shape) > 1:
        raise ValueError(f"params: expected one device or a 1-D batch, got {params.batch_shape}")
    params = params.checked()
    input_scale = _scalar("input_scale", input_scale)
    reset = ResetModel() if reset is None else reset
    v_read, t_read = _check_read(v_read, t_read)
    if grid is None:
        grid = TableGrid.for_devices(params, input_scale, float(z_max))
    batch = params.batch_shape
    m0 = _start_state(m0, batch)
    i_max = grid.reach * input_scale
    zero = jnp.zeros_like(i_max)
    n_write = _steps(params, jnp.stack([i_max, zero]), params.pulse_duration, steps)
    n_reset = _steps(
        params, jnp.stack([zero, _max_reset_current(params, reset)]), reset.time(params), steps
    )
    if field_free and (bad := energy_field_free_violations(params)):
        raise ValueError(f"field_free: these params are not field-free ({', '.join(bad)})")
    coef, latency = _energy_table(params, input_scale, grid, reset, v_read, t_read, m0,
                                  n_write, n_reset, bool(field_free))  # fmt: skip
    return EnergyTable(coef=coef, grid=grid, latency=latency)


def energy_field_free_violations(params: DeviceParams) -> list[str]:
    """Why the closed-form energy (`energy_table(field_free=True)`) does not describe
    `params`: `mtjax.analytic.field_free_violations`, and lambda2 = 1 (the reset pulse)."""
    bad = field_free_violations(params)
    if not isinstance(params.lambda2, jax.core.Tracer) and np.any(np.asarray(params.lambda2) != 1):
        bad.append("lambda2 != 1")
    return bad


@eqx.filter_jit
def _energy_table(
    params, input_scale, grid, reset, v_read, t_read, m0, n_write, n_reset, field_free=False
):
    zs = grid.nodes()
    if field_free:
        params = held_field_free(params, with_lambda2=True)

    def one_device(p, m):
        def node(z):
            e = _one_activation(p, z * input_scale, m, reset, v_read, t_read, n_write, n_reset,
                                field_free)  # fmt: skip
            return jnp.stack([getattr(e, name) for name in TABLE_CURVES])

        latency = p.pulse_duration + t_read + reset.time(p)
        bad = not_field_free(p) | (p.lambda2 != 1) if field_free else jnp.zeros((), bool)
        return hermite_coefficients(jax.vmap(node)(zs)), latency, bad

    coef, latency, bad = over_devices(one_device, params, m0)
    if field_free:
        bad = jnp.any(bad) | ~jnp.all(jnp.isfinite(coef))
    coef = eqx.error_if(
        coef, jnp.any(bad), "energy tables (field_free=True): a device has hk, demag or "
        "h_bias != 0 or lambda1/lambda2 != 1, or non-finite energies; use field_free=False",
    )  # fmt: skip
    return coef, latency


class NetworkEnergy(eqx.Module):
    """Energy per inference of a network's MTJ neurons (J, mean over the examples) and its
    latency (s). `total` = `write` + `reset` + `read`; `total_std`: standard deviation of the
    per-example total over the examples; `per_layer` (n_hidden,): mean total per hidden
    layer (0 for software activations); `latency`: MTJ layers in series (sum of each layer's
    slowest pulse + read + reset); `n_neurons`: MTJ neurons per inference."""

    total: Float[Array, ""]
    total_std: Float[Array, ""]
    write: Float[Array, ""]
    reset: Float[Array, ""]
    read: Float[Array, ""]
    per_layer: Float[Array, " n_hidden"]
    latency: Float[Array, ""]
    n_neurons: int = eqx.field(static=True)
    n_examples: int = eqx.field(static=True)


def _mlp_of(model) -> tuple[MLP, eqx.Module | None]:
    if isinstance(model, MLP):
        return model, None
    if isinstance(model, HeadedClassifier):
        return model.head, model.features
    raise TypeError(
        f"model: expected an mtjax.nn.MLP or HeadedClassifier, got {type(model).__name__}"
    )


def network_energy(
    model: MLP | HeadedClassifier,
    x: Float[ArrayLike, "batch ..."],
    *,
    key: PRNGKeyArray | None = None,
    reset: ResetModel | None = None,
    v_read: Float[ArrayLike, ""] = DEFAULT_V_READ,
    t_read: Float[ArrayLike, ""] = DEFAULT_T_READ,
    method: str = "table",
    steps: int | None = None,
    batch_size: int | None = None,
) -> NetworkEnergy:
    """Energy and latency per inference of the `MTJActivation` neurons of `model` (an `MLP`,
    or a `HeadedClassifier` whose head is one) over the examples `x` (a batch, leading
    axis); a `mtjax.codesign.DesignedMTJ` layer counts as its current design's activation
    (with the reset and read settings given here). The network runs as `model(x_i, key=k_i)`
    does (`key` split per example; needed by stochastic layers), every MTJ neuron is charged
    at its clipped pre-activation, with its own device, input_scale and reset state m0.
    `method`: "table" (`energy_table` on the activation's grid, fast) or "direct"
    (`activation_energy` per neuron and example).
    `batch_size`: examples per chunk (`lax.map`; None: all at once). Differentiable w.r.t.
    the weights, the device params and input_scale. Other arguments: `activation_energy`."""
    mlp, features = _mlp_of(model)
    if method not in ("table", "direct"):
        raise ValueError(f"method: expected 'table' or 'direct', got {method!r}")
    x = jnp.asarray(x)
    if x.ndim < 2 or x.shape[0] < 1:
        raise ValueError(
            f"x: expected a non-empty batch of examples (leading batch axis), got shape {x.shape}"
        )
    if features is None and math.prod(x.shape[1:]) != mlp.layers[0].in_features:
        raise ValueError(
            f"x: examples of shape {x.shape[1:]} do not flatten to the MLP's "
            f"{mlp.layers[0].in_features} inputs"
        )
    if batch_size is not None and (int(batch_size) != batch_size or batch_size < 1):
        raise ValueError(f"batch_size: must be a positive integer, got {batch_size!r}")
    reset = ResetModel() if reset is None else reset
    v_read, t_read = _check_read(v_read, t_read)

    # designed layers (`mtjax.codesign.DesignedMTJ`) are charged as their current design
    mlp = eqx.tree_at(lambda m: m.activations, mlp, tuple(map(_as_mtj, mlp.activations)))
    layers = []  # per hidden layer: None (software) or (evaluator, latency)
    n_neurons = 0
    for layer, act in zip(mlp.layers[:-1], mlp.activations, strict=True):
        if not isinstance(act, MTJActivation):
            layers.append(None)
            continue
        n_neurons += layer.out_features
        if method == "table":
            table = energy_table(
                act.params, act.input_scale, act.grid, reset=reset, v_read=v_read,
                t_read=t_read, m0=act.m0, steps=steps,
            )  # fmt: skip
            layers.append((table, jnp.max(table.latency)))
        else:
            direct = _direct(act, reset, v_read, t_read, steps)
            layers.append((direct, direct.latency))
    if n_neurons == 0:
        raise ValueError("model: has no MTJActivation layers, so no device energy to report")

    n = x.shape[0]
    keys = None if key is None else jax.random.split(key, n)
    evaluators = tuple(None if lay is None else lay[0] for lay in layers)
    per_example = _network_parts(mlp, features, evaluators, x, keys, batch_size)
    # per_example: (n, n_hidden, 3) write/reset/read in J
    per_layer = jnp.sum(per_example, axis=-1)  # (n, n_hidden)
    totals = jnp.sum(per_layer, axis=-1)
    parts = jnp.mean(jnp.sum(per_example, axis=1), axis=0)
    latency = sum(lay[1] for lay in layers if lay is not None)
    return NetworkEnergy(
        total=jnp.mean(totals),
        total_std=jnp.std(totals),
        write=parts[0],
        reset=parts[1],
        read=parts[2],
        per_layer=jnp.mean(per_layer, axis=0),
        latency=latency,
        n_neurons=n_neurons,
        n_examples=n,
    )


def _as_mtj(act):
    """`act`, or the exact `MTJActivation` an object with `.activation()` stands for."""
    if not isinstance(act, MTJActivation) and callable(getattr(act, "activation", None)):
        exact = act.activation()
        if isinstance(exact, MTJActivation):
            return exact
    return act


class _Direct(eqx.Module):
    """Per-neuron `activation_energy` of one MTJ layer (the "direct" method)."""

    params: DeviceParams
    input_scale: Array
    m0: Array
    reset: ResetModel
    v_read: Array
    t_read: Array
    latency: Array
    z_max: float = eqx.field(static=True)
    n_write: int = eqx.field(static=True)
    n_reset: int = eqx.field(static=True)

    def __call__(self, z) -> EnergyBreakdown:
        z = _clip(z, self.z_max)
        shared = self.params.batch_shape == ()

        def one(p, zz, m):
            return _one_activation(
                p, zz * self.input_scale, m, self.reset, self.v_read, self.t_read,
                self.n_write, self.n_reset,
            )  # fmt: skip

        in_axes = (None if shared else 0, 0, None if shared else 0)
        return jax.vmap(one, in_axes=in_axes)(self.params, z, self.m0)


def _direct(act: MTJActivation, reset, v_read, t_read, steps) -> _Direct:
    params = act.params.checked()
    zero = jnp.zeros_like(act.max_current)
    n_write = _steps(params, jnp.stack([act.max_current, zero]), params.pulse_duration, steps)
    n_reset = _steps(
        params, jnp.stack([zero, _max_reset_current(params, reset)]), reset.time(params), steps
    )
    latency = jnp.max(params.pulse_duration + t_read + reset.time(params))
    return _Direct(
        params, act.input_scale, act.m0, reset, v_read, t_read, latency, act.z_max,
        n_write, n_reset,
    )  # fmt: skip


@eqx.filter_jit
def _network_parts(mlp: MLP, features, layers, x, keys, batch_size):
    n_act = len(mlp.activations)

    def one(args):
        xi, k = args
        h = jnp.ravel(features(xi)) if features is not None else jnp.ravel(xi)
        ks = [None] * n_act if k is None else list(jax.random.split(k, n_act))
        out = []
        for layer, act, kk, lay in zip(mlp.layers[:-1], mlp.activations, ks, layers, strict=True):
            z = layer(h)
            if lay is None:
                out.append(jnp.zeros(3, z.dtype))
            else:
                e = lay(_clip(z, act.z_max))
                out.append(jnp.stack([jnp.sum(e.write), jnp.sum(e.reset), jnp.sum(e.read)]))
            h = apply_activation(act, z, kk)
        return jnp.stack(out)

    if batch_size is None:
        return jax.vmap(lambda xi, k: one((xi, k)), in_axes=(0, None if keys is None else 0))(
            x, keys
        )
    if keys is None:
        return jax.lax.map(lambda xi: one((xi, None)), x, batch_size=batch_size)
    return jax.lax.map(one, (x, keys), batch_size=batch_size)
