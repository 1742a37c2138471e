"""Reproduce the paper's findings (i)-(iii) on Fashion-MNIST (and CIFAR-100 when available).

Writes <out>/paper_reproduction.md (summary table), paper_reproduction.json,
robustness.{json,md,png} (finding (ii); `--only robustness` runs just that),
device_curves.{json,md,png} (finding (i) on non-ideal devices; `--only curves`) and
distillation.{json,md,png} (the KD sweep; `--only kd`). --quick:
tiny subsets and 1 epoch (a smoke test, numbers meaningless).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import jax

from mtjax import DeviceParams, Spreads, data, paper, sample_devices
from mtjax import experiments as ex
from mtjax import train as _train
from mtjax.analytic import current_scale
from mtjax.fileio import atomic_write_bytes, atomic_write_json
from mtjax.nn import MTJActivation, SmallCNN, cifar_model

PAPER = {
    "i": "training with device curves costs ~nothing",
    "ii": "robust to variation and noise",
    "fmnist": "0.1 % loss (FMNIST)",
    "cifar": "2 % loss (CIFAR-100)",
    "kd": "KD supported",
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results", help="output folder (default results/)")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny subsets, 1 epoch")
    ap.add_argument("--seeds", type=int, default=5, help="seeds for finding (i) (>= 1)")
    ap.add_argument(
        "--only", default="all", choices=("all", "curves", "robustness", "kd"),
        help="curves: only finding (i) on the paper and non-ideal devices (device_curves.*); "
        "robustness: only finding (ii) (robustness.*); kd: only the distillation sweep",
    )  # fmt: skip
    ap.add_argument("--kd-seeds", type=int, default=3, help="seeds of the KD sweep (>= 1)")
    ap.add_argument(
        "--robustness-seeds", type=int, default=3, help="training seeds for finding (ii) (>= 1)"
    )
    ap.add_argument("--epochs", type=int, default=10, help="MLP epochs (>= 1)")
    ap.add_argument("--data-dir", default=None, help="raw dataset folder (both datasets)")
    ap.add_argument("--skip-cifar", action="store_true")
    ap.add_argument(
        "--download", action="store_true",
        help="download the original files of datasets not found locally (checksums verified)",
    )  # fmt: skip
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if min(args.seeds, args.robustness_seeds, args.kd_seeds, args.epochs) < 1:
        ap.error("--seeds, --robustness-seeds, --kd-seeds and --epochs must be >= 1")
    return args


def _mtj_variants(sizes, *, with_sde: bool):
    """Activations to deploy software weights onto (label -> per-hidden-layer list)."""
    nominal = DeviceParams.paper()
    i_s = current_scale(nominal)
    widths = sizes[1:-1]

    def varied(s, noise, seed):
        keys = jax.random.split(jax.random.key(seed), len(widths))
        return [
            MTJActivation(
                sample_devices(nominal, k, w, Spreads.relative(s)),
                read_noise=noise,
                input_scale=i_s,
            )  # fmt: skip
            for w, k in zip(widths, keys, strict=True)
        ]

    variants = {
        "table, ideal device": MTJActivation(nominal),
        "ode, ideal device": MTJActivation(nominal, mode="ode"),
        "table, 5 % variation + 0.01 read noise": varied(0.05, 0.01, 1),
        "table, 10 % variation + 0.05 read noise": varied(0.1, 0.05, 2),
    }
    hot = nominal.replace(temperature=300.0)
    variants["thermal, 300 K"] = MTJActivation(hot, mode="thermal")
    if with_sde:
        variants["sde, 300 K (reference)"] = MTJActivation(hot, mode="sde")
    return variants


def _curves(base, fm, seeds, out, report, rows, *, quick: bool, progress: bool) -> dict:
    """Finding (i) on the paper and non-ideal devices: device_curves.*, summary rows; the
    software networks by seed."""
    print("(i) software vs MTJ-in-the-loop training, paper and non-ideal devices", flush=True)
    q = quick
    devices = paper.CURVE_DEVICES
    if q:
        devices = {k: devices[k] for k in ("paper device", "hk 8e3 A/m")}
    study, software = paper.device_curve_study(base, fm, seeds, devices, progress=progress)
    atomic_write_json(out / "device_curves.json", study)
    md = paper.curve_study_markdown(study)
    cmd = f"`python scripts/reproduce.py{' --quick' if q else ''} --only curves`"
    title = f"# Finding (i) on non-ideal devices ({cmd}, {base.sizes}, {base.epochs} epochs)"
    atomic_write_bytes(out / "device_curves.md", f"{title}\n\n{md}".encode())
    paper.curve_study_figure(study, out / "device_curves.png")
    report["finding_i"] = study
    print(md, flush=True)
    tanh_pp = s_fmt(study["tanh_accuracy_pp"])
    for label, e in study["devices"].items():
        for der in paper.DERIVATIVES if label == "paper device" else ("mz2",):
            rows.append({
                "experiment": f"(i) MLP trained with MTJ neurons, {label}, derivative {der}",
                "software_pp": tanh_pp, "mtj_pp": s_fmt(e["accuracy_pp"][der]),
                "gap_pp": s_fmt(e["gap_vs_tanh_pp"][der]), "paper": PAPER["i"],
                "settings": "784-256-10, table mode (all derivatives: device_curves.md)",
                "seeds": len(seeds),
            })  # fmt: skip
    return software


def _distillation(base, fm, out, report, rows, seeds, *, quick: bool, progress: bool) -> None:
    """The KD sweep (`paper.distill_sweep`): distillation.{json,md,png}, summary rows."""
    print("KD sweep: temperature x alpha, student width, training length", flush=True)
    teacher = dataclasses.replace(base, sizes=(784, 512, 512, 10), activation="tanh")
    student = dataclasses.replace(base, sizes=(784, 32, 10), activation="mtj")
    grid = {}
    if quick:
        grid = dict(temperatures=(2.0, 4.0), alphas=(0.5,), widths=(16, 32), epochs=(1,))
    sweep = paper.distill_sweep(teacher, student, fm, seeds, progress=progress, **grid)
    atomic_write_json(out / "distillation.json", sweep)
    paper.distill_figure(sweep, out / "distillation.png")
    md = paper.distill_markdown(sweep)
    cmd = f"`python scripts/reproduce.py{' --quick' if quick else ''} --only kd`"
    title = (f"# Knowledge distillation ({cmd}; teacher 784-512-512-10 tanh, MTJ student "
             f"784-w-10, table mode, {base.epochs} teacher epochs)")  # fmt: skip
    atomic_write_bytes(out / "distillation.md", f"{title}\n\n{md}".encode())
    report["distillation"] = sweep
    print(md, flush=True)
    for r in paper.distill_rows(sweep):
        rows.append({**r, "paper": PAPER["kd"]})


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    t0 = time.time()
    q = args.quick
    progress = not args.no_progress
    seeds = list(range(1 if q else args.seeds))
    epochs = 1 if q else args.epochs
    subsets = dict(train_subset=2000, test_subset=500) if q else {}
    fm = ex.load_arrays("fashion_mnist", data_dir=args.data_dir, download=args.download, **subsets)
    base = ex.RunSpec(sizes=(784, 256, 10), epochs=epochs, **subsets)
    rows, report = [], {"settings": {"quick": q, "seeds": seeds, "epochs": epochs}}

    kd_seeds = list(range(1 if q else args.kd_seeds))
    if args.only == "kd":
        _distillation(base, fm, out, report, rows, kd_seeds, quick=q, progress=progress)
        return report

    # (i) device in the training loop, per derivative, ideal and non-ideal devices
    software = {}
    if args.only in ("all", "curves"):
        software = _curves(base, fm, seeds, out, report, rows, quick=q, progress=progress)
        if args.only == "curves":
            return report

    # (ii) robustness: variation x read noise, imperfect reset; seeds 0..n-1
    print("(ii) robustness: variation x read noise, imperfect reset", flush=True)
    rob_seeds = range(1 if q else args.robustness_seeds)
    for seed in rob_seeds:
        if seed not in software:
            tanh = dataclasses.replace(base, activation="tanh", seed=seed)
            software[seed] = ex.run(tanh, *fm, progress=progress)[1].model
    grid = dict(variations=(0.0, 0.1), read_noises=(0.0, 0.05), reset_offsets=(0.1,)) if q else {}
    rob = paper.robustness_study(
        base, fm, {s: software[s] for s in rob_seeds}, progress=progress, **grid
    )  # fmt: skip
    atomic_write_json(out / "robustness.json", rob)
    paper.robustness_heatmap(rob, out / "robustness.png")
    rob_md = paper.robustness_markdown(rob)
    cmd = f"`python scripts/reproduce.py{' --quick' if q else ''} --only robustness`"
    title = f"# Finding (ii): robustness ({cmd}, {base.sizes}, {epochs} epochs)\n\n"
    atomic_write_bytes(out / "robustness.md", (title + rob_md).encode())
    report["finding_ii"] = rob
    if args.only == "robustness":
        print(rob_md)
        return report
    worst = {k: min(map(min, grid)) for k, grid in rob["accuracy_pp"].items()}
    rows.append({
        "experiment": "(ii) worst cell of the variation x noise grid (mean over seeds and "
        "noise keys), inference / training (all cells: robustness.md)",
        "software_pp": f"{rob['software_accuracy_pp']:.2f}",
        "mtj_pp": f"{worst['inference']:.2f} / {worst['training']:.2f}",
        "gap_pp": "", "paper": PAPER["ii"],
        "settings": f"variation <= {max(rob['variation'])}, noise <= {max(rob['read_noise'])}",
        "seeds": len(rob["seeds"]), "noise_keys": rob["n_keys"],
    })  # fmt: skip

    # (iii) transfer: MLP, small CNN; knowledge distillation
    print("(iii) transfer learning and distillation", flush=True)
    ft = dataclasses.replace(base, epochs=1, lr=2e-4)
    variants = _mtj_variants(base.sizes, with_sde=not q)
    mlp_rows = paper.transfer_rows(
        "(iii) FMNIST MLP", software[seeds[0]], fm, variants,
        finetune=("table, 10 % variation + 0.05 read noise", ft), progress=progress,
    )  # fmt: skip
    cnn_cfg = _train.TrainConfig(epochs=1 if q else 3, batch_size=128, lr=2e-3)
    cnn = _train.train(
        SmallCNN(1, 10, key=jax.random.key(0)), *fm, cnn_cfg, progress=progress
    ).model
    cnn_rows = paper.transfer_rows(
        "(iii) FMNIST small CNN", cnn, fm, {"table, ideal device": MTJActivation()},
        progress=progress,
    )  # fmt: skip
    for r in mlp_rows + cnn_rows:
        rows.append({**r, "paper": PAPER["fmnist"], "settings": "no retraining unless stated",
                     "seeds": 1})  # fmt: skip
    _distillation(base, fm, out, report, rows, kd_seeds, quick=q, progress=progress)

    # CIFAR-100 (needs the data; this is skipped where it cannot be obtained)
    if args.skip_cifar:
        report["cifar100"] = "skipped (--skip-cifar)"
    else:
        try:
            cf = ex.load_arrays(
                "cifar100", data_dir=args.data_dir, download=args.download, **subsets
            )
        except data.DatasetNotFoundError as err:
            msg = "CIFAR-100 skipped, data not available here: " + " ".join(str(err).split())
            if not args.download:
                msg += " (or pass --download)"
            print(msg, flush=True)
            report["cifar100"] = msg
        else:
            cfg = _train.TrainConfig(epochs=1 if q else 30, batch_size=128, lr=2e-3)
            model = _train.train(cifar_model(key=jax.random.key(0)), *cf, cfg, progress=progress)
            for r in paper.transfer_rows(
                "(iii) CIFAR-100 ResNet + MTJ head", model.model, cf,
                {"table, ideal device": MTJActivation()}, progress=progress,
            ):  # fmt: skip
                rows.append({**r, "paper": PAPER["cifar"], "settings": "GroupNorm ResNet, "
                             f"{cfg.epochs} epochs", "seeds": 1})  # fmt: skip

    report["rows"] = rows
    report["wall_time_s"] = time.time() - t0
    atomic_write_json(out / "paper_reproduction.json", report)
    text = (
        f"# Paper reproduction ({'QUICK smoke run' if q else 'full'}; "
        f"`python scripts/reproduce.py{' --quick' if q else ''}`, "
        f"{report['wall_time_s'] / 60:.1f} min)\n\n" + paper.markdown_table(rows)
    )
    if isinstance(report.get("cifar100"), str):
        text += f"\n{report['cifar100']}\n"
    atomic_write_bytes(out / "paper_reproduction.md", text.encode())
    print(text)
    return report


def s_fmt(ms: dict) -> str:
    return f"{ms['mean']:.2f} ± {ms['std']:.2f}"


if __name__ == "__main__":
    main()
