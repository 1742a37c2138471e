"""Train MLPs with software tanh and/or MTJ neurons in the loop; report test accuracy and gap.

With no flags: Fashion-MNIST, 784-256-10, a software-tanh MLP and an MTJ MLP (device
forward from the paper device's response table, device m_z^2 derivative), same seed; prints
both accuracies and the gap and writes results.json, metrics and training curves to --out.
An existing non-empty --out is refused unless --resume (continue: every setting must match
the checkpoints) or --overwrite (start again); a second run on the same --out is refused.

--devices all (default) trains data-parallel over every JAX device (GPUs, TPU cores, or CPU
devices exposed with XLA_FLAGS=--xla_force_host_platform_device_count=N); --devices N uses
the first N. Multi-host: start one process per host with JAX_COORDINATOR_ADDRESS=host0:port,
JAX_NUM_PROCESSES and JAX_PROCESS_ID set (or under Slurm / Open MPI) and the same flags; the
--out folder must be shared (see README, "GPU/TPU").
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from pathlib import Path

from mtjax import experiments
from mtjax import sharding as _sharding
from mtjax.codesign import VARIABLES
from mtjax.data import DataFormatError, DatasetNotFoundError
from mtjax.fileio import atomic_write_json
from mtjax.nn.activation import DERIVATIVES, MODES
from mtjax.train import LOCK_NAME, CheckpointError, RunFolderError, plot_history, run_folder

#: dataset -> (flattened input size, classes)
DATA_SHAPES = {"fashion_mnist": (784, 10), "cifar100": (3072, 100)}


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in text.split("-"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 784-256-10, got {text!r}") from None
    if len(sizes) < 2 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"need at least two sizes >= 1, got {text!r}")
    return sizes


def _nonneg(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be >= 0 and finite, got {text}")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32), got {text}")
    return value


def _devices(text: str) -> int | str:
    if text == "all":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all' or a count >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 'all' or a count >= 1, got {text!r}")
    return value


def _design_vars(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in VARIABLES]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown design quantities {bad or text!r}; choose from {', '.join(VARIABLES)}"
        )
    return names


def _device_override(text: str):
    try:
        return experiments.parse_device_override(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="fashion_mnist", choices=experiments.DATASETS)
    ap.add_argument("--data-dir", default=None, help="folder with the raw dataset files")
    ap.add_argument(
        "--download", action="store_true",
        help="download the original files of a dataset not found locally (checksums verified)",
    )  # fmt: skip
    ap.add_argument(
        "--model", type=_sizes, default=None,
        help="MLP sizes (default 784-256-10; cifar100: 3072-256-100)",
    )  # fmt: skip
    ap.add_argument("--activation", default="both", choices=("tanh", "mtj", "both"))
    ap.add_argument("--mode", default=None, choices=MODES, help="MTJ model (default table)")
    ap.add_argument("--derivative", default="mz2", choices=DERIVATIVES)
    ap.add_argument("--epochs", type=_positive_int, default=10)
    ap.add_argument("--batch-size", type=_positive_int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=_seed, default=0)
    ap.add_argument(
        "--device", type=_device_override, action="append", default=[], metavar="NAME=VALUE",
        help="nominal device: override a DeviceParams.paper field, repeatable, e.g. "
        "--device xi1=0.3 --device hk=8e3 --device h_bias=0,0,4e3 (SI units)",
    )  # fmt: skip
    ap.add_argument("--variation", type=_nonneg, default=0.0, help="relative device spread")
    ap.add_argument("--read-noise", type=_nonneg, default=0.0, help="std, normalized signal")
    ap.add_argument(
        "--temperature", type=_nonneg, default=0.0,
        help="K; > 0 makes the neurons thermal (--mode thermal by default; sde: the reference)",
    )  # fmt: skip
    ap.add_argument(
        "--train-device", type=_design_vars, default=(),
        help="co-design: comma-separated free device quantities of the MTJ network, e.g. "
        f"diameter,pulse_duration (any of {', '.join(VARIABLES)}); trained with the weights",
    )  # fmt: skip
    ap.add_argument("--design-lr", type=float, default=0.05, help="Adam lr of the design")
    ap.add_argument(
        "--design-every", type=_positive_int, default=1,
        help="co-design: rebuild the tables and update the design every N steps (1: every)",
    )  # fmt: skip
    ap.add_argument("--train-subset", type=_positive_int, default=None)
    ap.add_argument(
        "--devices", type=_devices, default="all",
        help="'all' (default) or N: data-parallel over all / the first N JAX devices; "
        "--batch-size must be a multiple of the count",
    )  # fmt: skip
    ap.add_argument("--out", default=None, help="output folder (default runs/<timestamp>)")
    ap.add_argument("--resume", action="store_true", help="continue the runs in --out")
    ap.add_argument("--overwrite", action="store_true", help="start again in a used --out")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if not (math.isfinite(args.lr) and args.lr > 0):
        ap.error(f"--lr must be > 0 and finite, got {args.lr}")
    if not (math.isfinite(args.design_lr) and args.design_lr > 0):
        ap.error(f"--design-lr must be > 0 and finite, got {args.design_lr}")
    if args.train_device and args.activation == "tanh":
        ap.error("--train-device needs MTJ neurons (--activation mtj or both)")
    if args.temperature > 0 and args.mode not in (None, "sde", "thermal"):
        ap.error(f"--temperature needs a thermal mode (thermal or sde), not --mode {args.mode}")
    args.mode = args.mode or ("thermal" if args.temperature > 0 else "table")
    try:
        experiments.RunSpec(device=tuple(args.device), temperature=args.temperature)
    except ValueError as err:
        ap.error(f"--device: {err}")
    n_in, n_out = DATA_SHAPES[args.dataset]
    args.model = args.model or (n_in, 256, n_out)
    if args.model[0] != n_in or args.model[-1] != n_out:
        ap.error(f"--model for {args.dataset} must start with {n_in} and end with {n_out}")
    if args.resume and args.out is None:
        ap.error("--resume needs --out")
    if args.resume and args.overwrite:
        ap.error("--resume and --overwrite exclude each other")
    args.out = args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}"
    _check_out(ap, Path(args.out), args.resume or args.overwrite)
    return args


def _check_out(ap: argparse.ArgumentParser, out: Path, reuse: bool) -> None:
    """--out must be (or become) a writable folder, empty unless --resume/--overwrite."""
    if out.exists() and not out.is_dir():
        ap.error(f"--out {out} exists and is not a folder")
    place = out
    while not place.exists():
        place = place.parent
    if not place.is_dir():
        ap.error(f"--out {out}: {place} is not a folder")
    if not os.access(place, os.W_OK | os.X_OK):
        ap.error(f"--out {out}: cannot write in {place}")
    held = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME) if out.is_dir() else []
    if held and not reuse:
        ap.error(
            f"--out {out} already holds a run ({', '.join(held[:3])}); pass --resume to "
            "continue it or --overwrite to start again"
        )


def main(argv=None) -> dict:
    try:  # multi-host: before anything starts JAX
        _sharding.initialize_distributed()
    except ValueError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    args = parse_args(argv)
    out = Path(args.out)
    try:
        mesh = _sharding.data_mesh(args.devices)
    except ValueError as err:
        print(f"train.py: error: --{err}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.batch_size % mesh.size:
        print(
            f"train.py: error: --batch-size {args.batch_size} must be a multiple of the "
            f"{mesh.size} devices (--devices)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    try:
        with run_folder(out, resume=args.resume, overwrite=args.overwrite):
            if args.overwrite and _sharding.is_primary():
                for name in ("results.json", "training_curves.png"):
                    (out / name).unlink(missing_ok=True)
            return run_all(args, out, mesh)
    except (RunFolderError, CheckpointError, DatasetNotFoundError, DataFormatError) as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def run_all(args: argparse.Namespace, out: Path, mesh=None) -> dict:
    """Train the activations of ``args`` in ``out/<kind>`` on ``mesh``; write results.json
    (process 0 of a multi-host run writes the files and prints); the report."""
    primary = _sharding.is_primary()
    say = print if primary else (lambda *a, **k: None)
    train_data, test_data = experiments.load_arrays(
        args.dataset, data_dir=args.data_dir, train_subset=args.train_subset,
        download=args.download,
    )  # fmt: skip
    base = experiments.RunSpec(
        dataset=args.dataset, sizes=args.model, mode=args.mode, derivative=args.derivative,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        variation=args.variation, read_noise=args.read_noise, temperature=args.temperature,
        train_subset=args.train_subset, design_lr=args.design_lr,
        design_every=args.design_every, device=tuple(args.device),
    )  # fmt: skip
    kinds = ("tanh", "mtj") if args.activation == "both" else (args.activation,)
    results, histories = {}, {}
    for kind in kinds:
        designed = args.train_device if kind == "mtj" else ()
        spec = dataclasses.replace(base, activation=kind, train_device=designed)
        summary, res = experiments.run(
            spec, train_data, test_data, out_dir=out / kind, resume=args.resume,
            overwrite=args.overwrite, progress=primary and not args.no_progress,
            mesh=mesh,
        )  # fmt: skip
        summary["devices"] = mesh.size
        results[kind], histories[kind] = summary, res.history
        if primary:
            plot_history(res.history, out / kind / "training_curves.png")
        say(f"{kind}: test accuracy {100 * summary['test_accuracy']:.2f} %", flush=True)
    report = {"results": results}
    if len(kinds) == 2:
        gap = results["tanh"]["test_accuracy"] - results["mtj"]["test_accuracy"]
        report["gap_pp"] = 100 * gap
        say(f"gap (software - MTJ): {100 * gap:+.2f} percentage points")
    if primary:
        experiments.plot_curves(histories, out / "training_curves.png")
        atomic_write_json(out / "results.json", report)
        say(f"wrote {out / 'results.json'}")
    return report


if __name__ == "__main__":
    main()
