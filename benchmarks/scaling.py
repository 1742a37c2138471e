"""Data-parallel scaling: training steps/s and device trajectories/s vs device count; JSON.

For each device count N (``--devices``, default 1,2,4), on a `mtjax.sharding.data_mesh(N)`:

- training: the step `mtjax.train.train` runs (`mtjax.train.train_step`; the batch placed as
  ``NamedSharding(mesh, P("data"))`` and the model/optimizer state replicated, as `train`
  does), 784-256-10 MLP, batch ``--batch``, Adam; software tanh and MTJ neurons (paper
  device, "table" mode, m_z^2 derivative). Each timed step includes the host-to-device batch
  transfer and reading the loss back, as in `train`. Steps/s: mean +- std over ``--groups``
  groups of ``--steps`` steps, after compilation.
- devices: `mtjax.pulse_ensemble` of ``--trajectories`` paper devices (one 1 ns pulse,
  1000 RK4 steps, P1 currents in [-2, 2] I_s), inputs placed on the mesh with
  `mtjax.sharding.shard_batch`; trajectories/s: mean +- std over ``--groups`` calls.

On CPU each N runs in a fresh subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (it must be set before JAX starts),
so the N "devices" share the machine's cores: the speed-up is bounded by the core count. On
GPU/TPU one process uses the first N accelerators. Speed-ups are relative to N = 1 of the
same run.

Usage: python benchmarks/scaling.py [--devices 1,2,4] [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mtjax import DeviceParams, current_scale, pulse_ensemble, sharding
from mtjax import train as _train
from mtjax.fileio import atomic_write_bytes
from mtjax.nn import MLP, MTJActivation, trainable

SIZES = (784, 256, 10)


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", default="1,2,4", help="comma-separated device counts")
    ap.add_argument("--batch", type=int, default=512, help="training batch (multiple of N)")
    ap.add_argument("--steps", type=int, default=20, help="training steps per timed group")
    ap.add_argument("--groups", type=int, default=5, help="timed groups (mean +- std)")
    ap.add_argument("--trajectories", type=int, default=16384, help="pulse_ensemble size")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--out", default=None, help="also write the JSON here (atomically)")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.steps, args.groups, args.trajectories = 64, 2, 2, 512
    try:
        args.devices = [int(n) for n in args.devices.split(",")]
    except ValueError:
        ap.error(f"--devices: expected counts like 1,2,4, got {args.devices!r}")
    if min(args.devices) < 1 or min(args.steps, args.groups, args.batch) < 1:
        ap.error("--devices, --steps, --groups and --batch must be >= 1")
    for n in args.devices:
        if args.batch % n or args.trajectories % n:
            ap.error(f"--batch and --trajectories must be multiples of every count ({n})")
    return args


def _mean_std(values) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def _train_rate(model, mesh, args) -> dict:
    n = mesh.size
    optimizer = _train.make_optimizer(_train.TrainConfig(lr=1e-3, schedule="constant"), 1)
    model, opt_state, mask = _train.init_state(model, optimizer, trainable(model))
    key = jax.random.key(1)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch, SIZES[0])).astype(np.float32)
    y = rng.integers(0, SIZES[-1], args.batch).astype(np.int32)
    ones = np.ones(args.batch, bool)
    place = lambda a: a  # one device: numpy goes in as `train` passes it
    if n > 1:
        model, opt_state, key = sharding.replicate((model, opt_state, key), mesh)
        split, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
        place = lambda a: sharding.global_array(a, split if np.ndim(a) else rep)
    state = {"model": model, "opt": opt_state, "i": 0}

    def step():
        batch = _train.Batch(
            place(x), place(y), place(ones), place(np.asarray(state["i"], np.uint32)), key
        )
        out = _train.train_step(batch, state["model"], state["opt"], optimizer, mask)
        state["model"], state["opt"], state["i"] = out.model, out.opt_state, state["i"] + 1
        return sharding.to_host(out.loss).item()

    t0 = time.perf_counter()
    step()
    compile_s = time.perf_counter() - t0
    rates = []
    for _ in range(args.groups):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = step()
        rates.append(args.steps / (time.perf_counter() - t0))
    return {"steps_per_s": _mean_std(rates), "compile_s": compile_s, "last_loss": loss}


def _ensemble_rate(mesh, args) -> dict:
    p = DeviceParams.paper()
    currents = jnp.linspace(-2.0, 2.0, args.trajectories) * current_scale(p)
    currents = sharding.shard_batch(currents, mesh)
    run = lambda: jax.block_until_ready(pulse_ensemble(p, currents, steps=1000))
    t0 = time.perf_counter()
    ms = run()
    compile_s = time.perf_counter() - t0
    rates = []
    for _ in range(args.groups):
        t0 = time.perf_counter()
        run()
        rates.append(args.trajectories / (time.perf_counter() - t0))
    mx = np.asarray(sharding.to_host(ms))[:, 0]
    return {
        "trajectories_per_s": _mean_std(rates),
        "compile_s": compile_s,
        "mx_range": [float(mx.min()), float(mx.max())],
    }


def measure(n: int, args) -> dict:
    """Every measurement for the first ``n`` devices, in this process."""
    mesh = sharding.data_mesh(n)
    k_model = jax.random.key(0)
    models = {
        "tanh": MLP(SIZES, jnp.tanh, key=k_model),
        "mtj_table": MLP(SIZES, MTJActivation(DeviceParams.paper(), mode="table"), key=k_model),
    }
    row = {"devices": n, "train": {k: _train_rate(m, mesh, args) for k, m in models.items()}}
    row["ensemble"] = _ensemble_rate(mesh, args)
    print(
        f"N={n}: tanh {row['train']['tanh']['steps_per_s']['mean']:.1f} steps/s, "
        f"mtj {row['train']['mtj_table']['steps_per_s']['mean']:.1f} steps/s, "
        f"{row['ensemble']['trajectories_per_s']['mean']:.3g} trajectories/s",
        file=sys.stderr,
    )
    return row


def _worker_argv(args, n: int) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "--worker", str(n),
            "--batch", str(args.batch), "--steps", str(args.steps), "--groups",
            str(args.groups), "--trajectories", str(args.trajectories),
            "--devices", str(n)]  # fmt: skip


def main(argv=None) -> dict:
    args = _parse(argv)
    if args.worker is not None:
        print(json.dumps(measure(args.worker, args)))
        return {}
    backend = jax.default_backend()
    load_before = os.getloadavg()
    rows = []
    if backend == "cpu":  # fresh process per count: the flag is read when JAX starts
        for n in args.devices:
            env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}
            proc = subprocess.run(
                _worker_argv(args, n), env=env, capture_output=True, text=True, check=False
            )
            sys.stderr.write(proc.stderr[-2000:])
            if proc.returncode != 0:
                raise SystemExit(f"scaling.py: worker for {n} devices failed")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    else:
        if max(args.devices) > jax.device_count():
            raise SystemExit(
                f"scaling.py: --devices up to {max(args.devices)} but {jax.device_count()} found"
            )
        rows = [measure(n, args) for n in args.devices]
    base = rows[0]
    for row in rows:
        for name, t in row["train"].items():
            t["speedup"] = t["steps_per_s"]["mean"] / base["train"][name]["steps_per_s"]["mean"]
        e = row["ensemble"]
        e["speedup"] = (
            e["trajectories_per_s"]["mean"] / base["ensemble"]["trajectories_per_s"]["mean"]
        )
    report = {
        "benchmark": "scaling",
        "train": f"mtjax.train.train_step, MLP {'-'.join(map(str, SIZES))}, batch "
        f"{args.batch} split over N devices, Adam; tanh and MTJ (paper device, table)",
        "ensemble": f"mtjax.pulse_ensemble, {args.trajectories} paper devices, 1 ns, 1000 RK4 "
        "steps, split over N devices",
        "timing": f"mean +- std over {args.groups} groups ({args.steps} training steps or one "
        "ensemble call each), after compilation; speedup vs the first count",
        "rows": rows,
        "platform": {
            "jax": jax.__version__,
            "backend": backend,
            "device_kind": jax.devices()[0].device_kind,
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpu_note": "on CPU, N forced host devices share cpu_count cores"
            if backend == "cpu"
            else None,
            "load_average_1min_before_after": [load_before[0], os.getloadavg()[0]],
        },
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        atomic_write_bytes(args.out, (text + "\n").encode())
    return report


if __name__ == "__main__":
    main()
