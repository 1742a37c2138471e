"""Co-design: gradients of accuracy and energy with respect to the device, safely.

- `DesignSpace`: which device/circuit quantities are free, with physical bounds
  (`VARIABLES` lists them with their defaults).
- `Design`: the free quantities as unconstrained, well-scaled variables `theta` (a bounded
  sigmoid of log x for positive scales, of x for signed or bounded ones), the fixed rest of
  the nominal device, and the driver gain. Any `theta` gives an in-bounds, physical device,
  so no optimizer step can make a device non-physical.
- `DesignedMTJ`: a layer of MTJ neurons whose devices are `deviations.apply(nominal)` (fixed
  relative deviations: gradients reach the nominal design) with tables derived from the
  design. On a "live" evaluation the tables (response, thermal and energy) are rebuilt
  inside the loss, so the design gradient is exact; otherwise a cache built at the last
  design change is used (the design then gets no gradient). `DesignSchedule(every=K)`
  makes every K-th training step live (K = 1: every step) and refreshes the cache.
- `joint_optimizer`: separate Optax transforms for the weights and the design; the design
  transform is skipped on steps where its gradient is exactly zero (cached steps).

Table and thermal designs whose devices have no field (no free hk/h_bias, none fixed
nonzero, no stray-field deviations) rebuild their tables from the closed form of the pulse
and its moment equations (`MTJActivation(field_free=True)`: exact, and ~90x cheaper to
differentiate than the RK4 integration used otherwise).
- `EnergyLoss`: cross-entropy + weight x (energy per inference / reference energy).

Static solver settings (pulse steps, table grid) are chosen once for the whole design box.
The pulse steps bound the rotation anywhere in the box; rebuilds of the response and energy
tables use fewer: the lowest rung of a ladder (1.25x what the starting design needs, x1.25
per rung, up to the box's) that the step rule allows for the current design (chosen by
`set_live` and `refresh`, outside jit; a rebuild whose design needs more raises). The table
grid is refined until the designs at the box's corners pass the tables' resolution test
(strong fields with long pulses oscillate in z: hk = 2e4 A/m at tau = 2.9 ns needs ~2049
nodes), and every live rebuild repeats the test, so a design that leaves the resolved range
raises at run time instead of training on a wrong table.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, PyTree

from mtjax.analytic import current_scale, field_free_violations
from mtjax.constants import GAMMA0
from mtjax.energy import (
    DEFAULT_ENERGY_STEPS,
    EnergyTable,
    ResetModel,
    energy_field_free_violations,
    energy_table,
    needed_energy_steps,
)
from mtjax.integrators import steps_for
from mtjax.nn.activation import (
    DEFAULT_ODE_STEPS,
    DEFAULT_Z_MAX,
    THERMAL_STD_LIMIT,
    MTJActivation,
    TableGrid,
    pulse_steps,
    resolved_table,
)
from mtjax.nn.cnn import HeadedClassifier
from mtjax.nn.models import MLP, apply_activation
from mtjax.params import DeviceParams
from mtjax.train import cross_entropy
from mtjax.variation import Deviations

#: Rebuilds of a `DesignedMTJ` (response and energy tables) use RK4 step counts from a
#: ladder: this many times the steps its starting design needs, times this again per rung,
#: up to the design box's count; each rebuild takes the lowest rung the step rule allows for
#: the current design (`step_ladder`, `MTJActivation.with_fast_steps`).
FAST_STEPS_MARGIN = 1.25


def step_ladder(fast: int, box: int) -> tuple[int, ...]:
    """Step counts `fast`, ceil(`fast` M), ceil(`fast` M^2), ... below `box`, then `box`
    (M = `FAST_STEPS_MARGIN`): at most a few compiled rebuilds per layer."""
    rungs = [min(int(fast), int(box))]
    while rungs[-1] < box:
        rungs.append(min(math.ceil(FAST_STEPS_MARGIN * rungs[-1]), int(box)))
    return tuple(rungs)


def _rung(need, fast: int, box: int) -> int:
    """Lowest rung of `step_ladder(fast, box)` >= `need` (box if `need` is traced)."""
    if isinstance(need, jax.core.Tracer):
        return int(box)
    return next((r for r in step_ladder(fast, box) if float(need) <= r), int(box))


@dataclasses.dataclass(frozen=True)
class Variable:
    """A free design quantity: the DeviceParams `fields` it sets (one value for all), its
    default bounds [lo, hi], whether the transform is logarithmic, and its unit."""

    fields: tuple[str, ...]
    lo: float
    hi: float
    log: bool
    unit: str
    size: int = 1  # 3 for a vector (h_bias)


#: Free-able quantities and their default bounds. A free "input_scale" is the driver gain
#: u/z: input_scale = gain * current_scale(nominal design), so the drive per unit z stays in
#: [lo, hi] whatever the device becomes (the driver is calibrated to the device). A fixed
#: input_scale is a current per unit z in A: the device's gain then follows the design.
VARIABLES: dict[str, Variable] = {
    "diameter": Variable(("diameter_x", "diameter_y"), 20e-9, 100e-9, True, "m"),
    "thickness": Variable(("thickness",), 1e-9, 2.5e-9, True, "m"),
    "pulse_duration": Variable(("pulse_duration",), 0.3e-9, 3e-9, True, "s"),
    "eta1": Variable(("eta1",), 0.3, 0.9, False, "1"),
    "input_scale": Variable((), 0.5, 2.0, True, "1 (gain u/z)"),
    "Ms": Variable(("Ms",), 3e5, 2e6, True, "A/m"),
    "alpha": Variable(("alpha",), 2e-3, 0.1, True, "1"),
    "hk": Variable(("hk",), -1e4, 1e4, False, "A/m"),
    "h_bias": Variable(("h_bias",), -1e4, 1e4, False, "A/m", size=3),
    "xi1": Variable(("xi1",), -0.5, 0.5, False, "1"),
    "tmr1": Variable(("tmr1",), 0.2, 3.0, True, "1"),
    "ra1": Variable(("ra1",), 1e-13, 1e-10, True, "Ohm m^2"),
}
DEFAULT_FREE = ("diameter", "thickness", "pulse_duration", "eta1", "input_scale")


class DesignSpace(eqx.Module):
    """The free variables (names of `VARIABLES`) and their bounds (lo, hi), overridable."""

    free: tuple[str, ...] = eqx.field(static=True)
    bounds: tuple[tuple[str, float, float], ...] = eqx.field(static=True)

    def __init__(
        self,
        free: Sequence[str] = DEFAULT_FREE,
        bounds: Mapping[str, tuple[float, float]] | None = None,
    ):
        free = tuple(free)
        unknown = [n for n in free if n not in VARIABLES]
        if unknown or not free or len(set(free)) != len(free):
            raise ValueError(
                f"free: unknown or repeated variables {unknown or free}; "
                f"choose from {', '.join(VARIABLES)}"
            )
        bounds = dict(bounds or {})
        extra = [n for n in bounds if n not in free]
        if extra:
            raise ValueError(f"bounds: {extra} are not free variables")
        out = []
        for name in free:
            v = VARIABLES[name]
            lo, hi = (float(b) for b in bounds.get(name, (v.lo, v.hi)))
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi) or (v.log and lo <= 0):
                raise ValueError(
                    f"bounds[{name!r}]: need finite lo < hi (> 0 if log), got {lo, hi}"
                )
            out.append((name, lo, hi))
        self.free = free
        self.bounds = tuple(out)

    def bound(self, name: str) -> tuple[float, float]:
        for n, lo, hi in self.bounds:
            if n == name:
                return lo, hi
        raise KeyError(name)


def _to_unit(name: str, x, lo: float, hi: float):
    f = jnp.log if VARIABLES[name].log else (lambda a: a)
    return (f(x) - f(lo)) / (f(hi) - f(lo))


def _from_theta(name: str, theta, lo: float, hi: float):
    s = jax.nn.sigmoid(theta)
    if VARIABLES[name].log:
        x = jnp.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * s)
    else:
        x = lo + (hi - lo) * s
    return jnp.clip(x, lo, hi)  # rounding at a saturated end stays in bounds


class Design(eqx.Module):
    """Free device quantities as unconstrained variables; see the module docstring.

    `theta[name]`: unconstrained value(s) (trainable); `base`: the nominal device whose
    other fields stay fixed; `space`: the free variables and bounds; `fixed_input_scale`
    (A): the driver's current per unit z when "input_scale" is not free."""

    theta: dict[str, Float[Array, "..."]]
    base: DeviceParams
    fixed_input_scale: float = eqx.field(static=True)
    space: DesignSpace = eqx.field(static=True)

    def __init__(
        self,
        base: DeviceParams,
        space: DesignSpace | None = None,
        *,
        gain: float = 1.0,
        theta: Mapping[str, ArrayLike] | None = None,
    ):
        """Start at `base` (one device; its values of the free fields must lie strictly
        inside the bounds) with the driver at u/z = `gain` for it; or at explicit
        unconstrained `theta`. If "input_scale" is not free, the driver stays at
        gain * current_scale(base) amperes per unit z."""
        space = DesignSpace() if space is None else space
        if not isinstance(base, DeviceParams) or base.batch_shape != ():
            raise ValueError("base: expected one DeviceParams device")
        if not (math.isfinite(gain) and gain > 0):
            raise ValueError(f"gain: must be finite and > 0, got {gain}")
        self.base, self.space = base, space
        self.fixed_input_scale = float(gain * current_scale(base))
        if theta is not None:
            self.theta = {
                n: jnp.asarray(theta[n], dtype=jnp.result_type(float)) for n in space.free
            }
            return
        out = {}
        for name, lo, hi in space.bounds:
            v = VARIABLES[name]
            x = np.asarray(gain if name == "input_scale" else getattr(base, v.fields[0]))
            if v.size == 1 and x.shape != ():
                raise ValueError(f"{name}: expected a scalar, got shape {x.shape}")
            for f in v.fields[1:]:
                if not np.allclose(np.asarray(getattr(base, f)), x):
                    raise ValueError(f"{name}: base has different {v.fields} (tied when free)")
            if not np.all((x > lo) & (x < hi)):
                raise ValueError(
                    f"{name}: starting value {x} {v.unit} is not strictly inside the bounds "
                    f"({lo}, {hi}); widen them with DesignSpace(bounds=...)"
                )
            u = np.asarray(_to_unit(name, x, lo, hi), dtype=np.float64)
            out[name] = jnp.asarray(np.log(u) - np.log1p(-u), dtype=jnp.result_type(float))
        self.theta = out

    def value(self, name: str) -> Array:
        """Physical value of free variable `name` (gain for "input_scale")."""
        lo, hi = self.space.bound(name)
        return _from_theta(name, self.theta[name], lo, hi)

    def nominal(self) -> DeviceParams:
        """The nominal device with the free fields set from `theta` (in bounds)."""
        changes = {}
        for name in self.space.free:
            for f in VARIABLES[name].fields:
                changes[f] = self.value(name)
        return dataclasses.replace(self.base, **changes)

    def input_scale(self) -> Array:
        """Driver current per unit z (A): gain x current_scale(nominal) if "input_scale" is
        free, else the fixed current."""
        if "input_scale" in self.space.free:
            return self.value("input_scale") * current_scale(self.nominal())
        return jnp.asarray(self.fixed_input_scale)

    def gain(self) -> Array:
        """u/z of the nominal device."""
        return self.input_scale() / current_scale(self.nominal())

    def with_values(self, values: Mapping[str, ArrayLike]) -> Design:
        """Copy with the free variables in `values` set to these physical values (gain for
        "input_scale"), strictly inside their bounds; the others unchanged."""
        theta = dict(self.theta)
        for name, x in values.items():
            if name not in self.space.free:
                raise ValueError(f"values: {name!r} is not a free variable ({self.space.free})")
            lo, hi = self.space.bound(name)
            x = np.asarray(x, dtype=np.float64)
            if x.shape != np.shape(theta[name]) or not np.all((x > lo) & (x < hi)):
                raise ValueError(
                    f"values[{name!r}]: {x} must have shape {np.shape(theta[name])} and lie "
                    f"strictly inside ({lo}, {hi})"
                )
            u = np.asarray(_to_unit(name, x, lo, hi), dtype=np.float64)
            theta[name] = jnp.asarray(np.log(u) - np.log1p(-u), dtype=theta[name].dtype)
        return eqx.tree_at(lambda d: d.theta, self, theta)

    def values(self) -> dict[str, Any]:
        """Physical values of the free variables (floats / lists), with input_scale in A."""
        out = {n: np.asarray(self.value(n)).tolist() for n in self.space.free}
        out["input_scale_A"] = float(self.input_scale())
        return out


# --------------------------------------------------------------------------- the layer


def _box_settings(design: Design, deviations: Deviations | None, z_max: float, n_grid):
    """Pulse steps and table grid valid for every design in the box (and its population):
    the largest gain (gain bound x the steepest device's gain ratio) and the largest field
    rotation (field bounds x the longest pulse)."""
    space, base = design.space, design.nominal()
    devices = base if deviations is None else deviations.apply(base)
    ratio = float(jnp.max(current_scale(base) / current_scale(devices)))
    g_max = ratio * _largest_gain(design)
    g_max *= 1.05  # alpha enters the gain weakly; margin
    tau_max = space.bound("pulse_duration")[1] if "pulse_duration" in space.free else None
    tau_max = float(jnp.max(devices.pulse_duration)) * (
        1.0 if tau_max is None else tau_max / float(base.pulse_duration)
    )

    def field_max(name, values):
        if name in space.free:
            lo, hi = space.bound(name)
            return max(abs(lo), abs(hi)) * (math.sqrt(3) if name == "h_bias" else 1.0)
        return float(jnp.max(values))

    ms_max = space.bound("Ms")[1] if "Ms" in space.free else float(jnp.max(devices.Ms))
    h = (
        field_max("hk", jnp.abs(devices.hk))
        + field_max("h_bias", jnp.linalg.norm(devices.h_bias, axis=-1))
        + float(jnp.max(devices.demag)) * ms_max
    )
    alpha_max = space.bound("alpha")[1] if "alpha" in space.free else float(jnp.max(devices.alpha))
    lam2 = max(1.0, float(jnp.max(devices.lambda1)) ** 2)
    xi = space.bound("xi1")[1] if "xi1" in space.free else float(jnp.max(jnp.abs(devices.xi1)))
    grid = TableGrid.for_devices(base, current_scale(base) * g_max, z_max, n_grid)
    # spin torque: rotation <= (1 + |xi|)(1 + alpha) lambda^2 u per pulse, u <= gain |z|
    spin = (1 + abs(xi)) * (1 + alpha_max) * lam2 * g_max * grid.reach
    theta = spin + GAMMA0 * (1 + alpha_max) * h * tau_max
    return steps_for(theta, "rk4_scan"), grid


#: Variables whose box corners `_resolved_box_grid` checks first (those that shape the
#: dynamics); at most 2**8 corners, the other free variables stay at the start value.
_CORNER_ORDER = ("pulse_duration", "hk", "h_bias", "Ms", "input_scale", "alpha", "xi1",
                 "thickness", "diameter", "eta1")  # fmt: skip


def _resolved_box_grid(design: Design, grid: TableGrid, steps: int, refine: bool) -> TableGrid:
    """`grid`, refined (nodes doubled) until the response tables of the designs at the
    corners of the box (at the box's pulse `steps`) pass the resolution test
    (`mtjax.nn.activation.TABLE_D4_MAX`); without `refine` (a given n_grid) an unresolved
    corner raises ValueError (so does a box whose response is discontinuous in z, e.g. a
    switching threshold: narrow the bounds)."""
    names = [n for n in _CORNER_ORDER if n in design.space.free][:8]
    corners = []
    for c in range(2 ** len(names)):
        theta = dict(design.theta)
        for i, name in enumerate(names):
            theta[name] = jnp.full_like(theta[name], 30.0 if (c >> i) & 1 else -30.0)
        corners.append(eqx.tree_at(lambda d: d.theta, design, theta))
    devices = jax.tree.map(lambda *v: jnp.stack(v), *[d.nominal() for d in corners])
    scales = jnp.stack([d.input_scale() for d in corners])
    return resolved_table(devices, scales, grid, "rk4_scan", steps, None, refine=refine).grid


def _largest_gain(design: Design) -> float:
    """Largest u/z of the nominal device over the design box: the gain bound if the driver
    follows the device, else the fixed current over the smallest current scale among the
    corners of the box."""
    space = design.space
    if "input_scale" in space.free:
        return space.bound("input_scale")[1]
    names = [n for n in space.free if n != "input_scale"]
    smallest = float(current_scale(design.base))
    for corner in range(2 ** len(names)):
        changes = {}
        for i, name in enumerate(names):
            value = space.bound(name)[(corner >> i) & 1]
            for f in VARIABLES[name].fields:
                changes[f] = jnp.full_like(getattr(design.base, f), value)
        smallest = min(smallest, float(current_scale(design.base.replace(**changes))))
    return design.fixed_input_scale / smallest


class DesignedMTJ(eqx.Module):
    """A layer of `width` MTJ neurons designed by `design` (see the module docstring).

    `deviations` (n = width, or None for one shared device): fixed relative deviations of
    each neuron's device. Other arguments as `MTJActivation` (modes "table", "thermal",
    "ode", "sde", "analytic"; "ideal" ignores the device and is refused). `reset`, `v_read`,
    `t_read`: the energy model of `energy_per_neuron` (`mtjax.energy`)."""

    design: Design
    deviations: Deviations | None
    template: MTJActivation  # settings + cached tables of the last refresh (never trained)
    energy_cache: EnergyTable
    # A Python bool leaf, static under eqx.filter_jit (a compiled step each for live and
    # cached; a cached one never runs a rebuild), same pytree structure either way.
    live: bool
    # RK4 steps of the response-table and energy-table rebuilds (Python int leaves like
    # `live`): the lowest rung of `step_ladder(fast, box)` the step rule allows for the
    # current design; chosen by `set_live` and `refresh` outside jit; a rebuild re-checks
    # the rule (raises).
    rebuild_steps: int
    energy_steps: int
    reset: ResetModel
    v_read: float = eqx.field(static=True)
    t_read: float = eqx.field(static=True)
    fast_steps: int | None = eqx.field(static=True)  # None: no tables, or fast = box
    energy_fast_steps: int = eqx.field(static=True)
    energy_box_steps: int = eqx.field(static=True)
    energy_field_free: bool = eqx.field(static=True)  # energy tables in closed form
    inert: tuple[str, ...] = eqx.field(static=True)  # response-inert free variables
    accepts_key = True

    def __init__(
        self,
        design: Design,
        *,
        deviations: Deviations | None = None,
        mode: str = "table",
        derivative: str = "mz2",
        read_noise: float = 0.0,
        z_max: float = DEFAULT_Z_MAX,
        n_grid: int | None = None,
        reset: ResetModel | None = None,
        v_read: float = 0.05,
        t_read: float = 1e-9,
        energy: bool = False,
        thermal_std_limit: float | None = THERMAL_STD_LIMIT,
        field_free: bool | None = None,
    ):
        """`energy`: the training loss has an energy term (`EnergyLoss`), so free variables
        that change only the energy (not the response) are allowed; otherwise they raise
        ValueError, since their gradient would be structurally zero. `thermal_std_limit`: as
        `MTJActivation` (mode "thermal"; checked at every rebuild, so a design moved out of
        the validated range stops training with an error). `field_free` (modes "table" and
        "thermal"): build the response tables from their closed form (`MTJActivation`); None
        chooses it when no field variable (hk, h_bias) is free and every device has zero
        effective field and lambda1 = 1; a live rebuild then costs a small fraction of an
        RK4 one.
        The energy tables likewise (any mode; also lambda2 = 1), unless `field_free` is
        False."""
        if mode == "ideal":
            raise ValueError("mode='ideal' ignores the device: there is nothing to design")
        if mode == "analytic" and {"hk", "h_bias"} & set(design.space.free):
            raise ValueError("mode='analytic' assumes zero fields: hk/h_bias cannot be free")
        if field_free and {"hk", "h_bias"} & set(design.space.free):
            raise ValueError("field_free: hk/h_bias are free design variables")
        steps, grid = _box_settings(design, deviations, float(z_max), n_grid)
        if mode in ("table", "thermal"):
            grid = _resolved_box_grid(design, grid, steps, refine=n_grid is None)
        self.design, self.deviations = design, deviations
        self.reset = ResetModel() if reset is None else reset
        self.v_read, self.t_read = float(v_read), float(t_read)
        devices, scale = self._devices_and_scale(design, deviations)
        no_fields = not {"hk", "h_bias"} & set(design.space.free)
        self.energy_field_free = (
            field_free is not False and no_fields and not energy_field_free_violations(devices)
        )
        if field_free is None:
            field_free = (
                mode in ("table", "thermal") and no_fields and not field_free_violations(devices)
            )
        self.template = MTJActivation(
            devices, mode=mode, derivative=derivative, read_noise=read_noise,
            input_scale=scale, z_max=z_max, steps=steps, grid=grid,
            thermal_std_limit=thermal_std_limit, field_free=field_free,
        )  # fmt: skip
        self.fast_steps = None
        if mode in ("table", "thermal"):
            # the ladder's lowest rung: the steps the starting design needs, with a margin
            # for the design to move
            local = pulse_steps(devices, grid.reach * scale, "rk4_scan", None, DEFAULT_ODE_STEPS)
            fast = math.ceil(FAST_STEPS_MARGIN * local)
            self.fast_steps = fast if fast < steps else None
        # the starting design needs `local` <= fast_steps steps: the rung `set_live` picks
        self.rebuild_steps = steps if self.fast_steps is None else self.fast_steps
        # energy tables: the same kind of ladder, from the energy pulses' step rule
        self.energy_box_steps = max(DEFAULT_ENERGY_STEPS, steps)
        need = needed_energy_steps(devices, grid.reach * scale, self.reset)
        fast = self.energy_box_steps
        if not isinstance(need, jax.core.Tracer):
            fast = min(math.ceil(FAST_STEPS_MARGIN * float(need)), fast)
        self.energy_fast_steps = self.energy_steps = fast
        self.energy_cache = self._energy(devices, scale)
        self.live = False
        self.inert = ()
        inert = self.response_inert()
        self.inert = inert  # the response path gives them exactly zero gradient
        if inert and not energy:
            raise ValueError(
                f"free design variables {inert} do not change the response of these neurons "
                f"(mode={mode!r}, T = {float(jnp.max(devices.temperature))} K"
                + (", driver calibrated to the device" if "input_scale" in design.space.free
                   else "")
                + "): their gradient would be structurally zero. Fix them, add thermal noise, "
                "or pass energy=True with an energy term in the loss (EnergyLoss)"
            )  # fmt: skip

    @staticmethod
    def _devices_and_scale(design: Design, deviations: Deviations | None):
        nominal = design.nominal()
        devices = nominal if deviations is None else deviations.apply(nominal)
        return devices, design.input_scale()

    def _energy(self, devices, scale) -> EnergyTable:
        """Energy table of `devices` at `energy_steps`; fewer than the box's are re-checked
        against the step rule for these devices (ValueError, or `eqx.error_if` if traced)."""
        table = energy_table(
            devices, scale, self.template.grid, reset=self.reset, v_read=self.v_read,
            t_read=self.t_read, m0=self.template.m0, steps=self.energy_steps,
            field_free=self.energy_field_free,
        )  # fmt: skip
        if self.energy_steps >= self.energy_box_steps or self.energy_field_free:
            return table
        need = needed_energy_steps(devices, self.template.grid.reach * scale, self.reset)
        msg = (
            f"DesignedMTJ: {self.energy_steps} RK4 steps per energy pulse are too coarse for "
            "this design by the step rule (it moved); set_live or refresh choose the steps "
            "again"
        )
        if isinstance(need, jax.core.Tracer):
            return eqx.tree_at(lambda t: t.coef, table,
                               eqx.error_if(table.coef, need > self.energy_steps, msg))  # fmt: skip
        if float(need) > self.energy_steps:
            raise ValueError(f"{msg}: {float(need):.1f} needed")
        return table

    @property
    def n_devices(self) -> int | None:
        return self.template.n_devices

    def response_inert(self, tol: float = 1e-6) -> tuple[str, ...]:
        """Free variables whose directional derivative of the response tables is below
        `tol` (per unit theta) on a few devices: structurally no effect on the response."""
        few = self
        if self.deviations is not None and self.deviations.n > 4:
            sub = jax.tree.map(lambda a: a[:4], self.deviations)
            few = eqx.tree_at(lambda s: s.deviations, self, sub)
        sizes = {name: float(size) for name, size in _sensitivities(few).items()}
        bad = [name for name, size in sizes.items() if not np.isfinite(size)]
        if bad:
            raise FloatingPointError(f"non-finite design sensitivity of {bad}")
        return tuple(name for name, size in sizes.items() if size <= tol)

    def activation(self) -> MTJActivation:
        """The exact `MTJActivation` of the current design (tables rebuilt, differentiable).
        The `inert` variables are held (stop_gradient): their response gradient is
        structurally zero, and float32 round-off would otherwise move them under Adam."""
        design = self.design
        if self.inert:
            theta = {
                k: jax.lax.stop_gradient(v) if k in self.inert else v
                for k, v in design.theta.items()
            }
            design = eqx.tree_at(lambda d: d.theta, design, theta)
        devices, scale = self._devices_and_scale(design, self.deviations)
        return self.template.with_devices(devices, scale).with_fast_steps(self.rebuild_steps)

    def refreshed(self) -> DesignedMTJ:
        """Copy whose caches (tables, energy) match the current design, and not live."""
        devices, scale = jax.lax.stop_gradient(
            self._devices_and_scale(self.design, self.deviations)
        )
        act = eqx.tree_at(lambda a: (a.params, a.input_scale), self.template, (devices, scale))
        # a frozen (train_device=False) copy: the cache, built at the rebuild steps
        act = act.with_fast_steps(self.rebuild_steps).rebuild().with_fast_steps(None)
        energy = jax.lax.stop_gradient(self._energy(devices, scale))
        new = eqx.tree_at(lambda s: (s.template, s.energy_cache), self, (act, energy))
        return _with_live(new, False)

    def __call__(
        self, z: Float[ArrayLike, " n"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " n"]:
        """Activation of the neurons; live: through the rebuilt tables (exact design
        gradient), else through the cache (no design gradient)."""
        z = jnp.asarray(z, dtype=jnp.result_type(float))
        if _is_live(self):
            return self.activation()(z, key=key)
        return jax.lax.stop_gradient(self.template)(z, key=key)

    def energy_per_neuron(self, z: Float[ArrayLike, " n"]) -> Float[Array, " n"]:
        """Energy per activation (J) of each neuron at pre-activations z (write at z,
        reset, read; `mtjax.energy`), live or cached like `__call__`."""
        z = jnp.asarray(z, dtype=jnp.result_type(float))
        if _is_live(self):
            devices, scale = self._devices_and_scale(self.design, self.deviations)
            return self._energy(devices, scale).total(z)
        return jax.lax.stop_gradient(self.energy_cache).total(z)


def _is_live(layer: DesignedMTJ) -> bool:
    if isinstance(layer.live, jax.core.Tracer):
        raise TypeError(
            "DesignedMTJ.live is traced: pass models through eqx.filter_jit (which keeps "
            "Python bools static), not jax.jit"
        )
    return bool(layer.live)


@eqx.filter_jit
def _sensitivities(layer: DesignedMTJ) -> dict[str, Array]:
    """max |d tables / d theta_k| of the response tables, per free variable."""
    mode = layer.template.mode
    theta = layer.design.theta

    def tables(th):
        d = eqx.tree_at(lambda x: x.theta, layer.design, th)
        devices, scale = DesignedMTJ._devices_and_scale(d, layer.deviations)
        act = layer.template
        if act.n_devices is not None and devices.batch_shape != (act.n_devices,):
            act = eqx.tree_at(lambda a: a.m0, act, act.m0[: devices.batch_shape[0]])
        act = act.with_devices(devices, scale)
        if mode in ("table", "thermal"):
            return act._tables().coef
        z = jnp.linspace(-act.z_max, act.z_max, 33)
        if act.n_devices is not None:
            z = jnp.broadcast_to(z[:, None], (33, act.n_devices))
        key = jax.random.key(0) if act.stochastic else None
        return jax.vmap(lambda zz: jnp.stack(act.read(zz, key=key)))(z)

    out = {}
    for name in theta:
        tangent = {k: jnp.zeros_like(v) for k, v in theta.items()}
        tangent[name] = jnp.ones_like(theta[name])
        out[name] = jnp.max(jnp.abs(jax.jvp(tables, (theta,), (tangent,))[1]))
    return out


def _is_designed(x) -> bool:
    return isinstance(x, DesignedMTJ)


def designed_layers(model: PyTree) -> list[DesignedMTJ]:
    return [x for x in jax.tree_util.tree_leaves(model, is_leaf=_is_designed) if _is_designed(x)]


def _with_live(layer: DesignedMTJ, live: bool) -> DesignedMTJ:
    return eqx.tree_at(lambda s: s.live, layer, bool(live))


@eqx.filter_jit
def _needed_steps(layer: DesignedMTJ) -> tuple[Array, Array]:
    """Step-rule counts of the current design: (response tables, energy table)."""
    devices, scale = layer._devices_and_scale(layer.design, layer.deviations)
    energy = needed_energy_steps(devices, layer.template.grid.reach * scale, layer.reset)
    return layer.activation().needed_steps(), energy


def _chosen_steps(layer: DesignedMTJ) -> tuple[int, int]:
    """(rebuild_steps, energy_steps) for the current design: the lowest rungs of the step
    ladders that the step rule allows (the box's for a traced design)."""
    # closed-form tables take no steps: keep their counts (and the compiled step) as they are
    tables, energy_steps = layer.rebuild_steps, layer.energy_steps
    if layer.template.field_free and layer.energy_field_free:
        return tables, energy_steps
    need, energy = _needed_steps(layer)
    if not layer.template.field_free:
        box = layer.template.steps
        tables = box if layer.fast_steps is None else _rung(need, layer.fast_steps, box)
    if not layer.energy_field_free:
        energy_steps = _rung(energy, layer.energy_fast_steps, layer.energy_box_steps)
    return tables, energy_steps


def _with_chosen_steps(layer: DesignedMTJ) -> DesignedMTJ:
    return eqx.tree_at(lambda s: (s.rebuild_steps, s.energy_steps), layer, _chosen_steps(layer))


def set_live(model: PyTree, live: bool) -> PyTree:
    """`model` with every `DesignedMTJ` live (exact design gradient) or cached. The flag is
    a Python bool, static under `eqx.filter_jit`: a compiled step exists for each, and a
    cached step never runs a rebuild (inside a `lax.cond` it did: the live branch's
    residuals were materialized, ~1000x the cached step for 256 devices). Also picks the
    rebuild steps for the current design (`DesignedMTJ.rebuild_steps`)."""

    def update(x):
        return _with_live(_with_chosen_steps(x), live) if _is_designed(x) else x

    return jax.tree_util.tree_map(update, model, is_leaf=_is_designed)


@eqx.filter_jit
def _refresh_all(model):
    return jax.tree_util.tree_map(
        lambda x: x.refreshed() if _is_designed(x) else x, model, is_leaf=_is_designed
    )


def refresh(model: PyTree) -> PyTree:
    """`model` with every `DesignedMTJ` cache rebuilt for its current design (not live), at
    the rebuild steps that design allows."""
    if not designed_layers(model):
        return model
    chosen = jax.tree_util.tree_map(
        lambda x: _with_chosen_steps(x) if _is_designed(x) else x, model, is_leaf=_is_designed
    )
    return _refresh_all(chosen)


class DesignSchedule(eqx.Module):
    """`mtjax.train.train(..., on_step=DesignSchedule(every=K))`: step k is live (tables
    rebuilt inside the loss, exact design gradient, design updated) when k % K == K - 1;
    the caches are refreshed after each live step. K = 1: every step is live."""

    every: int = eqx.field(static=True, default=1)

    def __check_init__(self):
        if isinstance(self.every, bool) or int(self.every) != self.every or self.every < 1:
            raise ValueError(f"every: must be an integer >= 1, got {self.every!r}")

    def __call__(self, step: int, model: PyTree) -> PyTree:
        layers = designed_layers(model)
        if not layers:
            return model
        if bool(layers[0].live):  # the previous step changed the design
            model = refresh(model)
        return set_live(model, step % self.every == self.every - 1)


# --------------------------------------------------------------------------- optimizer


def _skip_when_zero(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner`, but steps whose updates are all exactly zero leave state and params alone
    (cached co-design steps give the design zero gradient; Adam would still move it)."""

    def init(params):
        return inner.init(params)

    def update(updates, state, params=None):
        leaves = [jnp.any(u != 0) for u in jax.tree_util.tree_leaves(updates)]
        active = jnp.stack(leaves).any() if leaves else jnp.asarray(False)
        new_updates, new_state = inner.update(updates, state, params)
        keep = lambda new, old: jnp.where(active, new, old)
        new_state = jax.tree_util.tree_map(keep, new_state, state)
        zero = jax.tree_util.tree_map(jnp.zeros_like, updates)
        return jax.tree_util.tree_map(keep, new_updates, zero), new_state

    return optax.GradientTransformation(init, update)


def _labels(params):
    def label(x):
        if isinstance(x, Design):
            return jax.tree_util.tree_map(lambda _: "design", x)
        return jax.tree_util.tree_map(lambda _: "weights", x)

    return jax.tree_util.tree_map(label, params, is_leaf=lambda x: isinstance(x, Design))


class JointState(eqx.Module):
    """State of `joint_optimizer`: that of the weights' transform and of the design's."""

    weights: Any
    design: Any


def _split_groups(tree):
    """(weight arrays, design arrays, each leaf's label, treedef) of a params-like tree."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    labels = jax.tree_util.tree_leaves(_labels(tree))
    weights = [x for x, label in zip(leaves, labels, strict=True) if label == "weights"]
    design = [x for x, label in zip(leaves, labels, strict=True) if label == "design"]
    return weights, design, labels, treedef


def joint_optimizer(
    weights: optax.GradientTransformation | optax.Schedule | float,
    *,
    design_lr: float = 0.05,
    design: optax.GradientTransformation | None = None,
) -> optax.GradientTransformation:
    """Weights and design with separate Optax transforms: `weights` (a transform, or a
    learning rate/schedule for Adam) and `design` (default Adam at `design_lr` on the
    unconstrained variables, skipped on steps where the design gradient is zero).
    `TrainConfig(optimizer=functools.partial(joint_optimizer, design_lr=...))` passes the
    run's schedule as `weights`.

    Each transform sees the flat list of its group's arrays (in the model's leaf order), so
    the state is two short lists, not two copies of the model's structure as with
    `optax.multi_transform` (the same updates; its state cost ~1 ms of Python dispatch per
    compiled training step, 0.4-0.6x a software-tanh step)."""
    if not isinstance(weights, optax.GradientTransformation):
        weights = optax.adam(weights)
    if design is None:
        if not (math.isfinite(design_lr) and design_lr > 0):
            raise ValueError(f"design_lr: must be finite and > 0, got {design_lr}")
        design = optax.adam(design_lr)
    design = _skip_when_zero(design)

    def init(params):
        w, d, _, _ = _split_groups(params)
        return JointState(weights.init(w), design.init(d))

    def update(updates, state, params=None):
        uw, ud, labels, treedef = _split_groups(updates)
        pw = pd = None
        if params is not None:
            pw, pd, _, _ = _split_groups(params)
        uw, sw = weights.update(uw, state.weights, pw)
        ud, sd = design.update(ud, state.design, pd)
        groups = {"weights": iter(uw), "design": iter(ud)}
        merged = [next(groups[label]) for label in labels]
        return jax.tree_util.tree_unflatten(treedef, merged), JointState(sw, sd)

    return optax.GradientTransformation(init, update)


# --------------------------------------------------------------------------- energy loss


def _mlp(model) -> MLP:
    if isinstance(model, MLP):
        return model
    if isinstance(model, HeadedClassifier):
        return model.head
    raise TypeError(f"model: energy needs an MLP or HeadedClassifier, got {type(model).__name__}")


def energy_per_example(model, x: Float[ArrayLike, "..."], *, key=None) -> Float[Array, ""]:
    """Energy (J) of one inference of one example: the sum over the `DesignedMTJ` neurons at
    the pre-activations they see (other layers contribute nothing)."""
    mlp = _mlp(model)
    if isinstance(model, HeadedClassifier):
        x = model.features(x)
    h = jnp.ravel(jnp.asarray(x))
    keys = [None] * len(mlp.activations)
    if key is not None:
        keys = list(jax.random.split(key, len(mlp.activations)))
    total = jnp.zeros((), jnp.result_type(float))
    for layer, act, k in zip(mlp.layers[:-1], mlp.activations, keys, strict=True):
        z = layer(h)
        if isinstance(act, DesignedMTJ):
            total = total + jnp.sum(act.energy_per_neuron(z))
            h = act(z, key=k)
        else:
            h = apply_activation(act, z, k)
    return total


class EnergyLoss(eqx.Module):
    """Per-example loss cross-entropy + `weight` x energy per inference / `reference` (J)
    for `mtjax.train.train(..., loss_fn=EnergyLoss(...))`. Both are arrays (traced in the
    compiled step): a sweep over weights compiles the training step once."""

    weight: Float[Array, ""]
    reference: Float[Array, ""]
    needs_model = True

    def __init__(self, weight: float | ArrayLike, reference: float | ArrayLike):
        for name, v, ok, need in (
            ("weight", weight, lambda a: a >= 0, ">= 0"),
            ("reference", reference, lambda a: a > 0, "> 0 (J)"),
        ):
            if not isinstance(v, jax.core.Tracer):
                a = np.asarray(v, dtype=np.float64)
                if a.shape != () or not (np.isfinite(a) and ok(a)):
                    raise ValueError(f"{name}: must be a finite scalar {need}, got {v!r}")
        self.weight = jnp.asarray(weight, dtype=jnp.result_type(float))
        self.reference = jnp.asarray(reference, dtype=jnp.result_type(float))

    def __call__(self, logits, x, y, *, model, key=None):
        ce = cross_entropy(logits, x, y)
        if key is None:
            energy = jax.vmap(lambda xi: energy_per_example(model, xi))(x)
        else:  # the examples' own keys (as in the logits): the same noisy activations
            keys = jax.random.split(key, x.shape[0])
            energy = jax.vmap(lambda xi, ki: energy_per_example(model, xi, key=ki))(x, keys)
        return ce + self.weight * energy / self.reference
