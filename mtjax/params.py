"""Device parameters of the dual-polarizer MTJ, in SI units.

`DeviceParams` is an `equinox.Module`, hence a pytree: it can be batched (every leaf with
the same leading axes; one device per neuron), vmapped and differentiated. Construction
broadcasts all leaves to a common batch shape and validates concrete values; traced values
(inside `jit`/`vmap`) are not checked here, downstream functions guard with
`eqx.error_if` instead.
"""

from __future__ import annotations

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from mtjax.constants import GAMMA_E

#: Scalar fields: name -> (rule, unit). Rules: "pos" (> 0), "nonneg" (>= 0),
#: "unit" (0 <= x <= 1), "any" (finite).
SCALAR_FIELDS: dict[str, tuple[str, str]] = {
    "Ms": ("pos", "A/m"),
    "alpha": ("nonneg", "1"),
    "gamma": ("pos", "rad/(s T)"),
    "thickness": ("pos", "m"),
    "diameter_x": ("pos", "m"),
    "diameter_y": ("pos", "m"),
    "hk": ("any", "A/m"),
    "eta1": ("unit", "1"),
    "eta2": ("unit", "1"),
    "lambda1": ("pos", "1"),
    "lambda2": ("pos", "1"),
    "xi1": ("any", "1"),
    "xi2": ("any", "1"),
    "tmr1": ("pos", "1"),
    "tmr2": ("pos", "1"),
    "ra1": ("pos", "Ohm m^2"),
    "ra2": ("pos", "Ohm m^2"),
    "temperature": ("nonneg", "K"),
    "pulse_duration": ("pos", "s"),
}
#: Vector fields (last axis 3): name -> (rule, unit). "dir": non-zero length;
#: "demag": each component in [0, 1].
VECTOR_FIELDS: dict[str, tuple[str, str]] = {
    "hk_axis": ("dir", "1"),
    "demag": ("demag", "1"),
    "h_bias": ("any", "A/m"),
    "p1": ("dir", "1"),
    "p2": ("dir", "1"),
}


class DeviceParams(eqx.Module):
    """One dual-polarizer MTJ (or a batch of them), SI units.

    Free layer: `Ms` saturation magnetization (A/m); `alpha` Gilbert damping (1);
    `gamma` gyromagnetic ratio |gamma| (rad/(s T)); `thickness` (m); `diameter_x`,
    `diameter_y` ellipse axes (m; equal for a disk). Fields: `hk` uniaxial anisotropy field
    (A/m, H_k = 2K/(mu0 Ms); negative means a hard axis) along `hk_axis` (unit-less
    direction); `demag` diagonal demagnetization factors (Nx, Ny, Nz), each in [0, 1];
    `h_bias` bias/stray field vector (A/m). Polarizers (P1 = `p1`, `eta1`, `lambda1`,
    `xi1`, `tmr1`, `ra1`; P2 = `p2`, `eta2`, `lambda2`, `xi2`, `tmr2`, `ra2`): direction
    (normalized on use), spin polarization in [0, 1], Slonczewski asymmetry (1 = no angular
    dependence), field-like ratio (b = xi a), TMR ratio (1 = 100 %), resistance-area
    product (Ohm m^2). `temperature` (K) sets the thermal field when a PRNG key is given to
    the solvers; `pulse_duration` (s).
    """

    Ms: Float[Array, "*batch"]
    alpha: Float[Array, "*batch"]
    gamma: Float[Array, "*batch"]
    thickness: Float[Array, "*batch"]
    diameter_x: Float[Array, "*batch"]
    diameter_y: Float[Array, "*batch"]
    hk: Float[Array, "*batch"]
    hk_axis: Float[Array, "*batch 3"]
    demag: Float[Array, "*batch 3"]
    h_bias: Float[Array, "*batch 3"]
    p1: Float[Array, "*batch 3"]
    eta1: Float[Array, "*batch"]
    lambda1: Float[Array, "*batch"]
    xi1: Float[Array, "*batch"]
    tmr1: Float[Array, "*batch"]
    ra1: Float[Array, "*batch"]
    p2: Float[Array, "*batch 3"]
    eta2: Float[Array, "*batch"]
    lambda2: Float[Array, "*batch"]
    xi2: Float[Array, "*batch"]
    tmr2: Float[Array, "*batch"]
    ra2: Float[Array, "*batch"]
    temperature: Float[Array, "*batch"]
    pulse_duration: Float[Array, "*batch"]

    def __init__(
        self,
        *,
        Ms: ArrayLike = 1e6,
        alpha: ArrayLike = 0.01,
        gamma: ArrayLike = GAMMA_E,
        thickness: ArrayLike = 1.5e-9,
        diameter_x: ArrayLike = 50e-9,
        diameter_y: ArrayLike = 50e-9,
        hk: ArrayLike = 0.0,
        hk_axis: ArrayLike = (0.0, 0.0, 1.0),
        demag: ArrayLike = (0.0, 0.0, 0.0),
        h_bias: ArrayLike = (0.0, 0.0, 0.0),
        p1: ArrayLike = (1.0, 0.0, 0.0),
        eta1: ArrayLike = 0.6,
        lambda1: ArrayLike = 1.0,
        xi1: ArrayLike = 0.0,
        tmr1: ArrayLike = 1.0,
        ra1: ArrayLike = 5e-12,
        p2: ArrayLike = (0.0, 0.0, 1.0),
        eta2: ArrayLike = 0.6,
        lambda2: ArrayLike = 1.0,
        xi2: ArrayLike = 0.0,
        tmr2: ArrayLike = 1.0,
        ra2: ArrayLike = 5e-12,
        temperature: ArrayLike = 300.0,
        pulse_duration: ArrayLike = 1e-9,
    ):
        values = dict(locals())
        values.pop("self")
        values.pop("__class__", None)
        arrays = {k: _as_float_array(k, v) for k, v in values.items()}
        batch = _batch_shape(arrays)
        for name, arr in arrays.items():
            shape = batch + ((3,) if name in VECTOR_FIELDS else ())
            arr = jnp.broadcast_to(arr, shape)
            _check_values(name, arr)
            setattr(self, name, arr)

    @classmethod
    def paper(cls, **overrides) -> DeviceParams:
        """Reconstructed tanh neuron of arXiv 2409.02528 (Ms 1e6 A/m, alpha 0.01,
        t 1.5 nm, 50 nm disk, eta 0.6, zero effective anisotropy, xi 0, tau 1 ns,
        P1 = +x, P2 = +z, 300 K). Keyword arguments override fields."""
        return cls(**overrides)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """Leading (device) axes shared by every leaf; () for one device."""
        return tuple(self.Ms.shape)

    @property
    def area(self) -> Float[Array, "*batch"]:
        """Junction area of the elliptical pillar (m^2)."""
        return math.pi * self.diameter_x * self.diameter_y / 4

    @property
    def volume(self) -> Float[Array, "*batch"]:
        """Free-layer volume (m^3)."""
        return self.area * self.thickness

    def __repr__(self) -> str:
        items = []
        for name, (_, unit) in (SCALAR_FIELDS | VECTOR_FIELDS).items():
            leaf = _format_leaf(getattr(self, name), unit, name in VECTOR_FIELDS)
            items.append(f"{name}={leaf}")
        batch = f"batch_shape={self.batch_shape}, " if self.batch_shape else ""
        return f"DeviceParams({batch}{', '.join(items)})"

    def checked(self) -> DeviceParams:
        """`self`, with the validation rules attached as `eqx.error_if` checks when some
        leaves are traced (inside jit/vmap/grad); concrete params were checked at construction."""
        leaves = {f: getattr(self, f) for f in SCALAR_FIELDS | VECTOR_FIELDS}
        if not any(isinstance(v, jax.core.Tracer) for v in leaves.values()):
            return self
        bad = jnp.zeros(self.batch_shape, bool)
        for name, v in leaves.items():
            bad = bad | _violates(name, v)
        ms = eqx.error_if(self.Ms, jnp.any(bad), _TRACED_MESSAGE)
        return dataclasses.replace(self, Ms=ms)

    def replace(self, **changes) -> DeviceParams:
        """Copy with some fields changed (validated like the constructor)."""
        return dataclasses.replace(self, **changes)


def over_devices(fn, params: DeviceParams, *args):
    """`fn(device, *per_device_args)` mapped (vmapped) over every batch axis of `params`;
    `args` share those leading axes. For one device it is a plain call."""
    mapped = fn
    for _ in params.batch_shape:
        mapped = jax.vmap(mapped)
    return mapped(params, *args)


def _format_leaf(v, unit: str, vector: bool) -> str:
    """`1e+06 A/m`, `(1, 0, 0)`, or for a batch `mean +- std` (or one value if all equal)."""
    unit = "" if unit == "1" else f" {unit}"
    if isinstance(v, jax.core.Tracer):
        return f"<traced {v.dtype}{list(v.shape)}>"
    a = np.asarray(v, dtype=np.float64)
    rows = a.reshape(-1, 3) if vector else a.reshape(-1, 1)
    fmt = lambda r: "(" + ", ".join(f"{x:.4g}" for x in r) + ")" if vector else f"{r[0]:.4g}"
    if np.all(rows == rows[0]):
        return fmt(rows[0]) + unit + (" (all)" if a.ndim > vector else "")
    mean, std = rows.mean(axis=0), rows.std(axis=0)
    return f"{fmt(mean)} +- {fmt(std)}{unit} (mean +- std)"


_TRACED_MESSAGE = (
    "DeviceParams: a traced value breaks its rule (Ms, gamma, thickness, diameters, lambda, "
    "TMR, RA, pulse_duration > 0; alpha, temperature >= 0; eta in [0, 1]; demag in [0, 1]; "
    "polarizer and anisotropy axes non-zero; all finite)"
)


def _violates(name: str, v: Array) -> Array:
    """Traced version of `_check_values`: True per device where `v` breaks the rule."""
    rule = (SCALAR_FIELDS | VECTOR_FIELDS)[name][0]
    vec = name in VECTOR_FIELDS
    finite = jnp.all(jnp.isfinite(v), axis=-1) if vec else jnp.isfinite(v)
    if rule == "pos":
        ok = v > 0
    elif rule == "nonneg":
        ok = v >= 0
    elif rule == "unit":
        ok = (v >= 0) & (v <= 1)
    elif rule == "demag":
        ok = jnp.all((v >= 0) & (v <= 1), axis=-1)
    elif rule == "dir":
        ok = jnp.sum(v * v, axis=-1) > 0
    else:
        ok = True
    return ~(finite & ok)


def _as_float_array(name: str, value) -> Array:
    if isinstance(value, jax.core.Tracer):
        return value
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"DeviceParams.{name}: expected a real number/array, got {value!r}"
        ) from err
    return jnp.asarray(arr, dtype=jnp.result_type(float))


def _batch_shape(arrays: dict[str, Array]) -> tuple[int, ...]:
    batch: tuple[int, ...] = ()
    for name, arr in arrays.items():
        if name in VECTOR_FIELDS:
            if arr.ndim == 0 or arr.shape[-1] != 3:
                raise ValueError(
                    f"DeviceParams.{name}: must have a last axis of length 3, got shape {arr.shape}"
                )
            lead = tuple(arr.shape[:-1])
        else:
            lead = tuple(arr.shape)
        try:
            batch = tuple(np.broadcast_shapes(batch, lead))
        except ValueError:
            raise ValueError(
                f"DeviceParams.{name}: batch shape {lead} does not match the other fields' {batch}"
            ) from None
    return batch


def _check_values(name: str, arr: Array) -> None:
    if isinstance(arr, jax.core.Tracer):
        return
    rule, unit = (SCALAR_FIELDS | VECTOR_FIELDS)[name]
    a = np.asarray(arr)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"DeviceParams.{name}: must be finite, got {a}")
    bad = {
        "pos": lambda: np.any(a <= 0),
        "nonneg": lambda: np.any(a < 0),
        "unit": lambda: np.any((a < 0) | (a > 1)),
        "demag": lambda: np.any((a < 0) | (a > 1)),
        "dir": lambda: np.any(np.linalg.norm(a, axis=-1) == 0),
        "any": lambda: False,
    }[rule]()
    if bad:
        need = {
            "pos": "> 0",
            "nonneg": ">= 0",
            "unit": "in [0, 1]",
            "demag": "components in [0, 1]",
            "dir": "a non-zero vector",
        }[rule]
        raise ValueError(f"DeviceParams.{name} ({unit}) must be {need}, got {a}")
