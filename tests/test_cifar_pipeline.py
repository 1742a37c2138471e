"""CIFAR-100 transfer pipeline end to end on a synthetic dataset in the real
``cifar-100-python`` format: load -> normalize -> `cifar_model` (software tanh head) -> train
-> `deploy` an MTJ head -> evaluate both; fine (100) and coarse (20) labels."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax import data, train
from mtjax.nn import MTJActivation, cifar_model, deploy
from mtjax.testing import write_cifar100_python

N_TRAIN, N_TEST = 3000, 200
WIDTHS, GROUPS = (8, 16), 2  # tiny ResNet: the file runs in well under a minute


def _synthetic(n, rng, colors, patterns):
    """Class c: a mean color (5x5x4 grid of RGB) plus a coarse 4x4 random pattern, plus
    pixel noise; coarse label = fine // 5."""
    fine = np.arange(n) % 100
    rng.shuffle(fine)
    img = colors[fine][:, None, None, :] + patterns[fine] + rng.normal(0, 20, (n, 32, 32, 3))
    return np.clip(img, 0, 255).astype(np.uint8), fine, fine // 5


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    rng = np.random.default_rng(0)
    levels = (np.linspace(30, 225, 5),) * 2 + (np.linspace(30, 225, 4),)
    colors = np.stack(np.meshgrid(*levels, indexing="ij"), -1).reshape(100, 3)
    patterns = np.repeat(np.repeat(rng.uniform(-60, 60, (100, 4, 4, 3)), 8, 1), 8, 2)
    folder = tmp_path_factory.mktemp("cifar") / "cifar-100-python"
    write_cifar100_python(
        folder,
        train=_synthetic(N_TRAIN, rng, colors, patterns),
        test=_synthetic(N_TEST, rng, colors, patterns),
    )
    return folder.parent  # the parent of cifar-100-python/ is accepted too


@pytest.fixture(scope="module")
def mtj_act():
    return MTJActivation(mode="table", derivative="mz2")  # paper device, shared


@eqx.filter_jit
def _batch(model, x):
    return jax.vmap(model)(x)


def _load(folder, label):
    (x, y), (xt, yt) = (
        data.load("cifar100", s, data_dir=folder, label=label) for s in ("train", "test")
    )
    return (data.normalize(x), np.asarray(y)), (data.normalize(xt), np.asarray(yt))


def _run(folder, label, n_classes, epochs, mtj_act):
    (x, y), (xt, yt) = _load(folder, label)
    assert x.shape == (N_TRAIN, 32, 32, 3) and x.dtype == np.float32
    assert xt.shape == (N_TEST, 32, 32, 3) and yt.shape == (N_TEST,)
    assert set(np.unique(y)) == set(range(n_classes))
    model = cifar_model(
        n_classes, (64,), widths=WIDTHS, groups=GROUPS, key=jax.random.key(0, impl="rbg")
    )
    config = train.TrainConfig(epochs=epochs, batch_size=16, lr=3e-3, eval_batch_size=N_TEST)
    result = train.train(model, (x, y), (xt, yt), config, progress=False)
    assert result.completed and result.step == epochs * -(-N_TRAIN // 16)
    soft = result.model
    _, acc_soft = train.evaluate(soft, xt, yt, N_TEST)
    mtj = deploy(soft, mtj_act)
    assert mtj.head.activations == (mtj_act,) and soft.head.activations == (jnp.tanh,)
    logits = [_batch(m, xt[:50]) for m in (soft, mtj)]
    assert logits[1].shape == (50, n_classes)
    assert float(jnp.max(jnp.abs(logits[0] - logits[1]))) < 1e-3
    _, acc_mtj = train.evaluate(mtj, xt, yt, 100)
    return acc_soft, acc_mtj


@pytest.mark.slow  # ~24 s; the coarse-label test covers the same pipeline by default
def test_fine_labels_pipeline(cifar_dir, mtj_act):
    acc_soft, acc_mtj = _run(cifar_dir, "fine", 100, 2, mtj_act)
    print(f"fine: software {acc_soft:.3f}, MTJ head {acc_mtj:.3f}")
    # measured 0.42 (0.40-0.56 over data/init seeds); chance: 0.01
    assert acc_soft > 0.2, acc_soft
    # measured: identical accuracy (the paper device's table is tanh to ~1e-4)
    assert abs(acc_mtj - acc_soft) <= 0.02, (acc_soft, acc_mtj)


def test_coarse_labels_pipeline(cifar_dir, mtj_act):
    acc_soft, acc_mtj = _run(cifar_dir, "coarse", 20, 1, mtj_act)
    print(f"coarse: software {acc_soft:.3f}, MTJ head {acc_mtj:.3f}")
    # measured 0.725 (0.68-0.76 over data/init seeds); chance: 0.05
    assert acc_soft > 0.4, acc_soft
    assert abs(acc_mtj - acc_soft) <= 0.02, (acc_soft, acc_mtj)
