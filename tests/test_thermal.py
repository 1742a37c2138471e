"""Stochastic LLGS: Boltzmann equilibrium, thermal pulse statistics, fast path vs Diffrax."""

import io
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtjax
from mtjax.constants import KB, MU0
from mtjax.ensemble import pulse_ensemble


def _ks_pvalue(samples, cdf):
    """Two-sided one-sample Kolmogorov-Smirnov p-value (asymptotic series)."""
    x = np.sort(np.asarray(samples, dtype=np.float64))
    n = len(x)
    f = cdf(x)
    d = max(np.max(np.arange(1, n + 1) / n - f), np.max(f - np.arange(n) / n))
    lam = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * d
    k = np.arange(1, 101)
    return float(np.clip(2 * np.sum((-1.0) ** (k - 1) * np.exp(-2 * k**2 * lam**2)), 0, 1))


def _boltzmann_mz_cdf(delta):
    """CDF of m_z = cos(theta) for P(theta) ~ sin(theta) exp(-delta sin^2 theta)."""
    grid = np.linspace(-1, 1, 20001)
    pdf = np.exp(delta * (grid**2 - 1))
    cdf = np.concatenate([[0], np.cumsum((pdf[1:] + pdf[:-1]) / 2 * np.diff(grid))])
    return lambda x: np.interp(x, grid, cdf / cdf[-1])


@pytest.mark.parametrize("delta", [2.0, 5.0])
def test_equilibrium_distribution_matches_boltzmann(delta):
    base = mtjax.DeviceParams.paper(alpha=1.0, temperature=300.0)
    hk = delta * 2 * KB * 300.0 / (MU0 * 1e6 * float(base.volume))  # Delta = mu0 Ms Hk V / 2kT
    p = base.replace(hk=hk, pulse_duration=10e-9)  # ~20 relaxation times
    n = 4000
    m0 = jnp.where(jnp.arange(n)[:, None] % 2 == 0, 1.0, -1.0) * jnp.array([0.0, 0.0, 1.0])
    run = jax.jit(
        jax.vmap(
            lambda k, m: mtjax.pulse_response(p, 0.0, m0=m, key=k, solver="heun_scan", steps=5000)
        )
    )
    mz = run(jax.random.split(jax.random.key(1), n), m0)[:, 2]
    cdf = _boltzmann_mz_cdf(delta)
    assert _ks_pvalue(mz, cdf) > 0.01
    # the test can fail: the same samples reject a wrong barrier
    assert _ks_pvalue(mz, _boltzmann_mz_cdf(delta * 1.5)) < 0.01


@pytest.mark.parametrize("diameter", [50e-9, 100e-9])
def test_thermal_pulse_mean_follows_tanh(diameter):
    p = mtjax.DeviceParams.paper(diameter_x=diameter, diameter_y=diameter, temperature=300.0)
    us = jnp.array([-2.0, -0.5, 0.5, 1.0, 2.0])
    n = 4000
    currents = jnp.repeat(us, n) * mtjax.current_scale(p)
    ms = jax.jit(lambda k: pulse_ensemble(p, currents, key=k, steps=500))(jax.random.key(2))
    mx = ms[:, 0].reshape(len(us), n)
    assert float(jnp.max(jnp.abs(mx.mean(1) - jnp.tanh(us)))) < 0.02


def test_thermal_spread_shrinks_with_volume():
    stds = []
    for d in (50e-9, 100e-9):
        p = mtjax.DeviceParams.paper(diameter_x=d, diameter_y=d, temperature=300.0)
        currents = jnp.full(4000, mtjax.current_scale(p))
        ms = pulse_ensemble(p, currents, key=jax.random.key(3), steps=500)
        stds.append(float(jnp.std(ms[:, 0])))
    # thermal field variance ~ 1/V: std ratio = sqrt(V100/V50) = 2
    assert stds[0] / stds[1] == pytest.approx(2.0, rel=0.1)
    assert stds[1] > 0.005


def test_fast_path_matches_diffrax_sde_statistically():
    p = mtjax.DeviceParams.paper(temperature=300.0, alpha=0.1, hk=3e3, h_bias=(2e3, 0.0, 0.0))
    i = 0.8 * mtjax.current_scale(p)
    n, steps = 1500, 200
    keys = jax.random.split(jax.random.key(4), n)

    def run(solver):
        f = jax.vmap(lambda k: mtjax.pulse_response(p, i, key=k, solver=solver, steps=steps))
        return np.asarray(jax.jit(f)(keys), dtype=np.float64)

    fast, ref = run("heun_scan"), run("heun")
    for c in range(3):
        se = math.sqrt(fast[:, c].var() / n + ref[:, c].var() / n)
        assert abs(fast[:, c].mean() - ref[:, c].mean()) < 4 * se + 1e-4, c
        # variance: relative standard error ~ sqrt(2/n) each
        ratio = fast[:, c].var() / ref[:, c].var()
        assert abs(ratio - 1) < 4 * math.sqrt(4 / n), c
    assert fast[:, 0].std() > 0.01  # noise is really on


@pytest.mark.parametrize("solver", ["heun", "heun_scan"])
def test_zero_temperature_reduces_exactly_to_deterministic(solver):
    p = mtjax.DeviceParams.paper(temperature=0.0, hk=2e3, h_bias=(1e3, 0.0, 5e2))
    i = 1.2 * mtjax.current_scale(p)
    noisy = mtjax.pulse_response(p, i, key=jax.random.key(5), solver=solver, steps=300)
    clean = mtjax.pulse_response(p, i, solver=solver, steps=300)
    np.testing.assert_array_equal(noisy, clean)
    hot = mtjax.pulse_response(
        p.replace(temperature=300.0), i, key=jax.random.key(5), solver=solver, steps=300
    )
    assert float(jnp.max(jnp.abs(hot - clean))) > 1e-4


def test_ensemble_chunking_is_invisible():
    p = mtjax.DeviceParams.paper()
    currents = jnp.linspace(-2, 2, 37) * mtjax.current_scale(p)
    key = jax.random.key(6)
    a = pulse_ensemble(p, currents, key=key, steps=100, chunk_size=5)
    b = pulse_ensemble(p, currents, key=key, steps=100, chunk_size=1000)
    np.testing.assert_allclose(a, b, atol=1e-6)
    # trajectory i is pulse_response with key split(key, n)[i]
    keys = jax.random.split(key, 37)
    ref = jax.vmap(lambda k, c: mtjax.pulse_response(p, c, key=k, solver="heun_scan", steps=100))(
        keys, currents
    )
    np.testing.assert_allclose(a, ref, atol=1e-5)
    with pytest.raises(ValueError, match="currents"):
        pulse_ensemble(p, jnp.ones((3, 3)))


def test_ensemble_matches_adaptive_solver_for_batched_devices():
    p = mtjax.variation.sample_devices(
        mtjax.DeviceParams.paper(hk=2e3, h_bias=(1e3, 0.0, 0.0)), jax.random.key(7), 9,
        mtjax.Spreads.relative(0.1),
    )  # fmt: skip
    currents = jnp.stack([jnp.linspace(-2, 2, 9), jnp.linspace(0.5, -0.5, 9)], 1) * 8e-5
    got = pulse_ensemble(p, currents, steps=1000, chunk_size=4)
    ref = jax.vmap(mtjax.pulse_response)(p, currents)
    assert float(jnp.max(jnp.abs(got - ref))) < 1e-4


def test_ensemble_spreads_over_several_devices():
    """Two CPU devices (one per core): same numbers as one device."""
    code = (
        "import jax, jax.numpy as jnp, numpy as np, mtjax;"
        "assert jax.local_device_count() == 2;"
        "p = mtjax.DeviceParams.paper();"
        "c = jnp.linspace(-2, 2, 41) * mtjax.current_scale(p);"
        "m = mtjax.pulse_ensemble(p, c, key=jax.random.key(0), steps=50, chunk_size=8);"
        "import sys, io; b = io.BytesIO(); np.save(b, np.asarray(m));"
        "sys.stdout.buffer.write(b.getvalue())"
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, check=True
    ).stdout
    two = np.load(io.BytesIO(out))
    p = mtjax.DeviceParams.paper()
    c = jnp.linspace(-2, 2, 41) * mtjax.current_scale(p)
    one = pulse_ensemble(p, c, key=jax.random.key(0), steps=50, chunk_size=8)
    np.testing.assert_allclose(two, one, atol=1e-6)


def test_ensemble_nan_current_raises():
    p = mtjax.DeviceParams.paper()
    with pytest.raises(Exception, match="non-finite"):
        jax.block_until_ready(pulse_ensemble(p, jnp.array([1e-5, jnp.nan]), steps=10))
