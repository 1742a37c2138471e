"""Co-design: bounded design variables, exact design gradients, joint training, safety."""

import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtjax
from mtjax import codesign, train
from mtjax.codesign import Design, DesignedMTJ, DesignSchedule, DesignSpace, EnergyLoss
from mtjax.nn import MLP, MTJActivation
from mtjax.testing import central_difference

PAPER = mtjax.DeviceParams.paper()


def _model(design, mode="table", key=0, width=6, **kw):
    devs = mtjax.sample_deviations(jax.random.key(5), width, mtjax.Spreads.relative(0.05))
    layer = DesignedMTJ(design, deviations=devs, mode=mode, n_grid=65, **kw)
    return MLP((8, width, 3), layer, key=jax.random.key(key))


def _data(n=32, seed=0):
    x = jax.random.normal(jax.random.key(seed), (n, 8))
    y = jax.random.randint(jax.random.key(seed + 1), (n,), 0, 3)
    return x, y


def test_bounds_hold_after_many_large_adam_steps():
    space = DesignSpace(free=("diameter", "thickness", "pulse_duration", "eta1", "input_scale",
                              "hk", "h_bias", "Ms", "alpha", "xi1", "tmr1", "ra1"))  # fmt: skip
    design = Design(PAPER, space)
    push = jnp.array([1.0, -1.0, 1.0])

    def loss(d):  # drives every variable hard towards one end
        vals = [jnp.sum(d.value(n) * (push if d.value(n).ndim else 1.0)) for n in space.free]
        return -sum(jnp.log(jnp.abs(v) + 1e-30) for v in vals)

    opt = optax.adam(10.0)
    state = opt.init(eqx.filter(design, eqx.is_inexact_array))
    step = eqx.filter_jit(lambda d, s: opt.update(eqx.filter_grad(loss)(d), s))
    for _ in range(200):
        updates, state = step(design, state)
        design = eqx.apply_updates(design, updates)
    for name, lo, hi in space.bounds:
        v = np.asarray(design.value(name))
        assert np.all((v >= lo) & (v <= hi)), name
    nominal = design.nominal()
    mtjax.DeviceParams(**{f: getattr(nominal, f) for f in nominal.__dataclass_fields__})
    assert float(design.input_scale()) > 0


def test_design_space_errors_name_the_variable():
    with pytest.raises(ValueError, match="unknown"):
        DesignSpace(free=("diameter", "gamma"))
    with pytest.raises(ValueError, match="bounds\\['diameter'\\]"):
        DesignSpace(bounds={"diameter": (1e-7, 1e-8)})
    with pytest.raises(ValueError, match="thickness.*not strictly inside"):
        Design(PAPER.replace(thickness=5e-9))
    with pytest.raises(ValueError, match="ideal"):
        DesignedMTJ(Design(PAPER), mode="ideal")


def test_structurally_inert_variables_raise():
    # driver calibrated to the device (input_scale free), T = 0: the deterministic response
    # does not depend on the geometry, so its gradient would be zero
    cold = PAPER.replace(temperature=0.0)
    with pytest.raises(ValueError, match="diameter.*eta1.*thickness.*structurally zero"):
        DesignedMTJ(Design(cold), mode="table", n_grid=65)
    DesignedMTJ(Design(cold), mode="table", n_grid=65, energy=True)  # energy depends on them
    DesignedMTJ(Design(cold, DesignSpace(free=("diameter",))), mode="table", n_grid=65)


def test_design_starts_at_the_base_device():
    design = Design(PAPER, gain=1.3)
    nominal = design.nominal()
    for f in ("diameter_x", "diameter_y", "thickness", "pulse_duration", "eta1"):
        np.testing.assert_allclose(getattr(nominal, f), getattr(PAPER, f), rtol=1e-5)
    np.testing.assert_allclose(design.input_scale(), 1.3 * mtjax.current_scale(PAPER), rtol=1e-5)


@pytest.mark.parametrize(
    "mode",
    [
        pytest.param("table", marks=pytest.mark.slow),  # ~55 s; "thermal" covers its path
        pytest.param("thermal", marks=pytest.mark.slow),  # ~80 s
        pytest.param("ode", marks=pytest.mark.slow),
    ],
)  # ode: ~1 min; the ode design gradient is also checked against the tables (slow)
def test_loss_and_energy_gradients_match_finite_differences(mode):
    with jax.enable_x64(True):
        p = mtjax.DeviceParams.paper(temperature=300.0 if mode == "thermal" else 0.0)
        design = Design(p)
        model = codesign.set_live(_model(design, mode=mode, width=4, energy=True), True)
        x, y = _data(8)
        key = jax.random.key(3)
        loss_fn = EnergyLoss(weight=0.5, reference=1e-12)

        def loss(theta):
            m = eqx.tree_at(lambda m: m.activations[0].design.theta, model, theta)
            keys = jax.random.split(key, x.shape[0])
            logits = jax.vmap(lambda xi, ki: m(xi, key=ki))(x, keys)
            return jnp.mean(loss_fn(logits, x, y, model=m, key=key))

        theta = model.activations[0].design.theta
        vg = eqx.filter_jit(jax.value_and_grad(loss))
        _, grad = vg(theta)
        f = eqx.filter_jit(loss)
        for name in codesign.DEFAULT_FREE:
            fd = central_difference(f, theta, name, 1e-5)
            assert abs(float(grad[name]) - float(fd)) <= 1e-3 * abs(float(fd)) + 1e-9, name


@pytest.mark.slow  # ~1.5 min: compiles three live x64 gradients
def test_modes_agree_on_the_design_gradient():
    # table, thermal (at T = 0 it is the table) and ode: one physics, one gradient
    with jax.enable_x64(True):
        p = mtjax.DeviceParams.paper(temperature=0.0)
        x, y = _data(8)
        grads = {}
        space = DesignSpace(free=("diameter", "thickness", "pulse_duration", "eta1"))
        for mode in ("table", "thermal", "ode"):
            model = codesign.set_live(_model(Design(p, space), mode=mode, width=4), True)

            def loss(theta, model=model):
                # a key for every mode: the live thermal tables cannot know T = 0 when traced
                m = eqx.tree_at(lambda m: m.activations[0].design.theta, model, theta)
                keys = jax.random.split(jax.random.key(1), x.shape[0])
                logits = jax.vmap(lambda xi, ki: m(xi, key=ki))(x, keys)
                return jnp.mean(train.cross_entropy(logits, x, y))

            grads[mode] = eqx.filter_jit(jax.grad(loss))(model.activations[0].design.theta)
        for name in space.free:
            ref = float(grads["ode"][name])
            for mode in ("table", "thermal"):
                assert abs(float(grads[mode][name]) - ref) <= 1e-2 * abs(ref) + 1e-9, (mode, name)


@pytest.mark.slow  # ~40 s; tests/test_nn.py checks forward mode of the activation by default
def test_forward_mode_design_gradient_equals_reverse_mode(thermal_model):
    # the activations' derivative is a jvp rule, so jax.jacfwd works through a live design
    model = codesign.set_live(thermal_model, True)
    x, y = _data(4)

    def loss(theta):
        m = eqx.tree_at(lambda m: m.activations[0].design.theta, model, theta)
        keys = jax.random.split(jax.random.key(0), x.shape[0])
        logits = jax.vmap(lambda a, k: m(a, key=k))(x, keys)
        return jnp.mean(EnergyLoss(0.5, 1e-12)(logits, x, y, model=m, key=jax.random.key(1)))

    theta = model.activations[0].design.theta
    rev = eqx.filter_jit(jax.grad(loss))(theta)
    fwd = eqx.filter_jit(jax.jacfwd(loss))(theta)
    for name in theta:
        assert abs(float(rev[name])) > 0, name
        np.testing.assert_allclose(fwd[name], rev[name], rtol=1e-4, err_msg=name)


@pytest.mark.slow  # ~70 s; the stale-table test keeps the silent-zero class in the default run
def test_joint_training_moves_the_design_and_keeps_it_physical(tmp_path):
    # regression for the silent-zero bug: a trained table-mode device must change
    x, y = _data(64)
    model = _model(Design(PAPER.replace(temperature=0.0)), mode="table", energy=True)
    before = model.activations[0].design.values()
    config = train.TrainConfig(
        epochs=2, batch_size=16, lr=1e-2,
        optimizer=functools.partial(codesign.joint_optimizer, design_lr=0.2),
    )  # fmt: skip
    res = train.train(
        model, (np.asarray(x), np.asarray(y)), (np.asarray(x), np.asarray(y)), config,
        progress=False, on_step=DesignSchedule(every=2),
        loss_fn=EnergyLoss(weight=0.1, reference=1e-12),
    )  # fmt: skip
    after = res.model.activations[0].design.values()
    moved = [n for n in codesign.DEFAULT_FREE if not np.allclose(before[n], after[n], atol=0)]
    assert len(moved) == len(codesign.DEFAULT_FREE)
    assert np.isfinite(res.test_loss)


def test_cached_steps_leave_the_design_alone():
    x, y = _data(32)
    model = _model(Design(PAPER.replace(temperature=0.0)), mode="table", energy=True)
    config = train.TrainConfig(
        epochs=1, batch_size=16, lr=1e-2, optimizer=codesign.joint_optimizer
    )  # fmt: skip
    schedule = DesignSchedule(every=1000)  # never live within 2 steps
    res = train.train(
        model, (np.asarray(x), np.asarray(y)), (np.asarray(x), np.asarray(y)), config,
        progress=False, on_step=schedule,
    )  # fmt: skip
    before, after = model.activations[0].design.theta, res.model.activations[0].design.theta
    for name in before:
        np.testing.assert_array_equal(before[name], after[name])


def test_raw_device_arrays_cannot_be_optimized():
    act = MTJActivation(PAPER, mode="table", train_device=True)
    model = MLP((8, 6, 3), act, key=jax.random.key(0))
    x, y = _data(16)
    with pytest.raises(ValueError, match="raw device arrays"):
        train.train(
            model, (np.asarray(x), np.asarray(y)), (np.asarray(x), np.asarray(y)),
            train.TrainConfig(epochs=1, batch_size=16), filter_spec=eqx.is_inexact_array,
            progress=False,
        )  # fmt: skip
    # default spec: the device side is frozen, the weights train
    spec = mtjax.nn.trainable(model)
    assert not any(jax.tree_util.tree_leaves(eqx.filter(spec.activations[0], lambda v: v)))


def test_an_energy_loss_trains_only_weights_and_design_variables():
    # the reset model (target angle, start angle) and the energy cache are a circuit setting
    # and derived data (rebuilt by refresh), never optimizer parameters: an energy loss has a
    # gradient for the reset target (a sloppier reset costs less), and Adam used to move eps
    # 0.01 -> 0.05 rad in five live steps
    x, y = _data(32)
    model = _model(Design(PAPER.replace(temperature=0.0)), mode="table", energy=True)
    spec = mtjax.nn.trainable(model)
    paths = [jax.tree_util.keystr(p) for p, v in jax.tree_util.tree_leaves_with_path(spec) if v]
    assert paths and all(p.startswith(".layers") or ".design.theta" in p for p in paths), paths
    assert any(".design.theta" in p for p in paths)
    with pytest.raises(ValueError, match="fixed circuit settings"):
        mtjax.nn.check_trainable(model, eqx.is_inexact_array)
    layer = model.activations[0]
    e0 = float(codesign.energy_per_example(model, x[0]))
    config = train.TrainConfig(epochs=1, batch_size=16, lr=1e-2, optimizer=codesign.joint_optimizer)
    res = train.train(
        model, (np.asarray(x), np.asarray(y)), (np.asarray(x), np.asarray(y)), config,
        loss_fn=EnergyLoss(10.0, e0), progress=False, on_step=DesignSchedule(every=1),
    )  # fmt: skip
    after = res.model.activations[0]
    assert any(float(jnp.max(jnp.abs(after.design.theta[k] - v))) > 0
               for k, v in layer.design.theta.items())  # fmt: skip
    for a, b in zip(jax.tree_util.tree_leaves(after.reset), jax.tree_util.tree_leaves(layer.reset),
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(a, b)


def test_train_device_gradient_is_never_that_of_a_stale_table():
    act = MTJActivation(PAPER, mode="table", train_device=True)
    z = jnp.array([-1.0, 0.3, 1.5])
    g = jax.grad(lambda a: jnp.sum(a(z)))(act)
    assert float(jnp.abs(g.params.thickness)) > 0  # through the rebuilt table
    table = MTJActivation(PAPER, mode="table")
    g0 = jax.grad(lambda a: jnp.sum(a(z)))(table)
    assert float(jnp.abs(g0.params.thickness)) == 0  # frozen device: stop_gradient, by design


@pytest.mark.slow  # ~55 s; the joint-training test covers the library path
def test_train_script_train_device(tmp_path):
    import runpy
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    main = runpy.run_path(str(root / "scripts" / "train.py"))["main"]
    out = tmp_path / "run"
    report = main([
        "--activation", "mtj", "--epochs", "1", "--train-subset", "256",
        "--model", "784-16-10", "--train-device", "diameter,pulse_duration",
        "--no-progress", "--out", str(out),
    ])  # fmt: skip
    design = report["results"]["mtj"]["design"]
    assert set(design) >= {"diameter", "pulse_duration", "input_scale_A"}
    assert design["diameter"] != pytest.approx(50e-9, rel=1e-6)


@pytest.mark.slow  # ~30 s
def test_inert_variables_stay_put_and_energy_weights_are_traced():
    # float32 round-off once moved a response-inert diameter 50 -> 39 nm in 30 Adam steps
    x, y = _data(64)
    model = _model(Design(PAPER.replace(temperature=0.0)), mode="table", energy=True)
    layer = model.activations[0]
    assert set(layer.inert) == {"diameter", "thickness", "eta1"}
    loss = EnergyLoss(weight=0.0, reference=1e-12)
    assert eqx.is_array(loss.weight) and eqx.is_array(loss.reference)  # one compile per sweep
    with pytest.raises(ValueError, match="weight"):
        EnergyLoss(weight=-1.0, reference=1e-12)
    config = train.TrainConfig(
        epochs=2, batch_size=16, lr=1e-2,
        optimizer=functools.partial(codesign.joint_optimizer, design_lr=0.2),
    )  # fmt: skip
    res = train.train(
        model, (np.asarray(x), np.asarray(y)), (np.asarray(x), np.asarray(y)), config,
        progress=False, on_step=DesignSchedule(every=1), loss_fn=loss,
    )  # fmt: skip
    before, after = layer.design.theta, res.model.activations[0].design.theta
    for name in layer.inert:
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)
    assert not np.array_equal(before["input_scale"], after["input_scale"])


def test_network_energy_counts_designed_layers():
    model = _model(Design(PAPER.replace(temperature=0.0)), mode="table", energy=True)
    x, _ = _data(8)
    got = mtjax.network_energy(model, x)
    exact = mtjax.nn.deploy(model, model.activations[0].activation())
    want = mtjax.network_energy(exact, x)
    np.testing.assert_allclose(float(got.total), float(want.total), rtol=1e-6)
    assert got.n_neurons == 6 and float(got.total) > 0


@pytest.fixture(scope="module")
def thermal_model():
    return _model(Design(PAPER), mode="thermal", energy=True, width=6)


def test_cached_step_program_has_no_rebuild(thermal_model):
    # regression: inside a lax.cond the live branch's residuals (the whole table build) were
    # materialized on cached steps too (8 s instead of 4 ms for 256 devices). Now a cached
    # model's gradient program holds no scan (the rebuild integrates pulses with lax.scan).
    model = thermal_model
    x, y = _data(4)

    def loss(m):
        keys = jax.random.split(jax.random.key(0), x.shape[0])
        return jnp.mean(train.cross_entropy(jax.vmap(lambda a, k: m(a, key=k))(x, keys), x, y))

    def jaxpr_text(m):
        params, static = eqx.partition(m, eqx.is_inexact_array)
        return str(jax.make_jaxpr(jax.grad(lambda p: loss(eqx.combine(p, static))))(params))

    assert " scan[" not in jaxpr_text(codesign.set_live(model, False))
    assert " scan[" in jaxpr_text(codesign.set_live(model, True))
    layer = model.activations[0]
    with pytest.raises(TypeError, match="filter_jit"):  # a traced flag cannot pick a program
        jax.jit(
            lambda flag: eqx.tree_at(lambda s: s.live, layer, flag)(jnp.zeros(6), key=None)
        )(True)  # fmt: skip


def test_design_gradient_with_the_model_a_compile_time_constant(thermal_model):
    # regression: closed over by jax.jit, the layer's arrays became constants and XLA's
    # constant folding made d(thermal statistics)/d(diameter, thickness) NaN
    from mtjax.nn.activation import _noise_nodes

    layer = thermal_model.activations[0]

    def stats(theta, layer):
        d = eqx.tree_at(lambda d: d.theta, layer.design, theta)
        act = eqx.tree_at(lambda s: s.design, layer, d).activation()
        m0 = jnp.broadcast_to(act.m0, (6, 3))
        return jnp.sum(_noise_nodes(act.params, act.input_scale, act.grid, act.steps, m0))

    theta = layer.design.theta
    as_argument = eqx.filter_jit(jax.grad(stats))(theta, layer)
    closed_over = eqx.filter_jit(jax.grad(lambda th: stats(th, layer)))(theta)
    for name in ("diameter", "thickness", "pulse_duration"):
        assert np.isfinite(float(closed_over[name])), name
        np.testing.assert_allclose(closed_over[name], as_argument[name], rtol=1e-3, err_msg=name)


def test_rebuilds_use_fewer_steps_while_the_design_allows_them(thermal_model):
    # the box's step count covers every design; set_live / refresh pick the lowest rung of a
    # ladder (1.25x what the starting design needs, x1.25 per rung, up to the box's) that
    # the step rule allows for the current design; rebuilds stay guarded at run time
    from mtjax.energy import energy_table, needed_energy_steps
    from mtjax.integrators import required_steps
    from mtjax.nn.activation import rotation_per_pulse

    layer = thermal_model.activations[0]
    box, fast = layer.template.steps, layer.fast_steps
    assert fast is not None and fast < box and layer.rebuild_steps == fast
    ladder = codesign.step_ladder(fast, box)
    assert ladder[0] == fast and ladder[-1] == box and len(ladder) >= 3
    assert all(b <= math.ceil(1.25 * a) for a, b in zip(ladder[:-1], ladder[1:], strict=True))

    def need(lay):
        a = lay.activation()
        return float(required_steps(rotation_per_pulse(a.params, a.grid.reach * a.input_scale),
                                    "rk4_scan"))  # fmt: skip

    def energy_need(lay):
        devices, scale = lay._devices_and_scale(lay.design, lay.deviations)
        return float(needed_energy_steps(devices, lay.template.grid.reach * scale, lay.reset))

    def at_gain(gain):
        return eqx.tree_at(lambda s: s.design, layer,
                           layer.design.with_values({"input_scale": gain}))  # fmt: skip

    gains = [at_gain(g) for g in np.linspace(1.05, 1.98, 32)]
    mid = next(lay for lay in gains if need(lay) > fast)  # needs the second rung
    assert need(layer) <= fast < need(mid) <= ladder[1]
    live = eqx.filter_jit(lambda lay: lay.activation()._tables().coef)
    at = eqx.filter_jit(lambda lay, n: lay.activation()._tables_at(n).coef)
    zs = jnp.linspace(-3.0, 3.0, layer.n_devices or 13)
    for lay, n, other in ((layer, fast, box), (mid, ladder[1], fast)):
        chosen = codesign.set_live(lay, True)
        assert chosen.rebuild_steps == n and codesign.refresh(lay).rebuild_steps == n
        got, off = live(chosen), at(lay, other)
        np.testing.assert_array_equal(got, at(lay, n))
        assert float(jnp.max(jnp.abs(got - off))) > 1e-7  # another count: other tables
        # the energy table: its own ladder and step rule, the same choice
        e_ladder = codesign.step_ladder(layer.energy_fast_steps, layer.energy_box_steps)
        n_e = chosen.energy_steps
        assert n_e in e_ladder and energy_need(lay) <= n_e
        assert n_e == e_ladder[0] or energy_need(lay) > e_ladder[e_ladder.index(n_e) - 1]
        devices, scale = lay._devices_and_scale(lay.design, lay.deviations)
        direct = energy_table(devices, scale, lay.template.grid, reset=lay.reset, steps=n_e)
        np.testing.assert_allclose(chosen.energy_per_neuron(zs), direct(zs).total, rtol=1e-6)
        if lay is layer:  # fewer steps, the same energy: within the step rule's target
            box_e = energy_table(devices, scale, lay.template.grid, reset=lay.reset,
                                 steps=layer.energy_box_steps)(zs).total  # fmt: skip
            np.testing.assert_allclose(direct(zs).total, box_e, rtol=1e-4)
    np.testing.assert_array_equal(codesign.refresh(layer).template.table.coef, live(layer))
    # a traced design cannot be checked: the box's steps
    traced = eqx.filter_jit(lambda lay: codesign._chosen_steps(lay))(layer)
    assert traced == (box, layer.energy_box_steps)
    # too few steps for the design raise inside jit instead of building a wrong table
    coarse = eqx.tree_at(lambda s: s.rebuild_steps, layer, 2)
    with pytest.raises(Exception, match="too coarse"):
        jax.block_until_ready(live(coarse))
    # a design that moved past the chosen steps without set_live/refresh (e.g. a manual
    # loop) raises rather than rebuilding less accurately than the step rule asks
    stale = eqx.tree_at(lambda s: s.design, layer, mid.design)
    assert stale.rebuild_steps == fast and stale.energy_steps == layer.energy_fast_steps
    with pytest.raises(Exception, match="set_live"):
        jax.block_until_ready(live(stale))
    with pytest.raises(ValueError, match="set_live"):
        jax.lax.stop_gradient(stale.activation())._tables()
    live_stale = codesign.set_live(stale, True)
    live_stale = eqx.tree_at(lambda s: s.energy_steps, live_stale, layer.energy_fast_steps)
    with pytest.raises(ValueError, match="energy pulse are too coarse"):
        live_stale.energy_per_neuron(zs)
    energy = eqx.filter_jit(lambda lay, z: lay.energy_per_neuron(z))
    with pytest.raises(Exception, match="set_live"):
        jax.block_until_ready(energy(live_stale, zs))
    with pytest.raises(ValueError, match="fast_steps"):
        layer.template.with_fast_steps(0)
    with pytest.raises(ValueError, match="with_fast_steps"):
        MTJActivation(PAPER, mode="ode").with_fast_steps(5)
    assert layer.template.with_fast_steps(box).fast_steps is None


@pytest.mark.slow  # ~50 s (compiles the live gradient and the batched one)
def test_batched_table_pullback_equals_the_one_shot_live_gradient(thermal_model):
    # the sensitivity gradient sums batch gradients at the built tables and pulls the sum
    # back through one build; it must equal jax.grad of the whole loss through live tables
    from mtjax.sensitivity import (
        _loss_and_theta_grad,
        _mean_loss,
        _only_layer,
        _with_design,
        example_keys,
    )  # fmt: skip

    x, y = _data(6, seed=4)
    keys = example_keys([jax.random.key(7), jax.random.key(8)], 6)
    model = codesign.refresh(thermal_model)

    @eqx.filter_jit  # the model as an argument: as constants, XLA folds d/d diameter to NaN
    def whole(theta, live):
        moved = eqx.tree_at(lambda d: d.theta, _only_layer(live).design, theta)
        return _mean_loss(_with_design(live, moved), x, y, keys)

    live = codesign.set_live(model, True)
    loss, g = jax.value_and_grad(whole)(_only_layer(live).design.theta, live)
    loss_b, g_b = _loss_and_theta_grad(model, x, y, keys, 4)  # batches of 4 and 2
    assert float(loss_b) == pytest.approx(float(loss), rel=1e-5)
    for name in ("diameter", "thickness", "pulse_duration", "input_scale"):
        assert float(jnp.abs(g[name])) > 0, name
        np.testing.assert_allclose(g_b[name], g[name], rtol=1e-4, atol=1e-9, err_msg=name)
    with pytest.raises(ValueError, match="train_device"):
        model.activations[0].template.with_given_tables()


@pytest.mark.slow  # ~1 min; the default suite keeps the near-bound sensitivity test
def test_design_sensitivity_matches_finite_differences_and_steps_lower_the_loss(thermal_model):
    from mtjax.sensitivity import design_sensitivity

    x, y = _data(64, seed=3)
    model = thermal_model
    out = design_sensitivity(model, (np.asarray(x), np.asarray(y)), n_keys=2, log=lambda s: None)
    rows = out["variables"]
    assert rows["eta1"]["inert"] and rows["eta1"]["gradient"] == 0.0  # calibrated driver
    for name in ("diameter", "thickness", "pulse_duration", "input_scale"):
        r = rows[name]
        assert abs(r["gradient"] - r["finite_difference"]) <= 2e-2 * abs(r["gradient"]), name
        assert r["loss_decreased"] and r["loss_change"] < 0, name
        assert r["step_direction"] == -np.sign(r["gradient"])
    with pytest.raises(ValueError, match="exactly one DesignedMTJ"):
        design_sensitivity(MLP((8, 4, 3), jnp.tanh, key=jax.random.key(0)), (x, y))


@pytest.mark.slow  # ~35 s
def test_sensitivity_near_a_bound_uses_the_moves_it_made():
    # gain 1.9 in [0.5, 2]: x e^(+0.2) is clipped at 2, so a central difference over the
    # nominal 2 x 0.2 would be ~35 % low; it must use the moves actually made
    from mtjax.sensitivity import design_sensitivity

    design = Design(PAPER, DesignSpace(("input_scale",)), gain=1.9)
    x, y = _data(64, seed=3)
    data, model = (np.asarray(x), np.asarray(y)), _model(design)
    out = design_sensitivity(model, data, n_keys=1, fd_step=0.2, step=0.2,
                             log=lambda s: None)  # fmt: skip
    r = out["variables"]["input_scale"]
    assert r["fd_moves"][0] < 0.06 and r["fd_moves"][1] == pytest.approx(-0.2, rel=1e-4)
    assert abs(r["finite_difference"] - r["gradient"]) <= 0.15 * abs(r["gradient"])
    assert r["predicted_loss_change"] == pytest.approx(r["gradient"] * r["step_made"])
    for bad, match in (
        (dict(grad_examples=0), "grad_examples"), (dict(n_keys=0), "n_keys"),
        (dict(fd_step=float("nan")), "fd_step"), (dict(step=-1.0), "step"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            design_sensitivity(model, data, **bad)


def test_design_with_values_round_trips_and_checks_bounds():
    design = Design(PAPER)
    moved = design.with_values({"diameter": 30e-9, "input_scale": 1.5})
    np.testing.assert_allclose(float(moved.value("diameter")), 30e-9, rtol=1e-5)
    np.testing.assert_allclose(float(moved.value("input_scale")), 1.5, rtol=1e-5)
    np.testing.assert_array_equal(moved.theta["thickness"], design.theta["thickness"])
    with pytest.raises(ValueError, match="diameter"):
        design.with_values({"diameter": 1e-6})
    with pytest.raises(ValueError, match="not a free variable"):
        design.with_values({"Ms": 1e6})


@pytest.mark.slow  # ~1.5 min
def test_codesign_script_quick(tmp_path):
    import pathlib
    import runpy

    mod = runpy.run_path(str(pathlib.Path(__file__).parents[1] / "scripts" / "codesign.py"))
    out = mod["main"](["--quick", "--out", str(tmp_path), "--no-progress", "--keys", "2"])
    assert (tmp_path / "codesign_sensitivity.md").read_text().count("| yes |") >= 1
    assert set(out["variables"]) == set(codesign.DEFAULT_FREE)


@pytest.mark.slow  # ~1.7 min
def test_codesign_repair_script_quick(tmp_path):
    import pathlib
    import runpy

    mod = runpy.run_path(str(pathlib.Path(__file__).parents[1] / "scripts" / "codesign_repair.py"))
    out = mod["main"](["--quick", "--out", str(tmp_path), "--no-progress"])
    rows = {(r["weights"], r["design"]): r for r in out["rows"]}
    built = rows[("software", "as built")]
    assert built["deviation"] > 0.15  # hk = 8e3 A/m bends m_x away from tanh
    repaired = [r for r in out["rows"] if r["weights"] == "software (frozen)"]
    assert len(repaired) == 4 and all("values" in r for r in repaired)
    # weights frozen (the script checks): a shorter pulse undoes part of the precession
    pulse = next(r for r in repaired if r["design"].startswith("pulse + gain,"))
    assert pulse["values"]["pulse_duration"] < 0.9e-9
    assert pulse["deviation"] < built["deviation"]
    assert (tmp_path / "codesign_repair.png").stat().st_size > 0


def _front_script():
    import pathlib
    import runpy

    return runpy.run_path(str(pathlib.Path(__file__).parents[1] / "scripts" / "codesign_front.py"))


def test_front_script_pareto_grid_and_comparison():
    mod = _front_script()
    pt = lambda e, a, **kw: dict(energy_J=e, accuracy=dict(mean=a, std=0.0), **kw)
    points = [pt(3.0, 0.9), pt(1.0, 0.8), pt(2.0, 0.7), pt(0.5, 0.6), pt(1.0, 0.8)]
    assert mod["pareto"](points) == [3, 1, 4, 0]  # (2.0, 0.7) is beaten by (1.0, 0.8)
    grid = [pt(1.0, 0.8), pt(4.0, 0.85)]
    cmp = mod["compare_fronts"]([pt(2.0, 0.82, weight=0.1), pt(0.5, 0.9, weight=1.0)], grid)
    assert cmp[0]["accuracy_gain_pp"] == pytest.approx(2.0)  # vs the 1.0 J point
    assert cmp[0]["grid_energy_ratio"] == pytest.approx(2.0)  # the 4.0 J point
    assert cmp[1]["accuracy_gain_pp"] is None and cmp[1]["grid_energy_ratio"] is None
    start = Design(PAPER, DesignSpace(("diameter", "pulse_duration")))
    designs = mod["grid_designs"](start, 3)
    assert len(designs) == 9
    d = sorted({round(float(x.value("diameter")) * 1e9, 3) for x in designs})
    lo, hi = DesignSpace().bound("diameter")
    expect = [lo * (hi / lo) ** u * 1e9 for u in (1 / 6, 1 / 2, 5 / 6)]  # log-box cell centres
    np.testing.assert_allclose(d, expect, rtol=1e-4)


@pytest.mark.slow  # ~2 min
def test_codesign_front_script_quick(tmp_path):
    # its own process: in a long slow session XLA aborted compiling it (SIGABRT, memory)
    import json
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).parents[1]
    proc = subprocess.run(
        [sys.executable, str(root / "scripts" / "codesign_front.py"), "--quick", "--out",
         str(tmp_path), "--no-progress", "--weights", "0,1", "--keys", "2",
         "--free", "diameter,pulse_duration", "--validity-n", "256"],
        capture_output=True, text=True, timeout=1200, cwd=root,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = json.loads((tmp_path / "codesign_front.json").read_text())
    grad = out["searches"]["gradient"]
    assert len(grad) == 2 and set(out["searches"]) == {
        "gradient", "grid (cell centres)", "grid (box ends)"}  # fmt: skip
    assert all(len(out["searches"][n]) == 2 * 4 for n in out["comparison"])  # 2 ways per point
    assert out["steps"]["per_grid"] <= out["steps"]["gradient"]  # the same budget, rounded down
    for rows in out["searches"].values():
        for r in rows:
            # (a fixed driver on a large device with a short pulse gives u ~ 0: chance level)
            assert r["energy_J"] > 0 and 0.05 < r["accuracy"]["mean"] <= 1
            assert 0.3e-9 <= r["device"]["pulse_duration"] <= 1.2e-9  # the script's bounds
    ends = {round(r["device"]["diameter"] * 1e9) for r in out["searches"]["grid (box ends)"]}
    assert ends == {20, 100}
    assert grad[1]["energy_J"] < grad[0]["energy_J"]  # an energy weight buys energy
    assert all("validity" in grad[i] for i in out["fronts"]["gradient"])
    assert (tmp_path / "codesign_front.png").stat().st_size > 0
    assert "| gradient |" in (tmp_path / "codesign_front.md").read_text()


def test_front_script_refuses_a_grid_larger_than_its_step_budget(tmp_path):
    with pytest.raises(SystemExit, match="--levels 3"):  # 3^5 = 243 points > 2 x 16 steps
        _front_script()["main"](["--quick", "--out", str(tmp_path), "--weights", "0,1",
                                 "--levels", "3", "--no-progress"])  # fmt: skip
    assert not (tmp_path / "codesign_front.json").exists()


def test_designed_thermal_layer_keeps_the_thermal_range_guard():
    small = PAPER.replace(temperature=300.0, diameter_x=12e-9, diameter_y=12e-9)
    design = Design(small, DesignSpace(free=("diameter",), bounds={"diameter": (5e-9, 1e-7)}))
    with pytest.raises(ValueError, match="thermal_std_limit=0.25"):
        DesignedMTJ(design, mode="thermal", n_grid=65)
    loose = DesignedMTJ(design, mode="thermal", n_grid=65, thermal_std_limit=0.3)
    assert 0.25 < float(jnp.max(loose.template.thermal_std())) < 0.3


def _field_free_layers():
    p = mtjax.DeviceParams.paper(temperature=300.0)
    layer = lambda d, **kw: DesignedMTJ(d, mode="thermal", n_grid=65, energy=True, **kw)  # noqa: E731
    return layer, p


def _field_free_loss():
    x, y = _data(8)
    keys = jax.random.split(jax.random.key(3), x.shape[0])

    def loss(theta, model):
        m = eqx.tree_at(lambda m: m.activations[0].design.theta, model, theta)
        logits = jax.vmap(lambda xi, ki: m(xi, key=ki))(x, keys)
        return jnp.mean(train.cross_entropy(logits, x, y))

    return loss


def test_field_free_designs_rebuild_from_the_closed_form():
    # a thermal design whose devices have no field uses the closed-form statistics (unless
    # told not to); its design gradient matches central finite differences (x64)
    with jax.enable_x64(True):
        layer, p = _field_free_layers()
        ff = layer(Design(p))
        assert ff.template.field_free
        # no time steps: a design that an RK4 build would need more steps for keeps its
        # count (and its compiled step)
        moved = eqx.tree_at(lambda s: s.design, ff, ff.design.with_values({"input_scale": 1.98}))
        need = float(codesign._needed_steps(moved)[0])
        assert need > ff.rebuild_steps == codesign.set_live(moved, True).rebuild_steps
        assert jnp.all(jnp.isfinite(codesign.set_live(moved, True).activation()._tables().coef))
        with_hk = Design(p, DesignSpace((*codesign.DEFAULT_FREE, "hk"), bounds={"hk": (-1e3, 1e3)}))
        with pytest.raises(ValueError, match="hk/h_bias are free"):
            layer(with_hk, field_free=True)
        loss = _field_free_loss()
        model = codesign.set_live(MLP((8, 4, 3), ff, key=jax.random.key(0)), True)
        theta = ff.design.theta
        grad = eqx.filter_jit(jax.grad(loss))(theta, model)
        fwd = eqx.filter_jit(jax.jacfwd(loss))(theta, model)  # forward mode through it too
        for name in theta:
            np.testing.assert_allclose(fwd[name], grad[name], rtol=1e-9, atol=1e-15, err_msg=name)
        f = eqx.filter_jit(loss)
        for name in codesign.DEFAULT_FREE:
            fd = central_difference(lambda th: f(th, model), theta, name, 1e-5)
            assert abs(float(grad[name]) - float(fd)) <= 1e-5 * abs(float(fd)) + 1e-12, name
            assert name == "eta1" or abs(float(fd)) > 1e-6, name  # eta1: calibrated, inert
        # the energy tables too (closed form; lambda2 = 1), with exact design gradients
        assert ff.energy_field_free
        zs = jnp.linspace(-2.5, 2.5, 5)
        live = codesign.set_live(ff, True)
        energy = eqx.filter_jit(lambda th: 1e12 * jnp.sum(
            eqx.tree_at(lambda s: s.design.theta, live, th).energy_per_neuron(zs)))  # fmt: skip
        e_grad = eqx.filter_jit(jax.grad(energy))(theta)
        for name in codesign.DEFAULT_FREE:
            fd = central_difference(energy, theta, name, 1e-5)
            assert abs(float(e_grad[name]) - float(fd)) <= 1e-5 * abs(float(fd)) + 1e-9, name


def test_table_designs_rebuild_from_the_closed_form_too():
    # at T = 0 ("table"), a field-free design's response tables come from the closed-form
    # pulse: equal to the RK4 tables at the box's steps to their error, and the live design
    # gradient matches central finite differences (x64)
    with jax.enable_x64(True):
        p = mtjax.DeviceParams.paper()
        layer = lambda **kw: DesignedMTJ(Design(p), mode="table", n_grid=65, energy=True, **kw)  # noqa: E731
        ff, rk4 = layer(), layer(field_free=False)
        assert ff.template.field_free and not rk4.template.field_free
        np.testing.assert_allclose(ff.activation()._tables().coef,
                                   rk4.activation()._tables().coef, atol=1e-6)  # fmt: skip
        loss = _field_free_loss()
        model = codesign.set_live(MLP((8, 4, 3), ff, key=jax.random.key(0)), True)
        theta = ff.design.theta
        grad = eqx.filter_jit(jax.grad(loss))(theta, model)
        f = eqx.filter_jit(loss)
        for name in codesign.DEFAULT_FREE:
            fd = central_difference(lambda th: f(th, model), theta, name, 1e-5)
            assert abs(float(grad[name]) - float(fd)) <= 1e-5 * abs(float(fd)) + 1e-12, name
        # at T = 0 only the gain moves the field-free response (the others: energy only)
        assert ff.inert == ("diameter", "eta1", "pulse_duration", "thickness")
        assert abs(float(grad["input_scale"])) > 1e-3  # the check is not vacuous


@pytest.mark.slow  # ~1 min: builds four designs and compiles the RK4 live gradient in x64
def test_field_free_and_rk4_rebuilds_give_the_same_design_gradient():
    with jax.enable_x64(True):
        layer, p = _field_free_layers()
        with_hk = Design(p, DesignSpace((*codesign.DEFAULT_FREE, "hk"), bounds={"hk": (-1e3, 1e3)}))
        assert not layer(with_hk).template.field_free  # a free field: RK4
        devs = mtjax.sample_deviations(jax.random.key(5), 4, mtjax.Spreads.relative(0.05))
        assert not layer(Design(p), deviations=devs).template.field_free  # stray-field offsets
        loss = _field_free_loss()
        grads = []
        rk4 = layer(Design(p), field_free=False)
        assert not rk4.template.field_free and not rk4.energy_field_free
        for lay in (layer(Design(p)), rk4):
            model = codesign.set_live(MLP((8, 4, 3), lay, key=jax.random.key(0)), True)
            grads.append(eqx.filter_jit(jax.grad(loss))(lay.design.theta, model))
        for name in codesign.DEFAULT_FREE:
            ref = abs(float(grads[0][name]))
            assert abs(float(grads[0][name]) - float(grads[1][name])) <= 2e-3 * ref + 1e-12, name


def test_joint_optimizer_matches_a_multi_transform_with_a_small_state():
    # the joint optimizer's updates are those of optax.multi_transform over the two groups,
    # with a state of two short lists instead of two copies of the model's structure
    model = _model(Design(PAPER), width=4, energy=True)
    params = eqx.filter(model, mtjax.nn.trainable(model))
    reference = optax.multi_transform(
        {"weights": optax.adam(1e-2), "design": codesign._skip_when_zero(optax.adam(0.05))},
        codesign._labels,
    )
    joint = codesign.joint_optimizer(1e-2)
    states = [joint.init(params), reference.init(params)]
    n_params = len(jax.tree.leaves(params))
    assert len(jax.tree.leaves(states[0])) == 2 * n_params + 2  # mu, nu per array, 2 counts
    assert len(jax.tree.leaves(states[0], is_leaf=lambda x: x is None)) < len(
        jax.tree.leaves(states[1], is_leaf=lambda x: x is None)
    )
    for step in range(3):
        grads = jax.tree.map(lambda p, s=step: jnp.sin(p + s), params)
        if step == 1:  # a cached step: zero design gradient leaves the design state alone
            theta = grads.activations[0].design.theta
            zero = jax.tree.map(jnp.zeros_like, theta)
            grads = eqx.tree_at(lambda g: g.activations[0].design.theta, grads, zero)
        out = [o.update(grads, s, params) for o, s in zip((joint, reference), states, strict=True)]
        for a, b in zip(jax.tree.leaves(out[0][0]), jax.tree.leaves(out[1][0]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6)
        states = [o[1] for o in out]
        params = optax.apply_updates(params, out[0][0])
