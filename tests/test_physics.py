"""Deterministic LLGS physics: analytic oracles, gradients, input validation."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtjax
from mtjax.constants import GAMMA0
from mtjax.params import SCALAR_FIELDS, VECTOR_FIELDS

TIGHT = dict(rtol=1e-10, atol=1e-10)


def test_paper_preset_values():
    p = mtjax.DeviceParams.paper()
    assert p.batch_shape == ()
    np.testing.assert_allclose(p.area, np.pi * 25e-9**2, rtol=1e-6)
    np.testing.assert_allclose(p.volume, np.pi * 25e-9**2 * 1.5e-9, rtol=1e-6)
    # I_s by hand: a = 1/(gamma0 tau), J = a 2 e mu0 Ms t / (hbar eta), I = J area
    a = 1 / (GAMMA0 * 1e-9) * (1 + 0.01**2)
    i_s = a * 2 * 1.602176634e-19 * 1.25663706212e-6 * 1e6 * 1.5e-9 / (1.054571817e-34 * 0.6)
    np.testing.assert_allclose(mtjax.current_scale(p), i_s * np.pi * 25e-9**2, rtol=1e-5)


def test_norm_preserved_over_10ns():
    p = mtjax.DeviceParams.paper(hk=2e4, hk_axis=(1, 0, 1), h_bias=(1e4, 0, 3e4), xi1=0.2)
    i_s = mtjax.current_scale(p)
    tr = mtjax.simulate(p, (2 * i_s, 0.5 * i_s), 10e-9, m0=(0.3, 0.2, 0.9), saveat=201)
    assert tr.ms.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(jnp.linalg.norm(tr.ms, axis=-1) - 1))) <= 1e-6


def test_larmor_precession():
    with jax.enable_x64(True):
        h = 8e4
        p = mtjax.DeviceParams.paper(alpha=0.0, h_bias=(0, 0, h))
        m0 = jnp.array([1.0, 0.0, 1.0]) / jnp.sqrt(2.0)
        tr = mtjax.simulate(p, 0.0, 10e-9, m0=m0, saveat=2001, **TIGHT)
        phase = np.unwrap(np.arctan2(tr.ms[:, 1], tr.ms[:, 0]))
        freq = np.polyfit(np.asarray(tr.ts), phase, 1)[0] / (2 * np.pi)
        expected = GAMMA0 * h / (2 * np.pi)
        assert abs(freq / expected - 1) < 1e-4
        np.testing.assert_allclose(tr.ms[:, 2], m0[2], atol=1e-8)


def test_damped_relaxation():
    with jax.enable_x64(True):
        h, alpha, mz0 = 5e4, 0.05, -0.9
        p = mtjax.DeviceParams.paper(alpha=alpha, h_bias=(0, 0, h))
        m0 = jnp.array([np.sqrt(1 - mz0**2), 0.0, mz0])
        tr = mtjax.simulate(p, 0.0, 5e-9, m0=m0, saveat=201, **TIGHT)
        expected = np.tanh(alpha * GAMMA0 * h * tr.ts / (1 + alpha**2) + np.arctanh(mz0))
        assert np.max(np.abs(tr.ms[:, 2] - expected)) <= 1e-4
        assert expected[-1] > 0.8  # the run really relaxed


@pytest.mark.parametrize("xi", [0.0, 0.2])
def test_paper_device_tanh_sech(xi):
    p = mtjax.DeviceParams.paper(xi1=xi)
    us = jnp.linspace(-3.0, 3.0, 61)
    ms = jax.vmap(lambda u: mtjax.pulse_response(p, u * mtjax.current_scale(p)))(us)
    u, psi = jax.vmap(lambda u: mtjax.pulse_angles(p, u * mtjax.current_scale(p)))(us)
    np.testing.assert_allclose(u, us, rtol=1e-5)
    assert float(jnp.max(jnp.abs(ms[:, 0] - jnp.tanh(u)))) <= 1e-4
    assert float(jnp.max(jnp.abs(ms[:, 2] - jnp.cos(psi) / jnp.cosh(u)))) <= 1e-4
    assert float(jnp.max(jnp.abs(ms[:, 1] + jnp.sin(psi) / jnp.cosh(u)))) <= 1e-4
    if xi:
        assert float(jnp.max(jnp.abs(psi))) > 0.5  # psi matters: the check is not vacuous


def test_sech_and_the_closed_form_are_finite_at_any_drive():
    # 1 / jnp.cosh has a NaN gradient beyond |u| ~ 89 in float32; physics.sech does not
    from mtjax.physics import sech

    x = jnp.array([0.0, 0.7, -20.0, 95.0, -400.0, 1e6])
    with np.errstate(over="ignore"):  # float64 reference: cosh(1e6) = inf, its inverse 0
        ch = np.cosh(np.asarray(x, np.float64))
        want, dwant = 1 / ch, -np.tanh(np.asarray(x, np.float64)) / ch
    np.testing.assert_allclose(sech(x), want, rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(jax.vmap(jax.grad(sech))(x), dwant, rtol=1e-6, atol=1e-30)
    p = mtjax.DeviceParams.paper(xi1=0.2)
    jac = jax.jacrev(lambda i: mtjax.analytic_response(p, i))(100 * mtjax.current_scale(p))
    assert bool(jnp.all(jnp.isfinite(jac)))


def test_sign_convention_positive_current_drives_to_plus_p1():
    p = mtjax.DeviceParams.paper(p1=(0.0, 1.0, 0.0))
    m = mtjax.pulse_response(p, 2 * mtjax.current_scale(p))
    assert m[1] > 0.9
    m = mtjax.pulse_response(p, -2 * mtjax.current_scale(p))
    assert m[1] < -0.9


@pytest.mark.parametrize("solver", ["heun", "rk4_scan", "heun_scan"])
def test_fixed_step_solvers_match_adaptive(solver):
    p = mtjax.DeviceParams.paper(hk=3e4, hk_axis=(1, 0, 1), h_bias=(5e3, 2e3, 1e4), xi1=0.1)
    i = 1.5 * mtjax.current_scale(p)
    ref = mtjax.simulate(p, i, 1e-9, saveat=11)
    got = mtjax.simulate(p, i, 1e-9, saveat=11, solver=solver, steps=1000)
    np.testing.assert_allclose(got.ts, ref.ts, rtol=1e-6)
    assert float(jnp.max(jnp.abs(got.ms - ref.ms))) < 1e-4


def test_vmap_jit_over_currents_and_batched_params():
    p = mtjax.DeviceParams.paper(Ms=jnp.array([0.8e6, 1e6, 1.2e6]))
    i = jnp.array([1e-5, 5e-5, 1e-4])
    f = jax.jit(jax.vmap(mtjax.pulse_response))
    got = f(p, i)
    singles = [
        mtjax.pulse_response(mtjax.DeviceParams.paper(Ms=ms), c)
        for ms, c in zip([0.8e6, 1e6, 1.2e6], i, strict=True)
    ]
    np.testing.assert_allclose(got, jnp.stack(singles), atol=1e-5)  # solver tolerance
    with pytest.raises(ValueError, match="batched DeviceParams"):
        mtjax.pulse_response(p, 1e-5)


def _central_fd(f, x, h):
    return (f(x + h) - f(x - h)) / (2 * h)


def test_gradients_match_finite_differences():
    with jax.enable_x64(True):
        base = dict(hk=2e4, hk_axis=(1, 0, 1), h_bias=(3e3, 0, 5e3), xi1=0.2)
        p = mtjax.DeviceParams.paper(**base)
        i0 = 1.3 * float(mtjax.current_scale(p))

        def mx_of_current(i):
            return mtjax.pulse_response(p, i, **TIGHT)[0]

        def mx_of_ms(ms):
            return mtjax.pulse_response(mtjax.DeviceParams.paper(Ms=ms, **base), i0, **TIGHT)[0]

        g_i = jax.grad(mx_of_current)(i0)
        fd_i = _central_fd(mx_of_current, i0, 1e-4 * i0)
        assert abs(g_i / fd_i - 1) < 1e-3
        g_ms = jax.grad(mx_of_ms)(1e6)
        fd_ms = _central_fd(mx_of_ms, 1e6, 1e2)
        assert abs(g_ms / fd_ms - 1) < 1e-3
        # every leaf gets a finite gradient, and a few are checked against FD
        grads = jax.grad(lambda q: mtjax.pulse_response(q, i0, **TIGHT)[0])(p)
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
        for name, h in [("alpha", 1e-5), ("hk", 1.0), ("pulse_duration", 1e-14)]:
            val = float(getattr(p, name))
            fd = _central_fd(lambda v, n=name: mx_of_field(p, n, v, i0), val, h)
            assert abs(float(getattr(grads, name)) / fd - 1) < 1e-3, name


def mx_of_field(p, name, value, current):
    return mtjax.pulse_response(p.replace(**{name: value}), current, **TIGHT)[0]


BAD = [
    ("Ms", 0.0),
    ("Ms", -1e6),
    ("alpha", -0.01),
    ("thickness", 0.0),
    ("diameter_x", -5e-9),
    ("diameter_y", 0.0),
    ("p1", (0.0, 0.0, 0.0)),
    ("p2", (0.0, 0.0, 0.0)),
    ("temperature", -1.0),
    ("Ms", float("nan")),
    ("h_bias", (0.0, float("inf"), 0.0)),
    ("eta1", 1.5),
    ("tmr2", 0.0),
    ("pulse_duration", 0.0),
    ("demag", (0.0, 0.0, 2.0)),
]


@pytest.mark.parametrize("name,value", BAD)
def test_bad_params_raise_naming_the_field(name, value):
    with pytest.raises(ValueError, match=rf"DeviceParams\.{name}\b"):
        mtjax.DeviceParams(**{name: value})


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError, match="DeviceParams.alpha"):
        mtjax.DeviceParams(Ms=jnp.ones(3) * 1e6, alpha=jnp.ones(4) * 0.01)
    with pytest.raises(ValueError, match="DeviceParams.p1"):
        mtjax.DeviceParams(p1=(1.0, 0.0))


def test_every_field_documented_and_validated():
    assert set(SCALAR_FIELDS) | set(VECTOR_FIELDS) == {
        f.name for f in mtjax.DeviceParams.__dataclass_fields__.values()
    }
    for name in SCALAR_FIELDS | VECTOR_FIELDS:
        assert name in mtjax.DeviceParams.__doc__


def test_nan_current_inside_jit_raises():
    p = mtjax.DeviceParams.paper()
    f = eqx.filter_jit(lambda i: mtjax.pulse_response(p, i))
    assert bool(jnp.isfinite(f(1e-5)).all())
    with pytest.raises(eqx.EquinoxRuntimeError, match="non-finite current"):
        jax.block_until_ready(f(jnp.nan))
    with pytest.raises(Exception, match="non-finite current"):  # plain jax.jit too
        jax.block_until_ready(jax.jit(lambda i: mtjax.pulse_response(p, i))(jnp.inf))


def test_bad_solver_and_shapes():
    p = mtjax.DeviceParams.paper()
    with pytest.raises(ValueError, match="solver"):
        mtjax.pulse_response(p, 1e-5, solver="euler")
    with pytest.raises(ValueError, match="currents"):
        mtjax.pulse_response(p, jnp.ones(3))
    with pytest.raises(ValueError, match="m0"):
        mtjax.pulse_response(p, 1e-5, m0=jnp.ones(2))
    with pytest.raises(ValueError, match="fixed-step"):
        mtjax.pulse_response(p, 1e-5, key=jax.random.key(0))


def test_fused_torque_equals_textbook_terms():
    from mtjax import physics

    p = mtjax.DeviceParams.paper(
        hk=3e4, hk_axis=(1, 1, 0), demag=(0.1, 0.2, 0.7), h_bias=(1e3, -2e3, 5e3),
        lambda1=1.7, lambda2=0.6, xi1=0.3, xi2=-0.2, alpha=0.05,
    )  # fmt: skip
    currents = jnp.array([1.1e-4, -0.7e-4])
    for m in jax.random.normal(jax.random.key(0), (5, 3)):
        m = m / jnp.linalg.norm(m)
        textbook = physics.field_torque(p, m, physics.effective_field(p, m)) + physics.spin_torque(
            p, m, currents
        )
        fused = physics.llgs_rhs(p, m, currents)
        np.testing.assert_allclose(fused, textbook, rtol=1e-5, atol=1e-6 * jnp.abs(textbook).max())
        assert abs(float(jnp.dot(fused, m))) < 1e-5 * float(jnp.abs(fused).max())  # tangent
