"""How small can the neuron be? Accuracy vs device diameter at a finite temperature.

For each free-layer diameter (disk, thickness and pulse unchanged, the driver calibrated to
the device: input_scale = current_scale), 784-256-10 MLPs on Fashion-MNIST with "thermal"
neurons: (a) software-trained weights deployed on the thermal neurons, (b) networks trained
with the thermal neurons in the loop. Test accuracy per (training seed, noise key); gaps to
the same seed's software network. `scripts/device_size.py` runs it and writes results/.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtjax import train as _train
from mtjax.constants import GAMMA0, KB, MU0
from mtjax.experiments import accuracies_over_keys
from mtjax.nn import MLP, MTJActivation, deploy
from mtjax.params import DeviceParams


def thermal_std_at_zero(params: DeviceParams) -> float:
    """Small-noise std of m_x after one pulse at z = 0: sqrt(2 D tau / (1 + alpha^2)),
    D = alpha gamma0 kB T / (mu0 Ms V)."""
    d = params.alpha * GAMMA0 * KB * params.temperature / (MU0 * params.Ms * params.volume)
    return float(jnp.sqrt(2 * d * params.pulse_duration / (1 + params.alpha**2)))


def device(diameter: float, temperature: float) -> DeviceParams:
    return DeviceParams.paper(diameter_x=diameter, diameter_y=diameter, temperature=temperature)


def size_study(
    data,
    diameters: Sequence[float] = (10e-9, 15e-9, 20e-9, 30e-9, 50e-9, 100e-9),
    *,
    seeds: Sequence[int] = (0, 1, 2),
    n_keys: int = 5,
    temperature: float = 300.0,
    sizes: tuple[int, ...] = (784, 256, 10),
    config: _train.TrainConfig | None = None,
    progress: bool = False,
    log=print,
) -> dict[str, Any]:
    """Accuracies of deployed and thermal-trained networks per diameter; see the module doc.

    Returns a JSON-able dict: per diameter the thermal std of m_x at z = 0 (small-noise
    formula and the thermal table's value), accuracies [seed][key] for "deployed" and
    "trained", and the software accuracy per seed."""
    config = config or _train.TrainConfig(epochs=10, batch_size=128, lr=1e-3)
    train_data, test_data = data
    out: dict[str, Any] = {
        "diameters_m": [float(d) for d in diameters], "seeds": list(seeds), "n_keys": n_keys,
        "temperature_K": temperature, "sizes": list(sizes), "config": config.to_json(),
        "software": [], "devices": {},
    }  # fmt: skip
    acts = {}
    for d in diameters:
        p = device(d, temperature)
        act = MTJActivation(p, mode="thermal", thermal_std_limit=None)  # 10 nm: indicative
        s1 = float(jnp.asarray(act.table.coef)[..., 4, 0][act.grid.locate(jnp.zeros(()))[0]])
        acts[d] = act
        out["devices"][f"{d * 1e9:g}"] = {
            "diameter_m": float(d), "std_mx_z0_formula": thermal_std_at_zero(p),
            "std_mx_z0_table": s1, "deployed": [], "trained": [],
        }  # fmt: skip
    for seed in seeds:
        cfg = _train.TrainConfig(**{**config.to_json(), "seed": seed, "optimizer": "adam"})
        k_model = jax.random.key(seed)
        software = _train.train(
            MLP(sizes, jnp.tanh, key=k_model), train_data, test_data, cfg, progress=progress
        )
        out["software"].append(software.test_accuracy)
        log(f"seed {seed}: software {100 * software.test_accuracy:.2f} %")
        for d, act in acts.items():
            row = out["devices"][f"{d * 1e9:g}"]
            row["deployed"].append(
                accuracies_over_keys(deploy(software.model, act), test_data, n_keys, seed=seed)
            )
            res = _train.train(
                MLP(sizes, act, key=k_model), train_data, test_data, cfg, progress=progress
            )
            row["trained"].append(accuracies_over_keys(res.model, test_data, n_keys, seed=seed))
            log(
                f"  {d * 1e9:g} nm: deployed {100 * np.mean(row['deployed'][-1]):.2f} %, "
                f"trained {100 * np.mean(row['trained'][-1]):.2f} %"
            )
    summarize(out)
    return out


def summarize(out: dict[str, Any], threshold_pp: float = 0.1) -> None:
    """Add per-diameter gaps (pp, mean +- std over seeds of the per-seed mean over keys; and
    the key-to-key std) and the smallest diameter whose mean gap <= `threshold_pp`."""
    sw = 100 * np.asarray(out["software"])
    out["smallest_within_pp"] = {"threshold_pp": threshold_pp}
    for kind in ("deployed", "trained"):
        ok = []
        for row in out["devices"].values():
            acc = 100 * np.asarray(row[kind])  # (seeds, keys)
            gaps = sw - acc.mean(axis=1)
            row[f"{kind}_pp"] = {
                "mean": float(acc.mean()), "std_over_seeds": float(acc.mean(1).std(ddof=1))
                if len(acc) > 1 else 0.0, "std_over_keys": float(acc.std(axis=1, ddof=1).mean()),
            }  # fmt: skip
            row[f"{kind}_gap_pp"] = {
                "mean": float(gaps.mean()),
                "std": float(gaps.std(ddof=1)) if len(gaps) > 1 else 0.0,
            }
            if gaps.mean() <= threshold_pp:
                ok.append(row["diameter_m"])
        out["smallest_within_pp"][kind] = min(ok) if ok else None
