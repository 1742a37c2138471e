"""Co-design worked result: sensitivity of the test loss to the device (Fashion-MNIST).

A software-tanh 784-256-10 MLP is trained on real Fashion-MNIST; its weights are deployed on
MTJ neurons of the paper device at 300 K (thermal mode) with 5 % relative device-to-device
variation (`codesign.DesignedMTJ`, default free variables). `mtjax.sensitivity` then gives
d(test loss)/d ln x for each free variable through the live tables, checks it by a central
finite difference with the same noise keys, and takes a finite step along each gradient to
see whether the measured test loss and accuracy move the predicted way. Writes
<out>/codesign_sensitivity.json and .md. --quick: small subsets and width (smoke run).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import numpy as np

from mtjax import DeviceParams, codesign
from mtjax import experiments as ex
from mtjax.fileio import atomic_write_bytes, atomic_write_json
from mtjax.nn import deploy
from mtjax.sensitivity import design_sensitivity
from mtjax.variation import Spreads, sample_deviations


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results")
    ap.add_argument("--quick", action="store_true", help="small subsets and width (smoke run)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--keys", type=int, default=5, help="noise keys per evaluation")
    ap.add_argument("--variation", type=float, default=0.05, help="relative device spread")
    ap.add_argument("--temperature", type=float, default=300.0)
    ap.add_argument(
        "--grad-examples", type=int, default=None,
        help="test examples for the gradient and finite differences (default all; per-neuron "
        "devices need fewer, see mtjax.sensitivity)",
    )  # fmt: skip
    ap.add_argument(
        "--grad-batch", type=int, default=100,
        help="test examples per batch of the gradient (memory: one table cotangent per "
        "example and key of a batch)",
    )  # fmt: skip
    ap.add_argument("--step", type=float, default=0.1,
                    help="finite step along each gradient, in ln x")  # fmt: skip
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.grad_batch < 1 or not 0 < args.step < 1:
        ap.error("--grad-batch must be >= 1 and --step in (0, 1)")
    if args.grad_examples is not None and args.grad_examples < 1:
        ap.error("--grad-examples must be >= 1")
    if args.epochs < 1 or args.keys < 2:
        ap.error("--epochs must be >= 1 and --keys >= 2")
    if not 0 <= args.variation < 0.5:
        ap.error("--variation must be in [0, 0.5)")
    return args


def _command(args) -> str:
    """The command line that reproduces a run (non-default settings only)."""
    return ex.command_line("scripts/codesign.py", args, parse_args([]))


def _markdown(out: dict, command: str) -> str:
    lines = [
        f"# Design sensitivity (`{command}`, {out['wall_time_s'] / 60:.1f} min)",
        "",
        f"{out['setting']}. Deployed test accuracy {100 * out['test_accuracy']['mean']:.2f} ± "
        f"{100 * out['test_accuracy']['std']:.2f} % ({out['n_keys']} noise keys; software "
        f"{100 * out['software_accuracy']:.2f} %). Loss L: mean test cross-entropy over the "
        f"first {out['grad_examples']} test images and the same keys ({out['test_loss']:.4f}; "
        f"gradient in batches of {out['grad_batch']} with one table pull-back); accuracies over "
        "all test images, changes paired by key (mean ± std over keys).",
        "",
        "| variable | value | dL/d ln x | central FD | step in ln x | test loss change "
        "(predicted) | accuracy change (pp) | loss went down | accuracy went up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in out["variables"].items():
        if "finite_difference" not in r:
            value = np.array2string(np.asarray(r["value"]), precision=4)
            lines.append(f"| {name} | {value} | {r['gradient']} | {r['note']} | | | | | |")
            continue
        acc = r["accuracy_change"]
        lines.append(
            f"| {name} | {r['value']:.4g} | {r['gradient']:+.4g} | {r['finite_difference']:+.4g}"
            f" | {r['step_direction'] * out['step']:+g} | {r['loss_change']:+.3g} "
            f"({r['predicted_loss_change']:+.3g}) | {100 * acc['mean']:+.3f} ± "
            f"{100 * acc['std']:.3f} | {'yes' if r['loss_decreased'] else 'no'} | "
            f"{'yes' if acc['mean'] > 0 else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.time()
    q = args.quick
    subsets = dict(train_subset=2000, test_subset=500) if q else {}
    train_data, test_data = ex.load_arrays("fashion_mnist", **subsets)
    sizes = (784, 16, 10) if q else (784, 256, 10)
    software = ex.software_mlp(
        sizes, train_data, test_data, 1 if q else args.epochs, progress=not args.no_progress
    )
    device = DeviceParams.paper(temperature=args.temperature)
    devs = None
    if args.variation > 0:
        devs = sample_deviations(jax.random.key(1), sizes[1], Spreads.relative(args.variation))
    mode = "thermal" if args.temperature > 0 else "table"
    layer = codesign.DesignedMTJ(codesign.Design(device), deviations=devs, mode=mode, energy=True)
    model = deploy(software.model, layer)
    out = design_sensitivity(
        model, test_data, n_keys=args.keys, grad_examples=args.grad_examples,
        grad_batch=args.grad_batch, step=args.step,
    )  # fmt: skip
    out.update(
        setting=f"MLP {'-'.join(map(str, sizes))}, software weights deployed on {mode} MTJ "
        f"neurons, paper device at {args.temperature:g} K, "
        + (f"{100 * args.variation:g} % " if devs is not None else "")
        + (f"relative variation ({sizes[1]} devices)" if devs is not None else "one shared device")
        + f", free variables {list(codesign.DEFAULT_FREE)}",
        software_accuracy=software.test_accuracy, quick=q, wall_time_s=time.time() - t0,
    )  # fmt: skip
    folder = Path(args.out)
    path = atomic_write_json(folder / "codesign_sensitivity.json", out)
    command = _command(args)
    atomic_write_bytes(folder / "codesign_sensitivity.md", _markdown(out, command).encode())
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
