"""mtjax.nn.cnn: SmallCNN / ResNetFeatures / HeadedClassifier shapes, jit/vmap/grad, `deploy`
(activations swapped, weights bit-identical), and Fashion-MNIST transfer onto MTJ neurons."""

import ast
import inspect

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtjax
from mtjax import data, train
from mtjax.nn import (
    MLP,
    HeadedClassifier,
    MTJActivation,
    ResNetFeatures,
    SmallCNN,
    cifar_model,
    deploy,
)


def _key(seed):
    """Init key: "rbg" keys compile much faster than threefry on CPU (every new weight shape
    compiles its own `jax.random.uniform`), which keeps this file well under a minute."""
    return jax.random.key(seed, impl="rbg")


def _normal(seed, shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.fixture(scope="module")
def table_act():
    return MTJActivation(mode="table", derivative="mz2")  # paper device, shared


@pytest.fixture(scope="module")
def small():
    """A small SmallCNN (tanh everywhere); tests reuse it to share compilations."""
    return SmallCNN(1, 10, widths=(4, 8), hidden=16, key=_key(0))


@pytest.fixture(scope="module")
def headed():
    return cifar_model(10, (16, 8), widths=(4, 8), groups=2, key=_key(1))


@eqx.filter_jit
def _apply(model, x, key=None):
    return model(x, key=key)


@eqx.filter_jit
def _batch(model, x):
    return jax.vmap(model)(x)


def _per_neuron(n, mode="analytic"):
    p = mtjax.DeviceParams.paper(Ms=jnp.linspace(0.9e6, 1.1e6, n))
    return MTJActivation(p, mode=mode)


def _weights(model):
    """Every array leaf outside the activations (weights, biases, norm scales)."""
    if isinstance(model, SmallCNN):
        parts = (model.convs, model.head.layers)
    elif isinstance(model, HeadedClassifier):
        parts = (model.features, model.head.layers)
    else:
        parts = model.layers
    return jax.tree_util.tree_leaves(eqx.filter(parts, eqx.is_array))


def _assert_same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    assert len(wa) == len(wb) > 0
    for x, y in zip(wa, wb, strict=True):
        assert x is y  # the very same arrays, hence bit-identical
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --- shapes -------------------------------------------------------------------------------


def test_shapes(small, headed):
    cnn = SmallCNN(1, 10, key=_key(0))  # the Fashion-MNIST default
    assert [c.out_channels for c in cnn.convs] == [16, 32]
    assert cnn.head.layers[0].in_features == 32 * 7 * 7
    assert [lay.out_features for lay in cnn.head.layers] == [128, 10]
    assert _apply(small, jnp.zeros((28, 28, 1))).shape == (10,)
    assert _apply(small, jnp.zeros((28, 28))).shape == (10,)  # grayscale without channel axis
    with pytest.raises(ValueError, match=r"\(H, W, 1\)"):
        small(jnp.zeros((1, 28, 28)))
    odd = SmallCNN(1, 10, widths=(4, 8), hidden=16, image_size=(30, 26), key=_key(0))
    assert odd.head.layers[0].in_features == 8 * 7 * 6
    assert _apply(odd, jnp.ones((30, 26, 1))).shape == (10,)

    assert headed.features.out_features == 8 and len(headed.features.blocks) == 2
    assert _apply(headed, jnp.ones((32, 32, 3))).shape == (10,)
    assert [lay.out_features for lay in headed.head.layers] == [16, 8, 10]
    deep = ResNetFeatures(3, widths=(4, 8), blocks_per_stage=2, groups=2, key=_key(0))
    assert len(deep.blocks) == 4
    assert _apply(deep, jnp.ones((32, 32, 3))).shape == (8,)
    assert _apply(deep, jnp.ones((17, 17, 3))).shape == (8,)  # any image size
    with pytest.raises(ValueError, match="groups"):
        ResNetFeatures(3, widths=(6,), groups=4, key=_key(0))
    with pytest.raises(ValueError, match="features gives 8"):
        HeadedClassifier(deep, MLP((16, 8, 10), jnp.tanh, key=_key(0)))
    with pytest.raises(ValueError, match="per-neuron"):
        SmallCNN(1, 10, activation=_per_neuron(16), key=_key(0))


# --- transformations ----------------------------------------------------------------------


def _loss(model, x, y):
    logits = jax.vmap(model)(x)
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])


def test_jit_vmap_grad_compose(small, headed, table_act):
    cnn = deploy(small, table_act)
    x = _normal(2, (6, 28, 28, 1))
    y = jnp.arange(6) % 10
    out = _batch(cnn, x)
    assert out.shape == (6, 10)
    np.testing.assert_allclose(out[3], _apply(cnn, x[3]), atol=1e-5)

    g = eqx.filter_jit(eqx.filter_grad(_loss))(cnn, x, y)
    for conv in g.convs:  # the device-read-out derivative reaches the first conv layer
        assert bool(jnp.all(jnp.isfinite(conv.weight))) and float(jnp.abs(conv.weight).sum()) > 0
    # frozen device side: no gradient reaches the MTJ params
    assert float(jnp.abs(g.conv_activations[0].input_scale)) == 0

    model = deploy(headed, table_act)
    xc = _normal(3, (4, 32, 32, 3))
    gc = eqx.filter_jit(eqx.filter_grad(_loss))(model, xc, y[:4])
    assert float(jnp.abs(gc.features.stem.weight).sum()) > 0
    assert float(jnp.abs(gc.head.layers[0].weight).sum()) > 0
    np.testing.assert_allclose(_batch(model, xc)[1], _apply(model, xc[1]), atol=1e-5)


def test_key_reaches_every_noisy_layer(small):
    noisy = MTJActivation(mode="analytic", read_noise=0.05)
    x = jnp.ones((28, 28, 1))
    k1, k2 = _key(1), _key(2)
    # noise only in the conv layers, then only in the head
    for act, conv_act in ((jnp.tanh, noisy), (noisy, jnp.tanh)):
        cnn = deploy(small, act, conv_activation=conv_act)
        a, b = _apply(cnn, x, k1), _apply(cnn, x, k2)
        assert float(jnp.max(jnp.abs(a - b))) > 0
        np.testing.assert_array_equal(a, _apply(cnn, x, k1))
        with pytest.raises(ValueError, match="key"):
            cnn(x)


# --- deploy -------------------------------------------------------------------------------


def test_deploy_small_cnn_swaps_all_activations_keeps_weights(small, table_act):
    mtj = deploy(small, table_act)
    assert mtj.conv_activations == (table_act, table_act)
    assert mtj.head.activations == (table_act,)
    assert small.conv_activations == (jnp.tanh, jnp.tanh)  # original untouched
    assert small.head.activations == (jnp.tanh,)
    _assert_same_weights(small, mtj)
    x = _normal(1, (28, 28, 1))
    # the paper device's table is tanh to 6e-7 on [-6, 6]; measured max |logit diff| 2.2e-7
    # over 5 inputs (logits ~0.25): 10x margin
    np.testing.assert_allclose(_apply(mtj, x), _apply(small, x), atol=2e-6)
    ideal = deploy(small, MTJActivation(mode="ideal"))
    np.testing.assert_allclose(_apply(ideal, x), _apply(small, x), atol=1e-6)  # measured 0

    # per-neuron devices: head only, conv layers need a shared device
    with pytest.raises(ValueError, match="conv_activation"):
        deploy(small, _per_neuron(16))
    mixed = deploy(small, _per_neuron(16), conv_activation=table_act)
    assert mixed.head.activations[0].n_devices == 16
    assert mixed.conv_activations == (table_act, table_act)
    _assert_same_weights(small, mixed)
    assert _apply(mixed, x).shape == (10,)
    with pytest.raises(ValueError, match="width 16"):
        deploy(small, _per_neuron(8), conv_activation=table_act)
    with pytest.raises(ValueError, match="conv_activation"):
        deploy(small, jnp.tanh, conv_activation=_per_neuron(4))
    with pytest.raises(ValueError, match="2 conv layers"):
        deploy(small, jnp.tanh, conv_activation=(jnp.tanh,))
    per_layer = deploy(small, jax.nn.relu, conv_activation=(jnp.tanh, table_act))
    assert per_layer.conv_activations == (jnp.tanh, table_act)
    assert per_layer.head.activations == (jax.nn.relu,)
    _assert_same_weights(small, deploy(per_layer, jnp.tanh))


def test_deploy_headed_classifier_and_mlp(headed, table_act):
    mtj = deploy(headed, table_act)
    assert mtj.head.activations == (table_act, table_act)
    assert headed.head.activations == (jnp.tanh, jnp.tanh)
    _assert_same_weights(headed, mtj)  # features and head weights untouched
    per_neuron = deploy(headed, (_per_neuron(16), _per_neuron(8)))
    assert [a.n_devices for a in per_neuron.head.activations] == [16, 8]
    _assert_same_weights(headed, per_neuron)
    x = _normal(1, (32, 32, 3))
    np.testing.assert_allclose(_apply(mtj, x), _apply(headed, x), atol=2e-6)  # measured 2.4e-7
    with pytest.raises(ValueError, match="conv_activation"):
        deploy(headed, table_act, conv_activation=table_act)

    mlp = headed.head
    dm = deploy(mlp, table_act)
    assert dm.activations == (table_act, table_act)
    _assert_same_weights(mlp, dm)
    with pytest.raises(ValueError, match="conv_activation"):
        deploy(mlp, table_act, conv_activation=jnp.tanh)
    with pytest.raises(TypeError, match="unsupported model"):
        deploy(headed.features, table_act)


def test_deploy_calls_with_activations(small, headed, table_act):
    """`deploy` is `model.with_activations(...)`: any model type can take part."""
    assert eqx.tree_equal(deploy(small, table_act), small.with_activations(table_act))
    mixed = small.with_activations(_per_neuron(16), conv_activation=table_act)
    assert eqx.tree_equal(mixed, deploy(small, _per_neuron(16), conv_activation=table_act))
    assert eqx.tree_equal(deploy(headed, table_act), headed.with_activations(table_act))

    class Wrapped(eqx.Module):
        inner: MLP

        def with_activations(self, activation, *, conv_activation=None):
            inner = self.inner.with_activations(activation, conv_activation=conv_activation)
            return Wrapped(inner)

    w = deploy(Wrapped(headed.head), table_act)
    assert w.inner.activations == (table_act, table_act)
    _assert_same_weights(headed.head, w.inner)


def test_models_module_does_not_import_cnn():
    """Imports point one way: mtjax.nn.cnn -> mtjax.nn.models, never back (not even inside a
    function)."""
    tree = ast.parse(inspect.getsource(mtjax.nn.models))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
            imported.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
    assert not any("cnn" in m for m in imported), imported
    assert any(m.startswith("mtjax.nn.activation") for m in imported)  # the walk sees imports


# --- Fashion-MNIST transfer ---------------------------------------------------------------


def test_fashion_mnist_small_cnn_transfers_to_mtj(table_act):
    try:
        x, y = data.load("fashion_mnist", "train")
        xt, yt = data.load("fashion_mnist", "test")
    except data.DatasetNotFoundError as e:
        pytest.skip(f"Fashion-MNIST not available: {e}")
    x, y = data.normalize(x[:6000]), np.asarray(y[:6000])
    xt, yt = data.normalize(xt[:2000]), np.asarray(yt[:2000])
    cnn = SmallCNN(1, 10, key=_key(0))
    config = train.TrainConfig(epochs=1, batch_size=32, lr=3e-3, eval_batch_size=500)
    result = train.train(cnn, (x, y), (xt, yt), config, progress=False)
    soft = result.model
    _, acc_soft = train.evaluate(soft, xt, yt, 500)
    assert acc_soft == pytest.approx(result.test_accuracy)
    assert acc_soft > 0.70, acc_soft  # measured 0.804 (0.800-0.804 over init seeds)

    mtj = deploy(soft, table_act)  # every neuron (conv and head) on the paper device
    _assert_same_weights(soft, mtj)
    _, acc_mtj = train.evaluate(mtj, xt, yt, 500)
    # measured: identical accuracy (0.804), logits (|logit| up to 7.5) within 2.0e-5: the
    # table is tanh to 6e-7. Bounds: 10x the logit difference; at most 2 of 2000 test
    # images may change class
    assert abs(acc_mtj - acc_soft) <= 0.001, (acc_soft, acc_mtj)
    logits_soft = _batch(soft, xt[:200])
    logits_mtj = _batch(mtj, xt[:200])
    assert float(jnp.max(jnp.abs(logits_soft - logits_mtj))) < 2e-4
