"""Training-step cost of MTJ activations vs software tanh; JSON to stdout.

One training step = `mtjax.train.train_step`, the compiled step `mtjax.train.train` runs
(forward + backward + Optax Adam update, non-finite guard, per-example keys) of a 784-256-10
`mtjax.nn.MLP` on a batch of 256 random inputs (softmax cross-entropy). Every
variant runs in this process on the same data: software `jnp.tanh`, then `MTJActivation`
(paper device, shared by all neurons, derivative "mz2") in each mode, plus "table" with
one device per neuron (Ms with a 5 % rms spread). Compile time is measured apart; the
compiled step is timed `--repeats` times (`--slow-repeats` for ode/sde), each from the same
starting model and optimizer state, round-robin over the variants (median,
`block_until_ready`); "ratio" is relative to tanh.
"thermal" (300 K, paper device; and one device per neuron) draws its thermal noise from the
moment tables. The one-off cost of building the tables for 256 per-neuron devices
(deterministic and thermal) is timed apart and reported in steps.
"joint_*": one joint weights + design step of `mtjax.codesign` (`DesignedMTJ`, thermal, 300 K,
`joint_optimizer`, energy in the design): "live" rebuilds the response tables inside the
loss (exact design gradient; the paper device is field-free, so its thermal tables come from
their closed form; "live_rk4_moments": integrated by RK4 instead, the way devices with
fields are built; "live_box_steps": RK4 with the design box's worst-case steps instead of
the fewer the current design needs; "live_energy": with `EnergyLoss`, so the energy tables
are rebuilt too (closed form for the paper device; "live_energy_box_steps": both kinds of
tables by RK4 at the box's steps), "cached" uses the tables of the last refresh; shared
device and 256 per-neuron devices (5 % relative deviations, with stray-field offsets: RK4). With
`DesignSchedule(every=K)` one step in K is live: "amortized" gives (live + (K - 1) cached) / K
from the measured medians (the refresh after a live step, a forward rebuild, is timed apart
and added).
Goals on CPU: "table" <= 1.2x tanh, "thermal" <= 1.5x, "ode" <= 20x, joint live <= 3x.

Usage: python benchmarks/activation_overhead.py [--repeats N] [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from mtjax import DeviceParams, codesign
from mtjax import train as _train
from mtjax.fileio import atomic_write_bytes
from mtjax.nn import MLP, MTJActivation, deploy, trainable
from mtjax.variation import Spreads, sample_deviations

SIZES = (784, 256, 10)
BATCH = 256


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=21, help="timed steps for fast variants")
    ap.add_argument("--slow-repeats", type=int, default=5, help="timed steps for ode/sde")
    ap.add_argument("--quick", action="store_true", help="few repeats, skip sde (smoke test)")
    ap.add_argument("--out", default=None, help="also write the JSON here (atomically)")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.slow_repeats = 3, 1
    if args.repeats < 1 or args.slow_repeats < 1:
        ap.error("repeats must be >= 1")
    return args


def _copy(tree):
    return jax.tree.map(lambda v: jnp.copy(v) if isinstance(v, jax.Array) else v, tree)


def _prepare(model, x, y, optimizer=None, loss_fn=_train.cross_entropy):
    """Compile one variant; return (compile seconds, a zero-argument step returning its
    seconds, its state). Every step starts from the same model and optimizer state (copied
    outside the timing; the step donates them): a live co-design step moves the design, and
    a design moved past its rebuild steps raises until `codesign.set_live` picks new ones."""
    if optimizer is None:
        optimizer = _train.make_optimizer(_train.TrainConfig(lr=1e-3, schedule="constant"), 1)
    model, opt_state, mask = _train.init_state(model, optimizer, trainable(model))
    start = _copy((model, opt_state))
    state = {"i": 0, "loss": None}
    key, ones = jax.random.key(1), jnp.ones(x.shape[0], bool)

    def run():
        model, opt_state = jax.block_until_ready(_copy(start))
        batch = _train.Batch(x, y, ones, np.asarray(state["i"], np.uint32), key, loss_fn)
        t0 = time.perf_counter()
        out = _train.train_step(batch, model, opt_state, optimizer, mask)
        jax.block_until_ready(out)
        seconds = time.perf_counter() - t0
        state["loss"] = out.loss
        state["i"] += 1
        return seconds

    return run(), run, state


def _time_rebuild(act: MTJActivation, repeats: int) -> dict:
    """Median time of rebuilding both tables of `act` (compiled; forward only)."""
    rebuild = eqx.filter_jit(lambda a: a.rebuild().table)
    jax.block_until_ready(rebuild(act))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(rebuild(act))
        times.append(time.perf_counter() - t0)
    return {
        "ms": 1e3 * statistics.median(times),
        "what": f"deterministic + thermal tables, {act.n_devices} devices, {act.n_grid} nodes",
        "note": "built once when the devices are fixed (amortized over training); co-design "
        "rebuilds them when the design changes",
    }


def _designed(base, deviations, live: bool, field_free: bool | None = None):
    layer = codesign.DesignedMTJ(
        codesign.Design(DeviceParams.paper()), deviations=deviations, mode="thermal",
        energy=True, field_free=field_free,
    )  # fmt: skip
    return codesign.set_live(deploy(base, layer), live)


def _box_steps(model):
    """`model` whose `DesignedMTJ` rebuilds (response and energy tables) always use the
    design box's steps (the comparison for `codesign.step_ladder`)."""

    def box(layer):
        steps = (layer.template.steps, layer.energy_box_steps)
        return eqx.tree_at(lambda s: (s.rebuild_steps, s.energy_steps), layer, steps)

    is_designed = lambda x: isinstance(x, codesign.DesignedMTJ)  # noqa: E731
    return jax.tree.map(lambda x: box(x) if is_designed(x) else x, model, is_leaf=is_designed)


def _time_refresh(model, repeats: int) -> float:
    """Median ms of `codesign.refresh` (compiled), what DesignSchedule runs after a live step."""
    jax.block_until_ready(codesign.refresh(model))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(codesign.refresh(model))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _amortized(results, refresh_ms, suffix=""):
    live = results[f"joint_live{suffix}"]["step_ms"]
    cached = results[f"joint_cached{suffix}"]["step_ms"]
    ref = results["tanh"]["step_ms"]
    out = {}
    for k in (1, 10, 100, 1000):
        ms = (live + refresh_ms + (k - 1) * cached) / k
        out[f"every_{k}"] = {"step_ms": ms, "ratio": ms / ref}
    return out


def _settings(act):
    if isinstance(act, str):
        return act
    if not isinstance(act, MTJActivation):
        return "software"
    text = f"mode={act.mode}, derivative={act.derivative}"
    if act.mode in ("ode", "sde", "table", "thermal"):
        text += f", {act.solver} {act.steps} steps"
    if act.mode in ("table", "thermal"):
        text += f", {act.n_grid} nodes, cubic Hermite"
    if act.field_free:
        text += ", closed-form tables"
    if act.n_devices:
        text += f", {act.n_devices} devices"
    return text


def main(argv=None):
    args = _parse(argv)
    kx, ky, km, kp = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(kx, (BATCH, SIZES[0]))
    y = jax.random.randint(ky, (BATCH,), 0, SIZES[-1])
    base = MLP(SIZES, jnp.tanh, key=km)
    paper = DeviceParams.paper()
    spread = DeviceParams.paper(Ms=1e6 * (1 + 0.05 * jax.random.normal(kp, (SIZES[1],))))

    variants = [("tanh", jnp.tanh, args.repeats)]
    for mode in ("ideal", "analytic", "table"):
        variants.append((mode, MTJActivation(paper, mode=mode), args.repeats))
    per_neuron = MTJActivation(spread, mode="table")
    variants.append(("table_per_neuron", per_neuron, args.repeats))
    variants.append(("thermal", MTJActivation(paper, mode="thermal"), args.repeats))
    thermal_per_neuron = MTJActivation(spread, mode="thermal")
    variants.append(("thermal_per_neuron", thermal_per_neuron, args.repeats))
    rebuild = _time_rebuild(thermal_per_neuron, args.slow_repeats)
    variants.append(("ode", MTJActivation(paper, mode="ode"), args.slow_repeats))
    if not args.quick:
        variants.append(("sde", MTJActivation(paper, mode="sde"), args.slow_repeats))
    joint = codesign.joint_optimizer(1e-3)
    devs = sample_deviations(kp, SIZES[1], Spreads.relative(0.05))
    text = "DesignedMTJ thermal 300 K, default free variables, joint_optimizer"
    live = _designed(base, None, True)
    live_rk4 = _designed(base, None, True, field_free=False)
    lay = codesign.designed_layers(live)[0]
    steps = f"rebuilds with {lay.rebuild_steps} RK4 steps (box: {lay.template.steps})"
    e_steps = f"energy tables with {lay.energy_steps} (box: {lay.energy_box_steps})"
    cached = _designed(base, None, False)
    e0 = codesign.energy_per_example(cached, x[0], key=jax.random.key(2))  # the reference
    energy_loss = codesign.EnergyLoss(1.0, e0)
    box_text = "rebuilds with the box's steps"
    models = {
        "joint_live": (live, f"{text}, live, {steps}", args.repeats),
        "joint_live_rk4_moments": (
            live_rk4,
            f"{text}, live, thermal tables by RK4, {steps}",
            args.repeats,
        ),
        "joint_live_box_steps": (
            _box_steps(live_rk4),
            f"{text}, live, thermal tables by RK4, {box_text}",
            args.repeats,
        ),
        "joint_live_energy": (
            live,
            f"{text}, live, EnergyLoss, {steps}, {e_steps}",
            args.repeats,
            energy_loss,
        ),
        "joint_live_energy_box_steps": (
            _box_steps(live_rk4),
            f"{text}, live, EnergyLoss, thermal tables by RK4, {box_text}",
            args.repeats,
            energy_loss,
        ),
        "joint_cached": (cached, text + ", cached", args.repeats),
        "joint_cached_per_neuron": (
            _designed(base, devs, False),
            text + ", cached, 256 devices",
            args.repeats,
        ),
    }
    if not args.quick:  # ~1 min per step on 2 CPU cores
        models["joint_live_per_neuron"] = (
            _designed(base, devs, True),
            text + ", live, 256 devices",
            1,
        )
    refresh_ms = {
        "shared": _time_refresh(models["joint_cached"][0], args.slow_repeats),
        "per_neuron": _time_refresh(models["joint_cached_per_neuron"][0], 1),
    }

    prepared = {}
    for name, act, repeats in variants:
        compile_s, run, state = _prepare(deploy(base, act), x, y)
        prepared[name] = (run, state, repeats, compile_s, [])
    for name, (model, text, repeats, *loss) in models.items():
        compile_s, run, state = _prepare(model, x, y, joint, *loss)
        prepared[name] = (run, state, repeats, compile_s, [])
        variants.append((name, text, repeats))
    # round-robin, so that background load affects every variant alike
    for r in range(max(v[2] for v in prepared.values())):
        for run, _, repeats, _, times in prepared.values():
            if r < repeats:
                times.append(run())
    results = {}
    for (name, act, _), (_, state, repeats, compile_s, times) in zip(
        variants, prepared.values(), strict=True
    ):
        results[name] = {
            "step_ms": 1e3 * statistics.median(times),
            "min_ms": 1e3 * min(times),
            "compile_s": compile_s,
            "repeats": repeats,
            "loss": float(state["loss"]),
            "settings": _settings(act),
        }
        print(f"{name}: {results[name]['step_ms']:.2f} ms", file=sys.stderr)
    ref = results["tanh"]["step_ms"]
    for r in results.values():
        r["ratio"] = r["step_ms"] / ref
    rebuild["in_thermal_steps"] = rebuild["ms"] / results["thermal_per_neuron"]["step_ms"]
    amortized = {"shared": _amortized(results, refresh_ms["shared"])}
    if "joint_live_per_neuron" in results:
        amortized["per_neuron"] = _amortized(results, refresh_ms["per_neuron"], "_per_neuron")

    report = {
        "benchmark": "activation_overhead",
        "model": "MLP 784-256-10, batch 256, Adam, softmax cross-entropy",
        "step": "mtjax.train.train_step (the step of mtjax.train.train)",
        "device": "DeviceParams.paper(); table_per_neuron: 256 devices, Ms 5 % rms",
        "results": results,
        "table_rebuild_256_devices": rebuild,
        "codesign_refresh_ms": refresh_ms,
        "codesign_amortized": amortized,
        "goals": {
            "table_le_1.2x_tanh": results["table"]["ratio"] <= 1.2,
            "thermal_le_1.5x_tanh": results["thermal"]["ratio"] <= 1.5,
            "thermal_per_neuron_le_1.5x_tanh": results["thermal_per_neuron"]["ratio"] <= 1.5,
            "ode_le_20x_tanh": results["ode"]["ratio"] <= 20,
            "joint_live_le_3x_tanh": results["joint_live"]["ratio"] <= 3,
        },
        "platform": {
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        atomic_write_bytes(args.out, (text + "\n").encode())


if __name__ == "__main__":
    main()
