"""mtjax.nn: MTJActivation modes, custom derivatives, device-parameter gradients, MLP/deploy."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtjax
from mtjax import readout
from mtjax.nn import MLP, MTJActivation, deploy, rebuild_tables, trainable

PAPER = mtjax.DeviceParams.paper()
Z_GRID = jnp.concatenate(
    [
        jnp.linspace(-6.0, 6.0, 241),
        jax.random.uniform(jax.random.key(3), (200,), minval=-6.0, maxval=6.0),
    ]
)


@pytest.fixture(scope="module")
def acts():
    return {m: MTJActivation(PAPER, mode=m) for m in ("ode", "table", "analytic", "ideal")}


@pytest.fixture(scope="module")
def ode_read(acts):
    return eqx.filter_jit(acts["ode"].read)(Z_GRID)


def _per_neuron_params(n=4):
    return mtjax.DeviceParams.paper(Ms=jnp.linspace(0.9e6, 1.1e6, n), xi1=jnp.linspace(0.0, 0.1, n))


# --- forward -----------------------------------------------------------------------------


def test_ode_forward_equals_pulse_response_readout(acts):
    z = jnp.linspace(-5.0, 5.0, 11)
    i_s = mtjax.current_scale(PAPER)

    @jax.jit
    def run(z):
        m = jax.vmap(
            lambda zz: mtjax.pulse_response(
                PAPER, zz * i_s, solver="rk4_scan", steps=acts["ode"].steps
            )
        )(z)
        ref = readout.projection_from_conductance(PAPER, readout.conductance(PAPER, m, 1), 1)
        return m, ref, acts["ode"](z), acts["ode"].read(z)

    m, ref, y, (_, mz) = run(z)
    np.testing.assert_allclose(y, ref, atol=1e-6)
    np.testing.assert_allclose(mz, m[:, 2], atol=1e-6)
    np.testing.assert_allclose(ref, jnp.tanh(z), atol=1e-4)  # ideal device: tanh(z)


@pytest.mark.parametrize("mode", ["table", "analytic"])
def test_table_and_analytic_match_ode(acts, ode_read, mode):
    got = eqx.filter_jit(acts[mode].read)(Z_GRID)
    assert float(jnp.max(jnp.abs(got[0] - ode_read[0]))) <= 1e-4
    assert float(jnp.max(jnp.abs(got[1] - ode_read[1]))) <= 1e-4


def test_ideal_is_tanh_exactly(acts):
    np.testing.assert_array_equal(acts["ideal"](Z_GRID), jnp.tanh(Z_GRID))
    g = jax.grad(lambda z: acts["ideal"](z).sum())(Z_GRID)
    np.testing.assert_allclose(g, 1 / jnp.cosh(Z_GRID) ** 2, atol=1e-6)


def test_driver_saturates_beyond_z_max(acts):
    act = acts["table"]
    z = jnp.array([-9.0, -6.0, 6.0, 7.5])
    y = act(z)
    assert y[0] == y[1] and y[2] == y[3]
    g = jax.grad(lambda z: act(z).sum())(z)
    assert g[0] == 0 and g[3] == 0 and g[2] > 0
    np.testing.assert_allclose(act.max_current, 6.0 * mtjax.current_scale(PAPER), rtol=1e-6)


# --- backward ----------------------------------------------------------------------------


def _fd_check_params(value_and_grad, params, grads, names=("Ms", "eta1", "xi1", "alpha")):
    for name in names:
        v = float(getattr(params, name))
        h = 1e-4 * max(abs(v), 1e-2)
        fd = (
            value_and_grad(params.replace(**{name: v + h}))[0]
            - value_and_grad(params.replace(**{name: v - h}))[0]
        ) / (2 * h)
        assert abs(float(getattr(grads, name)) / float(fd) - 1) < 1e-2, name


Z4 = (-2.0, -0.5, 0.8, 1.7)
# Gradient plumbing is solver-independent; reverse mode through heun_scan compiles ~3x
# faster than through the default rk4_scan on this CPU (keeps the file under a minute).
# z_max = 2.5 keeps 40 Heun steps within the step guard for |z| <= 2.5.
FAST = dict(mode="ode", solver="heun_scan", steps=40, n_grid=33, z_max=2.5)
W4 = (0.3, -1.0, 0.7, 1.1)


def test_ode_autodiff_gradients_match_finite_differences_x64():
    # One compile gives both the z-derivative of derivative="autodiff" and the gradient
    # w.r.t. device params through the "ode" mode.
    with jax.enable_x64(True):
        z, w = jnp.array(Z4), jnp.array(W4)
        base = MTJActivation(
            mtjax.DeviceParams.paper(xi1=0.1), derivative="autodiff", train_device=True, **FAST
        )

        def loss(p, z):
            return jnp.sum(w * eqx.tree_at(lambda a: a.params, base, p)(z))

        vg = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        _, (g_p, g_z) = vg(base.params, z)
        h = 1e-5
        for i in range(4):
            e = h * (jnp.arange(4) == i)
            fd = (vg(base.params, z + e)[0] - vg(base.params, z - e)[0]) / (2 * h)
            np.testing.assert_allclose(g_z[i], fd, rtol=1e-6, atol=1e-9)
        _fd_check_params(lambda p: vg(p, z), base.params, g_p)


def test_table_param_gradients_match_finite_differences_x64():
    # derivative="mz2": the device-parameter part of the activation's jvp rule is autodiff
    # of the forward, through the table rebuilt from params.
    with jax.enable_x64(True):
        z, w = jnp.array(Z4), jnp.array(W4)
        base = MTJActivation(
            mtjax.DeviceParams.paper(xi1=0.1), train_device=True, **FAST | dict(mode="table")
        )

        def loss(p):
            return jnp.sum(w * eqx.tree_at(lambda a: a.params, base, p).rebuild()(z))

        vg = jax.jit(jax.value_and_grad(loss))  # one compile, reused for FD
        _fd_check_params(vg, base.params, vg(base.params)[1])


@pytest.mark.parametrize(
    ("mode", "derivative"), [("sde", "mz2"), ("table", "mz"), ("thermal", "mz2")]
)
def test_device_derivative_is_the_same_evaluations_readout(mode, derivative):
    # Read noise (+ thermal noise for "sde"): only the same evaluation's m.p2 read-out can
    # reproduce the gradient.
    act = MTJActivation(
        PAPER, mode=mode, steps=20, z_max=2.5, read_noise=0.05, derivative=derivative
    )
    z = jnp.array([-1.5, 0.0, 0.3, 2.0])

    @jax.jit
    def run(key):
        g = jax.grad(lambda z: act(z, key=key).sum())(z)
        return g, act(z, key=key), act.read(z, key=key)

    g, y_call, (y, mz) = run(jax.random.key(7))
    np.testing.assert_array_equal(y_call, y)
    expected = mz**2 if derivative == "mz2" else mz
    np.testing.assert_allclose(g, expected, rtol=1e-6)
    mz_other = run(jax.random.key(8))[2][1]
    assert float(jnp.max(jnp.abs(mz_other - mz))) > 1e-3  # noise really differs per key


def test_forward_mode_uses_the_same_device_derivative():
    # a jvp rule: jax.jacfwd (and jvp-based tools) see the device's own derivative, equal to
    # reverse mode, with read and thermal noise, and for device parameters (train_device)
    p = PAPER.replace(temperature=300.0)
    act = MTJActivation(p, mode="thermal", steps=20, z_max=2.5, read_noise=0.05)
    z, key = jnp.array([-1.5, 0.0, 0.3, 2.0]), jax.random.key(7)
    fwd = jax.jit(jax.jacfwd(lambda z: act(z, key=key)))(z)
    rev = jax.jit(jax.jacrev(lambda z: act(z, key=key)))(z)
    mz = act.read(z, key=key)[1]
    np.testing.assert_allclose(jnp.diag(fwd), mz**2, rtol=1e-5)
    np.testing.assert_allclose(fwd, rev, rtol=1e-5)
    assert float(jnp.max(jnp.abs(fwd - jnp.diag(jnp.diag(fwd))))) == 0.0
    dev = MTJActivation(PAPER, mode="analytic", read_noise=0.05, train_device=True)

    def out(ms, z):
        a = eqx.tree_at(lambda a: a.params.Ms, dev, ms)
        return a(z, key=key).sum()

    ms = dev.params.Ms
    g_rev = jax.jit(jax.grad(out, argnums=(0, 1)))(ms, z)
    g_fwd = jax.jit(jax.jacfwd(out, argnums=(0, 1)))(ms, z)
    assert float(jnp.abs(g_rev[0])) > 0
    for r, f in zip(g_rev, g_fwd, strict=True):
        np.testing.assert_allclose(f, r, rtol=1e-4)


@pytest.mark.parametrize("mode", ["ode", "table"])
def test_mz2_is_sech2_for_ideal_device(acts, mode):
    z = Z_GRID[jnp.abs(Z_GRID) < 6.0]
    g = jax.jit(jax.grad(lambda z: acts[mode](z).sum()))(z)
    assert float(jnp.max(jnp.abs(g - 1 / jnp.cosh(z) ** 2))) <= 1e-4


def test_device_is_frozen_unless_train_device(acts):
    g = eqx.filter_grad(lambda a: a(jnp.array([0.3, 1.0])).sum())(acts["analytic"])
    assert float(jnp.abs(g.params.Ms)) == 0 and float(g.input_scale) == 0
    spec = trainable(MLP((3, 2, 1), acts["table"], key=jax.random.key(0)))
    assert not any(jax.tree.leaves(spec.activations[0]))
    assert all(jax.tree.leaves(spec.layers))


# --- composition, per-neuron devices, errors ---------------------------------------------


@pytest.mark.parametrize("mode", [pytest.param("ode", marks=pytest.mark.slow), "analytic"])
def test_per_neuron_devices_broadcast(mode):
    p = _per_neuron_params(4)
    act = MTJActivation(p, mode=mode)
    z = jnp.array([-1.0, 0.5, 1.0, 2.0])
    y = act(z)

    @jax.jit
    def single(p_i, z_i):
        return MTJActivation(p_i, mode=mode, input_scale=act.input_scale)(z_i[None])[0]

    for i in range(4):
        np.testing.assert_allclose(
            y[i], single(jax.tree.map(lambda x, i=i: x[i], p), z[i]), atol=1e-6
        )
    assert float(jnp.max(jnp.abs(y - jnp.tanh(z)))) > 1e-3  # devices really differ
    if mode == "ode":  # lax.map over chunks of neurons: same result
        np.testing.assert_allclose(MTJActivation(p, mode=mode, chunk=3)(z), y, atol=1e-6)
    with pytest.raises(ValueError, match=r"\(3,\).*4 per-neuron"):
        act(z[:3])


def test_mlp_jit_vmap_grad_compose():
    p = _per_neuron_params(5)
    model = MLP((6, 5, 3), MTJActivation(p, mode="table", n_grid=65), key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (8, 2, 3))
    out = jax.jit(jax.vmap(model))(x)
    assert out.shape == (8, 3)
    np.testing.assert_allclose(out[2], model(x[2]), atol=1e-6)

    @eqx.filter_jit
    def loss(m):
        return jnp.mean(jax.vmap(m)(x) ** 2)

    g = eqx.filter_grad(loss)(model)
    assert float(jnp.sum(jnp.abs(g.layers[0].weight))) > 0
    # software model -> MTJ: same weights, different activation
    soft = deploy(model, jnp.tanh)
    np.testing.assert_array_equal(soft.layers[0].weight, model.layers[0].weight)
    assert soft.activations == (jnp.tanh,)
    np.testing.assert_allclose(
        deploy(soft, MTJActivation(mode="ideal"))(x[0]), soft(x[0]), atol=1e-6
    )
    assert rebuild_tables(model).activations[0].table.coef.shape == (5, 64, 2, 4)
    with pytest.raises(ValueError, match="width 5"):
        deploy(model, MTJActivation(_per_neuron_params(4), mode="analytic"))


def test_mlp_key_reaches_noisy_layers():
    act = MTJActivation(mode="analytic", read_noise=0.1)
    model = MLP((4, 8, 8, 2), act, key=jax.random.key(0))
    x = jnp.ones(4)
    a, b = model(x, key=jax.random.key(1)), model(x, key=jax.random.key(2))
    assert float(jnp.max(jnp.abs(a - b))) > 0
    np.testing.assert_array_equal(a, model(x, key=jax.random.key(1)))
    with pytest.raises(ValueError, match="key"):
        model(x)


def test_read_noise_units():
    act = MTJActivation(mode="table", read_noise=0.1)
    z = jnp.full(4000, 0.5)
    y, mz = act.read(z, key=jax.random.key(0))
    clean = MTJActivation(mode="table").read(z[:1])
    assert abs(float(jnp.std(y - clean[0][0])) / 0.1 - 1) < 0.05
    assert abs(float(jnp.std(mz - clean[1][0])) / 0.1 - 1) < 0.05
    assert abs(float(jnp.mean(y - clean[0][0]))) < 0.01


def test_non_finite_input_raises(acts):
    z = jnp.array([0.0, jnp.nan])
    with pytest.raises(Exception, match="non-finite"):
        acts["table"](z)
    with pytest.raises(Exception, match="non-finite"):
        jax.jit(lambda z: acts["analytic"](z))(z).block_until_ready()


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        MTJActivation(mode="spice")
    with pytest.raises(ValueError, match="derivative"):
        MTJActivation(mode="ideal", derivative="sech")
    with pytest.raises(ValueError, match="read_noise"):
        MTJActivation(mode="ideal", read_noise=-0.1)
    with pytest.raises(ValueError, match="key"):
        MTJActivation(mode="ideal", read_noise=0.1)(jnp.zeros(2))
    with pytest.raises(ValueError, match="key"):
        MTJActivation(mode="sde")(jnp.zeros(2))
    with pytest.raises(ValueError, match="solver"):
        MTJActivation(mode="sde", solver="rk4_scan")


def test_imperfect_reset_offsets_the_response():
    m0 = mtjax.sample_reset_states(jax.random.key(1), 4, 0.1)
    assert float(jnp.std(m0[:, 0])) > 0.03
    z = jnp.array([0.0, 0.0, 0.0, 0.0])
    table = MTJActivation(PAPER, m0=m0)  # one shared device, four reset states
    assert table.n_devices == 4
    ode = MTJActivation(PAPER, m0=m0, mode="ode")
    np.testing.assert_allclose(table(z), m0[:, 0], atol=1e-5)  # no drive, no field: m stays
    zz = jnp.array([-1.0, -0.3, 0.4, 1.2])
    np.testing.assert_allclose(table(zz), ode(zz), atol=1e-5)
    assert float(jnp.max(jnp.abs(table(zz) - MTJActivation(PAPER)(zz)))) > 1e-3
    with pytest.raises(ValueError, match="m0"):
        MTJActivation(PAPER, m0=m0, mode="analytic")
    with pytest.raises(ValueError, match="m0"):
        MTJActivation(PAPER, m0=jnp.zeros(3))


def test_table_lookups_get_kernels_of_their_own_on_cpu_only(monkeypatch):
    """`own_kernel`: on CPU the table coordinates and the thermal draws stay conditionals
    after compilation (the fusion boundary the speed-up rests on), values and gradients are
    those of the plain function, and other platforms get the plain function."""
    from mtjax.nn import activation
    from mtjax.nn.activation import _thermal_sample, own_kernel

    act = MTJActivation(PAPER, mode="thermal")
    z = jnp.linspace(-5.0, 5.0, 64)
    key = jax.random.key(3)

    def conditionals():  # in the compiled thermal activation (a fresh jit each time)
        hlo = jax.jit(lambda z, key: act(z, key=key)).lower(z, key).compile().as_text()
        return hlo.count("conditional(")

    ours = conditionals()
    with monkeypatch.context() as m:
        m.setattr(activation, "own_kernel", lambda fn, *args: fn(*args))
        plain = conditionals()
    assert ours - plain == 2  # coordinates, draws
    sample = jax.jit(lambda z, key: _thermal_sample(act.table, z, key, True))
    spec = (jax.ShapeDtypeStruct(z.shape, z.dtype), jax.eval_shape(lambda: key))
    for platform, barrier in (("cpu", True), ("cuda", False)):
        text = jax.export.export(sample, platforms=[platform])(*spec).mlir_module()
        assert ("optimization_barrier" in text) == barrier, platform

    grid = act.grid
    i, t = jax.jit(grid.locate)(z)
    pos = (np.arcsinh(np.asarray(z, np.float64) / grid.z0) + grid.s_max) / grid.ds
    np.testing.assert_array_equal(i, np.floor(pos))
    np.testing.assert_allclose(t, pos - np.floor(pos), atol=2e-5)
    f = lambda x: jnp.sin(x) * jnp.log1p(x * x)  # noqa: E731
    g = lambda x: jnp.sum(own_kernel(f, x) ** 2)  # noqa: E731
    np.testing.assert_allclose(
        jax.jit(jax.grad(g))(z), jax.grad(lambda x: jnp.sum(f(x) ** 2))(z), rtol=1e-6
    )
    np.testing.assert_array_equal(
        jax.vmap(lambda x: own_kernel(f, x))(z.reshape(8, 8)), jax.vmap(f)(z.reshape(8, 8))
    )


@pytest.mark.parametrize("per_neuron", [False, True])
def test_table_interpolation_by_scalar_gathers_matches_the_cubic_in_value_and_derivatives(
    per_neuron,
):
    """`hermite_curves` gathers scalars for the value and rows when the table is
    differentiated (custom jvp): value, jvp and gradients (table and z) must all be those of
    the plain cubic c0 + c1 t + c2 t^2 + c3 t^3 on the located interval."""
    from mtjax.nn.activation import TableGrid, hermite_curves, hermite_eval

    with jax.enable_x64(True):
        grid = TableGrid(6.0, 33, 0.5)
        n, k = 5, 3
        shape = (n, grid.n_grid - 1, k, 4) if per_neuron else (grid.n_grid - 1, k, 4)
        coef = jax.random.normal(jax.random.key(0), shape, jnp.float64)
        z = jnp.array([-5.9, -1.3, 0.0, 0.07, 4.2])
        w = jax.random.normal(jax.random.key(1), (n, k), jnp.float64)

        def reference(c, z):
            i, t = grid.locate(z)
            rows = c[jnp.arange(n), i] if per_neuron else c[i]
            powers = t[:, None, None] ** jnp.arange(4)
            return jnp.sum(rows * powers, axis=-1)  # (n, k)

        i, t = (np.asarray(a) for a in grid.locate(z))
        rows = np.asarray(coef)[np.arange(n), i] if per_neuron else np.asarray(coef)[i]
        np.testing.assert_allclose(
            hermite_eval(coef, grid, z), np.sum(rows * t[:, None, None] ** np.arange(4), -1),
            rtol=1e-13, atol=1e-14,
        )  # fmt: skip
        picked = jnp.stack(hermite_curves(coef, grid, z, (2, 0)), axis=-1)
        np.testing.assert_allclose(picked, reference(coef, z)[:, [2, 0]], rtol=1e-13, atol=1e-14)

        def loss(f):
            return lambda c, z: jnp.sum(w * f(c, z))

        ours = lambda c, z: hermite_eval(c, grid, z)  # noqa: E731
        for argnum in (0, 1):
            np.testing.assert_allclose(
                jax.grad(loss(ours), argnum)(coef, z),
                jax.grad(loss(reference), argnum)(coef, z), rtol=1e-12, atol=1e-12,
            )  # fmt: skip
        d_coef = jax.random.normal(jax.random.key(2), shape, jnp.float64)
        for tangents in ((d_coef, jnp.zeros_like(z)), (jnp.zeros_like(coef), jnp.ones_like(z))):
            np.testing.assert_allclose(
                jax.jvp(ours, (coef, z), tangents)[1],
                jax.jvp(reference, (coef, z), tangents)[1], rtol=1e-12, atol=1e-12,
            )  # fmt: skip
