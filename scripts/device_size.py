"""How small can the MTJ neuron be? Accuracy vs diameter at 300 K (Fashion-MNIST, 784-256-10).

Writes results/device_size.json, device_size.md and device_size.png. --quick: tiny subsets,
1 epoch, 2 diameters, 1 seed, 2 keys (a smoke test; numbers meaningless).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from mtjax import experiments, plot
from mtjax import train as _train
from mtjax.fileio import atomic_write_bytes, atomic_write_json
from mtjax.size_study import size_study


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--keys", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    q = args.quick
    subsets = dict(train_subset=1000, test_subset=500) if q else {}
    data = experiments.load_arrays("fashion_mnist", **subsets)
    t0 = time.time()
    out = size_study(
        data,
        (10e-9, 50e-9) if q else (10e-9, 15e-9, 20e-9, 30e-9, 50e-9, 100e-9),
        seeds=range(1 if q else args.seeds),
        n_keys=2 if q else args.keys,
        config=_train.TrainConfig(epochs=1 if q else args.epochs, batch_size=128, lr=1e-3),
        progress=not args.no_progress,
    )
    out["quick"] = q
    out["wall_time_s"] = time.time() - t0
    folder = Path(args.out)
    atomic_write_json(folder / "device_size.json", out)
    sw = 100 * np.asarray(out["software"])
    lines = [
        f"# Device size at {out['temperature_K']:g} K (`python scripts/device_size.py"
        f"{' --quick' if q else ''}`, {out['wall_time_s'] / 60:.1f} min)",
        "",
        f"Software tanh: {sw.mean():.2f} ± {sw.std(ddof=1) if len(sw) > 1 else 0:.2f} % "
        f"({len(sw)} seeds). Accuracy: mean over seeds x {out['n_keys']} noise keys; gap: "
        "software − MTJ per seed, mean ± std over seeds.",
        "",
        "| diameter (nm) | std m_x at z=0 | deployed (%) | gap (pp) | trained (%) | gap (pp) |",
        "|---|---|---|---|---|---|",
    ]
    series = {"deployed (software weights)": [], "trained with thermal neurons": []}
    for name, row in out["devices"].items():
        dep, tr = row["deployed_pp"], row["trained_pp"]
        lines.append(
            f"| {name} | {row['std_mx_z0_table']:.3f} | {dep['mean']:.2f} ± "
            f"{dep['std_over_seeds']:.2f} | {row['deployed_gap_pp']['mean']:.2f} ± "
            f"{row['deployed_gap_pp']['std']:.2f} | {tr['mean']:.2f} ± {tr['std_over_seeds']:.2f}"
            f" | {row['trained_gap_pp']['mean']:.2f} ± {row['trained_gap_pp']['std']:.2f} |"
        )
        for label, r in zip(series, (dep, tr), strict=True):
            series[label].append((row["diameter_m"] * 1e9, r["mean"], r["std_over_seeds"]))
    small = out["smallest_within_pp"]
    fmt = lambda d: "none" if d is None else f"{d * 1e9:g} nm"
    lines += [
        "",
        f"Smallest diameter with mean gap <= {small['threshold_pp']} pp: deployed "
        f"{fmt(small['deployed'])}, trained {fmt(small['trained'])}.",
    ]
    text = "\n".join(lines) + "\n"
    atomic_write_bytes(folder / "device_size.md", text.encode())
    ax = plot.energy_accuracy(series, xlabel="free-layer diameter (nm)")
    ax.axhline(sw.mean(), color="k", ls="--", lw=1, label="software tanh")
    ax.legend(fontsize="small")
    plot.save(ax, folder / "device_size.png")
    print(text)
    return out


if __name__ == "__main__":
    main()
