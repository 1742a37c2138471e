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


def _small_noise_moments(p, u):
    """Mean and variance of m_x after a thermal pulse u from +z on the ideal device, to first
    order in the thermal diffusion D tau (an analytic oracle, no mtjax solver).

    Thermal noise is Brown's rotational diffusion, D = alpha gamma kB T / ((1+alpha^2) Ms V).
    The ideal device is symmetric about P1 = +x, so c = m_x alone obeys the Ito SDE
    dc = [r (1 - c^2) - 2 D c] dt + sqrt(2 D (1 - c^2)) dB with r tau = u. Expanding around
    c = tanh(s), s = r t, with d = D / r:
        var  = d sech^4(s) (s + sinh s cosh s)
        mean = tanh(s) - d (s tanh s sech^2 s + tanh^2 s)."""
    d_tau = float(
        p.alpha * p.gamma * KB * p.temperature / ((1 + p.alpha**2) * p.Ms * p.volume)
    ) * float(p.pulse_duration)
    s = np.abs(np.asarray(u, dtype=np.float64))
    d = d_tau / s
    t, sech2 = np.tanh(s), 1 / np.cosh(s) ** 2
    mean = np.sign(u) * (t - d * (s * t * sech2 + t**2))
    var = d * sech2**2 * (s + np.sinh(s) * np.cosh(s))
    return mean, var


def _thermal_mx(p, us, n, seed):
    """m_x of n thermal pulses per input u, (len(us), n) float64."""
    currents = jnp.repeat(jnp.asarray(us), n) * mtjax.current_scale(p)
    ms = jax.jit(lambda k: pulse_ensemble(p, currents, key=k, steps=500))(jax.random.key(seed))
    return np.asarray(ms[:, 0], dtype=np.float64).reshape(len(us), n)


CHI2_5_P001 = 20.52  # 0.999 quantile of chi^2 with 5 degrees of freedom


@pytest.mark.parametrize("diameter", [50e-9, 100e-9])
def test_thermal_pulse_mean_follows_tanh_with_thermal_shift(diameter):
    p = mtjax.DeviceParams.paper(diameter_x=diameter, diameter_y=diameter, temperature=300.0)
    us = np.array([-2.0, -0.5, 0.5, 1.0, 2.0])
    n = 4000
    mx = _thermal_mx(p, us, n, seed=2)
    mean_ref, _ = _small_noise_moments(p, us)
    se = mx.std(axis=1, ddof=1) / math.sqrt(n)  # 1.6e-4 (u = +-2) to 9e-4 (u = +-0.5) at 50 nm
    chi2 = float(np.sum(((mx.mean(1) - mean_ref) / se) ** 2))
    # measured chi2 (5 dof): 9.0 (50 nm), 9.3 (100 nm); every |z| < 2.4 (also with seed 3)
    assert chi2 < CHI2_5_P001, chi2
    # The test can fail: the thermal shift (mean_ref - tanh u, -1.3e-3 at u = 2 for 50 nm,
    # -3.3e-4 for 100 nm) is resolved: without it the same samples give chi2 = 192 (50 nm),
    # 60 (100 nm).
    chi2_no_shift = float(np.sum(((mx.mean(1) - np.tanh(us)) / se) ** 2))
    assert chi2_no_shift > CHI2_5_P001, chi2_no_shift


def test_thermal_spread_matches_small_noise_theory():
    """Variance of m_x against the analytic oracle; it scales as 1/V."""
    us = np.array([0.5, 1.0, 2.0])
    n = 4000
    variances = []
    for d in (50e-9, 100e-9):
        p = mtjax.DeviceParams.paper(diameter_x=d, diameter_y=d, temperature=300.0)
        mx = _thermal_mx(p, us, n, seed=3)
        _, var_ref = _small_noise_moments(p, us)
        var = mx.var(axis=1, ddof=1)
        # standard error of a sample variance: sqrt((mu4 - sigma^4) / n), ~ var sqrt(2/n)
        dev = mx - mx.mean(axis=1, keepdims=True)
        se = np.sqrt((np.mean(dev**4, axis=1) - var**2) / n)
        z = (var - var_ref) / se
        # measured |z| <= 1.6 (var / var_ref = 0.966..0.993, relative se 2.3%)
        assert np.all(np.abs(z) < 4), z
        # the test can fail: a 2x variance error is |z| > 40
        assert np.all(np.abs((var - 2 * var_ref) / se) > 4)
        variances.append(var)
    # thermal field variance ~ 1/V: 4x from 50 to 100 nm (to first order in D tau)
    ratio = variances[0] / variances[1]
    se_ratio = ratio * math.sqrt(2 * 2 / n)
    assert np.all(np.abs(ratio - 4) < 4 * se_ratio), ratio


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


def test_thermal_draws_pass_the_unit_bound_as_readme_states():
    """README ("The draws are Gaussian"): over z in [-6, 6] at most ~16 % of the thermal
    draws at one z pass |m.p| = 1, by up to 0.0075 (m.p1) / 0.035 (m.p2) at 50 nm and
    0.15 / 0.20 at 20 nm (16384 draws, seed 0), and clipping them would shrink the std there
    by ~13 % (why they are not clipped)."""
    from mtjax.nn import MTJActivation
    from mtjax.nn.activation import _thermal_sample

    z = jnp.linspace(-6.0, 6.0, 49)
    keys = jax.random.split(jax.random.key(0), 16384)
    for d, excess in ((50e-9, (0.0075, 0.035)), (20e-9, (0.15, 0.20))):
        act = MTJActivation(mtjax.DeviceParams.paper(diameter_x=d, diameter_y=d), mode="thermal")
        draws = jax.vmap(lambda k: _thermal_sample(act.table, z, k, True))(keys)  # noqa: B023
        for p, most in zip(draws, excess, strict=True):
            p = np.asarray(p, np.float64)
            frac = np.mean(np.abs(p) > 1, axis=0)
            assert 0.15 < frac.max() < 0.17, (d, frac.max())
            np.testing.assert_allclose(np.abs(p).max() - 1, most, rtol=0.05)
            at = np.argmax(frac)
            shrink = np.std(np.clip(p[:, at], -1, 1)) / np.std(p[:, at])
            assert 0.85 < shrink < 0.88, (d, shrink)
