"""Fixed-step solvers know their range: accurate, or an error naming the fix (never silent)."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtjax
from mtjax.nn import MTJActivation

PAPER = mtjax.DeviceParams.paper()
I_S = float(mtjax.current_scale(PAPER))


def test_strong_pulse_is_accurate_or_an_error():
    # the probe: 10 or 1000 RK4 steps at 5 mA / 1 A returned far-off states silently
    with pytest.raises(ValueError, match="too coarse.*needs steps >="):
        mtjax.pulse_response(PAPER, 5e-3, solver="rk4_scan", steps=10)
    with pytest.raises(ValueError, match="too coarse"):
        mtjax.pulse_response(PAPER, 1.0, solver="rk4_scan", steps=1000)
    m = mtjax.pulse_response(PAPER, 1.0, solver="rk4_scan")  # steps chosen from the dynamics
    np.testing.assert_allclose(m, [1.0, 0.0, 0.0], atol=1e-3)
    with pytest.raises(eqx.EquinoxRuntimeError, match="max_steps"):  # adaptive: says so
        jax.block_until_ready(mtjax.pulse_response(PAPER, 1.0))
    # traced currents: the step guard raises inside jit
    f = eqx.filter_jit(jax.vmap(lambda i: mtjax.pulse_response(PAPER, i, solver="rk4_scan")))
    assert bool(jnp.all(jnp.isfinite(f(jnp.array([1e-5, 2e-4])))))
    with pytest.raises(eqx.EquinoxRuntimeError, match="too few steps"):
        jax.block_until_ready(f(jnp.array([1e-5, 1.0])))


def test_ensemble_refuses_too_few_steps():
    with pytest.raises(ValueError, match="too coarse"):
        mtjax.pulse_ensemble(PAPER, jnp.array([1e-5, 5e-3]), steps=10)
    m = mtjax.pulse_ensemble(PAPER, jnp.array([1e-5, 5e-3]))
    np.testing.assert_allclose(m[1], [1.0, 0.0, 0.0], atol=1e-3)


def test_fifty_percent_variation_tables_match_adaptive_solver():
    # high-gain devices (u/z up to ~38 here) need more pulse steps and a finer table near 0
    devs = mtjax.sample_devices(
        PAPER, jax.random.key(0), 32, mtjax.Spreads.relative(0.5, distribution="lognormal")
    )
    act = MTJActivation(devs, input_scale=I_S)
    zs = jnp.concatenate([jnp.linspace(-6, 6, 121), jnp.linspace(-0.2, 0.2, 41)])
    got = eqx.filter_jit(lambda z: jax.vmap(act.read)(z))(
        jnp.broadcast_to(zs[:, None], (len(zs), 32))
    )
    ref = jax.jit(
        jax.vmap(
            jax.vmap(
                lambda q, z: mtjax.pulse_response(
                    q, z * I_S, rtol=1e-8, atol=1e-8, max_steps=2**17
                ),
                in_axes=(0, None),
            ),
            in_axes=(None, 0),
        )
    )(devs, zs)
    gain = float(jnp.max(I_S / mtjax.current_scale(devs)))
    assert gain > 10  # the population really holds steep devices
    assert float(jnp.max(jnp.abs(got[0] - ref[..., 0]))) <= 1e-3
    assert float(jnp.max(jnp.abs(got[1] - ref[..., 2]))) <= 1e-3
    with pytest.raises(ValueError, match="steps"):
        MTJActivation(devs, input_scale=I_S, steps=10)


def test_adaptive_states_are_on_the_sphere():
    with jax.enable_x64(True):
        us = jnp.linspace(-3.0, 3.0, 25)
        p = mtjax.DeviceParams.paper(hk=2e3, xi1=0.2)
        ms = jax.vmap(lambda u: mtjax.pulse_response(p, u * I_S))(us)
        assert float(jnp.max(jnp.abs(jnp.linalg.norm(ms, axis=-1) - 1))) <= 1e-6


def test_saveat_accepts_diffrax_saveat_and_numpy_ints():
    tr = mtjax.simulate(PAPER, I_S, 1e-9, saveat=diffrax.SaveAt(t0=True, ts=[0.5e-9], t1=True))
    np.testing.assert_allclose(tr.ts, [0.0, 0.5e-9, 1e-9], rtol=1e-6)
    ref = mtjax.simulate(PAPER, I_S, 1e-9, saveat=np.array([0.0, 0.5e-9, 1e-9]))
    np.testing.assert_allclose(tr.ms, ref.ms, atol=1e-6)
    np.testing.assert_allclose(tr.ms[-1, 0], np.tanh(1.0), atol=1e-4)
    assert mtjax.simulate(PAPER, I_S, 1e-9, saveat=np.int64(5)).ms.shape == (5, 3)
    with pytest.raises(ValueError, match="saveat"):
        mtjax.simulate(PAPER, I_S, 1e-9, saveat=diffrax.SaveAt(steps=True))


@pytest.mark.parametrize("m0", [(0.0, 0.0, 0.0), (np.nan, 0.0, 1.0)])
def test_bad_initial_state_is_named(m0):
    with pytest.raises(ValueError, match="m0: must be a finite non-zero vector"):
        mtjax.simulate(PAPER, I_S, 1e-9, m0=m0)


def test_negative_duration_and_nan_drive_are_named():
    with pytest.raises(ValueError, match="t1: must be a finite duration > 0"):
        mtjax.simulate(PAPER, I_S, -1e-9)
    with pytest.raises(eqx.EquinoxRuntimeError, match="drive returned NaN"):
        mtjax.simulate(PAPER, lambda t: jnp.array([jnp.nan, 0.0]), 1e-9)


def test_traced_nonphysical_params_raise_inside_jit():
    f = eqx.filter_jit(lambda ms, eta: mtjax.pulse_response(PAPER.replace(Ms=ms, eta1=eta), I_S))
    assert bool(jnp.all(jnp.isfinite(f(1e6, 0.6))))
    for ms, eta in [(-1e6, 0.6), (1e6, 1.5)]:
        with pytest.raises(eqx.EquinoxRuntimeError, match="DeviceParams: a traced value"):
            jax.block_until_ready(f(ms, eta))


def test_analytic_mode_refuses_non_ideal_devices():
    p = mtjax.DeviceParams.paper(hk=2e3)
    with pytest.raises(ValueError, match="hk != 0"):
        MTJActivation(p, mode="analytic")
    with pytest.raises(ValueError, match="hk != 0"):
        mtjax.analytic_response(p, I_S)
    MTJActivation(PAPER.replace(xi1=0.2), mode="analytic")  # field-like torque is in the form


def test_params_print_with_units():
    text = repr(PAPER)
    assert "Ms=1e+06 A/m" in text and "pulse_duration=1e-09 s" in text and "f32[" not in text
    devs = mtjax.sample_devices(PAPER, jax.random.key(0), 8)
    assert "batch_shape=(8,)" in repr(devs) and "(mean +- std)" in repr(devs)


def test_tables_resolve_field_driven_precession_or_raise():
    # the probe: at hk = 2e4 A/m, tau = 2.9 ns the 129-node table was off by 0.29, and
    # MTJActivation(n_grid=33) at hk = 5e4 returned m_x = 1.084, both silently
    z = jnp.linspace(-6.0, 6.0, 1201)
    for p in (PAPER.replace(hk=2e4, pulse_duration=2.9e-9), PAPER.replace(hk=5e4)):
        act = MTJActivation(p, mode="table")  # grid refined until the resolution test passes
        assert act.n_grid > 129
        ref = MTJActivation(p, mode="ode", steps=400)
        assert float(jnp.max(jnp.abs(act(z) - ref(z)))) < 1e-3
    with pytest.raises(ValueError, match="33-node response table does not resolve.*n_grid"):
        MTJActivation(PAPER.replace(hk=5e4), mode="table", n_grid=33)
    assert MTJActivation(PAPER, mode="table").n_grid == 129  # the paper device: unchanged
    # traced params (co-design rebuilds inside the loss): the same test raises at run time
    grid = MTJActivation(PAPER, mode="table").grid

    @eqx.filter_jit
    def rebuilt(hk):
        p = PAPER.replace(hk=hk)
        return mtjax.nn.activation.build_table(p, I_S, grid=grid, steps=80).coef

    jax.block_until_ready(rebuilt(jnp.asarray(0.0)))
    with pytest.raises(eqx.EquinoxRuntimeError, match="does not resolve"):
        jax.block_until_ready(rebuilt(jnp.asarray(5e4)))


def test_table_resolution_test_bounds_the_midpoint_error():
    # the calibration behind TABLE_D4_MAX: midpoint error <= 0.1 x the largest 4th difference
    from mtjax.nn.activation import TableGrid, _build_table, _pulse, hermite_eval

    for p, n in ((PAPER, 17), (PAPER.replace(hk=1e4, pulse_duration=3e-9), 129),
                 (PAPER.replace(hk=2e4, pulse_duration=2.9e-9), 129),
                 (PAPER.replace(xi1=0.3, h_bias=jnp.array([0.0, 0.0, 4e3])), 33)):  # fmt: skip
        grid = TableGrid.for_devices(p, I_S, 6.0, n)
        table, d4 = _build_table(p, jnp.asarray(I_S), grid, "rk4_scan", 100, jnp.array([0, 0, 1.0]))
        s = -grid.s_max + (jnp.arange(n - 1) + 0.5) * grid.ds
        zm = grid.z0 * jnp.sinh(s)
        ref = jax.vmap(lambda z, p=p: _pulse(p, z * I_S, None, "rk4_scan", 100))(zm)
        err = float(jnp.max(jnp.abs(hermite_eval(table.coef, grid, zm) - ref)))
        assert err <= 0.1 * float(d4), (p.hk, n, err, float(d4))
