"""Co-design worked result: a poor device repaired by its design (Fashion-MNIST).

A software-tanh 784-256-10 MLP is trained on real Fashion-MNIST and its weights are deployed
on neurons of a defective device: the paper device with a residual anisotropy hk along z
(default 8e3 A/m), one device shared by the hidden layer. With the weights frozen, only the
design is then trained (`codesign.joint_optimizer` with zero weight updates, every step
live), for three sets of free variables: the driver gain u/z; pulse duration + gain; and
the same plus a bias field (3 components). Controls: the weights retrained on the fixed
device for the same steps, the paper device (hk = 0), and the paper device with its gain
trained the same way (what the gain alone buys without the defect).
Writes <out>/codesign_repair.{json,md,png}.
--quick: small subsets and width (smoke run).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mtjax import DeviceParams, codesign  # noqa: E402
from mtjax import experiments as ex  # noqa: E402
from mtjax import plot as mplot  # noqa: E402
from mtjax import train as _train  # noqa: E402
from mtjax.fileio import atomic_write_bytes, atomic_write_json  # noqa: E402
from mtjax.nn import MTJActivation, deploy  # noqa: E402

# (label, defective device?, free variables); the paper-device row is the control: what the
# driver gain alone buys a device without the defect.
REPAIRS = (
    ("gain", True, ("input_scale",)),
    ("pulse + gain", True, ("pulse_duration", "input_scale")),
    ("pulse + gain + bias field", True, ("pulse_duration", "input_scale", "h_bias")),
    ("gain (control)", False, ("input_scale",)),
)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results")
    ap.add_argument("--quick", action="store_true", help="small subsets and width (smoke run)")
    ap.add_argument("--hk", type=float, default=8e3, help="residual anisotropy along z (A/m)")
    ap.add_argument("--epochs", type=int, default=10, help="software training epochs")
    ap.add_argument("--repair-epochs", type=int, default=2, help="design (or weight) epochs")
    ap.add_argument("--design-lr", type=float, default=0.05)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.epochs < 1 or args.repair_epochs < 1:
        ap.error("--epochs and --repair-epochs must be >= 1")
    if not (np.isfinite(args.hk) and abs(args.hk) <= 1e4):
        ap.error("--hk must be finite with |hk| <= 1e4 A/m (the design box)")
    if not (np.isfinite(args.design_lr) and args.design_lr > 0):
        ap.error("--design-lr must be finite and > 0")
    return args


Z = np.linspace(-3, 3, 241)


def _curve(act: MTJActivation) -> np.ndarray:
    """The noise-free activation of a shared-device layer at Z."""
    return np.asarray(jax.vmap(lambda zi: act(zi[None])[0])(jnp.asarray(Z, jnp.float32)))


def _deviation(act: MTJActivation, gain: float = 1.0) -> float:
    """max |activation(z) - tanh(gain z)| over z in [-3, 3]: the shape error at the drive
    the design chose (gain = u/z; 1 for a driver calibrated to the device)."""
    return float(np.max(np.abs(_curve(act) - np.tanh(gain * Z))))


def _markdown(out: dict, command: str) -> str:
    lines = [
        f"# A poor device repaired by its design (`{command}`, {out['wall_time_s'] / 60:.1f} min)",
        "",
        f"{out['setting']}.",
        "",
        "| neurons | weights | design | gain u/z | test accuracy (%) | max \\|m_x - tanh(gain z)\\|"
        ", z in [-3, 3] |",
        "|---|---|---|---|---|---|",
    ]
    for r in out["rows"]:
        lines.append(
            f"| {r['neurons']} | {r['weights']} | {r['design']} | {r['gain']:.3g} | "
            f"{100 * r['accuracy']:.2f} | {r['deviation']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.time()
    q, progress = args.quick, not args.no_progress
    subsets = dict(train_subset=2000, test_subset=500) if q else {}
    train_data, test_data = ex.load_arrays("fashion_mnist", **subsets)
    sizes = (784, 16, 10) if q else (784, 256, 10)
    software = ex.software_mlp(sizes, train_data, test_data, 1 if q else args.epochs,
                               progress=progress)  # fmt: skip
    paper = DeviceParams.paper(temperature=0.0)
    poor = DeviceParams.paper(hk=args.hk, temperature=0.0)
    epochs = 1 if q else args.repair_epochs

    def row(neurons, weights, design, model, act, gain=1.0, **extra):
        acc = ex.accuracies_over_keys(model, test_data)[0]  # deterministic (T = 0)
        r = dict(neurons=neurons, weights=weights, design=design, accuracy=acc, gain=gain)
        return r | dict(deviation=_deviation(act, gain)) | extra

    paper_act, poor_act = MTJActivation(paper), MTJActivation(poor)
    rows = [
        dict(neurons="software tanh", weights="software", design="-",
             accuracy=software.test_accuracy, gain=1.0, deviation=0.0),
        row("paper device", "software", "paper", deploy(software.model, paper_act), paper_act),
        row(f"hk = {args.hk:g} A/m", "software", "as built", deploy(software.model, poor_act),
            poor_act),
    ]  # fmt: skip
    retrained = _train.train(
        deploy(software.model, poor_act), train_data, test_data,
        _train.TrainConfig(epochs=epochs, batch_size=128, lr=1e-3), progress=progress,
    )  # fmt: skip
    rows.append(row(f"hk = {args.hk:g} A/m", f"retrained {epochs} epochs", "as built",
                    retrained.model, poor_act))  # fmt: skip
    design_only = codesign.joint_optimizer(optax.set_to_zero(), design_lr=args.design_lr)
    curves = {"as built": poor_act}
    for label, defective, free in REPAIRS:
        device = poor if defective else paper
        neurons = f"hk = {args.hk:g} A/m" if defective else "paper device"
        start = codesign.Design(device, codesign.DesignSpace(free))
        layer = codesign.DesignedMTJ(start, mode="table")
        result = _train.train(
            deploy(software.model, layer), train_data, test_data,
            _train.TrainConfig(epochs=epochs, batch_size=128, optimizer=design_only),
            progress=progress, on_step=codesign.DesignSchedule(every=1),
        )  # fmt: skip
        model = codesign.refresh(codesign.set_live(result.model, False))
        after = codesign.designed_layers(model)[0]
        frozen = jax.tree.leaves(eqx.filter(software.model.layers, eqx.is_array))
        moved = jax.tree.leaves(eqx.filter(model.layers, eqx.is_array))
        if not all(bool(jnp.array_equal(a, b)) for a, b in zip(frozen, moved, strict=True)):
            raise RuntimeError("design-only repair changed the weights")
        values = {k: np.asarray(v).tolist() for k, v in after.design.values().items()}
        act = after.template  # the refreshed tables of the final design (no rebuild per call)
        if defective:
            curves[label] = act
        start_values = {k: np.asarray(v).tolist() for k, v in start.values().items()}
        gain = float(after.design.value("input_scale"))
        what = f"{label}, trained {epochs} epochs"
        rows.append(row(neurons, "software (frozen)", what, model, act, gain=gain,
                        values=values, start_values=start_values))  # fmt: skip
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    ax.plot(Z, np.tanh(Z), "k--", lw=1, label="tanh z")
    for label, act in curves.items():
        ax.plot(Z, _curve(act), label=label)
    ax.set_xlabel("pre-activation z")
    ax.set_ylabel("m·p1 after the pulse")
    ax.grid(alpha=0.3)
    ax.set_title(f"m_x after one pulse, hk = {args.hk:g} A/m: as built and repaired")
    ax.legend(fontsize="x-small")
    folder = Path(args.out)
    mplot.save(fig, folder / "codesign_repair.png")
    out = dict(
        setting=f"MLP {'-'.join(map(str, sizes))}, real Fashion-MNIST, software weights "
        f"({1 if q else args.epochs} epochs, seed 0) deployed on one shared device at T = 0 "
        f"(table mode): the paper device with hk = {args.hk:g} A/m along z. Design-only "
        f"repair: weights frozen, Adam at {args.design_lr:g} on the design variables, every "
        f"step live, batch 128",
        rows=rows, hk=args.hk, quick=q, wall_time_s=time.time() - t0,
    )  # fmt: skip
    path = atomic_write_json(folder / "codesign_repair.json", out)
    command = "python scripts/codesign_repair.py" + (" --quick" if q else "")
    atomic_write_bytes(folder / "codesign_repair.md", _markdown(out, command).encode())
    print(_markdown(out, command))
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
