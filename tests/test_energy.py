"""Energy and latency per activation and per inference (`mtjax.energy`) against closed forms,
an independent trajectory integral, finite differences and explicit per-neuron sums."""

import json
import math
import runpy
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtjax
from mtjax import energy as E
from mtjax.nn import MLP, HeadedClassifier, MTJActivation, TableGrid
from mtjax.readout import conductance, mean_conductance
from mtjax.testing import central_difference

PAPER = mtjax.DeviceParams.paper()
I_S = float(mtjax.current_scale(PAPER))
K_TMR = 1.0 / 3.0  # TMR/(2+TMR) of the paper device (TMR = 1)


def _int_inv(v, k=K_TMR):
    """Antiderivative of 1 / (1 + k tanh v)."""
    return (v - k * np.log(np.cosh(v) + k * np.sinh(v))) / (1 - k * k)


def _g0(p, polarizer=1):
    return float(mean_conductance(p, polarizer))


def test_write_energy_of_a_device_that_does_not_move_is_i2_r_tau():
    # eta1 = 0: no spin torque and no field, so m stays at m0 and R1 is constant.
    with jax.enable_x64(True):
        p = mtjax.DeviceParams.paper(eta1=0.0)  # built in x64
        area = math.pi * 50e-9**2 / 4
        i = 2e-4
        e0 = E.activation_energy(p, 0.0)
        assert float(e0.write) == 0.0
        for m0, r in [((0.0, 0.0, 1.0), 1 / _g0(p)), ((1.0, 0.0, 0.0), 5e-12 / area)]:
            e = E.activation_energy(p, i, m0=m0)
            np.testing.assert_allclose(e.write, i * i * r * 1e-9, rtol=1e-12)
            # read: both junctions at v_read for t_read, in the state after the pulse
            g = conductance(p, jnp.asarray(m0), 1) + conductance(p, jnp.asarray(m0), 2)
            np.testing.assert_allclose(e.read, 0.05**2 * g * 1e-9, rtol=1e-12)
        e = E.activation_energy(p, i, v_read=0.2, t_read=3e-9)
        # from +z: G1 = G0_1 (m.p1 = 0), G2 = G_P2 = area / RA2 (m.p2 = 1)
        g_read = _g0(p, 1) + area / 5e-12
        np.testing.assert_allclose(e.read, 0.2**2 * g_read * 3e-9, rtol=1e-12)
        np.testing.assert_allclose(e.latency, 1e-9 + 3e-9 + 1e-9, rtol=1e-12)


@pytest.mark.parametrize("z", [-2.0, 0.5, 1.0, 3.0])
def test_ideal_device_write_read_reset_match_closed_forms(z):
    # Ideal device: m_x(t) = tanh(u t / tau) during the write and m_z = tanh(w0 + u_r t / t_r)
    # during the reset, so both energy integrals have closed forms.
    with jax.enable_x64(True):
        p = mtjax.DeviceParams.paper()
        i_s = float(mtjax.current_scale(p))
        e = E.activation_energy(p, z * i_s, steps=200)
        write = (z * i_s) ** 2 * 1e-9 / (_g0(p) * z) * _int_inv(z)
        np.testing.assert_allclose(e.write, write, rtol=1e-9)
        m = mtjax.analytic_response(p, z * i_s)
        read = 0.05**2 * 1e-9 * (conductance(p, m, 1) + conductance(p, m, 2))
        np.testing.assert_allclose(e.read, read, rtol=1e-9)
        u_r = math.log(1 / math.tan(0.005))  # equator -> 0.01 rad
        np.testing.assert_allclose(e.reset_current, u_r * i_s, rtol=1e-12)
        w0 = math.atanh(float(m[2]))
        reset = (u_r * i_s) ** 2 * 1e-9 / (_g0(p, 2) * u_r) * (_int_inv(w0 + u_r) - _int_inv(w0))
        np.testing.assert_allclose(e.reset, reset, rtol=1e-9)
        theta0 = math.acos(float(m[2]))
        residual = 2 * math.atan(math.tan(theta0 / 2) * math.exp(-u_r))
        np.testing.assert_allclose(e.residual_angle, residual, rtol=1e-6)
        assert float(e.residual_angle) <= 0.01
        np.testing.assert_allclose(e.total, e.write + e.read + e.reset, rtol=1e-15)
        # read disturb: the P1 read current's u over t_read, u per ampere = 1 / I_s
        np.testing.assert_allclose(e.read_disturb, 0.05 * conductance(p, m, 1) / i_s, rtol=1e-9)


def test_write_energy_matches_trapezoid_of_simulated_trajectory():
    # Independent path: Diffrax Tsit5 trajectory (not the energy module's RK4), R1 from the
    # read-out module, trapezoid rule over 4001 save points.
    with jax.enable_x64(True):
        p = mtjax.DeviceParams.paper(xi1=0.2, hk=3e3)
        i = 1.7 * float(mtjax.current_scale(p))
        traj = mtjax.simulate(p, i, 1e-9, saveat=4001, rtol=1e-10, atol=1e-10)
        r = 1 / conductance(p, traj.ms, 1)
        ref = i * i * float(np.trapezoid(np.asarray(r), np.asarray(traj.ts)))
        e = E.activation_energy(p, i)
        np.testing.assert_allclose(e.write, ref, rtol=1e-4)


def test_reset_leaves_at_most_eps_and_adaptive_reset_is_cheaper():
    for z in (0.0, 0.3, 1.0, 6.0):
        for eps in (0.01, 0.05):
            f = E.activation_energy(PAPER, z * I_S, reset=E.ResetModel(eps=eps))
            a = E.activation_energy(PAPER, z * I_S, reset=E.ResetModel(eps=eps, adaptive=True))
            assert float(f.residual_angle) <= eps
            assert float(a.residual_angle) <= eps * (1 + 1e-4)
            assert float(a.reset) <= float(f.reset)
    # z = 0: the state is already at +z, so the adaptive reset spends nothing
    a0 = E.activation_energy(PAPER, 0.0, reset=E.ResetModel(adaptive=True))
    assert float(a0.reset) == 0.0 and float(a0.reset_current) == 0.0
    # a longer reset pulse needs a proportionally smaller current: energy ~ 1 / duration
    e1 = E.activation_energy(PAPER, I_S, reset=E.ResetModel(1e-9))
    e5 = E.activation_energy(PAPER, I_S, reset=E.ResetModel(5e-9))
    np.testing.assert_allclose(e5.reset_current, e1.reset_current / 5, rtol=1e-6)
    np.testing.assert_allclose(e5.reset, e1.reset / 5, rtol=2e-3)
    np.testing.assert_allclose(e5.latency, 1e-9 + 1e-9 + 5e-9, rtol=1e-6)


def test_energy_table_matches_direct_computation_off_nodes():
    devs = mtjax.sample_devices(PAPER, jax.random.key(0), 3, mtjax.Spreads.relative(0.1))
    table = E.energy_table(devs, I_S, z_max=4.0)
    z = jnp.array([0.123, -2.71, 5.0])  # 5.0 is clipped to z_max = 4
    got = table(z)
    for j in range(3):
        dev = jax.tree.map(lambda x, j=j: x[j], devs)
        want = E.activation_energy(dev, min(float(z[j]), 4.0) * I_S)
        for name in ("write", "reset", "read", "total"):
            np.testing.assert_allclose(getattr(got, name)[j], getattr(want, name), rtol=1e-4)
        np.testing.assert_allclose(got.latency[j], want.latency, rtol=1e-6)
    # the one-curve total (what co-design's energy loss reads) and its gradient
    np.testing.assert_allclose(table.total(z), got.total, rtol=1e-6)
    g_total = jax.grad(lambda c: jnp.sum(eqx.tree_at(lambda t: t.coef, table, c).total(z)))
    g_sum = jax.grad(lambda c: jnp.sum(eqx.tree_at(lambda t: t.coef, table, c)(z).total))
    np.testing.assert_allclose(g_total(table.coef), g_sum(table.coef), rtol=1e-6, atol=0)
    for f in (table, table.total):
        with pytest.raises(ValueError, match="does not match"):
            f(jnp.zeros(4))


def test_energy_gradients_match_finite_differences_x64():
    # The default free design variables: diameter (both axes together), thickness,
    # pulse_duration, eta1 and input_scale, through the table (fixed grid and steps).
    with jax.enable_x64(True):
        grid = TableGrid(3.0, 33, 1.0)
        z = jnp.array([0.7, -1.3, 2.9])

        def total(p, s):
            return jnp.sum(E.energy_table(p, s, grid, steps=64)(z).total)

        p0 = mtjax.DeviceParams.paper()
        s0 = float(mtjax.current_scale(p0))
        vg = jax.jit(jax.value_and_grad(total, argnums=(0, 1)))
        _, (g_p, g_s) = vg(p0, s0)
        f = lambda p, s: float(vg(p, s)[0])
        rel = 1e-6

        def fd(names):
            d = rel * float(getattr(p0, names[0]))
            up = p0.replace(**{n: getattr(p0, n) + d for n in names})
            dn = p0.replace(**{n: getattr(p0, n) - d for n in names})
            return (f(up, s0) - f(dn, s0)) / (2 * d)

        checks = {
            "diameter": (g_p.diameter_x + g_p.diameter_y, fd(["diameter_x", "diameter_y"])),
            "thickness": (g_p.thickness, fd(["thickness"])),
            "pulse_duration": (g_p.pulse_duration, fd(["pulse_duration"])),
            "eta1": (g_p.eta1, fd(["eta1"])),
            "input_scale": (g_s, (f(p0, s0 * (1 + rel)) - f(p0, s0 * (1 - rel)))
                            / (2 * rel * s0)),
        }  # fmt: skip
        for name, (ad, num) in checks.items():
            assert abs(float(num)) > 0, name
            np.testing.assert_allclose(ad, num, rtol=1e-6, err_msg=name)


@pytest.fixture(scope="module")
def small_models():
    k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
    devs = mtjax.sample_devices(PAPER, k1, 6, mtjax.Spreads(0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0, 0))
    # "analytic": no response tables to build; the energy uses params, grid, m0 and z_max only
    per_neuron = MTJActivation(devs, mode="analytic", input_scale=I_S, z_max=3.0, n_grid=65)
    shared = MTJActivation(PAPER.replace(ra1=8e-12), mode="analytic", z_max=3.0, n_grid=65)
    mlp = MLP((8, 6, 4, 5, 3), [per_neuron, jnp.tanh, shared], key=k2)
    # large enough weights that some neurons saturate at z_max
    mlp = jax.tree.map(lambda w: 3 * w if eqx.is_array(w) and w.ndim == 2 else w, mlp,
                       is_leaf=lambda x: isinstance(x, MTJActivation))  # fmt: skip
    x = jax.random.normal(k3, (5, 8))
    return mlp, x


def _explicit(mlp, x):
    """Per-neuron sum of activation_energy, looping by hand."""
    totals, per_layer = [], []
    for xi in x:
        h, layer_e = xi, []
        for layer, act in zip(mlp.layers[:-1], mlp.activations, strict=True):
            z = layer(h)
            if isinstance(act, MTJActivation):
                e = 0.0
                for j in range(z.shape[0]):
                    dev = act.params if act.n_devices is None else jax.tree.map(
                        lambda a, j=j: a[j], act.params)  # fmt: skip
                    zj = float(jnp.clip(z[j], -act.z_max, act.z_max))
                    e += float(E.activation_energy(dev, zj * act.input_scale).total)
                layer_e.append(e)
                h = act(z)
            else:
                layer_e.append(0.0)
                h = act(z)
        per_layer.append(layer_e)
        totals.append(sum(layer_e))
    return np.array(totals), np.array(per_layer)


def test_network_energy_equals_explicit_per_neuron_sum(small_models):
    mlp, x = small_models
    totals, per_layer = _explicit(mlp, x)
    z0 = jax.vmap(lambda xi: mlp.layers[0](xi))(x)
    assert np.any(np.abs(np.asarray(z0)) > 3.0)  # the clipping is exercised
    direct = E.network_energy(mlp, x, method="direct")
    np.testing.assert_allclose(direct.total, totals.mean(), rtol=1e-5)
    np.testing.assert_allclose(direct.total_std, totals.std(), rtol=1e-4)
    np.testing.assert_allclose(direct.per_layer, per_layer.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(direct.write + direct.reset + direct.read, direct.total, rtol=1e-6)
    table = E.network_energy(mlp, x, batch_size=2)
    np.testing.assert_allclose(table.total, totals.mean(), rtol=1e-4)
    np.testing.assert_allclose(table.per_layer, per_layer.mean(axis=0), rtol=1e-4)
    assert table.per_layer[1] == 0.0 and table.n_neurons == 11 and table.n_examples == 5
    # two MTJ layers in series, each pulse + read + reset (slowest device of the layer)
    tau = mlp.activations[0].params.pulse_duration  # per-device pulse (and reset) durations
    want = (float(jnp.max(2 * tau)) + 1e-9) + (2e-9 + 1e-9)
    np.testing.assert_allclose(table.latency, want, rtol=1e-6)
    np.testing.assert_allclose(direct.latency, want, rtol=1e-6)
    # HeadedClassifier: the same head behind a (software) feature extractor
    feats = eqx.nn.Linear(4, 8, key=jax.random.key(9))
    xs = jax.random.normal(jax.random.key(10), (5, 4))
    headed = HeadedClassifier(feats, mlp)
    np.testing.assert_allclose(
        E.network_energy(headed, xs).total,
        E.network_energy(mlp, jax.vmap(feats)(xs)).total,
        rtol=1e-6,
    )


def test_network_energy_is_differentiable_in_weights_and_devices():
    act = MTJActivation(PAPER, mode="analytic", z_max=3.0, n_grid=33)
    mlp = MLP((4, 3, 2), act, key=jax.random.key(5))
    x = 2 * jax.random.normal(jax.random.key(6), (4, 4))

    def f(w, ra):
        m = eqx.tree_at(lambda t: t.layers[0].weight, mlp, w)
        m = eqx.tree_at(lambda t: t.activations[0].params.ra1, m, ra)
        return E.network_energy(m, x).total

    vg = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
    w, ra = mlp.layers[0].weight, jnp.asarray(5e-12)
    _, (g_w, g_ra) = vg(w, ra)
    # energy-aware training: the gradient w.r.t. a weight matches a finite difference
    h = 1e-2
    dw = jnp.zeros_like(w).at[1, 2].set(h)
    fd = (vg(w + dw, ra)[0] - vg(w - dw, ra)[0]) / (2 * h)
    np.testing.assert_allclose(g_w[1, 2], fd, rtol=2e-2)
    assert abs(float(fd)) > 0
    # a higher RA of the write junction raises the write energy
    assert float(g_ra) > 0


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="eps < theta_start"):
        E.ResetModel(eps=2.0)
    with pytest.raises(ValueError, match="ResetModel.duration"):
        E.ResetModel(-1e-9)
    with pytest.raises(ValueError, match="v_read"):
        E.activation_energy(PAPER, I_S, v_read=float("nan"))
    with pytest.raises(ValueError, match="batched"):
        E.activation_energy(mtjax.sample_devices(PAPER, jax.random.key(0), 2), I_S)
    with pytest.raises(ValueError, match="too coarse"):
        E.activation_energy(PAPER, 6 * I_S, steps=2)
    with pytest.raises(ValueError, match="input_scale"):
        E.energy_table(PAPER, 0.0)
    with pytest.raises(TypeError, match="MLP or HeadedClassifier"):
        E.network_energy(jnp.tanh, jnp.zeros((2, 3)))
    software = MLP((3, 4, 2), jnp.tanh, key=jax.random.key(0))
    with pytest.raises(ValueError, match="no MTJActivation"):
        E.network_energy(software, jnp.zeros((2, 3)))
    mtj = MLP((3, 4, 2), MTJActivation(PAPER), key=jax.random.key(0))
    with pytest.raises(ValueError, match="flatten"):
        E.network_energy(mtj, jnp.zeros((2, 5)))
    with pytest.raises(ValueError, match="method"):
        E.network_energy(mtj, jnp.zeros((2, 3)), method="exact")
    with pytest.raises(Exception, match="no damping-like torque"):
        E.activation_energy(PAPER.replace(eta2=0.0), I_S)


@pytest.mark.slow  # ~17 s; the default suite keeps the energy checks it summarizes
def test_energy_report_script_quick(tmp_path):
    # The script behind README's numbers runs and writes consistent JSON (smoke run).
    main = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "energy_report.py"))
    report = main["main"](["--quick", "--no-progress", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "energy.json").read_text())
    assert saved["network"]["mtj_accuracy"] == pytest.approx(report["network"]["mtj_accuracy"])
    assert saved["network"]["software_accuracy"] > 0.6
    for r in saved["network"]["per_inference"].values():
        assert r["total_J"] == pytest.approx(r["write_J"] + r["read_J"] + r["reset_J"], rel=1e-5)
        assert r["n_neurons"] == 256
    rows = saved["per_activation"]["resets"]["fixed, 1 ns (default)"]
    assert [r["write"] for r in rows][0] == 0.0
    assert all(r["residual_angle"] <= 0.01 for r in rows)


def _odd_device():
    return mtjax.DeviceParams.paper(xi1=0.3, xi2=-0.1, alpha=0.05, tmr1=2.0, tmr2=0.8)


def test_field_free_energy_tables_equal_converged_rk4_and_their_gradients_fd():
    # the closed-form write and reset pulses against RK4 at 2000 steps, and the gradient of
    # the tabulated total against central finite differences (x64)
    with jax.enable_x64(True):
        tilted = jnp.array([0.1, -0.2, 0.97])
        cases = ((PAPER, None, E.ResetModel()),
                 (_odd_device(), tilted, E.ResetModel(adaptive=True)))  # fmt: skip
        for p, m0, reset in cases:
            scale = mtjax.current_scale(p)
            grid = TableGrid.for_devices(p, scale, 3.0, 33)
            kw = dict(reset=reset, m0=m0)
            exact = E.energy_table(p, scale, grid, field_free=True, **kw)
            rk4 = E.energy_table(p, scale, grid, steps=2000, **kw)
            for k, name in enumerate(E.TABLE_CURVES):
                ref = rk4.coef[..., k, :]
                # RK4's error at 2000 steps: ~1e-9 relative in energies, ~4e-9 rad in angles
                tol = 1e-8 if name in ("residual_angle", "read_disturb") else 1e-8 * float(
                    jnp.max(jnp.abs(ref)))  # fmt: skip
                np.testing.assert_allclose(exact.coef[..., k, :], ref, atol=tol, err_msg=name)
        zs = jnp.linspace(-2.5, 2.5, 7)
        names = ("diameter_x", "thickness", "Ms", "alpha", "pulse_duration", "eta1", "eta2",
                 "xi1", "tmr1", "tmr2", "ra1", "ra2")  # fmt: skip
        p0 = _odd_device()
        scale = mtjax.current_scale(p0)
        grid = TableGrid.for_devices(p0, scale, 3.0, 33)

        def total(vals):
            p = p0.replace(**dict(zip(names, vals, strict=True)))
            return jnp.sum(E.energy_table(p, scale, grid, field_free=True).total(zs)) * 1e12

        vals = [getattr(p0, n) for n in names]
        grad = jax.grad(total)(vals)
        for i, name in enumerate(names):
            fd = central_difference(total, vals, i, 1e-6 * float(vals[i]))
            assert abs(float(grad[i]) - float(fd)) <= 1e-6 * abs(float(fd)) + 1e-9, name


def test_field_free_energy_is_refused_where_it_does_not_hold():
    scale = mtjax.current_scale(PAPER)
    for bad, what in (({"hk": 10.0}, "hk != 0"), ({"lambda2": 1.3}, "lambda2 != 1")):
        with pytest.raises(ValueError, match=what):
            E.energy_table(PAPER.replace(**bad), scale, field_free=True)
    grid = TableGrid.for_devices(PAPER, scale, 3.0, 33)
    build = eqx.filter_jit(lambda p: E.energy_table(p, scale, grid, field_free=True, steps=64).coef)
    with pytest.raises(Exception, match="field_free"):  # traced: refused at run time
        jax.block_until_ready(build(PAPER.replace(h_bias=(0.0, 0.0, 30.0))))
    with pytest.raises(ValueError, match="no derivative"):
        jax.grad(lambda hk: jnp.sum(build(PAPER.replace(hk=hk))))(0.0)


def test_field_free_pulse_energy_holds_for_any_drive_in_float32():
    # rotations A t far beyond float32's sinh/cosh (~89): float32 equals the x64 closed form
    # (value and gradient w.r.t. the current), and x64 equals RK4 converged at A t ~ 40,
    # through P1 (from +z) and P2 (from a tilted state, against and along the drive)
    from mtjax.constants import TIME_UNIT
    from mtjax.moments import field_free_rotation
    from mtjax.physics import torque_coefficients

    p = _odd_device()
    scale = mtjax.current_scale(p)
    cases = [(1, (0.0, 0.0, 1.0)), (2, (0.3, 0.1, -0.9)), (2, (0.1, -0.2, 0.97))]

    def pulse(i, m0, polarizer, dtype, steps=None):
        m0 = jnp.asarray(m0, dtype) / jnp.linalg.norm(jnp.asarray(m0, dtype))
        q = p.replace(**{k: jnp.asarray(getattr(p, k), dtype) for k in ("Ms", "thickness")})
        currents = jnp.zeros(2, dtype).at[polarizer - 1].set(i * scale)
        if steps:
            return E._pulse_energy(q, currents, m0, q.pulse_duration, steps, polarizer)
        return E._field_free_pulse_energy(q, currents, m0, q.pulse_duration, polarizer)

    def rotation(i, polarizer):
        c = torque_coefficients(p, jnp.zeros(2).at[polarizer - 1].set(i * scale))
        return float(field_free_rotation(c, polarizer - 1, p.pulse_duration / TIME_UNIT))

    def r_dt(i, m0, polarizer, dtype):
        return pulse(i, m0, polarizer, dtype)[1] * 1e9

    for polarizer, m0 in cases:
        unit = rotation(1.0, polarizer)
        drives = [a / unit for a in (0.5, -3.0, 40.0, -95.0, 300.0, -2e4)]
        with jax.enable_x64(True):
            i40 = jnp.float64(-40 / unit)
            want40 = pulse(i40, m0, polarizer, jnp.float64, steps=20000)
            got40 = pulse(i40, m0, polarizer, jnp.float64)
            np.testing.assert_allclose(got40[0], want40[0], atol=1e-9)
            np.testing.assert_allclose(got40[1], want40[1], rtol=1e-9)
            want = [jax.tree.map(np.asarray, pulse(jnp.float64(i), m0, polarizer, jnp.float64))
                    for i in drives]  # fmt: skip
            dwant = [np.asarray(jax.grad(r_dt)(jnp.float64(i), m0, polarizer, jnp.float64))
                     for i in drives]  # fmt: skip
        for i, w, dw in zip(drives, want, dwant, strict=True):
            what = f"P{polarizer}, A t = {i * unit:.3g}"
            m, rdt = pulse(jnp.float32(i), m0, polarizer, jnp.float32)
            assert m.dtype == rdt.dtype == jnp.float32
            np.testing.assert_allclose(m, w[0], atol=2e-6, err_msg=what)
            np.testing.assert_allclose(rdt, w[1], rtol=2e-5, err_msg=what)
            dg = jax.grad(r_dt)(jnp.float32(i), m0, polarizer, jnp.float32)
            assert jnp.isfinite(dg), what
            np.testing.assert_allclose(dg, dw, rtol=1e-4, atol=1e-6 * abs(float(dw)) + 1e-12,
                                       err_msg=what)  # fmt: skip
    table = E.energy_table(PAPER, 30 * scale, TableGrid.for_devices(PAPER, 30 * scale, 3.0, 33),
                           field_free=True)  # fmt: skip
    assert bool(jnp.all(jnp.isfinite(table.coef)))
