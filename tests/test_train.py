"""Tests for mtjax.train: learning, metrics, checkpoints, exact resume, NaN handling, config."""

import json
import os
import signal
import subprocess
import sys
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


def make_net(seed=0, n_in=64, width=32):
    mlp = eqx.nn.MLP(n_in, 10, width, 1, activation=jnp.tanh, key=jax.random.key(seed))
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
    assert res.wall_time > 0 and res.checkpoint_path == tmp_path / train.CHECKPOINT_NAME / "24"
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
    assert all(r["train_loss"] > 0 and r["wall_time"] >= 0 for r in steps)
    # the logged rate is the cosine schedule used by the update after `step - 1` updates
    for r in steps:
        cosine = 1e-2 * 0.5 * (1 + np.cos(np.pi * (r["step"] - 1) / 24))
        assert r["lr"] == pytest.approx(cosine, rel=1e-5, abs=1e-9)

    header, (m2, o2) = train.load_checkpoint(
        tmp_path, (make_net(), res.opt_state)
    )  # checkpoint_every=None: saved at each epoch end, so this is the final state
    assert header["step"] == 24 and header["epoch"] == 3 and header["config"]["lr"] == 0.01
    assert_tree_equal(m2, res.model)
    assert_tree_equal(o2, res.opt_state)
    assert ["model.mlp.layers[0].weight", [32, 64], "float32"] in header["structure"]["model"]
    assert header["model_builder"] is None and header["devices"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "checkpoints", "metrics.jsonl"]
    # epoch ends 8, 16, 24 were saved; keep_checkpoints=2 keeps the last two
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["16", "24"]
    older, (m16, _) = train.load_checkpoint(tmp_path, (make_net(), None), step=16)
    assert older["step"] == 16 and not np.array_equal(leaves(m16)[0], leaves(m2)[0])
    with pytest.raises(train.CheckpointError, match=r"no checkpoint of step 8 \(steps: \[16, 24"):
        train.load_checkpoint(tmp_path, step=8)

    png = train.accuracy_curve_png(tmp_path / "metrics.jsonl", tmp_path / "plots" / "acc.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert train.plot_history(res.history, tmp_path / "h.png").stat().st_size > 1000


def test_plot_history_draws_training_curves(tmp_path, monkeypatch):
    history = [
        {"event": "step", "step": 2, "epoch": 0, "train_loss": 2.0},
        {"event": "step", "step": 4, "epoch": 0, "train_loss": 1.5},
        {"event": "epoch", "step": 4, "epoch": 1, "train_loss": 1.6, "test_loss": 1.7,
         "test_accuracy": 0.4},
        {"event": "epoch", "step": 8, "epoch": 2, "train_loss": 1.1, "test_loss": 1.2,
         "test_accuracy": 0.6},
    ]  # fmt: skip
    saved = {}
    real_save = train.plot.save

    def spy(fig_or_ax, path, dpi=120):
        saved.update(axes=fig_or_ax, dpi=dpi)
        return real_save(fig_or_ax, path, dpi=dpi)

    monkeypatch.setattr(train.plot, "save", spy)
    path = train.plot_history(history, tmp_path / "h.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and saved["dpi"] == 100
    ax_loss, ax_acc = saved["axes"]  # the two panels of mtjax.plot.training_curves
    lines = {ln.get_label(): ln.get_xydata().tolist() for ln in ax_loss.lines}
    assert lines == {
        "train (logged steps)": [[2, 2.0], [4, 1.5]],
        "train": [[4, 1.6], [8, 1.1]],
        "test": [[4, 1.7], [8, 1.2]],
    }
    assert ax_acc.lines[0].get_xydata().tolist() == [[1, 40.0], [2, 60.0]]
    assert "(%)" in ax_acc.get_ylabel()
    with pytest.raises(ValueError, match="history"):
        train.plot_history([], tmp_path / "empty.png")
    with pytest.raises(ValueError, match="png"):
        train.plot_history(history, tmp_path / "h.pdf")


def test_progress_bars_do_not_warn_in_jupyter_without_ipywidgets():
    """In a Jupyter kernel without ipywidgets `tqdm.auto` warns "IProgress not found" on
    import; mtjax.train then uses the text bar (a kernel is faked as tqdm detects it)."""
    code = """
import importlib, sys, types, warnings
import IPython
sys.modules["ipykernel.zmqshell"] = types.ModuleType("ipykernel.zmqshell")  # "in a kernel"
sys.modules["ipywidgets"] = None  # not importable
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import mtjax.train, tqdm.std
assert mtjax.train.tqdm is tqdm.std.tqdm, mtjax.train.tqdm
assert not [w for w in caught if "IProgress" in str(w.message)], [str(w.message) for w in caught]
for name in ("tqdm.auto", "tqdm.autonotebook"):  # control: tqdm.auto itself warns here
    sys.modules.pop(name, None)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    importlib.import_module("tqdm.auto")
assert [w for w in caught if "IProgress" in str(w.message)], "fake kernel not detected"
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


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
    header, _ = train.load_checkpoint(tmp_path / "b")
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


def test_relative_run_directory_checkpoints_and_resumes(tmp_path, monkeypatch):
    """`scripts/train.py` writes under the relative runs/: orbax's array writer refuses a
    relative path, so the checkpoint manager must get an absolute one."""
    monkeypatch.chdir(tmp_path)
    a = run(Path("runs/a"), stop_after_steps=6)
    assert not a.completed and (tmp_path / "runs/a/checkpoints").is_dir()
    header, _ = train.load_checkpoint(Path("runs/a"))
    assert header["step"] == 6
    b = run(Path("runs/a"), resume=True)
    assert b.completed and b.step == 16
    assert_tree_equal(b.model, run(tmp_path / "ref").model)


def test_resume_after_a_real_kill_is_bit_identical(tmp_path):
    """SIGKILL a training process (possibly mid-checkpoint); resuming gives the same run."""
    cfg = train.TrainConfig(**{**CFG.__dict__, "epochs": 4, "checkpoint_every": 1})
    out = tmp_path / "run"
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import test_train as t; "
        "from mtjax import train; "
        f"t.run(sys.argv[2], cfg=train.TrainConfig(**{cfg.__dict__!r}))"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
        ),
    }
    proc = subprocess.Popen([sys.executable, "-c", code, str(Path(__file__).parent), str(out)],
                            env=env, stderr=subprocess.PIPE)  # fmt: skip
    try:
        ckpts = out / train.CHECKPOINT_NAME
        done = lambda: [p for p in ckpts.glob("*") if p.name.isdigit()]  # not orbax temps
        while proc.poll() is None and len(done()) < 2:
            time.sleep(0.01)
        time.sleep(0.05)  # somewhere in the next steps or saves
        proc.kill()
    finally:
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    header, _ = train.load_checkpoint(out)
    assert 2 <= header["step"] < 32  # killed mid-run
    # checkpoint_every may change on resume; fewer saves keep the test short
    resumed = run(out, cfg=train.TrainConfig(**{**cfg.__dict__, "checkpoint_every": None}),
                  resume=True)  # fmt: skip
    assert resumed.completed
    ref = run(cfg=cfg)
    assert_tree_equal(resumed.model, ref.model)
    assert_tree_equal(resumed.opt_state, ref.opt_state)
    assert strip(train.read_metrics(out / "metrics.jsonl")) == strip(ref.history)


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


def test_public_train_step_is_the_step_train_runs():
    """init_state + train_step over mtjax.data.batches reproduce `train` bit for bit."""
    ref = run(stop_after_steps=3)
    optimizer = train.make_optimizer(CFG, 16)
    model, opt_state, trainable = train.init_state(make_net(), optimizer)
    key = jax.random.key(CFG.seed)
    batches = data.batches(*TRAIN, CFG.batch_size, seed=CFG.seed, epoch=0, drop_last=False)
    for step, (xb, yb, mb) in enumerate(list(batches)[:3]):
        batch = train.Batch(xb, yb, mb, np.uint32(step), key)
        out = train.train_step(batch, model, opt_state, optimizer, trainable)
        assert bool(out.applied) and bool(out.loss_finite)
        model, opt_state = out.model, out.opt_state
    assert_tree_equal(model, ref.model)
    assert_tree_equal(opt_state, ref.opt_state)
    assert trainable.mlp.layers[0].weight is True and float(model.gain) == 1.5


# --------------------------------------------------------------------------- run folder


def test_existing_run_is_refused_unless_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    first = run(out, stop_after_steps=5)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(train.RunFolderError, match=f"run folder {out} is not empty"):
        run(out)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # untouched
    # a folder holding any other file is refused too
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(train.RunFolderError, match="holds notes.txt"):
        run(tmp_path / "other")
    # overwrite starts again: same as a run in a fresh folder (old metrics and checkpoint gone)
    fresh = run(tmp_path / "fresh", stop_after_steps=3)
    over = run(out, stop_after_steps=3, overwrite=True)
    assert_tree_equal(over.model, fresh.model)
    assert strip(train.read_metrics(out / "metrics.jsonl")) == strip(fresh.history)
    header, _ = train.load_checkpoint(out / train.CHECKPOINT_NAME, (make_net(), first.opt_state))
    assert header["step"] == 3


def test_run_folder_lock(tmp_path):
    out = tmp_path / "run"
    with train.run_folder(out):
        with pytest.raises(train.RunFolderError, match=f"run folder {out} is in use"):
            run(out)
    # another process holding the lock
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.ftruncate(fd, 0); os.write(fd, b'4242'); "
            "print('locked', flush=True); "
            "sys.stdin.read()"
        ), str(out / train.LOCK_NAME)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(train.RunFolderError, match=r"in use by another run \(pid 4242\)"):
            run(out, resume=True)
    finally:
        holder.communicate("", timeout=30)
    assert run(out, resume=True, stop_after_steps=2).step == 2  # released with the process


def test_run_folder_bad_places(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(train.RunFolderError, match="file exists and is not a folder"):
        run(tmp_path / "file")
    with pytest.raises(train.RunFolderError, match="cannot write to run folder .*sub: Not a dir"):
        run(tmp_path / "file" / "sub")
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(train.RunFolderError, match=f"cannot write to run folder {ro}"):
            run(ro / "run")


def test_orphan_temp_files_are_removed(tmp_path):
    out = tmp_path / "run"
    run(out, stop_after_steps=5)
    orphans = [out / ".checkpoint.eqx.k2j_x9a1.tmp", out / ".metrics.jsonl.abcdefgh.tmp"]
    for p in orphans:
        p.write_bytes(b"half a checkpoint")
    keep = out / ".notes.tmp"  # not an atomic-write temp name
    keep.write_text("x")
    assert run(out, resume=True).completed
    assert not any(p.exists() for p in orphans) and keep.exists()
    # a folder with nothing but orphans counts as empty
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / ".checkpoint.eqx.abcd1234.tmp").write_bytes(b"x")
    assert run(fresh, stop_after_steps=1).step == 1
    assert sorted(p.name for p in fresh.iterdir())[0] == ".lock"


# --------------------------------------------------------------------------- resume checks


INFO = {"mode": "table", "derivative": "mz2", "sizes": (64, 32, 10), "read_noise": 0.0}


def test_resume_refuses_other_run_settings(tmp_path):
    out = tmp_path / "run"
    run(out, stop_after_steps=5, run_info=INFO)
    for change, message in [
        ({"derivative": "mz"}, "derivative: checkpoint 'mz2', now 'mz'"),
        ({"read_noise": 0.05}, "read_noise: checkpoint 0.0, now 0.05"),
        ({"sizes": (64, 16, 10)}, r"sizes: checkpoint \[64, 32, 10\], now \[64, 16, 10\]"),
        ({"temperature": 300.0}, "temperature: checkpoint '<not set>', now 300.0"),
    ]:
        with pytest.raises(train.CheckpointError, match=f"cannot resume from {out}.*{message}"):
            run(out, resume=True, run_info={**INFO, **change})
    with pytest.raises(train.CheckpointError, match="mode: checkpoint 'table', now '<not set>'"):
        run(out, resume=True)
    # every config field but checkpoint_every must match
    for field, value in (("eval_batch_size", 32), ("log_every", 2), ("optimizer", "sgd")):
        cfg = train.TrainConfig(**{**CFG.__dict__, field: value})
        with pytest.raises(train.CheckpointError, match=f"{field}: checkpoint"):
            run(out, cfg=cfg, resume=True, run_info=INFO)
    cfg = train.TrainConfig(**{**CFG.__dict__, "checkpoint_every": 3})
    assert run(out, cfg=cfg, resume=True, run_info=INFO, stop_after_steps=6).step == 6


def test_resume_refuses_other_model_structure(tmp_path):
    out = tmp_path / "run"
    run(out, stop_after_steps=2)
    with pytest.raises(
        train.CheckpointError,
        match=r"structure differs: leaf model.mlp.layers\[0\].weight: checkpoint "
        r"float32\[32, 64\], now float32\[16, 64\]",
    ):
        run(out, model=make_net(width=16), resume=True)
    opt_state = run(stop_after_steps=0).opt_state
    half = eqx.tree_at(lambda m: m.gain, make_net(), jnp.array(1.5, jnp.float16))
    with pytest.raises(
        train.CheckpointError, match=r"leaf model.gain: checkpoint float32\[\], now float16\[\]"
    ):
        train.load_checkpoint(out / train.CHECKPOINT_NAME, (half, opt_state))
    with pytest.raises(
        train.CheckpointError, match=r"checkpoint leaf opt_state\[0\].count .* is not in the"
    ):
        train.load_checkpoint(out / train.CHECKPOINT_NAME, (make_net(), ()))


# orbax's readers of a damaged file are abandoned mid-read: "coroutine ignored GeneratorExit"
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_edited_or_damaged_checkpoint_is_refused(tmp_path):
    out = tmp_path / "run"
    run(out, stop_after_steps=5)
    step = out / train.CHECKPOINT_NAME / "5"
    # the JSON header (orbax item "mtjax") and the biggest array file of the model
    (head,) = [p for p in (step / "mtjax").iterdir() if p.read_bytes().startswith(b"{")]
    files = [p for p in (step / "model").rglob("*") if p.is_file()]
    blob = max(files, key=lambda p: p.stat().st_size)
    good_head, good_blob = head.read_bytes(), blob.read_bytes()
    edited = good_head.replace(b'"step": 5', b'"step": 6')
    assert edited != good_head
    head.write_bytes(edited)
    with pytest.raises(train.CheckpointError, match=f"{step}: corrupt or edited"):
        run(out, resume=True)
    head.write_bytes(good_head.replace(b'"lr": 0.01', b'"lr": 0.02'))  # no longer this run
    with pytest.raises(train.CheckpointError, match=f"{step}: corrupt or edited"):
        run(out, resume=True)
    head.write_bytes(good_head[:-20])
    with pytest.raises(train.CheckpointError, match=f"{step}: corrupt or edited header"):
        run(out, resume=True)
    head.write_bytes(good_head)
    half = len(good_blob) // 2  # (orbax does not read every byte of a file: some are spare)
    flipped = good_blob[:half] + bytes([good_blob[half] ^ 1]) + good_blob[half + 1 :]
    for damaged in (good_blob[:half], flipped):
        blob.write_bytes(damaged)
        with pytest.raises(train.CheckpointError, match=f"{step}: corrupt or"):
            run(out, resume=True)
        with pytest.raises(train.CheckpointError, match=f"{step}: corrupt or"):
            train.load_checkpoint(out, (make_net(), None))
    blob.write_bytes(good_blob)
    assert run(out, resume=True).completed


def test_legacy_single_file_checkpoint_is_refused(tmp_path):
    (tmp_path / "checkpoint.eqx").write_bytes(b'{"format": "mtjax.train.checkpoint/2"}\n')
    message = "checkpoint.eqx: a single-file checkpoint of an earlier mtjax"
    with pytest.raises(train.CheckpointError, match=message):
        run(tmp_path, resume=True)
    with pytest.raises(train.CheckpointError, match=message):
        train.load_checkpoint(tmp_path)
    assert run(tmp_path, overwrite=True, stop_after_steps=1).step == 1
    assert not (tmp_path / "checkpoint.eqx").exists()


def test_async_checkpoints_resume_bit_identical(tmp_path):
    cfg = train.TrainConfig(**{**CFG.__dict__, "async_checkpoints": True, "keep_checkpoints": 1})
    a = run(cfg=CFG)
    b1 = run(tmp_path, cfg=cfg, stop_after_steps=11)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["11"]
    b = run(tmp_path, resume=True)  # async and keep_checkpoints may change on resume
    assert b1.step == 11 and b.completed
    assert_tree_equal(a.model, b.model)
    assert_tree_equal(a.opt_state, b.opt_state)


def test_load_run_rebuilds_the_model(tmp_path):
    from mtjax import experiments

    x, y = TRAIN
    flat = (x.reshape(len(x), -1), y)
    test = (TEST[0].reshape(len(TEST[0]), -1), TEST[1])
    # (MTJ neurons: tests/test_scripts.py, through scripts/train.py)
    spec = experiments.RunSpec(sizes=(64, 16, 10), epochs=1, batch_size=64, lr=1e-2, seed=5)
    _, res = experiments.run(spec, flat, test, out_dir=tmp_path / "tanh", progress=False)
    model, header = train.load_run(tmp_path / "tanh")
    assert header["model_builder"] == experiments.MODEL_BUILDER and header["step"] == 4
    assert_tree_equal(model, res.model)
    assert jax.tree.structure(model) == jax.tree.structure(res.model)  # static parts too
    logits = jax.vmap(model)(jnp.asarray(test[0][:8]))
    assert np.array_equal(logits, jax.vmap(res.model)(jnp.asarray(test[0][:8])))
    # a run of a model the caller built has no builder
    run(tmp_path / "plain", stop_after_steps=1)
    with pytest.raises(train.CheckpointError, match="recorded no model_builder"):
        train.load_run(tmp_path / "plain")
    with pytest.raises(ValueError, match="model_builder 'nowhere:f' cannot be imported"):
        run(tmp_path / "x", model_builder="nowhere:f")


def test_torn_last_metrics_line_is_ignored(tmp_path):
    a = run(tmp_path / "a")
    out = tmp_path / "b"
    run(out, stop_after_steps=11)
    metrics = out / train.METRICS_NAME
    with open(metrics, "a") as f:
        f.write('{"event": "step", "step": 12, "ep')  # killed mid-write
    with pytest.warns(UserWarning, match="ignoring torn last line"):
        b = run(out, resume=True)
    assert_tree_equal(a.model, b.model)
    assert strip(train.read_metrics(metrics)) == strip(a.history)
    # a bad line elsewhere is an error naming the file and line
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=f"{metrics}, line 2: not a JSON record"):
        train.read_metrics(metrics)


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
        ("seed", 2**32),  # would alias seed 0 in jax.random.key
        ("eval_batch_size", 0),
        ("checkpoint_every", 0),
        ("log_every", 0),
        ("keep_checkpoints", 0),
        ("async_checkpoints", "yes"),
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
    with pytest.raises(ValueError, match="overwrite=True needs out_dir"):
        train.train(make_net(), TRAIN, TEST, CFG, overwrite=True, progress=False)
    with pytest.raises(ValueError, match="exclude each other"):
        run(tmp_path / "x", resume=True, overwrite=True)
    with pytest.raises(ValueError, match="run_info must be JSON-able"):
        run(tmp_path / "x", run_info={"variation": float("inf")})
    with pytest.raises(ValueError, match="stop_after_steps"):
        train.train(make_net(), TRAIN, TEST, CFG, stop_after_steps=-1, progress=False)
    with pytest.raises(TypeError, match="TrainConfig"):
        train.train(make_net(), TRAIN, TEST, {"epochs": 1}, progress=False)
    (tmp_path / train.CHECKPOINT_NAME).write_bytes(b"garbage\n")
    with pytest.raises(train.CheckpointError, match=f"{tmp_path}.*: not a checkpoint folder"):
        train.train(make_net(), TRAIN, TEST, CFG, out_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(train.CheckpointError, match=f"{tmp_path / 'nowhere'}: not a checkpoint"):
        train.load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        train.train(make_net(), TRAIN, TEST, CFG, mesh="all", progress=False)
    with pytest.raises(ValueError, match="mesh: needs an axis named 'data'"):
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("batch",))
        train.train(make_net(), TRAIN, TEST, CFG, mesh=mesh, progress=False)


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
    res = train.train(model, (x, y), (xt, yt), cfg, progress=False)
    assert res.step == 313 and res.test_accuracy > 0.75, res.test_accuracy
