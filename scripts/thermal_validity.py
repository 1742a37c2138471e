"""Where the "thermal" neuron's Gaussian moment statistics hold: against the SDE reference.

For each device (300 K): `mtjax.validity.thermal_vs_sde` (13 inputs z in [-3, 3]; mean, std
and correlation of both read-outs against SDE runs), N trajectories per point. Writes
results/thermal_validity.json and prints a markdown table.
Usage: python scripts/thermal_validity.py [--n 4096] [--out DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import mtjax
from mtjax.fileio import atomic_write_json
from mtjax.validity import thermal_vs_sde

DEVICES = {
    "paper, 50 nm": {},
    "30 nm": {"diameter_x": 30e-9, "diameter_y": 30e-9},
    "20 nm": {"diameter_x": 20e-9, "diameter_y": 20e-9},
    "15 nm": {"diameter_x": 15e-9, "diameter_y": 15e-9},
    "10 nm": {"diameter_x": 10e-9, "diameter_y": 10e-9},
    "xi 0.2, hk 2e3 A/m": {"xi1": 0.2, "hk": 2e3},
}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096, help="trajectories per point")
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    t0 = time.time()
    rows = {}
    for i, (name, over) in enumerate(DEVICES.items()):
        rows[name] = thermal_vs_sde(mtjax.DeviceParams.paper(**over), args.n, 100 * i)
        r = rows[name]
        print(
            f"| {name} | {r['std_mx_at_z0']:.3f} | {r['max_mean_error'][0]:.4f} / "
            f"{r['max_mean_error'][1]:.4f} | {100 * r['max_std_rel_error'][0]:.1f} / "
            f"{100 * r['max_std_rel_error'][1]:.1f} | {r['max_corr_error']:.3f} | "
            f"{'yes' if r['passes'] else 'no'} |",
            flush=True,
        )
    report = {
        "what": "thermal mode (moment tables) vs SDE, 300 K, z in [-3, 3] (13 points)",
        "trajectories_per_point": args.n,
        "criteria": "mean within 3 SE + 2e-3, std within 10 %, correlation within 0.1",
        "devices": rows,
        "wall_time_s": time.time() - t0,
    }
    atomic_write_json(Path(args.out) / "thermal_validity.json", report)
    return report


if __name__ == "__main__":
    main()
