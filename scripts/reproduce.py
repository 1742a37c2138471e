"""Reproduce the paper's findings (i)-(iii) on Fashion-MNIST (and CIFAR-100 when available).

Each part writes its own files into --out and can run alone (`--only PART`):
curves: finding (i) on the paper and non-ideal devices, device_curves.{json,md,png};
robustness: finding (ii), robustness.{json,md,png}; transfer: finding (iii), software weights
deployed on MTJ neurons (MLP over seeds, small CNN, CIFAR-100 when available),
transfer.{json,md}; kd: the distillation sweep, distillation.{json,md,png}. After any run the
summary paper_reproduction.{md,json} is rebuilt from every part's JSON found in --out, each
listed with the command that wrote it. --quick: tiny subsets and 1 epoch (a smoke test,
numbers meaningless).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax

from mtjax import data, paper
from mtjax import experiments as ex
from mtjax import train as _train
from mtjax.fileio import atomic_write_bytes, atomic_write_json
from mtjax.nn import MTJActivation, SmallCNN, cifar_model, deploy

PAPER = {
    "i": "training with device curves costs ~nothing",
    "ii": "robust to variation and noise",
    "fmnist": "0.1 % loss (FMNIST)",
    "cifar": "2 % loss (CIFAR-100)",
    "kd": "KD supported",
}
#: part -> the JSON it writes (the summary is rebuilt from these).
FILES = {
    "curves": "device_curves.json",
    "robustness": "robustness.json",
    "transfer": "transfer.json",
    "kd": "distillation.json",
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results", help="output folder (default results/)")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny subsets, 1 epoch")
    ap.add_argument("--seeds", type=int, default=5, help="seeds for finding (i) (>= 1)")
    ap.add_argument(
        "--only", default="all", choices=("all", *FILES),
        help="run one part (its files and the rebuilt summary): curves (finding (i)), "
        "robustness (finding (ii)), transfer (finding (iii)), kd (the distillation sweep)",
    )  # fmt: skip
    ap.add_argument("--kd-seeds", type=int, default=3, help="seeds of the KD sweep (>= 1)")
    ap.add_argument(
        "--robustness-seeds", type=int, default=3, help="training seeds for finding (ii) (>= 1)"
    )
    ap.add_argument(
        "--transfer-seeds", type=int, default=3,
        help="software MLPs deployed in finding (iii) (>= 1; the SDE reference uses the first)",
    )  # fmt: skip
    ap.add_argument("--epochs", type=int, default=10, help="MLP epochs (>= 1)")
    ap.add_argument("--data-dir", default=None, help="raw dataset folder (both datasets)")
    ap.add_argument("--skip-cifar", action="store_true")
    ap.add_argument(
        "--download", action="store_true",
        help="download the original files of datasets not found locally (checksums verified)",
    )  # fmt: skip
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    counts = (args.seeds, args.robustness_seeds, args.kd_seeds, args.transfer_seeds, args.epochs)
    if min(counts) < 1:
        ap.error("--seeds, --robustness-seeds, --kd-seeds, --transfer-seeds and --epochs must "
                 "be >= 1")  # fmt: skip
    return args


def _command(args, part: str) -> str:
    """The command that rewrites `part`'s files (with this run's settings)."""
    keep = {"seeds": "curves", "robustness_seeds": "robustness", "transfer_seeds": "transfer",
            "kd_seeds": "kd", "skip_cifar": "transfer", "download": "transfer"}  # fmt: skip
    skip = ["out", "no_progress", "only", "data_dir"]
    skip += [k for k, p in keep.items() if p != part]
    cmd = ex.command_line("scripts/reproduce.py", args, parse_args([]), skip=skip)
    return f"{cmd} --only {part}"


def _kd(args, base, fm, out, cache, progress):
    """The KD sweep (`paper.distill_sweep`): a software teacher, MTJ students."""
    print("KD sweep: temperature x alpha, student width, training length", flush=True)
    teacher = dataclasses.replace(base, sizes=(784, 512, 512, 10), activation="tanh")
    student = dataclasses.replace(base, sizes=(784, 32, 10), activation="mtj")
    grid = {}
    if args.quick:
        grid = dict(temperatures=(2.0, 4.0), alphas=(0.5,), widths=(16, 32), epochs=(1,))
    seeds = list(range(1 if args.quick else args.kd_seeds))
    sweep = paper.distill_sweep(teacher, student, fm, seeds, progress=progress, **grid)
    title = (f"Knowledge distillation (teacher 784-512-512-10 tanh, MTJ student 784-w-10, "
             f"table mode, {base.epochs} teacher epochs)")  # fmt: skip
    _save(out, "kd", sweep, _command(args, "kd"), title, paper.distill_markdown(sweep))
    paper.distill_figure(sweep, out / "distillation.png")


def _software(base, fm, seeds, cache, progress) -> dict:
    """Software tanh MLPs of `base` by seed (trained once per run, shared by the parts)."""
    for seed in seeds:
        if seed not in cache:
            spec = dataclasses.replace(base, activation="tanh", seed=seed)
            cache[seed] = ex.run(spec, *fm, progress=progress)[1].model
    return {s: cache[s] for s in seeds}


def _save(out: Path, part: str, result: dict, command: str, title: str, md: str) -> None:
    """`part`'s JSON (with the command that wrote it) and markdown; prints the markdown."""
    atomic_write_json(out / FILES[part], {"command": command, **result})
    stem = FILES[part].removesuffix(".json")
    atomic_write_bytes(out / f"{stem}.md", f"# {title} (`{command}`)\n\n{md}".encode())
    print(md, flush=True)


def _curves(args, base, fm, out, cache, progress):
    """Finding (i) on the paper and non-ideal devices."""
    print("(i) software vs MTJ-in-the-loop training, paper and non-ideal devices", flush=True)
    devices = paper.CURVE_DEVICES
    if args.quick:
        devices = {k: devices[k] for k in ("paper device", "hk 8e3 A/m")}
    seeds = list(range(1 if args.quick else args.seeds))
    study, software = paper.device_curve_study(base, fm, seeds, devices, progress=progress)
    cache.update(software)
    title = f"Finding (i) on non-ideal devices ({base.sizes}, {base.epochs} epochs)"
    _save(out, "curves", study, _command(args, "curves"), title,
          paper.curve_study_markdown(study))  # fmt: skip
    paper.curve_study_figure(study, out / "device_curves.png")


def _robustness(args, base, fm, out, cache, progress):
    """Finding (ii): variation x read noise, imperfect reset, over training seeds."""
    print("(ii) robustness: variation x read noise, imperfect reset", flush=True)
    q = args.quick
    software = _software(base, fm, range(1 if q else args.robustness_seeds), cache, progress)
    grid = dict(variations=(0.0, 0.1), read_noises=(0.0, 0.05), reset_offsets=(0.1,)) if q else {}
    rob = paper.robustness_study(base, fm, software, progress=progress, **grid)
    title = f"Finding (ii): robustness ({base.sizes}, {base.epochs} epochs)"
    _save(out, "robustness", rob, _command(args, "robustness"), title,
          paper.robustness_markdown(rob))  # fmt: skip
    paper.robustness_heatmap(rob, out / "robustness.png")


def _transfer(args, base, fm, out, cache, progress):
    """Finding (iii): software weights on MTJ neurons, no retraining (MLP over seeds, with
    one fine-tuned variant; small CNN; CIFAR-100 when its data is there)."""
    print("(iii) transfer of software weights to MTJ neurons", flush=True)
    q = args.quick
    software = _software(base, fm, range(1 if q else args.transfer_seeds), cache, progress)
    variants = dict(paper.TRANSFER_VARIANTS)
    sde = "sde, 300 K (reference)"
    if q:
        del variants[sde]  # minutes even on the quick subsets
    ft = dataclasses.replace(base, epochs=1, lr=2e-4)
    result = {"mlp": paper.transfer_study(
        base, fm, software, variants, max_seeds={sde: 1} if sde in variants else None,
        finetune=("table, 10 % variation + 0.05 read noise", ft), progress=progress,
    )}  # fmt: skip
    cnn_cfg = _train.TrainConfig(epochs=1 if q else 3, batch_size=128, lr=2e-3)
    cnn = _train.train(SmallCNN(1, 10, key=jax.random.key(0)), *fm, cnn_cfg, progress=progress)
    result["cnn"] = _deployed("small CNN", cnn.model, fm[1], cnn_cfg.epochs)
    result["cifar100"] = _cifar(args, progress)
    md = paper.markdown_table(_transfer_rows(result))
    title = f"Finding (iii): software weights deployed on MTJ neurons ({base.sizes} MLP)"
    _save(out, "transfer", result, _command(args, "transfer"), title, md)


def _deployed(name: str, model, test_data, epochs: int) -> dict:
    """One software network deployed on ideal table-mode neurons (a `transfer_study`-shaped
    result with one seed)."""
    sw = 100 * _train.evaluate(model, *test_data, 500)[1]
    acc = 100 * _train.evaluate(deploy(model, MTJActivation()), *test_data, 500)[1]
    return {"name": name, "epochs": epochs, "seeds": [0], "software_pp": [sw], "variants": {
        "table, ideal device": {"changes": {}, "seeds": [0], "values_pp": [[acc]]}}}


def _cifar(args, progress):
    """CIFAR-100 (GroupNorm ResNet + MTJ head) when its data can be had, else why not."""
    if args.skip_cifar:
        return "skipped (--skip-cifar)"
    subsets = dict(train_subset=2000, test_subset=500) if args.quick else {}
    try:
        cf = ex.load_arrays("cifar100", data_dir=args.data_dir, download=args.download, **subsets)
    except data.DatasetNotFoundError as err:
        msg = "CIFAR-100 skipped, data not available here: " + " ".join(str(err).split())
        if not args.download:
            msg += " (or pass --download)"
        print(msg, flush=True)
        return msg
    cfg = _train.TrainConfig(epochs=1 if args.quick else 30, batch_size=128, lr=2e-3)
    model = _train.train(cifar_model(key=jax.random.key(0)), *cf, cfg, progress=progress)
    return _deployed("GroupNorm ResNet + MTJ head", model.model, cf[1], cfg.epochs)


def _transfer_rows(result: dict) -> list[dict]:
    rows = [{**r, "paper": PAPER["fmnist"], "settings": "no retraining unless stated"}
            for r in paper.transfer_rows("(iii) FMNIST MLP", result["mlp"])]  # fmt: skip
    rows += [{**r, "paper": PAPER["fmnist"], "settings": f"{result['cnn']['epochs']} epochs"}
             for r in paper.transfer_rows("(iii) FMNIST small CNN", result["cnn"])]  # fmt: skip
    if isinstance(result.get("cifar100"), dict):
        c = result["cifar100"]
        rows += [{**r, "paper": PAPER["cifar"], "settings": f"{c['name']}, {c['epochs']} epochs"}
                 for r in paper.transfer_rows("(iii) CIFAR-100", c)]  # fmt: skip
    return rows


#: part -> summary rows from its JSON.
ROWS = {
    "curves": lambda r: [{**x, "paper": PAPER["i"]} for x in paper.curve_rows(r)],
    "robustness": lambda r: [{**x, "paper": PAPER["ii"]} for x in paper.robustness_rows(r)],
    "transfer": _transfer_rows,
    "kd": lambda r: [{**x, "paper": PAPER["kd"]} for x in paper.distill_rows(r)],
}


def summarize(out: Path) -> dict:
    """Rebuild paper_reproduction.{md,json} from the parts' JSONs found in `out`."""
    rows, sources, notes = [], {}, []
    for part, name in FILES.items():
        path = out / name
        if not path.exists():
            notes.append(f"- {part}: not run yet (`{name}` missing)")
            continue
        try:
            result = json.loads(path.read_text())
            rows += ROWS[part](result)
        except (ValueError, KeyError, TypeError, IndexError) as err:
            raise ValueError(f"{path}: not a {part} result ({err!r}); rerun --only {part}") from err
        sources[part] = {"file": name, "command": result.get("command", "unknown")}
        notes.append(f"- {part}: `{name}`, from `{sources[part]['command']}`")
        if part == "transfer" and isinstance(result.get("cifar100"), str):
            notes.append(f"  - {result['cifar100']}")
    report = {"sources": sources, "rows": rows}
    atomic_write_json(out / "paper_reproduction.json", report)
    text = ("# Paper reproduction (`python scripts/reproduce.py`)\n\nSources:\n"
            + "\n".join(notes) + "\n\n" + paper.markdown_table(rows))  # fmt: skip
    atomic_write_bytes(out / "paper_reproduction.md", text.encode())
    return report


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    q = args.quick
    progress = not args.no_progress
    subsets = dict(train_subset=2000, test_subset=500) if q else {}
    fm = ex.load_arrays("fashion_mnist", data_dir=args.data_dir, download=args.download, **subsets)
    base = ex.RunSpec(sizes=(784, 256, 10), epochs=1 if q else args.epochs, **subsets)
    cache: dict = {}  # software networks by seed, shared by the parts
    run = {"curves": _curves, "robustness": _robustness, "transfer": _transfer, "kd": _kd}
    for part in FILES if args.only == "all" else (args.only,):
        run[part](args, base, fm, out, cache, progress)
    report = summarize(out)
    print((out / "paper_reproduction.md").read_text())
    print(f"wall time {(time.time() - t0) / 60:.1f} min", flush=True)
    return report


if __name__ == "__main__":
    main()
