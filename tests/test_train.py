"""Tests for mtjax.train: learning, metrics, checkpoints, exact resume, NaN handling, config."""

import json
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtjax import data, train

DEBIAN = Path("/usr/share/datasets/fashion-mnist")


class Net(eqx.Module):
    """Tiny MLP taking ``key=`` (input noise, like a stochastic neuron) with a frozen leaf."""

    mlp: eqx.nn.MLP
    gain: jax.Array  # a "device parameter": stop_gradient inside, never trained
    noise: float = eqx.field(static=True, default=0.05)

    def __call__(self, x, *, key=None):
        h = x.reshape(-1)
        if key is not None:
            h = h + self.noise * jax.random.normal(key, h.shape)
        return self.mlp(h) * jax.lax.stop_gradient(self.gain)


def make_net(seed=0, n_in=64):
    mlp = eqx.nn.MLP(n_in, 10, 32, 1, activation=jnp.tanh, key=jax.random.key(seed))
    return Net(mlp, jnp.array(1.5, jnp.float32))


def synthetic(n=256, n_test=100, seed=0):
    """8x8 images: a random prototype per class plus noise (linearly separable-ish)."""
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(10, 8, 8, 1)).astype(np.float32)
    out = []
    for m in (n, n_test):
        y = rng.integers(0, 10, m).astype(np.int32)
        x = protos[y] + 0.7 * rng.normal(size=(m, 8, 8, 1)).astype(np.float32)
        out.append((x, y))
    return out[0], out[1]


TRAIN, TEST = synthetic()
# 256 / 32 = 8 steps per epoch; 2 epochs = 16 steps.
CFG = train.TrainConfig(
    epochs=2, batch_size=32, lr=1e-2, seed=3, eval_batch_size=64, checkpoint_every=5, log_every=4
)


def leaves(tree):
    return [np.asarray(v) for v in jax.tree.leaves(eqx.filter(tree, eqx.is_array))]


def assert_tree_equal(a, b):
    la, lb = leaves(a), leaves(b)
    assert len(la) == len(lb)
    for u, v in zip(la, lb, strict=True):
        assert u.dtype == v.dtype and np.array_equal(u, v)


def strip(history):
    return [{k: v for k, v in r.items() if k != "wall_time"} for r in history]


def run(tmp=None, cfg=CFG, model=None, **kw):
    model = make_net() if model is None else model
    return train.train(model, TRAIN, TEST, cfg, out_dir=tmp, progress=False, **kw)


# --------------------------------------------------------------------------- learning, files


def test_learns_writes_metrics_checkpoint_and_plot(tmp_path):
    cfg = train.TrainConfig(
        epochs=3, batch_size=32, lr=1e-2, seed=1, eval_batch_size=64, log_every=4
    )
    model = make_net()
    res = run(tmp_path, cfg, model=model)
    assert res.completed and res.step == res.total_steps == 24
    assert res.test_accuracy > 0.9, res.test_accuracy
    assert res.wall_time > 0 and res.checkpoint_path == tmp_path / train.CHECKPOINT_NAME
    # The caller's model was copied, not donated, and the frozen leaf did not move.
    assert float(model.gain) == 1.5 and float(res.model.gain) == 1.5
    assert not np.array_equal(leaves(model)[0], leaves(res.model)[0])

    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert recs == res.history
    epochs = [r for r in recs if r["event"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3] and [r["step"] for r in epochs] == [8, 16, 24]
    assert all(0 <= r["test_accuracy"] <= 1 and r["test_loss"] > 0 for r in epochs)
    assert epochs[-1]["test_accuracy"] == res.test_accuracy
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    steps = [r for r in recs if r["event"] == "step"]
    assert [r["step"] for r in steps] == [4, 8, 12, 16, 20, 24]
    assert all(r["train_loss"] > 0 and r["lr"] <= 1e-2 and r["wall_time"] >= 0 for r in steps)
    assert steps[-1]["lr"] < 1e-3  # cosine decay towards 0

    header, (m2, _) = train.load_checkpoint(
        res.checkpoint_path, (make_net(), res.opt_state)
    )  # checkpoint_every=None: saved at each epoch end, so this is the final state
    assert header["step"] == 24 and header["epoch"] == 3 and header["config"]["lr"] == 0.01
    assert_tree_equal(m2, res.model)
    side = json.loads((tmp_path / train.SIDECAR_NAME).read_text())
    assert side["payload_sha256"] == header["payload_sha256"] and side["step"] == 24
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    png = train.accuracy_curve_png(tmp_path / "metrics.jsonl", tmp_path / "plots" / "acc.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert train.plot_history(res.history, tmp_path / "h.png").stat().st_size > 1000


def test_evaluate_pads_last_batch_and_uses_key():
    model = make_net()
    x, y = TEST  # 100 examples: batches of 32 leave a padded batch of 4
    logits = jax.vmap(lambda xi: model(xi))(jnp.asarray(x))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y))
    acc = np.mean(np.argmax(np.asarray(logits), -1) == y)
    for bs in (32, 1000):
        loss, a = train.evaluate(model, x, y, bs)
        assert a == pytest.approx(acc, abs=1e-12)
        assert loss == pytest.approx(float(ce.mean()), rel=1e-5)
    k = jax.random.key(7)
    noisy = train.evaluate(model, x, y, 32, key=k)
    assert noisy == train.evaluate(model, x, y, 32, key=k) and noisy[0] != loss
    with pytest.raises(ValueError, match="99 labels"):
        train.evaluate(model, x, y[:99], 32)


# --------------------------------------------------------------------------- reproducibility


def test_deterministic_and_seed_dependent():
    a, b = run(), run()
    assert_tree_equal(a.model, b.model)
    assert strip(a.history) == strip(b.history) and len(a.history) == 6  # 4 steps + 2 epochs
    assert a.test_accuracy == b.test_accuracy
    c = run(cfg=train.TrainConfig(**{**CFG.__dict__, "seed": 4}))
    assert not np.array_equal(leaves(a.model)[0], leaves(c.model)[0])


def test_resume_mid_epoch_is_bit_identical(tmp_path):
    a = run(tmp_path / "a")
    # Interrupted at step 11 (epoch 2, batch 3 of 8; checkpoint_every=5 also saved step 10).
    b1 = run(tmp_path / "b", stop_after_steps=11)
    assert not b1.completed and b1.step == 11
    header = json.loads((tmp_path / "b" / train.SIDECAR_NAME).read_text())
    assert (header["step"], header["epoch"], header["batch_in_epoch"]) == (11, 1, 3)
    # Metrics written after the checkpoint (here, none) are dropped on resume; fake one.
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"event": "step", "step": 12, "epoch": 1, "train_loss": 9.9}) + "\n")
    b = run(tmp_path / "b", model=make_net(seed=99), resume=True)  # template only
    assert b.completed and b.step == 16
    assert_tree_equal(a.model, b.model)
    assert_tree_equal(a.opt_state, b.opt_state)
    assert strip(a.history) == strip(b.history)
    assert strip(train.read_metrics(tmp_path / "b" / "metrics.jsonl")) == strip(a.history)
    assert b.test_accuracy == a.test_accuracy
    # Resuming a finished run changes nothing; a changed config or data is refused.
    again = run(tmp_path / "b", resume=True)
    assert_tree_equal(again.model, a.model) and again.step == 16
    with pytest.raises(ValueError, match="lr: checkpoint 0.01, now 0.02"):
        run(tmp_path / "b", cfg=train.TrainConfig(**{**CFG.__dict__, "lr": 2e-2}), resume=True)
    x, y = TRAIN
    with pytest.raises(ValueError, match="data differ"):
        train.train(
            make_net(), (x[::-1], y), TEST, CFG, out_dir=tmp_path / "b", resume=True,
            progress=False,
        )  # fmt: skip


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    x, y = TRAIN
    order = np.random.default_rng((CFG.seed, 0)).permutation(len(x))
    x = x.copy()
    x[order[5 * CFG.batch_size + 2]] = np.nan  # in the 6th batch of epoch 1
    with pytest.raises(train.NonFiniteLossError, match="non-finite loss at step 6") as err:
        train.train(make_net(), (x, y), TEST, CFG, out_dir=tmp_path / "nan", progress=False)
    assert err.value.step == 6 and err.value.checkpoint_step == 5
    ref = train.train(
        make_net(), (x, y), TEST, CFG, out_dir=tmp_path / "ref", progress=False,
        stop_after_steps=5,
    )  # fmt: skip
    header, (model, _) = train.load_checkpoint(
        tmp_path / "nan" / train.CHECKPOINT_NAME, (make_net(), ref.opt_state)
    )
    assert header["step"] == 5
    assert all(np.isfinite(v).all() for v in leaves(model))
    assert_tree_equal(model, ref.model)
    last = train.read_metrics(tmp_path / "nan" / "metrics.jsonl")[-1]
    assert last["event"] == "nonfinite" and last["step"] == 6 and last["train_loss"] is None


# --------------------------------------------------------------------------- options, checks


def test_filter_spec_freezes_leaves():
    model = make_net()
    spec = jax.tree.map(lambda _: False, model)
    spec = eqx.tree_at(lambda m: m.mlp.layers[-1].weight, spec, True)
    res = run(model=model, filter_spec=spec, stop_after_steps=3)
    assert res.step == 3
    changed = [
        not np.array_equal(u, v) for u, v in zip(leaves(model), leaves(res.model), strict=True)
    ]
    assert changed == [v.shape == (10, 32) for v in leaves(model)]  # only that weight


def test_other_optimizers():
    for opt, lr in ((optax.adamw, 1e-2), (optax.sgd(0.05), None)):
        cfg = train.TrainConfig(**{**CFG.__dict__, "optimizer": opt, "schedule": "constant"})
        res = run(cfg=cfg, stop_after_steps=4)
        assert res.step == 4 and np.isfinite(res.test_loss)
        assert res.history[0]["lr"] == lr  # a ready GradientTransformation has its own


@pytest.mark.parametrize(
    "field, value",
    [
        ("epochs", 0),
        ("epochs", 1.5),
        ("batch_size", 0),
        ("lr", 0.0),
        ("lr", -1e-3),
        ("lr", float("nan")),
        ("seed", -1),
        ("eval_batch_size", 0),
        ("checkpoint_every", 0),
        ("log_every", 0),
        ("schedule", "linear"),
        ("optimizer", "rmsprop"),
        ("optimizer", 3),
    ],
)
def test_config_validation(field, value):
    with pytest.raises(ValueError, match=f"TrainConfig.{field} "):
        train.TrainConfig(**{field: value})


def test_argument_validation(tmp_path):
    x, y = TRAIN
    with pytest.raises(ValueError, match="train_data: x has 256 examples but y has 255"):
        train.train(make_net(), (x, y[:-1]), TEST, CFG, progress=False)
    with pytest.raises(ValueError, match="test_data"):
        train.train(make_net(), TRAIN, (TEST[0], TEST[1][:3]), CFG, progress=False)
    with pytest.raises(ValueError, match="integer labels"):
        train.train(make_net(), (x, y.astype(np.float32)), TEST, CFG, progress=False)
    with pytest.raises(ValueError, match="needs out_dir"):
        train.train(make_net(), TRAIN, TEST, CFG, resume=True, progress=False)
    with pytest.raises(ValueError, match="stop_after_steps"):
        train.train(make_net(), TRAIN, TEST, CFG, stop_after_steps=-1, progress=False)
    with pytest.raises(TypeError, match="TrainConfig"):
        train.train(make_net(), TRAIN, TEST, {"epochs": 1}, progress=False)
    (tmp_path / train.CHECKPOINT_NAME).write_bytes(b"garbage\n")
    with pytest.raises(ValueError, match="not a"):
        train.train(make_net(), TRAIN, TEST, CFG, out_dir=tmp_path, resume=True, progress=False)


# --------------------------------------------------------------------------- real data


@pytest.mark.skipif(not DEBIAN.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_mlp_one_epoch():
    """784-64-10 tanh MLP, 1 epoch on 10k training images: > 75% on the 10k test set."""
    x, y = data.load("fashion_mnist", "train")
    xt, yt = data.load("fashion_mnist", "test")
    x, y = data.normalize(x[:10000]), y[:10000]
    xt = data.normalize(xt)
    mlp = eqx.nn.MLP(784, 10, 64, 1, activation=jnp.tanh, key=jax.random.key(0))
    model = Net(mlp, jnp.array(1.0, jnp.float32), noise=0.0)
    cfg = train.TrainConfig(epochs=1, batch_size=32, lr=2e-3, seed=0, eval_batch_size=2000)
    t0 = time.perf_counter()
    res = train.train(model, (x, y), (xt, yt), cfg, progress=False)
    assert time.perf_counter() - t0 < 15
    assert res.step == 313 and res.test_accuracy > 0.75, res.test_accuracy
