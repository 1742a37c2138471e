"""Where the "thermal" neuron's Gaussian moment statistics hold: against the SDE reference.

For each device (300 K), 13 inputs z in [-3, 3]: mean, std and correlation of the two
read-outs (m.p1, m.p2) of `MTJActivation(mode="thermal")` against `pulse_ensemble` SDE runs
(Stratonovich Heun, 1 ps steps), N trajectories per point. Writes results/thermal_validity.json
and prints a markdown table. Usage: python scripts/thermal_validity.py [--n 4096] [--out DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import mtjax
from mtjax.fileio import atomic_write_json
from mtjax.nn import MTJActivation

DEVICES = {
    "paper, 50 nm": {},
    "30 nm": {"diameter_x": 30e-9, "diameter_y": 30e-9},
    "20 nm": {"diameter_x": 20e-9, "diameter_y": 20e-9},
    "15 nm": {"diameter_x": 15e-9, "diameter_y": 15e-9},
    "10 nm": {"diameter_x": 10e-9, "diameter_y": 10e-9},
    "xi 0.2, hk 2e3 A/m": {"xi1": 0.2, "hk": 2e3},
}
Z = np.linspace(-3.0, 3.0, 13)


def compare(params, n: int, seed: int) -> dict:
    i_s = float(mtjax.current_scale(params))
    ms = mtjax.pulse_ensemble(
        params, jnp.repeat(jnp.asarray(Z) * i_s, n), key=jax.random.key(seed), steps=1000
    )
    ref = np.asarray(ms).reshape(len(Z), n, 3)[..., [0, 2]]
    act = MTJActivation(params, mode="thermal")
    keys = jax.random.split(jax.random.key(seed + 1), n)
    zz = jnp.broadcast_to(jnp.asarray(Z), (n, len(Z)))
    got = eqx.filter_jit(lambda a, z: jax.vmap(lambda zi, k: jnp.stack(a.read(zi, key=k)))(z, keys))
    got = np.transpose(np.asarray(got(act, zz)), (2, 0, 1))
    se = ref.std(1) / np.sqrt(n)
    mean_err = np.abs(got.mean(1) - ref.mean(1))
    std_rel = np.abs(got.std(1) / ref.std(1) - 1)
    corr = lambda a: np.array([np.corrcoef(a[i].T)[0, 1] for i in range(len(Z))])
    corr_err = np.abs(corr(got) - corr(ref))
    return {
        "std_mx_at_z0": float(ref[len(Z) // 2, :, 0].std()),
        "max_mean_error": mean_err.max(axis=0).tolist(),
        "max_mean_error_in_tolerance": float((mean_err / (3 * se + 2e-3)).max()),
        "max_std_rel_error": std_rel.max(axis=0).tolist(),
        "max_corr_error": float(corr_err.max()),
        "passes": bool(
            np.all(mean_err <= 3 * se + 2e-3) and np.all(std_rel <= 0.1) and corr_err.max() <= 0.1
        ),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096, help="trajectories per point")
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    t0 = time.time()
    rows = {}
    for i, (name, over) in enumerate(DEVICES.items()):
        rows[name] = compare(mtjax.DeviceParams.paper(**over), args.n, 100 * i)
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
