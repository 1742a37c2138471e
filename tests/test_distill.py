import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtjax import distill, train


def test_alpha_zero_is_cross_entropy():
    s = jax.random.normal(jax.random.key(0), (8, 10))
    t = jax.random.normal(jax.random.key(1), (8, 10))
    y = jnp.arange(8) % 10
    ce = optax.softmax_cross_entropy_with_integer_labels(s, y)
    np.testing.assert_allclose(distill.kd_loss(s, t, y, alpha=0.0), ce, rtol=1e-6)
    # alpha = 1 with teacher = student: KL is zero
    np.testing.assert_allclose(distill.kd_loss(s, s, y, alpha=1.0), 0.0, atol=1e-6)


def test_gradient_matches_finite_differences():
    with jax.enable_x64(True):
        s = jax.random.normal(jax.random.key(2), (4, 5), dtype=jnp.float64)
        t = jax.random.normal(jax.random.key(3), (4, 5), dtype=jnp.float64)
        y = jnp.array([0, 1, 2, 3])
        f = lambda s_: jnp.sum(distill.kd_loss(s_, t, y, temperature=3.0, alpha=0.7))
        g = jax.grad(f)(s)
        eps = 1e-6
        for idx in [(0, 0), (1, 3), (3, 4)]:
            e = jnp.zeros_like(s).at[idx].set(eps)
            fd = (f(s + e) - f(s - e)) / (2 * eps)
            assert float(g[idx]) == pytest.approx(float(fd), rel=1e-6, abs=1e-9)
        # teacher gets no gradient
        gt = jax.grad(lambda t_: jnp.sum(distill.kd_loss(s, t_, y)))(t)
        assert float(jnp.max(jnp.abs(gt))) == 0.0


class _Net(eqx.Module):
    mlp: eqx.nn.MLP

    def __init__(self, width, key):
        self.mlp = eqx.nn.MLP(16, 4, width, 1, activation=jnp.tanh, key=key)

    def __call__(self, x, *, key=None):
        return self.mlp(x.reshape(-1))


def test_distill_trains_student_and_leaves_teacher_alone():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 4, 4, 1)).astype(np.float32)
    y = (x.reshape(256, -1)[:, :4].argmax(-1)).astype(np.int32)
    teacher = _Net(64, jax.random.key(0))
    teacher = train.train(
        teacher, (x, y), (x, y), train.TrainConfig(epochs=3, batch_size=32, lr=1e-2), progress=False
    ).model
    before = jax.tree.map(np.asarray, eqx.filter(teacher, eqx.is_array))
    res = distill.distill(
        teacher, _Net(8, jax.random.key(1)), (x, y), (x, y),
        train.TrainConfig(epochs=10, batch_size=32, lr=2e-2), progress=False,
    )  # fmt: skip
    after = eqx.filter(teacher, eqx.is_array)
    assert all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)
    )
    assert res.test_accuracy > 0.7
    with pytest.raises(ValueError, match="alpha"):
        distill.DistillationLoss(teacher, alpha=1.5)


def test_defaults_are_the_best_setting_of_the_committed_sweep():
    import json
    from pathlib import Path

    sweep = json.loads((Path(__file__).parents[1] / "results" / "distillation.json").read_text())
    best = sweep["best"]
    gains = [c["gain_pp"]["mean"] for row in sweep["grid"] for c in row]
    key = (best["temperature"], best["alpha"])
    cell = next(c for row in sweep["grid"] for c in row if (c["temperature"], c["alpha"]) == key)
    assert cell["gain_pp"]["mean"] == max(gains)
    assert (distill.DEFAULT_TEMPERATURE, distill.DEFAULT_ALPHA) == (
        best["temperature"], best["alpha"],
    )  # fmt: skip
    loss = distill.DistillationLoss(_Net(4, jax.random.key(0)))
    assert (loss.temperature, loss.alpha) == (best["temperature"], best["alpha"])
