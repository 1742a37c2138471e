"""Co-design worked result: the energy-accuracy front, gradients against a grid search.

A software-tanh 784-256-10 MLP is trained on real Fashion-MNIST. From its weights:

- gradient co-design: for each energy weight w, weights and design are trained jointly
  (`codesign.joint_optimizer`, every step live) with the loss cross-entropy + w x energy per
  inference / E0 (`codesign.EnergyLoss`; E0: the software weights on the paper device);
- grid search: the same free variables on a grid (`--levels` per variable, cell centres of
  the transformed box); at each grid design the weights are fine-tuned with cross-entropy,
  and all grid points together get the same number of training steps as all gradient runs.

Training sees one shared nominal device with 300 K thermal noise (thermal mode). Every
result is then evaluated the same way: per-neuron devices with 5 % relative variation (one
fixed population) at 300 K, test accuracy mean +- std over noise keys, energy per inference
(`mtjax.network_energy`) on test images. The design box keeps the noisiest corner (20 nm,
1.2 nm, 1.2 ns: std m_x 0.22 at z = 0) inside the range where the thermal tables were
validated against the SDE, and the nominal design of every point on a front is checked
again (`mtjax.validity.thermal_vs_sde`). Writes <out>/codesign_front.{json,md,png}.
--quick: small subsets and width (smoke run).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mtjax import DeviceParams, codesign, network_energy  # noqa: E402
from mtjax import experiments as ex  # noqa: E402
from mtjax import plot as mplot  # noqa: E402
from mtjax import train as _train  # noqa: E402
from mtjax.fileio import atomic_write_bytes, atomic_write_json  # noqa: E402
from mtjax.nn import deploy  # noqa: E402
from mtjax.size_study import thermal_std_at_zero  # noqa: E402
from mtjax.validity import thermal_vs_sde  # noqa: E402
from mtjax.variation import Spreads, sample_deviations  # noqa: E402

#: Bounds that differ from `codesign.VARIABLES`: thinner than 1.2 nm or pulses longer than
#: 1.2 ns would take the 20 nm corner past the validated thermal range (README).
BOUNDS = {"thickness": (1.2e-9, 2.5e-9), "pulse_duration": (0.3e-9, 1.2e-9)}
#: `thermal_std_limit` of the neurons: at that corner the worst of 256 neurons with 5 %
#: variation reaches a read-out std of 0.256, just past the library default (0.25); the
#: nominal designs on the fronts are checked against the SDE in this run (`validity`).
STD_LIMIT = 0.27


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results")
    ap.add_argument("--quick", action="store_true", help="small subsets and width (smoke run)")
    ap.add_argument("--epochs", type=int, default=10, help="software training epochs")
    ap.add_argument("--codesign-epochs", type=int, default=1, help="epochs per gradient run")
    ap.add_argument("--weights", default="0,0.03,0.1,0.3,1,3", help="energy weights w")
    ap.add_argument("--free", default=",".join(codesign.DEFAULT_FREE), help="free variables")
    ap.add_argument("--levels", type=int, default=2, help="grid levels per free variable")
    ap.add_argument("--keys", type=int, default=5, help="noise keys per evaluation")
    ap.add_argument("--variation", type=float, default=0.05, help="relative device spread")
    ap.add_argument("--design-lr", type=float, default=0.05)
    ap.add_argument("--energy-examples", type=int, default=2000)
    ap.add_argument("--validity-n", type=int, default=4096, help="SDE trajectories per point")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        args.weights = tuple(float(w) for w in args.weights.split(","))
    except ValueError:
        ap.error(f"--weights: expected comma-separated numbers, got {args.weights!r}")
    args.free = tuple(args.free.split(","))
    if not set(args.free) <= set(codesign.DEFAULT_FREE):
        ap.error(f"--free: choose from {','.join(codesign.DEFAULT_FREE)}")
    if not args.weights or not all(np.isfinite(w) and w >= 0 for w in args.weights):
        ap.error("--weights must be finite and >= 0")
    if min(args.epochs, args.codesign_epochs, args.energy_examples) < 1:
        ap.error("--epochs, --codesign-epochs and --energy-examples must be >= 1")
    if args.levels < 2 or args.keys < 2:
        ap.error("--levels and --keys must be >= 2")
    if not 0 <= args.variation < 0.5:
        ap.error("--variation must be in [0, 0.5)")
    if not (np.isfinite(args.design_lr) and args.design_lr > 0):
        ap.error("--design-lr must be finite and > 0")
    return args


def _command(args) -> str:
    """The command line that reproduces a run (non-default settings only)."""
    return ex.command_line("scripts/codesign_front.py", args, parse_args([]))


#: Grid placements: cell centres of the transformed box, or evenly from end to end.
GRIDS = ("cell centres", "box ends")


def grid_designs(start: codesign.Design, levels: int, where: str = GRIDS[0]):
    """The designs of a `levels`^n grid over the transformed box (unit coordinates: cell
    centres (k + 1/2)/levels, or k/(levels - 1) with the ends moved 1e-3 inside)."""
    if where not in GRIDS:
        raise ValueError(f"where: expected one of {GRIDS}, got {where!r}")
    if where == GRIDS[0]:
        units = (np.arange(levels) + 0.5) / levels
    else:
        units = np.clip(np.linspace(0.0, 1.0, levels), 1e-3, 1 - 1e-3)
    theta = np.log(units) - np.log1p(-units)  # sigmoid^-1: unit position -> theta
    out = []
    for combo in itertools.product(theta, repeat=len(start.space.free)):
        values = {
            n: jnp.asarray(t, jnp.float32) for n, t in zip(start.space.free, combo, strict=True)
        }
        out.append(eqx.tree_at(lambda d: d.theta, start, values))
    return out


def pareto(points: list[dict]) -> list[int]:
    """Indices of the points no other point beats in both energy (lower) and mean accuracy
    (higher), sorted by energy."""
    keep = [
        i for i, p in enumerate(points)
        if not any(
            q["energy_J"] <= p["energy_J"] and q["accuracy"]["mean"] >= p["accuracy"]["mean"]
            and (q["energy_J"], q["accuracy"]["mean"]) != (p["energy_J"], p["accuracy"]["mean"])
            for q in points
        )
    ]  # fmt: skip
    return sorted(keep, key=lambda i: points[i]["energy_J"])


def compare_fronts(gradient: list[dict], grid: list[dict]) -> list[dict]:
    """Per gradient point: the best grid accuracy at no more energy, and the least grid
    energy at no less mean accuracy (None where the grid has no such point)."""
    out = []
    for p in gradient:
        cheaper = [q for q in grid if q["energy_J"] <= p["energy_J"]]
        better = [q for q in grid if q["accuracy"]["mean"] >= p["accuracy"]["mean"]]
        best = max(cheaper, key=lambda q: q["accuracy"]["mean"]) if cheaper else None
        least = min(better, key=lambda q: q["energy_J"]) if better else None
        out.append(dict(
            weight=p["weight"],
            accuracy_gain_pp=None if best is None
            else 100 * (p["accuracy"]["mean"] - best["accuracy"]["mean"]),
            grid_energy_ratio=None if least is None else least["energy_J"] / p["energy_J"],
        ))  # fmt: skip
    return out


def _check(row: dict) -> str:
    if "validity" not in row:
        return "off the front"
    return "passes" if row["validity"]["passes"] else "FAILS"


def _markdown(out: dict, command: str) -> str:
    fmt = lambda a: f"{100 * a['mean']:.2f} ± {100 * a['std']:.2f}"
    lines = [
        f"# Energy-accuracy front: gradients vs grids (`{command}`, "
        f"{out['wall_time_s'] / 60:.1f} min)",
        "",
        f"{out['setting']}. Software network {100 * out['software_accuracy']:.2f} %.",
        "",
        "| search | weights | energy weight w | test accuracy (%) | energy / inference (pJ) |"
        " diameter (nm) | thickness (nm) | pulse (ns) | eta1 | gain u/z | std m_x at z=0 |"
        " SDE check |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [("control", r) for r in out["controls"]]
    for name, found in out["searches"].items():
        front = out["fronts"][name]
        rows += [(name, found[i]) for i in (range(len(found)) if name == "gradient" else front)]
    for name, r in rows:
        v = r["device"]
        lines.append(
            f"| {name} | {r.get('weights', r.get('what', ''))} | {r.get('weight', '-')} | "
            f"{fmt(r['accuracy'])} | {1e12 * r['energy_J']:.3g} | {1e9 * v['diameter']:.1f} | "
            f"{1e9 * v['thickness']:.2f} | {1e9 * v['pulse_duration']:.2f} | {v['eta1']:.2f} | "
            f"{v['gain']:.2f} | {r['std_mx_at_z0']:.3f} | {_check(r)} |"
        )
    st = out["steps"]
    lines += [
        "",
        f"Grid rows: each grid's Pareto front (of {2 * st['per_grid'] // st['per_grid_point']} "
        f"evaluated points). Training steps: gradient {st['gradient']}, each grid "
        f"{st['per_grid']} ({st['per_grid_point']} per point).",
        "",
        "| energy weight w | "
        + " | ".join(f"vs {n}: accuracy gain at <= energy (pp) | {n}: energy for >= accuracy "
                     "/ gradient energy" for n in out["comparison"])
        + " |",
        "|---|" + "---|---|" * len(out["comparison"]),
    ]  # fmt: skip
    none = "no grid point"
    for i, r in enumerate(out["searches"]["gradient"]):
        cells = []
        for cmp in out["comparison"].values():
            gain, ratio = cmp[i]["accuracy_gain_pp"], cmp[i]["grid_energy_ratio"]
            cells += [none if gain is None else f"{gain:+.2f}",
                      none if ratio is None else f"{ratio:.2f}"]  # fmt: skip
        lines.append(f"| {r['weight']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _figure(out: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.5), layout="constrained")
    styles = ("s", "o", "^")
    for (name, rows), style, color in zip(out["searches"].items(), styles, ("C0", "C1", "C2"),
                                           strict=True):  # fmt: skip
        e = np.array([1e12 * r["energy_J"] for r in rows])
        m = np.array([100 * r["accuracy"]["mean"] for r in rows])
        s = np.array([100 * r["accuracy"]["std"] for r in rows])
        ax.errorbar(e, m, yerr=s, fmt=style, color=color, ms=3, alpha=0.35, lw=0.8)
        f = out["fronts"][name]
        ax.plot(e[f], m[f], "-", color=color, marker=style, label=f"{name} front")
    for r in out["searches"]["gradient"]:
        ax.annotate(f"w={r['weight']:g}", (1e12 * r["energy_J"], 100 * r["accuracy"]["mean"]),
                    fontsize="x-small", xytext=(3, 3), textcoords="offset points")  # fmt: skip
    c = out["controls"][0]
    ax.errorbar(
        [1e12 * c["energy_J"]],
        [100 * c["accuracy"]["mean"]],
        yerr=[100 * c["accuracy"]["std"]],
        fmt="k*",
        ms=9,
        label="paper device",
    )
    ax.set_xscale("log")
    ax.set_xlabel("MTJ energy per inference (pJ)")
    ax.set_ylabel("test accuracy (%), 300 K, 5 % variation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    mplot.save(fig, path)


def _device_row(design: codesign.Design) -> dict:
    """The nominal device's values of the default free variables (SI; gain u/z)."""
    nominal = design.nominal()
    get = lambda f: float(np.asarray(getattr(nominal, f)))
    return dict(diameter=get("diameter_x"), thickness=get("thickness"),
                pulse_duration=get("pulse_duration"), eta1=get("eta1"),
                gain=float(design.gain()))  # fmt: skip


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.time()
    q, progress = args.quick, not args.no_progress
    subsets = dict(train_subset=2048, test_subset=500) if q else {}
    train_data, test_data = ex.load_arrays("fashion_mnist", **subsets)
    sizes = (784, 16, 10) if q else (784, 256, 10)
    batch = 128
    n_gradient = len(args.weights) * args.codesign_epochs * -(-len(train_data[0]) // batch)
    if args.levels ** len(args.free) > n_gradient:  # each grid point needs >= 1 step
        raise SystemExit(
            f"--levels {args.levels}: {args.levels}^{len(args.free)} grid points exceed the "
            f"gradient runs' {n_gradient} training steps (the grids' budget); use fewer levels, "
            "fewer --free variables or more --weights/--codesign-epochs"
        )
    software = ex.software_mlp(
        sizes, train_data, test_data, 1 if q else args.epochs, batch_size=batch,
        progress=progress,
    )  # fmt: skip
    space = codesign.DesignSpace(args.free, {k: v for k, v in BOUNDS.items() if k in args.free})
    start = codesign.Design(DeviceParams.paper(temperature=300.0), space)
    shared = codesign.DesignedMTJ(start, mode="thermal", energy=True, thermal_std_limit=STD_LIMIT)
    devs = None
    if args.variation > 0:
        devs = sample_deviations(jax.random.key(1), sizes[1], Spreads.relative(args.variation))
    population = codesign.DesignedMTJ(
        start, deviations=devs, mode="thermal", energy=True, thermal_std_limit=STD_LIMIT
    )
    x_energy = jnp.asarray(test_data[0][: args.energy_examples])
    e0 = network_energy(deploy(software.model, shared), x_energy, key=jax.random.key(7))
    e0 = float(e0.total)

    def evaluate(model, design, **extra) -> dict:
        """Deployed on the varied population (a copy of `model`'s weights)."""
        layer = codesign.refresh(eqx.tree_at(lambda s: s.design, population, design))
        deployed = deploy(model, layer)
        accs = ex.accuracies_over_keys(deployed, test_data, args.keys)
        energy = network_energy(deployed, x_energy, key=jax.random.key(7))
        return extra | dict(
            accuracy=ex.mean_std(accs), accuracies=accs, energy_J=float(energy.total),
            energy_parts_J=dict(write=float(energy.write), reset=float(energy.reset),
                                read=float(energy.read)),
            latency_s=float(energy.latency), values=design.values(), device=_device_row(design),
            std_mx_at_z0=thermal_std_at_zero(design.nominal()),
        )  # fmt: skip

    def fine_tune(design, data, loss_fn=_train.cross_entropy, on_step=None, epochs=1):
        layer = codesign.refresh(eqx.tree_at(lambda s: s.design, shared, design))
        result = _train.train(
            deploy(software.model, layer), data, test_data,
            _train.TrainConfig(epochs=epochs, batch_size=batch, lr=1e-3, optimizer=optimizer),
            loss_fn=loss_fn, on_step=on_step, progress=progress and on_step is not None,
        )  # fmt: skip
        model = codesign.refresh(codesign.set_live(result.model, False))
        return model, codesign.designed_layers(model)[0].design

    optimizer = functools.partial(codesign.joint_optimizer, design_lr=args.design_lr)
    searches = {"gradient": []}
    designs = {"gradient": []}
    for w in args.weights:
        model, design = fine_tune(
            start, train_data, codesign.EnergyLoss(w, e0), codesign.DesignSchedule(every=1),
            epochs=args.codesign_epochs,
        )  # fmt: skip
        searches["gradient"].append(evaluate(model, design, weight=w, weights="joint"))
        designs["gradient"].append(design)
        r = searches["gradient"][-1]
        print(f"w={w}: {r['accuracy']} {r['energy_J']:.3g} J", flush=True)
    per_point = n_gradient // args.levels ** len(space.free)
    subset = tuple(a[: per_point * batch] for a in train_data)
    for where in GRIDS:
        name = f"grid ({where})"
        searches[name], designs[name] = [], []
        for design in grid_designs(start, args.levels, where):
            tuned, _ = fine_tune(design, subset)
            searches[name] += [
                evaluate(software.model, design, weights="software"),
                evaluate(tuned, design, weights=f"fine-tuned {per_point} steps"),
            ]
            designs[name] += [design, design]
    controls = [
        evaluate(software.model, start, what="software weights on the paper device"),
        evaluate(fine_tune(start, train_data, epochs=args.codesign_epochs)[0], start,
                 what=f"paper device, weights fine-tuned {args.codesign_epochs} epoch(s) with "
                 "cross-entropy (design fixed)"),
    ]  # fmt: skip
    fronts = {name: pareto(rows) for name, rows in searches.items()}
    for name, front in fronts.items():  # the thermal tables' validity where it matters
        for i in front:
            check = thermal_vs_sde(designs[name][i].nominal(), args.validity_n, seed=11)
            searches[name][i]["validity"] = check
    grid_names = [n for n in searches if n != "gradient"]
    out = dict(
        setting=f"MLP {'-'.join(map(str, sizes))}, real Fashion-MNIST, software weights "
        f"({1 if q else args.epochs} epochs, seed 0). Free variables {list(space.free)}, "
        f"bounds {({n: (lo, hi) for n, lo, hi in space.bounds})}. "
        f"Training: one shared nominal device, 300 K thermal, batch {batch}, weights Adam 1e-3 "
        f"(cosine), design Adam {args.design_lr:g}. Gradient: {args.codesign_epochs} "
        f"epoch(s) per energy weight w from the software weights, loss cross-entropy + w x "
        f"E / E0 (E0 = {e0:.4g} J: the software weights on the paper device), every step "
        f"live. Grids: {args.levels} levels per variable (cell centres, or the box's ends), "
        f"each grid point evaluated with the software weights and after {per_point} steps of "
        f"cross-entropy fine-tuning (each grid: the gradient runs' step budget). Evaluation: "
        f"{sizes[1]} per-neuron devices with {100 * args.variation:g} % relative variation, "
        f"300 K, {args.keys} noise keys; energy over {len(x_energy)} test images",
        e0_J=e0, software_accuracy=software.test_accuracy, searches=searches, fronts=fronts,
        controls=controls,
        comparison={n: compare_fronts(searches["gradient"], searches[n]) for n in grid_names},
        steps=dict(gradient=n_gradient, per_grid=per_point * args.levels ** len(space.free),
                   per_grid_point=per_point),
        quick=q, wall_time_s=time.time() - t0,
    )  # fmt: skip
    folder = Path(args.out)
    path = atomic_write_json(folder / "codesign_front.json", out)
    _figure(out, folder / "codesign_front.png")
    text = _markdown(out, _command(args))
    atomic_write_bytes(folder / "codesign_front.md", text.encode())
    print(text)
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
