"""Data parallelism: sharded training, checkpoints across device counts, sharded device batches.

The main pytest process has one CPU device. `test_four_device_session` runs the tests marked
``four_devices`` in a pytest subprocess with 4 forced host devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=4``); in the main session they skip.
`test_two_process_run` (slow) starts the documented 2-host launch on localhost.
"""

import json
import os
import runpy
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import TEST, TRAIN, assert_tree_equal, leaves, make_net, strip

import mtjax
from mtjax import sharding, train
from mtjax.nn import build_table

ROOT = Path(__file__).resolve().parents[1]
FOUR = jax.device_count() == 4
four_devices = pytest.mark.skipif(not FOUR, reason="run by test_four_device_session")
# 256 examples / 32 = 8 steps per epoch
CFG = train.TrainConfig(
    epochs=1, batch_size=32, lr=1e-2, seed=3, eval_batch_size=64, checkpoint_every=3, log_every=2
)
TOL = dict(rtol=1e-5, atol=1e-6)  # float32 reduction-order differences only


def assert_close(a, b):
    la, lb = leaves(a), leaves(b)
    assert len(la) == len(lb)
    for u, v in zip(la, lb, strict=True):
        assert u.dtype == v.dtype
        np.testing.assert_allclose(u, v, **TOL)


def fit(n_devices, out=None, **kw):
    return train.train(
        make_net(), TRAIN, TEST, CFG, out_dir=out, progress=False,
        mesh=sharding.data_mesh(n_devices), **kw,
    )  # fmt: skip


# --------------------------------------------------------------------------- main session


@pytest.mark.slow  # ~40 s: a second pytest process with 4 host devices
@pytest.mark.skipif(FOUR, reason="this is the 4-device session")
def test_four_device_session():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
         "-k", "four_ and not session", str(Path(__file__))],
        capture_output=True, text=True, timeout=900, env=env, cwd=ROOT,
    )  # fmt: skip
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert "3 passed" in proc.stdout and "skipped" not in proc.stdout, tail


def test_one_device_mesh_and_errors():
    assert sharding.default_mesh() is None  # one device here: no mesh, plain single-device
    mesh = sharding.data_mesh(1)
    assert mesh.axis_names == ("data",) and sharding.n_data(mesh) == 1
    with pytest.raises(ValueError, match="devices: 2 requested but 1 available"):
        sharding.data_mesh(2)
    with pytest.raises(ValueError, match="devices: expected 'all'"):
        sharding.data_mesh("some")
    # a 1-device mesh is the single-device run, bit for bit
    assert_tree_equal(fit(1).model, train.train(make_net(), TRAIN, TEST, CFG, progress=False).model)


def test_initialize_distributed_reads_the_environment():
    assert sharding.initialize_distributed({}) is False  # one process: nothing to do
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES, JAX_PROCESS_ID missing"):
        sharding.initialize_distributed({"JAX_COORDINATOR_ADDRESS": "h:1"})
    env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "x"}
    with pytest.raises(ValueError, match="JAX_PROCESS_ID must be an integer, got 'x'"):
        sharding.initialize_distributed(env)
    with pytest.raises(ValueError, match=r"JAX_PROCESS_ID=2 must be in \[0, JAX_NUM_PROC"):
        sharding.initialize_distributed({**env, "JAX_PROCESS_ID": "2"})
    with pytest.raises(ValueError, match="host:port"):
        sharding.initialize_distributed(
            {**env, "JAX_COORDINATOR_ADDRESS": "h", "JAX_PROCESS_ID": "1"}
        )
    assert sharding.initialize_distributed({"SLURM_NTASKS": "1"}) is False


def test_train_script_devices_flag(tmp_path, capsys):
    main = runpy.run_path(str(ROOT / "scripts" / "train.py"))["main"]
    for flag, message in (("0", "expected 'all' or a count >= 1"), ("2", "2 requested but 1")):
        with pytest.raises(SystemExit) as exit_:
            main(["--devices", flag, "--out", str(tmp_path / "run")])
        assert exit_.value.code == 2 and message in capsys.readouterr().err


# --------------------------------------------------------------------------- 4 devices


@four_devices
def test_four_sharded_training_equals_single_device():
    """Same keys, same batches: 2 and 4 devices give the 1-device run up to float32 order.

    The model draws per-example input noise from its key, so a different key scheme would
    show up as O(0.05) differences, not 1e-6."""
    one = fit(1)
    for n in (2, 4):
        res = fit(n)
        assert_close(res.model, one.model)
        assert_close(res.opt_state, one.opt_state)
        a, b = strip(res.history), strip(one.history)
        assert [r["step"] for r in a] == [r["step"] for r in b]
        for ra, rb in zip(a, b, strict=True):
            for k in ("train_loss", "test_loss", "test_accuracy"):
                if k in rb:
                    assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-6)
        w = res.model.mlp.layers[0].weight  # state stays replicated on every device
        assert len(w.sharding.device_set) == n and w.sharding.is_fully_replicated
    default = train.train(make_net(), TRAIN, TEST, CFG, progress=False, stop_after_steps=2)
    assert len(default.model.mlp.layers[0].weight.sharding.device_set) == 4  # all by default
    with pytest.raises(ValueError, match="batch_size 30 is not a multiple of the 4 devices"):
        cfg = train.TrainConfig(**{**CFG.__dict__, "batch_size": 30})
        train.train(make_net(), TRAIN, TEST, cfg, progress=False)


@four_devices
def test_four_checkpoints_move_between_device_counts(tmp_path):
    ref = {n: fit(n) for n in (1, 4)}
    # same devices: bit-identical resume
    fit(4, tmp_path / "44", stop_after_steps=5)
    res = fit(4, tmp_path / "44", resume=True)
    assert_tree_equal(res.model, ref[4].model)
    assert_tree_equal(res.opt_state, ref[4].opt_state)
    # 4 devices -> 1 device and 1 -> 4: the run continues (float32 order only)
    for first, then in ((4, 1), (1, 4)):
        out = tmp_path / f"{first}{then}"
        fit(first, out, stop_after_steps=5)
        header, _ = train.load_checkpoint(out)
        assert header["devices"] == first and header["step"] == 5
        res = fit(then, out, resume=True)
        assert res.completed
        assert_close(res.model, ref[then].model)
        assert len(res.model.mlp.layers[0].weight.sharding.device_set) == then
    # loading onto a mesh, or onto one device
    _, (m4, _) = train.load_checkpoint(
        tmp_path / "14", (make_net(), None), mesh=sharding.data_mesh(4)
    )
    _, (m1, _) = train.load_checkpoint(tmp_path / "14", (make_net(), None))
    assert_tree_equal(m4, m1)
    assert len(m4.mlp.layers[0].weight.sharding.device_set) == 4
    assert m1.mlp.layers[0].weight.sharding.device_set == {jax.devices()[0]}


@four_devices
def test_four_device_batches_shard_for_tables_and_ensembles():
    mesh = sharding.data_mesh(4)
    p = mtjax.DeviceParams.paper()
    devs = mtjax.sample_devices(p, jax.random.key(0), 8, mtjax.Spreads.relative(0.05))
    sharded = sharding.shard_batch(devs, mesh)
    assert sharded.Ms.sharding.spec == jax.sharding.PartitionSpec("data")
    assert len(sharded.p1.addressable_shards) == 4 and sharded.p1.addressable_shards[
        0
    ].data.shape == (2, 3)
    scale = mtjax.current_scale(p)
    ref = build_table(devs, scale, n_grid=33)
    tab = build_table(sharded, scale, n_grid=33)
    assert tab.coef.sharding.spec == jax.sharding.PartitionSpec("data")  # built where it lives
    np.testing.assert_allclose(tab.coef, ref.coef, rtol=1e-5, atol=1e-5)
    currents = jnp.linspace(-2, 2, 8) * scale
    key = jax.random.key(1)
    ens_ref = mtjax.pulse_ensemble(devs, currents, key=key, steps=100)
    ens = mtjax.pulse_ensemble(sharded, sharding.shard_batch(currents, mesh), key=key, steps=100)
    np.testing.assert_array_equal(ens, ens_ref)
    # and both are the per-trajectory definition, on one device
    keys = jax.random.split(key, 8)
    one = jax.vmap(
        lambda d, i, k: mtjax.pulse_response(d, i, key=k, solver="heun_scan", steps=100)
    )(devs, currents, keys)
    np.testing.assert_allclose(ens, one, atol=1e-5)
    with pytest.raises(ValueError, match=r"leaf \.Ms has leading axis 6, not a multiple of"):
        sharding.shard_batch(mtjax.sample_devices(p, key, 6, mtjax.Spreads.relative(0.05)), mesh)


# --------------------------------------------------------------------------- 2 processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="no data")
def test_two_process_run(tmp_path):
    """The README's 2-host launch, both hosts on localhost (2 CPU devices each), equals a
    1-device run of the same flags."""
    flags = ["--activation", "tanh", "--model", "784-32-10", "--epochs", "1",
             "--train-subset", "1024", "--batch-size", "64", "--no-progress"]  # fmt: skip
    port = _free_port()
    procs = []
    for pid in range(2):
        env = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
               "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(pid), "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
               "PYTHONPATH": str(ROOT)}  # fmt: skip
        procs.append(subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / "train.py"), *flags, "--out",
             str(tmp_path / "two")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        ))  # fmt: skip
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(s[-2000:] for s in logs)
    main = runpy.run_path(str(ROOT / "scripts" / "train.py"))["main"]
    one = main([*flags, "--devices", "1", "--out", str(tmp_path / "one")])
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["results"]["tanh"]["devices"] == 4
    assert two["results"]["tanh"]["test_accuracy"] == pytest.approx(
        one["results"]["tanh"]["test_accuracy"], abs=2e-3
    )
    a = train.load_run(tmp_path / "two" / "tanh")
    b = train.load_run(tmp_path / "one" / "tanh")
    assert a.header["processes"] == 2 and a.header["devices"] == 4
    assert_close(a.model, b.model)
