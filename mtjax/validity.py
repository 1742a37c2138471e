"""Where the "thermal" neuron's Gaussian moment statistics hold: a check against the SDE.

`thermal_vs_sde(params)`: for inputs z in [-3, 3] (13 points), the mean, std and correlation
of the two read-outs (m.p1, m.p2) of `MTJActivation(mode="thermal")` against
`pulse_ensemble` SDE runs (Stratonovich Heun, 1000 steps per pulse), N trajectories per
point. Criteria (README): mean within 3 standard errors + 2e-3, std within 10 %,
correlation within 0.1.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from mtjax.analytic import current_scale
from mtjax.ensemble import pulse_ensemble
from mtjax.nn import MTJActivation
from mtjax.params import DeviceParams

Z = np.linspace(-3.0, 3.0, 13)


def thermal_vs_sde(params: DeviceParams, n: int = 4096, seed: int = 0) -> dict[str, Any]:
    """Compare the thermal tables of one device (driver calibrated: u = z) with `n` SDE
    trajectories per input; returns the errors and whether all criteria pass."""
    if not isinstance(params, DeviceParams) or params.batch_shape != ():
        raise ValueError("params: expected one DeviceParams device")
    if int(n) != n or n < 64:
        raise ValueError(f"n: trajectories per point must be an integer >= 64, got {n!r}")
    n = int(n)
    if float(params.temperature) <= 0:
        raise ValueError("params.temperature: the check needs T > 0 (at T = 0 thermal == table)")
    i_s = float(current_scale(params))
    ms = pulse_ensemble(
        params, jnp.repeat(jnp.asarray(Z) * i_s, n), key=jax.random.key(seed), steps=1000
    )
    ref = np.asarray(ms).reshape(len(Z), n, 3)[..., [0, 2]]
    act = MTJActivation(params, mode="thermal", thermal_std_limit=None)  # the check itself
    keys = jax.random.split(jax.random.key(seed + 1), n)
    zz = jnp.broadcast_to(jnp.asarray(Z), (n, len(Z)))
    got = eqx.filter_jit(lambda a, z: jax.vmap(lambda zi, k: jnp.stack(a.read(zi, key=k)))(z, keys))
    got = np.transpose(np.asarray(got(act, zz)), (2, 0, 1))
    se = ref.std(1) / np.sqrt(n)
    mean_err = np.abs(got.mean(1) - ref.mean(1))
    std_rel = np.abs(got.std(1) / ref.std(1) - 1)
    corr = lambda a: np.array([np.corrcoef(a[i].T)[0, 1] for i in range(len(Z))])
    corr_err = np.abs(corr(got) - corr(ref))
    return {
        "std_mx_at_z0": float(ref[len(Z) // 2, :, 0].std()),
        "max_mean_error": mean_err.max(axis=0).tolist(),
        "max_mean_error_in_tolerance": float((mean_err / (3 * se + 2e-3)).max()),
        "max_std_rel_error": std_rel.max(axis=0).tolist(),
        "max_corr_error": float(corr_err.max()),
        "passes": bool(
            np.all(mean_err <= 3 * se + 2e-3) and np.all(std_rel <= 0.1) and corr_err.max() <= 0.1
        ),
    }
