"""The studies behind the paper's findings (arXiv 2409.02528), as library functions.

(i) `device_curve_study`: software tanh vs MTJ neurons in the training loop, for each device
derivative ("mz2", "mz", "autodiff"), over seeds, on the paper device and on non-ideal
devices whose curves differ from tanh / sech (`CURVE_DEVICES`). (ii) `robustness_study`:
device variation x read noise, at inference only (software weights deployed) and during
training. (iii) `transfer_rows` (software weights deployed on MTJ neurons, no retraining,
optional fine-tuning; MLP and CNN) and `distill_sweep` (a software teacher distilled into a
small MTJ student vs the same student trained alone, over temperature, alpha, student width
and training length). `scripts/reproduce.py` runs them and writes
`results/`; `markdown_table` renders the summary rows.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from mtjax import experiments as ex
from mtjax import plot as _plot
from mtjax import train as _train
from mtjax.distill import distill
from mtjax.nn import deploy, trainable

Row = dict[str, Any]


#: Devices of the non-ideal curve study (label -> `RunSpec.device` overrides of the paper
#: device): field-like torque bends m.p2 away from sech, residual anisotropy and a z bias
#: field bend m.p1 away from tanh.
CURVE_DEVICES: dict[str, tuple] = {
    "paper device": (),
    "xi 0.1": (("xi1", 0.1),),
    "xi 0.3": (("xi1", 0.3),),
    "hk 2e3 A/m": (("hk", 2e3),),
    "hk 8e3 A/m": (("hk", 8e3),),
    "bias 4e3 A/m along z": (("h_bias", (0.0, 0.0, 4e3)),),
    "xi 0.3 + hk 2e3 + bias 4e3": (("xi1", 0.3), ("hk", 2e3), ("h_bias", (0.0, 0.0, 4e3))),
}
DERIVATIVES = ("autodiff", "mz2", "mz")


def curve_deviations(spec: ex.RunSpec, z_max: float = 3.0, n: int = 601) -> dict[str, Any]:
    """How far the device of `spec` (its hidden-layer neuron, noise-free) is from software:
    max over z in [-z_max, z_max] of |m.p1 - tanh z|, |m.p2 - sech z| and
    |m.p2^2 - sech^2 z|, and both curves on 61 points (for plots)."""
    z = np.linspace(-z_max, z_max, n)
    clean = dict(activation="mtj", variation=0.0, read_noise=0.0, reset_offset=0.0)
    act = ex.make_activation(dataclasses.replace(spec, **clean), 1, None)
    p1, p2 = (np.asarray(v, dtype=np.float64) for v in act.noise_free().read(z))
    sech = 1 / np.cosh(z)
    every = max((n - 1) // 60, 1)
    return {
        "max_abs_p1_minus_tanh": float(np.max(np.abs(p1 - np.tanh(z)))),
        "max_abs_p2_minus_sech": float(np.max(np.abs(p2 - sech))),
        "max_abs_p2sq_minus_sech2": float(np.max(np.abs(p2**2 - sech**2))),
        "z": z[::every].tolist(),
        "p1": p1[::every].tolist(),
        "p2": p2[::every].tolist(),
    }


def _pp(values: Sequence[float]) -> dict[str, float]:
    return {k: 100 * v for k, v in ex.mean_std(values).items()}


def _paired(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    return _pp([x - y for x, y in zip(a, b, strict=True)])


def device_curve_study(
    base: ex.RunSpec,
    data,
    seeds: Sequence[int],
    devices: dict[str, tuple] | None = None,
    derivatives: Sequence[str] = DERIVATIVES,
    *,
    progress: bool = False,
) -> tuple[dict, dict[int, Any]]:
    """Finding (i) where device and software curves differ: per device of `devices` (label ->
    `RunSpec.device`; default `CURVE_DEVICES`) and seed, an MTJ network (table mode) trained
    with each derivative, against software tanh of the same seed.

    "autodiff" is also the software control of the issue: the device's forward curve with
    its exact derivative, so per seed "curve cost" = tanh - autodiff separates the effect of
    the curve and "derivative cost" = autodiff - mz2 / mz the effect of the device-supplied
    gradient (all gaps paired by seed, pp). Returns (result, software models by seed)."""
    devices = CURVE_DEVICES if devices is None else devices
    if not devices or not seeds:
        raise ValueError("devices, seeds: need at least one of each")
    if "autodiff" not in derivatives:
        raise ValueError("derivatives: need 'autodiff' (the exact-derivative control)")
    train_data, test_data = data
    software, tanh = {}, []
    for seed in seeds:
        summary, res = ex.run(dataclasses.replace(base, activation="tanh", seed=seed),
                              train_data, test_data, progress=progress)  # fmt: skip
        tanh.append(summary["test_accuracy"])
        software[seed] = res.model
    out: dict[str, Any] = {
        "seeds": list(seeds), "spec": dataclasses.asdict(base), "tanh_accuracy": tanh,
        "tanh_accuracy_pp": _pp(tanh), "devices": {},
    }  # fmt: skip
    for label, overrides in devices.items():
        dev_spec = dataclasses.replace(base, activation="mtj", device=tuple(overrides))
        acc: dict[str, list[float]] = {}
        for der in derivatives:
            for seed in seeds:
                spec = dataclasses.replace(dev_spec, derivative=der, seed=seed)
                summary, _ = ex.run(spec, train_data, test_data, progress=progress)
                acc.setdefault(der, []).append(summary["test_accuracy"])
        entry = {
            "device": [list(o) for o in overrides],
            "deviation": curve_deviations(dev_spec),
            "accuracy": acc,
            "accuracy_pp": {d: _pp(v) for d, v in acc.items()},
            "gap_vs_tanh_pp": {d: _paired(tanh, v) for d, v in acc.items()},
            "curve_cost_pp": _paired(tanh, acc["autodiff"]),
            "derivative_cost_pp": {
                d: _paired(acc["autodiff"], v) for d, v in acc.items() if d != "autodiff"
            },
        }
        out["devices"][label] = entry
    return out, software


def curve_study_markdown(result: dict) -> str:
    """Table of `device_curve_study`: deviations, accuracies and the paired costs (pp)."""
    ders = [d for d in DERIVATIVES if d in next(iter(result["devices"].values()))["accuracy"]]
    fmt = lambda ms: f"{ms['mean']:.2f} ± {ms['std']:.2f}"  # noqa: E731
    head = ["device", "max abs(m.p1 - tanh)", "max abs(m.p2 - sech)", "software tanh (%)"]
    head += [f"MTJ {d} (%)" for d in ders]
    head += ["curve cost (tanh - autodiff)"]
    head += [f"derivative cost (autodiff - {d})" for d in ders if d != "autodiff"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, e in result["devices"].items():
        dev = e["deviation"]
        cells = [
            label,
            f"{dev['max_abs_p1_minus_tanh']:.3f}",
            f"{dev['max_abs_p2_minus_sech']:.3f}",
            fmt(result["tanh_accuracy_pp"]),
        ]
        cells += [fmt(e["accuracy_pp"][d]) for d in ders]
        cells += [fmt(e["curve_cost_pp"])]
        cells += [fmt(e["derivative_cost_pp"][d]) for d in ders if d != "autodiff"]
        lines.append("| " + " | ".join(cells) + " |")  # fmt: skip
    n = len(result["seeds"])
    return "\n".join(lines) + (
        f"\n\nMean ± std over {n} seed(s); costs are paired by seed (pp, positive = worse). "
        "'autodiff' is the device curve with its exact derivative, i.e. the software control.\n"
    )


def curve_rows(result: Mapping[str, Any]) -> list[Row]:
    """Summary rows of `device_curve_study`: every derivative on the paper device, "mz2" on
    the others (all of them: `curve_study_markdown`)."""
    rows = []
    for label, e in result["devices"].items():
        for der in DERIVATIVES if label == "paper device" else ("mz2",):
            rows.append({
                "experiment": f"(i) MLP trained with MTJ neurons, {label}, derivative {der}",
                "software_pp": _ms(result["tanh_accuracy_pp"]),
                "mtj_pp": _ms(e["accuracy_pp"][der]),
                "gap_pp": _ms(e["gap_vs_tanh_pp"][der]),
                "settings": f"{_sizes(result)}, table mode (all derivatives: device_curves.md)",
                "seeds": len(result["seeds"]),
            })  # fmt: skip
    return rows


def _sizes(result: Mapping[str, Any]) -> str:
    return "-".join(str(n) for n in result["spec"]["sizes"])


def curve_study_figure(result: dict, path: str | os.PathLike) -> Path:
    """`mtjax.plot.curve_study` of a `device_curve_study` result, PNG written atomically."""
    return _plot.save(_plot.curve_study(result), path)


def _noise_cell(base, data, models, kinds, n_keys, progress, **changes) -> dict:
    """Accuracies (%) [seed][key] of one robustness cell, per kind."""
    train_data, test_data = data
    out: dict[str, list[list[float]]] = {k: [] for k in kinds}
    for seed, software in models.items():
        spec = dataclasses.replace(base, activation="mtj", seed=seed, **changes)
        out["inference"].append(
            [100 * a for a in ex.evaluate_with(software, spec, test_data, n_keys=n_keys)]
        )
        if "training" in kinds:
            _, res = ex.run(spec, train_data, test_data, progress=progress)
            accs = ex.accuracies_over_keys(res.model, test_data, n_keys, seed=spec.seed)
            out["training"].append([100 * a for a in accs])
    return out


def _cell_stats(values: list[list[float]]) -> tuple[float, float, float]:
    """(mean, std over seeds of the key means, mean over seeds of the std over keys)."""
    means = [float(np.mean(v)) for v in values]
    over_keys = [ex.mean_std(v)["std"] for v in values]
    return float(np.mean(means)), ex.mean_std(means)["std"], float(np.mean(over_keys))


def robustness_study(
    base: ex.RunSpec,
    data,
    software_models,
    variations: Sequence[float] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5),
    read_noises: Sequence[float] = (0.0, 0.01, 0.05, 0.1),
    reset_offsets: Sequence[float] = (0.02, 0.05, 0.1, 0.2),
    *,
    train_too: bool = True,
    n_keys: int = 5,
    progress: bool = False,
) -> dict:
    """Test accuracy (%) on a device-variation x read-noise grid, and along a line of
    imperfect-reset offsets (`RunSpec.reset_offset`: m_x(0) spread, no variation or noise):
    software weights deployed on the perturbed MTJ neurons ("inference") and networks trained
    with them ("training").

    `software_models`: seed -> software network (one model: seed `base.seed`); each seed also
    draws its own devices. Each cell: mean over seeds of the mean over `n_keys` noise keys,
    the std over seeds of those means ("std_over_seeds_pp") and the mean std over keys
    ("std_over_keys_pp"). Variation >= 1/3 is lognormal (`experiments.make_activation`)."""
    one = not isinstance(software_models, Mapping)
    models = {base.seed: software_models} if one else dict(software_models)
    _, test_data = data
    kinds = ("inference", "training") if train_too else ("inference",)
    sw = [100 * _train.evaluate(m, *test_data, 1000)[1] for m in models.values()]
    stats = ("accuracy_pp", "std_over_seeds_pp", "std_over_keys_pp")
    result: dict[str, Any] = {
        "variation": list(variations), "read_noise": list(read_noises), "n_keys": n_keys,
        "seeds": list(models), "software_accuracy_pp": float(np.mean(sw)),
        "software_accuracy_std_pp": ex.mean_std(sw)["std"], "spec": dataclasses.asdict(base),
        **{name: {k: [] for k in kinds} for name in stats},
        "values_pp": {k: [] for k in kinds},
    }  # fmt: skip
    for s in variations:
        rows = {k: [] for k in kinds}
        for r in read_noises:
            cell = _noise_cell(base, data, models, kinds, n_keys, progress, variation=s,
                               read_noise=r)  # fmt: skip
            for k in kinds:
                rows[k].append(cell[k])
        for k in kinds:
            result["values_pp"][k].append(rows[k])
            cells = [_cell_stats(c) for c in rows[k]]
            for i, name in enumerate(stats):
                result[name][k].append([c[i] for c in cells])
    line: dict[str, Any] = {"offset": list(reset_offsets)}
    line.update({name: {k: [] for k in kinds} for name in stats})
    for off in reset_offsets:
        cell = _noise_cell(base, data, models, kinds, n_keys, progress, reset_offset=off)
        for k in kinds:
            for name, v in zip(stats, _cell_stats(cell[k]), strict=True):
                line[name][k].append(v)
    result["reset_offset"] = line
    return result


def robustness_markdown(result: dict) -> str:
    """Tables of `robustness_study`: each grid (variation rows x read-noise columns) and the
    reset-offset line, cells "mean ± std over seeds" (%)."""
    n, keys = len(result["seeds"]), result["n_keys"]
    lines = [f"Test accuracy (%), mean ± std over {n} seed(s) (each the mean over {keys} noise "
             f"keys); software {result['software_accuracy_pp']:.2f} ± "
             f"{result['software_accuracy_std_pp']:.2f}.", ""]  # fmt: skip
    for kind, grid in result["accuracy_pp"].items():
        sd = result["std_over_seeds_pp"][kind]
        lines += [f"**{kind}** (rows: variation, columns: read noise)", "",
                  "| variation | " + " | ".join(f"{r:g}" for r in result["read_noise"]) + " |",
                  "|" + "---|" * (1 + len(result["read_noise"]))]  # fmt: skip
        for s, row, srow in zip(result["variation"], grid, sd, strict=True):
            cells = [f"{m:.2f} ± {e:.2f}" for m, e in zip(row, srow, strict=True)]
            lines.append(f"| {s:g} | " + " | ".join(cells) + " |")
        lines.append("")
    line = result.get("reset_offset")
    if line and line["offset"]:
        kinds = list(line["accuracy_pp"])
        lines += [
            "**imperfect reset** (m_x(0) spread, no variation or read noise)",
            "",
            "| reset offset | " + " | ".join(kinds) + " |",
            "|" + "---|" * (1 + len(kinds)),
        ]
        for i, off in enumerate(line["offset"]):
            cells = [f"{line['accuracy_pp'][k][i]:.2f} ± {line['std_over_seeds_pp'][k][i]:.2f}"
                     for k in kinds]  # fmt: skip
            lines.append(f"| {off:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def robustness_rows(result: Mapping[str, Any]) -> list[Row]:
    """Summary row of `robustness_study`: the worst cell of each grid (all: robustness.md)."""
    worst = {}
    for kind, grid in result["accuracy_pp"].items():
        i, j = np.unravel_index(np.argmin(grid), np.shape(grid))
        worst[kind] = f"{grid[i][j]:.2f} ± {result['std_over_seeds_pp'][kind][i][j]:.2f}"
    sw = f"{result['software_accuracy_pp']:.2f} ± {result['software_accuracy_std_pp']:.2f}"
    return [{
        "experiment": "(ii) worst cell of the variation x read-noise grid, " + " / ".join(worst)
        + " (all cells and imperfect reset: robustness.md)",
        "software_pp": sw, "mtj_pp": " / ".join(worst.values()), "gap_pp": "",
        "settings": f"{_sizes(result)}, variation <= {max(result['variation']):g}, "
        f"read noise <= {max(result['read_noise']):g}",
        "seeds": len(result["seeds"]), "noise_keys": result["n_keys"],
    }]  # fmt: skip


#: Deployment variants of finding (iii): label -> `RunSpec` changes of the MTJ network
#: whose hidden neurons take the software weights (devices drawn per seed).
TRANSFER_VARIANTS: dict[str, dict[str, Any]] = {
    "table, ideal device": {},
    "ode, ideal device": {"mode": "ode"},
    "table, 5 % variation + 0.01 read noise": {"variation": 0.05, "read_noise": 0.01},
    "table, 10 % variation + 0.05 read noise": {"variation": 0.1, "read_noise": 0.05},
    "thermal, 300 K": {"mode": "thermal", "temperature": 300.0},
    "sde, 300 K (reference)": {"mode": "sde", "temperature": 300.0},
}


def transfer_study(
    base: ex.RunSpec,
    data,
    software_models: Mapping[int, Any],
    variants: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    finetune: tuple[str, ex.RunSpec] | None = None,
    n_keys: int = 5,
    max_seeds: Mapping[str, int] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Software weights deployed on MTJ neurons without retraining (finding (iii)).

    `software_models`: seed -> software network of `base.sizes`; every variant (label ->
    `RunSpec` changes, default `TRANSFER_VARIANTS`) deploys each seed's weights on neurons
    drawn with that seed (`experiments.evaluate_with`), noisy ones scored over `n_keys` noise
    keys. `finetune=(label, spec)` also trains that variant for `spec.epochs` with the
    device in the loop. `max_seeds`: label -> how many of the seeds (the first) an expensive
    variant runs. Returns accuracies (%) [seed][key] per variant, its seeds, and the software
    accuracy per seed."""
    if not software_models:
        raise ValueError("software_models: need at least one seed")
    variants = dict(TRANSFER_VARIANTS if variants is None else variants)
    if finetune is not None and finetune[0] not in variants:
        raise ValueError(f"finetune: {finetune[0]!r} is not one of the variants")
    train_data, test_data = data
    seeds = list(software_models)
    result: dict[str, Any] = {
        "seeds": seeds, "n_keys": n_keys, "spec": dataclasses.asdict(base),
        "software_pp": [100 * _train.evaluate(m, *test_data, 1000)[1]
                        for m in software_models.values()],
        "variants": {},
    }  # fmt: skip

    def spec_of(changes, seed):
        return dataclasses.replace(base, activation="mtj", seed=seed, **changes)

    max_seeds = dict(max_seeds or {})
    unknown = set(max_seeds) - set(variants)
    if unknown or any(n < 1 for n in max_seeds.values()):
        raise ValueError(f"max_seeds: unknown variants {sorted(unknown)} or a count < 1")
    for label, changes in variants.items():
        use = seeds[: max_seeds.get(label, len(seeds))]
        result["variants"][label] = {"changes": dict(changes), "seeds": use, "values_pp": [
            [100 * a for a in ex.evaluate_with(software_models[s], spec_of(changes, s),
                                               test_data, n_keys=n_keys)]
            for s in use
        ]}  # fmt: skip
    if finetune is not None:
        label, ft = finetune
        values = []
        for s, m in software_models.items():
            spec = dataclasses.replace(spec_of(variants[label], s), epochs=ft.epochs, lr=ft.lr)
            acts = ex.hidden_activations(spec, jax.random.key(spec.seed + 10_000))
            _, res = ex.run(spec, train_data, test_data, model=deploy(m, acts),
                            progress=progress)  # fmt: skip
            accs = ex.accuracies_over_keys(res.model, test_data, n_keys, seed=s)
            values.append([100 * a for a in accs])
        result["variants"][f"deploy + fine-tune {ft.epochs} ep, {label}"] = {
            "changes": dict(variants[label]), "seeds": seeds, "values_pp": values,
            "finetune_epochs": ft.epochs, "finetune_lr": ft.lr,
        }  # fmt: skip
    return result


def transfer_rows(name: str, result: Mapping[str, Any]) -> list[Row]:
    """Summary rows of `transfer_study` (experiment "<name>: deploy, <label>")."""
    rows = []
    for label, v in result["variants"].items():
        what = label if label.startswith("deploy + ") else f"deploy, {label}"
        sw = [result["software_pp"][result["seeds"].index(s)] for s in v["seeds"]]
        rows.append(_row(f"{name}: {what}", sw, v["values_pp"]))
    return rows


#: The knowledge-distillation sweep (`distill_sweep`).
KD_TEMPERATURES = (1.0, 2.0, 4.0, 8.0)
KD_ALPHAS = (0.3, 0.5, 0.7, 0.9)
KD_WIDTHS = (16, 32, 64)
KD_EPOCHS = (5, 10, 20)


def distill_sweep(
    teacher_spec: ex.RunSpec,
    student_spec: ex.RunSpec,
    data,
    seeds: Sequence[int] = (0, 1, 2),
    temperatures: Sequence[float] = KD_TEMPERATURES,
    alphas: Sequence[float] = KD_ALPHAS,
    widths: Sequence[int] = KD_WIDTHS,
    epochs: Sequence[int] = KD_EPOCHS,
    *,
    progress: bool = False,
) -> dict[str, Any]:
    """Does distillation from a software teacher help an MTJ student? One teacher
    (`teacher_spec`), then per seed: (a) KD at every temperature x alpha, at the student's
    width (`student_spec.sizes[1]`) and `student_spec.epochs`; (b) the best (temperature,
    alpha) of (a) (largest mean gain) at every width of `widths` and training length of
    `epochs`. Every KD run is paired with the same student (seed, width, epochs) trained
    alone with cross-entropy: gain = KD - alone (test accuracy, pp, mean ± std over seeds)."""
    if len(student_spec.sizes) != 3:
        raise ValueError(f"student_spec.sizes: one hidden layer expected, got {student_spec.sizes}")
    train_data, test_data = data
    t_summary, t_res = ex.run(teacher_spec, train_data, test_data, progress=progress)
    alone: dict[tuple, float] = {}
    kd: dict[tuple, float] = {}
    ref_w, ref_e = student_spec.sizes[1], student_spec.epochs

    def spec_of(width, n_epochs, seed):
        sizes = (student_spec.sizes[0], width, student_spec.sizes[2])
        return dataclasses.replace(student_spec, sizes=sizes, epochs=n_epochs, seed=seed)

    def cell(t, a, width, n_epochs) -> dict[str, Any]:
        for seed in seeds:
            spec = spec_of(width, n_epochs, seed)
            if (width, n_epochs, seed) not in alone:
                summary, _ = ex.run(spec, train_data, test_data, progress=progress)
                alone[width, n_epochs, seed] = summary["test_accuracy"]
            if (t, a, width, n_epochs, seed) not in kd:
                student = ex.make_model(spec)
                res = distill(
                    t_res.model, student, train_data, test_data, spec.config(),
                    temperature=t, alpha=a, progress=progress, filter_spec=trainable(student),
                )  # fmt: skip
                kd[t, a, width, n_epochs, seed] = res.test_accuracy
        a_acc = [alone[width, n_epochs, s] for s in seeds]
        k_acc = [kd[t, a, width, n_epochs, s] for s in seeds]
        return {
            "temperature": t, "alpha": a, "width": width, "epochs": n_epochs,
            "alone_pp": _pp(a_acc), "kd_pp": _pp(k_acc), "gain_pp": _paired(k_acc, a_acc),
            "alone": a_acc, "kd": k_acc,
        }  # fmt: skip

    grid = [[cell(float(t), float(a), ref_w, ref_e) for a in alphas] for t in temperatures]
    best = max((c for row in grid for c in row), key=lambda c: c["gain_pp"]["mean"])
    t_best, a_best = best["temperature"], best["alpha"]
    return {
        "teacher": dataclasses.asdict(teacher_spec), "student": dataclasses.asdict(student_spec),
        "teacher_accuracy_pp": 100 * t_summary["test_accuracy"], "seeds": list(seeds),
        "temperatures": [float(t) for t in temperatures], "alphas": [float(a) for a in alphas],
        "grid": grid, "best": {"temperature": t_best, "alpha": a_best},
        "widths": [cell(t_best, a_best, int(w), ref_e) for w in widths],
        "epochs": [cell(t_best, a_best, ref_w, int(e)) for e in epochs],
    }  # fmt: skip


def _ms(ms: Mapping[str, float]) -> str:
    return f"{ms['mean']:.2f} ± {ms['std']:.2f}"


def distill_markdown(result: Mapping[str, Any]) -> str:
    """Tables of `distill_sweep`: the KD gain over temperature x alpha, then the best setting
    across student widths and training lengths (pp, mean ± std over seeds)."""
    alphas = result["alphas"]
    ref = result["grid"][0][0]
    lines = [
        f"Teacher (software tanh): {result['teacher_accuracy_pp']:.2f} %. Student trained "
        f"alone (width {ref['width']}, {ref['epochs']} epochs): {_ms(ref['alone_pp'])} %.",
        "",
        "KD gain (KD - alone, pp) by temperature (rows) and alpha (columns):",
        "",
        "| T | " + " | ".join(f"alpha {a:g}" for a in alphas) + " |",
        "|" + "---|" * (len(alphas) + 1),
    ]
    for row in result["grid"]:
        lines.append(f"| {row[0]['temperature']:g} | " + " | ".join(_ms(c["gain_pp"]) for c in row)
                     + " |")  # fmt: skip
    b = result["best"]
    lines += [
        "",
        f"Best: T = {b['temperature']:g}, alpha = {b['alpha']:g}, across student widths and "
        "training lengths:",
        "",
        "| width | epochs | alone (%) | KD (%) | gain (pp) |",
        "|---|---|---|---|---|",
    ]
    seen = set()
    for c in result["widths"] + result["epochs"]:
        if (c["width"], c["epochs"]) in seen:
            continue
        seen.add((c["width"], c["epochs"]))
        lines.append(f"| {c['width']} | {c['epochs']} | {_ms(c['alone_pp'])} | "
                     f"{_ms(c['kd_pp'])} | {_ms(c['gain_pp'])} |")  # fmt: skip
    n = len(result["seeds"])
    return "\n".join(lines) + (
        f"\n\nMean ± std over {n} seed(s); each KD run is paired with the same student (seed, "
        "width, epochs) trained alone with cross-entropy.\n"
    )


def distill_figure(result: dict, path: str | os.PathLike) -> Path:
    """`mtjax.plot.distill_sweep` of a `distill_sweep` result, PNG written atomically."""
    return _plot.save(_plot.distill_sweep(result), path)


def distill_rows(result: Mapping[str, Any]) -> list[Row]:
    """Summary rows of `distill_sweep`: the student alone and distilled with the best setting
    at the reference width and length."""
    b = result["best"]
    ref = next(c for row in result["grid"] for c in row
               if (c["temperature"], c["alpha"]) == (b["temperature"], b["alpha"]))  # fmt: skip
    teacher = result["teacher_accuracy_pp"]
    rows = []
    for label, ms in (("trained alone", ref["alone_pp"]), ("distilled from the teacher",
                                                           ref["kd_pp"])):  # fmt: skip
        rows.append({
            "experiment": f"KD: MTJ student {label}", "software_pp": f"{teacher:.2f}",
            "mtj_pp": _ms(ms), "gap_pp": f"{teacher - ms['mean']:.2f}",
            "seeds": len(result["seeds"]),
        })  # fmt: skip
    rows[-1]["settings"] = (
        f"student 784-{ref['width']}-10 MTJ, {ref['epochs']} epochs, best of the sweep: "
        f"T={b['temperature']:g}, alpha={b['alpha']:g}; KD gain {_ms(ref['gain_pp'])} pp "
        "(distillation.md)"
    )
    return rows


def _row(experiment: str, software: Sequence[float], mtj: Sequence[Sequence[float]]) -> Row:
    """Summary row from accuracies (%): `software` per seed, `mtj` [seed][key] (one key when
    noise-free). One seed: mean ± std over its keys; several: the mean over seeds of the key
    means ± their std over seeds; the gap is paired by seed."""
    means = [float(np.mean(v)) for v in mtj]
    if len(means) == 1:
        ms = ex.mean_std(mtj[0])
        n = len(mtj[0])
        spread = f" ± {ms['std']:.2f}" if n > 1 else ""
        sw = f"{software[0]:.2f}"
        gap = f"{software[0] - ms['mean']:.2f}{spread}"
        mtj_text = f"{ms['mean']:.2f}{spread}"
    else:
        n = len(mtj[0])
        sw, mtj_text = _ms(ex.mean_std(software)), _ms(ex.mean_std(means))
        gap = _ms(ex.mean_std([a - b for a, b in zip(software, means, strict=True)]))
    return {
        "experiment": experiment, "software_pp": sw, "mtj_pp": mtj_text, "gap_pp": gap,
        "seeds": len(means), "noise_keys": n,
    }  # fmt: skip


def markdown_table(rows: Sequence[Row]) -> str:
    cols = ("experiment", "software_pp", "mtj_pp", "gap_pp", "paper", "settings", "seeds",
            "noise_keys")  # fmt: skip
    head = ["experiment", "software acc (%)", "MTJ acc (%)", "gap (pp)", "paper", "settings",
            "seeds", "noise keys"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def robustness_heatmap(result: dict, path: str | os.PathLike) -> Path:
    """Heatmaps of `robustness_study` (one panel per grid, `mtjax.plot.robustness_heatmaps`),
    PNG written atomically."""
    return _plot.save(_plot.robustness_heatmaps(result), path)
