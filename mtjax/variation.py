"""Device-to-device variation: sample a batch of devices around a nominal one.

Relative spreads (std / nominal) for Ms, thickness, diameters, eta, alpha and pulse
duration; absolute spreads (A/m) for the residual anisotropy field hk and each component of
the bias field. `distribution="normal"` draws x0 (1 + s xi) with xi clipped to [-3, 3];
`"lognormal"` draws x0 exp(s xi). Every sample is then clipped to its physical range
(positive quantities >= 1e-3 x0, eta in [0, 1]), so no sampled device is non-physical.
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from mtjax.constants import GAMMA0
from mtjax.params import DeviceParams

#: Spread name -> DeviceParams fields it perturbs (relative spreads).
RELATIVE = {
    "Ms": ("Ms",),
    "thickness": ("thickness",),
    "diameter": ("diameter_x", "diameter_y"),
    "eta": ("eta1", "eta2"),
    "alpha": ("alpha",),
    "pulse_duration": ("pulse_duration",),
}
DISTRIBUTIONS = ("normal", "lognormal")


class Spreads(eqx.Module):
    """Spreads of device-to-device variation (defaults: a typical 5 % process spread).

    Relative (fractions): Ms, thickness, diameter (each axis independently), eta (both
    polarizers), alpha, pulse_duration. Absolute (A/m): hk, h_bias (per component)."""

    Ms: float = 0.05
    thickness: float = 0.05
    diameter: float = 0.05
    eta: float = 0.05
    alpha: float = 0.05
    pulse_duration: float = 0.02
    hk: float = 200.0
    h_bias: float = 100.0
    distribution: str = eqx.field(static=True, default="normal")

    def __check_init__(self):
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"Spreads.distribution must be one of {DISTRIBUTIONS}")
        for name in (*RELATIVE, "hk", "h_bias"):
            value = getattr(self, name)
            if not (value >= 0 and value < float("inf")):
                raise ValueError(f"Spreads.{name} must be finite and >= 0, got {value}")
        if self.distribution == "normal":
            for name in RELATIVE:
                if getattr(self, name) >= 1 / 3:
                    raise ValueError(
                        f"Spreads.{name} >= 1/3 with normal sampling reaches zero at 3 sigma: "
                        "use distribution='lognormal'"
                    )

    @classmethod
    def relative(cls, s: float, params: DeviceParams | None = None, **kw) -> Spreads:
        """Every relative spread = s; hk and h_bias spreads = s * H_ref, where
        H_ref = 1 / (gamma0 tau) (the field that turns m by one radian in one pulse)."""
        tau = 1e-9 if params is None else float(jnp.mean(params.pulse_duration))
        h_ref = 1.0 / (GAMMA0 * tau)
        return cls(**{name: s for name in RELATIVE}, hk=s * h_ref, h_bias=s * h_ref, **kw)


class Deviations(eqx.Module):
    """Fixed device-to-device deviations of `n` devices, applied to any nominal device.

    `factors[name]` (n,): relative factor of each field of `RELATIVE` (x = x0 * factor,
    clipped to >= 1e-3 x0, eta to <= 1); `hk` (n,), `h_bias` (n, 3): additive offsets (A/m).
    Because they are fixed, a population `apply(nominal)` moves with its nominal design and
    gradients reach the nominal values (reparametrization)."""

    factors: dict[str, Float[Array, " n"]]
    hk: Float[Array, " n"]
    h_bias: Float[Array, "n 3"]

    @property
    def n(self) -> int:
        return int(self.hk.shape[0])

    def apply(self, params: DeviceParams) -> DeviceParams:
        """The `n` devices around the single device `params` (leading axis n)."""
        if params.batch_shape != ():
            raise ValueError(f"params: expected one nominal device, got {params.batch_shape}")
        out = {}
        for name, factor in self.factors.items():
            x0 = getattr(params, name)
            hi = 1.0 if name.startswith("eta") else jnp.inf
            out[name] = jnp.clip(x0 * factor, 1e-3 * x0, hi)
        out["hk"] = params.hk + self.hk
        out["h_bias"] = params.h_bias + self.h_bias
        n = self.n
        batched = jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), params)
        return dataclasses.replace(batched, **out)


def sample_deviations(
    key: PRNGKeyArray, n: int, spreads: Spreads | dict | None = None
) -> Deviations:
    """Draw the deviations of `n` devices (see `Spreads`; `sample_devices` applies them)."""
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n}")
    if spreads is None:
        spreads = Spreads()
    elif isinstance(spreads, dict):
        spreads = Spreads(**spreads)
    fields = [f for group in RELATIVE.values() for f in group]
    keys = dict(zip([*fields, "hk", "h_bias"], jax.random.split(key, len(fields) + 2), strict=True))
    factors = {}
    for group, names in RELATIVE.items():
        s = getattr(spreads, group)
        for name in names:
            xi = jax.random.normal(keys[name], (n,))
            if spreads.distribution == "normal":
                factors[name] = 1 + s * jnp.clip(xi, -3, 3)
            else:
                factors[name] = jnp.exp(s * xi)
    return Deviations(
        factors=factors,
        hk=spreads.hk * jax.random.normal(keys["hk"], (n,)),
        h_bias=spreads.h_bias * jax.random.normal(keys["h_bias"], (n, 3)),
    )


def sample_devices(
    params: DeviceParams, key: PRNGKeyArray, n: int, spreads: Spreads | dict | None = None
) -> DeviceParams:
    """`n` devices (leading axis n) drawn independently around the single device `params`."""
    if params.batch_shape != ():
        raise ValueError(f"params: expected one nominal device, got batch {params.batch_shape}")
    return sample_deviations(key, n, spreads).apply(params)


def sample_reset_states(key: PRNGKeyArray, n: int, offset: float) -> Float[Array, "n 3"]:
    """`n` imperfect reset states near +z: m0 = (a, b, 1) / |(a, b, 1)| with a, b ~ N(0, offset),
    so m_x(0) has a spread of about `offset` (pass as `MTJActivation(..., m0=...)`)."""
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n}")
    if not (offset >= 0 and offset < float("inf")):
        raise ValueError(f"offset must be finite and >= 0, got {offset}")
    ab = offset * jax.random.normal(key, (n, 2))
    m = jnp.concatenate([ab, jnp.ones((n, 1))], axis=1)
    return m / jnp.linalg.norm(m, axis=1, keepdims=True)
