"""Energy and latency of the paper device (the numbers of README's "Energy and latency").

Per activation at z = 0, 1, 3, 6 (write, read, reset, total, latency, residual reset angle,
reset current, read disturb) for three reset models; then a software-tanh 784-256-10 MLP is
trained on Fashion-MNIST, its weights are deployed onto paper-device MTJ neurons (table mode,
no retraining) and the energy per inference is measured over the test images, next to both
accuracies. Writes <out>/energy.json. --quick: small subsets, 1 epoch (smoke run).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from mtjax import DeviceParams, current_scale
from mtjax import energy as E
from mtjax import experiments as ex
from mtjax import train as _train
from mtjax.fileio import atomic_write_json
from mtjax.nn import MTJActivation, deploy

Z_POINTS = (0.0, 1.0, 3.0, 6.0)
#: Published activation-unit figures (order-of-magnitude comparison; other technologies).
LITERATURE = [
    {
        "what": "SV/MTJ spiking neuron (LLGS model)",
        "figure": "power as low as 50 uW at a ~1 ns time scale, i.e. ~50 fJ per 1 ns event",
        "energy_J": 50e-6 * 1e-9,
        "citation": "S. Louis et al., Spintronic Neuron Using a Magnetic Tunnel Junction for "
        "Low-Power Neuromorphic Computing, arXiv:2409.09268",
    },
    {
        "what": "domain-wall MTJ FitzHugh-Nagumo spiking neuron",
        "figure": "as low as 9 fJ per spike",
        "energy_J": 9e-15,
        "citation": "A. H. Lone et al., Spintronic FitzHugh-Nagumo spiking neuron device for "
        "spiking neural networks, doi:10.1063/5.0263130",
    },
]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results", help="output folder (default results/)")
    ap.add_argument("--epochs", type=int, default=10, help="software MLP epochs (>= 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None, help="raw Fashion-MNIST folder")
    ap.add_argument("--quick", action="store_true", help="smoke run: small subsets, 1 epoch")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.epochs < 1:
        ap.error("--epochs must be >= 1")
    return args


def _fields(e: E.EnergyBreakdown) -> dict[str, float]:
    names = ("write", "read", "reset", "total", "latency", "residual_angle", "reset_current",
             "read_disturb")  # fmt: skip
    return {n: float(getattr(e, n)) for n in names}


def per_activation(params: DeviceParams) -> dict:
    """Breakdown at `Z_POINTS` for the default, adaptive and 5 ns reset models."""
    i_s = float(current_scale(params))
    resets = {
        "fixed, 1 ns (default)": E.ResetModel(),
        "adaptive, 1 ns": E.ResetModel(adaptive=True),
        "fixed, 5 ns": E.ResetModel(5e-9),
    }
    out = {"input_scale_A": i_s, "z": list(Z_POINTS), "resets": {}}
    for label, reset in resets.items():
        rows = [_fields(E.activation_energy(params, z * i_s, reset=reset)) for z in Z_POINTS]
        out["resets"][label] = rows
    return out


def network(args, params: DeviceParams) -> dict:
    subsets = dict(train_subset=3000, test_subset=500) if args.quick else {}
    fm = ex.load_arrays("fashion_mnist", data_dir=args.data_dir, **subsets)
    spec = ex.RunSpec(
        sizes=(784, 256, 10), activation="tanh", epochs=1 if args.quick else args.epochs,
        seed=args.seed, **subsets,
    )  # fmt: skip
    summary, result = ex.run(spec, *fm, progress=not args.no_progress)
    software = result.model
    act = MTJActivation(params)  # table mode, input_scale = I_s of the device
    mtj = deploy(software, act)
    x_test, y_test = fm[1]
    _, acc_mtj = _train.evaluate(mtj, x_test, y_test, 1000)
    out = {
        "model": "784-256-10 MLP, software tanh training, deployed onto paper-device neurons "
        "(table mode, no retraining)",
        "epochs": spec.epochs,
        "seed": spec.seed,
        "n_test": int(len(x_test)),
        "software_accuracy": float(summary["test_accuracy"]),
        "mtj_accuracy": float(acc_mtj),
    }
    z = jax.vmap(lambda x: software.layers[0](jnp.ravel(x)))(jnp.asarray(x_test))
    out["preactivation"] = {
        "mean_abs_z": float(jnp.mean(jnp.abs(z))),
        "rms_z": float(jnp.sqrt(jnp.mean(z * z))),
        "fraction_clipped": float(jnp.mean(jnp.abs(z) > act.z_max)),
    }
    out["per_inference"] = {}
    for label, reset in {"fixed, 1 ns (default)": E.ResetModel(),
                         "adaptive, 1 ns": E.ResetModel(adaptive=True),
                         "fixed, 5 ns": E.ResetModel(5e-9)}.items():  # fmt: skip
        ne = E.network_energy(mtj, x_test, reset=reset, batch_size=1000)
        out["per_inference"][label] = {
            "total_J": float(ne.total), "total_std_J": float(ne.total_std),
            "write_J": float(ne.write), "read_J": float(ne.read), "reset_J": float(ne.reset),
            "per_neuron_J": float(ne.total) / ne.n_neurons, "latency_s": float(ne.latency),
            "n_neurons": ne.n_neurons,
        }  # fmt: skip
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.time()
    params = DeviceParams.paper()
    report = {
        "device": "DeviceParams.paper() (50 nm disk, RA 5 Ohm um^2, TMR 100 %, tau 1 ns)",
        "read": {"v_read_V": E.DEFAULT_V_READ, "t_read_s": E.DEFAULT_T_READ},
        "reset_model": "P2 pulse sized to bring the equator to 0.01 rad of +z "
        f"(u_r = ln(1/tan(0.005)) = {math.log(1 / math.tan(0.005)):.3f})",
        "per_activation": per_activation(params),
        "literature": LITERATURE,
        "quick": args.quick,
    }
    report["network"] = network(args, params)
    report["wall_time_s"] = time.time() - t0
    path = atomic_write_json(Path(args.out) / "energy.json", report)
    _print(report)
    print(f"wrote {path}")
    return report


def _print(report: dict) -> None:
    pa = report["per_activation"]
    for label, rows in pa["resets"].items():
        print(f"reset {label}:")
        for z, r in zip(pa["z"], rows, strict=True):
            print(
                f"  z={z:g}: write {r['write'] * 1e15:.1f} fJ, read {r['read'] * 1e15:.2f} fJ, "
                f"reset {r['reset'] * 1e15:.1f} fJ, total {r['total'] * 1e15:.1f} fJ, "
                f"latency {r['latency'] * 1e9:.1f} ns, residual {r['residual_angle']:.4f} rad"
            )
    net = report["network"]
    print(f"accuracy: software {net['software_accuracy']:.4f}, MTJ {net['mtj_accuracy']:.4f}")
    for label, r in net["per_inference"].items():
        print(
            f"per inference ({label}): {r['total_J'] * 1e12:.2f} +- {r['total_std_J'] * 1e12:.2f} "
            f"pJ, latency {r['latency_s'] * 1e9:.1f} ns"
        )


if __name__ == "__main__":
    main()
