"""The studies behind the paper's findings (arXiv 2409.02528), as library functions.

(i) `derivative_study`: software tanh vs MTJ neurons in the training loop, for each device
derivative ("mz2", "mz", "autodiff"), over seeds. (ii) `robustness_study`: device variation x
read noise, at inference only (software weights deployed) and during training. (iii)
`transfer_study` (software weights deployed on MTJ neurons, no retraining, optional
fine-tuning; MLP and CNN) and `distill_study` (a software teacher distilled into a small MTJ
student vs the same student trained alone). `scripts/reproduce.py` runs them and writes
`results/`; `markdown_table` renders the summary rows.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mtjax import experiments as ex
from mtjax import plot as _plot
from mtjax import train as _train
from mtjax.distill import distill
from mtjax.nn import deploy, trainable

Row = dict[str, Any]


def derivative_study(
    base: ex.RunSpec, data, seeds: Sequence[int], *, progress: bool = False
) -> tuple[dict, dict[int, Any]]:
    """Accuracy of tanh and MTJ (each derivative) networks per seed, and the per-seed gaps.

    Returns (summary, software models by seed) — the models are reused by later studies."""
    train_data, test_data = data
    acc: dict[str, list[float]] = {}
    software = {}
    for seed in seeds:
        for label, act, der in (
            ("tanh", "tanh", "mz2"),
            ("mtj_mz2", "mtj", "mz2"),
            ("mtj_mz", "mtj", "mz"),
            ("mtj_autodiff", "mtj", "autodiff"),
        ):
            spec = dataclasses.replace(base, activation=act, derivative=der, seed=seed)
            summary, res = ex.run(spec, train_data, test_data, progress=progress)
            acc.setdefault(label, []).append(summary["test_accuracy"])
            if label == "tanh":
                software[seed] = res.model
    out = {"seeds": list(seeds), "accuracy": acc, "summary": {}}
    for label, values in acc.items():
        gaps = [t - v for t, v in zip(acc["tanh"], values, strict=True)]
        out["summary"][label] = {
            "accuracy_pp": {k: 100 * v for k, v in ex.mean_std(values).items()},
            "gap_pp": {k: 100 * v for k, v in ex.mean_std(gaps).items()},
        }
    return out, software


def robustness_study(
    base: ex.RunSpec,
    data,
    software_model,
    variations: Sequence[float] = (0.0, 0.05, 0.1, 0.2),
    read_noises: Sequence[float] = (0.0, 0.01, 0.05, 0.1),
    *,
    train_too: bool = True,
    n_keys: int = 5,
    progress: bool = False,
) -> dict:
    """Test accuracy (%) on a variation x read-noise grid: software weights deployed on the
    perturbed MTJ neurons ("inference"), and networks trained with them ("training"); each
    cell the mean (and std) over `n_keys` read-noise keys."""
    train_data, test_data = data
    kinds = ("inference", "training") if train_too else ("inference",)
    grids = {k: [] for k in kinds}
    stds = {k: [] for k in kinds}
    _, sw_acc = _train.evaluate(software_model, *test_data, 1000)
    for s in variations:
        cells: dict[str, list[dict]] = {k: [] for k in kinds}
        for r in read_noises:
            spec = dataclasses.replace(base, activation="mtj", variation=s, read_noise=r)
            accs = {"inference": ex.evaluate_with(software_model, spec, test_data, n_keys=n_keys)}
            if train_too:
                _, res = ex.run(spec, train_data, test_data, progress=progress)
                accs["training"] = ex.accuracies_over_keys(
                    res.model, test_data, n_keys, seed=spec.seed
                )
            for k in kinds:
                cells[k].append(ex.mean_std([100 * a for a in accs[k]]))
        for k in kinds:
            grids[k].append([c["mean"] for c in cells[k]])
            stds[k].append([c["std"] for c in cells[k]])
    return {
        "variation": list(variations),
        "read_noise": list(read_noises),
        "n_keys": n_keys,
        "software_accuracy_pp": 100 * sw_acc,
        "accuracy_pp": grids,
        "std_over_keys_pp": stds,
        "spec": dataclasses.asdict(base),
    }


def transfer_rows(
    name: str,
    software_model,
    data,
    variants: dict[str, Any],
    *,
    finetune: tuple[str, ex.RunSpec] | None = None,
    n_keys: int = 5,
    progress: bool = False,
) -> list[Row]:
    """Deploy `software_model`'s weights with each activation in `variants` (label ->
    activation or per-layer list) and evaluate without retraining; `finetune=(label, spec)`
    also trains that variant for `spec.epochs` with the device in the loop. Noisy variants:
    accuracy mean ± std over `n_keys` noise keys (`experiments.accuracies_over_keys`)."""
    train_data, test_data = data
    _, sw = _train.evaluate(software_model, *test_data, 500)
    rows = []
    for label, act in variants.items():
        accs = ex.accuracies_over_keys(deploy(software_model, act), test_data, n_keys)
        rows.append(_row(f"{name}: deploy, {label}", sw, accs))
    if finetune is not None:
        label, spec = finetune
        model = deploy(software_model, variants[label])
        res = _train.train(
            model, train_data, test_data, spec.config(), progress=progress,
            filter_spec=trainable(model),
        )  # fmt: skip
        accs = ex.accuracies_over_keys(res.model, test_data, n_keys)
        rows.append(_row(f"{name}: deploy + fine-tune {spec.epochs} ep, {label}", sw, accs))
    return rows


def distill_study(
    teacher_spec: ex.RunSpec,
    student_spec: ex.RunSpec,
    data,
    seeds: Sequence[int] = (0,),
    *,
    temperature: float = 2.0,
    alpha: float = 0.5,
    progress: bool = False,
) -> list[Row]:
    """A software teacher distilled into an MTJ student vs the same student (same seed)
    trained alone; accuracies as mean ± std over `seeds`."""
    train_data, test_data = data
    t_summary, t_res = ex.run(teacher_spec, train_data, test_data, progress=progress)
    alone, kd = [], []
    for seed in seeds:
        spec = dataclasses.replace(student_spec, seed=seed)
        summary, _ = ex.run(spec, train_data, test_data, progress=progress)
        alone.append(summary["test_accuracy"])
        student = ex.make_model(spec)
        res = distill(
            t_res.model, student, train_data, test_data, spec.config(),
            temperature=temperature, alpha=alpha, progress=progress,
            filter_spec=trainable(student),
        )  # fmt: skip
        kd.append(res.test_accuracy)
    teacher = 100 * t_summary["test_accuracy"]
    rows = []
    for label, accs in (("trained alone", alone), ("distilled from the teacher", kd)):
        ms = ex.mean_std([100 * a for a in accs])
        rows.append({
            "experiment": f"KD: MTJ student {label}", "software_pp": f"{teacher:.2f}",
            "mtj_pp": f"{ms['mean']:.2f} ± {ms['std']:.2f}",
            "gap_pp": f"{teacher - ms['mean']:.2f}", "seeds": len(seeds),
        })  # fmt: skip
    return rows


def _row(experiment: str, software: float, mtj: Sequence[float]) -> Row:
    """Summary row; `mtj`: accuracies over noise keys (one entry when noise-free)."""
    ms = ex.mean_std([100 * a for a in mtj])
    spread = f" ± {ms['std']:.2f}" if len(mtj) > 1 else ""
    return {
        "experiment": experiment,
        "software_pp": f"{100 * software:.2f}",
        "mtj_pp": f"{ms['mean']:.2f}{spread}",
        "gap_pp": f"{100 * software - ms['mean']:.2f}{spread}",
        "noise_keys": len(mtj),
    }


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
