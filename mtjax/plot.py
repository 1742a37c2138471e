"""Figures of mtjax objects (matplotlib).

Every function draws on the given Axes, or, with `ax=None`, on a new pyplot-free figure
(`mtjax.fileio.new_figure`: no global state, works headless and in threads), and returns the
Axes (a pair or list for multi-panel plots). In a notebook either pass axes from
`plt.subplots()` or show a returned figure with `display(ax.figure)`. `save` writes a PNG
atomically. Axis labels carry units; normalized read-outs m.p are dimensionless.

Noise bands and histograms are Monte Carlo over `samples` keys split from `key`
(mean +- std), so they work for any stochastic source: thermal field ("sde" mode or a
thermal `DeviceParams` run) and read noise.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike, Float, PRNGKeyArray

from mtjax.analytic import current_scale
from mtjax.fileio import new_figure, save_figure
from mtjax.nn.activation import MTJActivation
from mtjax.params import SCALAR_FIELDS, VECTOR_FIELDS, DeviceParams
from mtjax.readout import response_curves
from mtjax.solve import Trajectory

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "accuracy_curves",
    "curve_study",
    "energy_accuracy",
    "population",
    "readout_histogram",
    "response",
    "robustness_heatmap",
    "robustness_heatmaps",
    "save",
    "sweep",
    "training_curves",
    "trajectory_sphere",
]

X_AXES = ("z", "current")
XLABELS = {"z": "input z = I / I_s (dimensionless)", "current": "P1 current I (µA)"}
READOUT_LABEL = "normalized read-out m·p (dimensionless)"
DERIVATIVE_SIGNALS = ("mz", "mz2")
DEFAULT_Z = np.linspace(-3.0, 3.0, 121)


# --------------------------------------------------------------------------- helpers


def _axes(ax, figsize=(5.0, 3.6)):
    if ax is not None:
        return ax
    return new_figure(figsize=figsize, layout="constrained").subplots()


def _axes_list(axes, n: int, figsize, name: str = "axes") -> list:
    if axes is None:
        fig = new_figure(figsize=figsize, layout="constrained")
        return list(np.atleast_1d(fig.subplots(1, n)))
    axes = list(np.ravel(np.asarray(axes, dtype=object)))
    if len(axes) != n:
        raise ValueError(f"{name}: expected {n} Axes, got {len(axes)}")
    return axes


def _z_grid(z) -> np.ndarray:
    z = np.asarray(DEFAULT_Z if z is None else z, dtype=np.float64)
    if z.ndim != 1 or z.size < 2 or not np.all(np.isfinite(z)):
        raise ValueError(f"z: expected a finite 1-D grid of >= 2 inputs, got shape {z.shape}")
    return z


def _check_x(x: str) -> None:
    if x not in X_AXES:
        raise ValueError(f"x: choose from {X_AXES}, got {x!r}")


def _x_values(z: np.ndarray, x: str, input_scale) -> np.ndarray:
    return z if x == "z" else z * float(input_scale) * 1e6


def _check_single(params: DeviceParams, name: str = "params") -> None:
    if not isinstance(params, DeviceParams):
        raise TypeError(f"{name}: expected DeviceParams, got {type(params).__name__}")
    if params.batch_shape != ():
        raise ValueError(f"{name}: expected one device, got batch shape {params.batch_shape}")


def _keys(key, samples: int, what: str):
    if key is None:
        raise ValueError(f"key: {what} needs a PRNG key (Monte Carlo samples)")
    if int(samples) != samples or samples < 2:
        raise ValueError(f"samples: must be an integer >= 2, got {samples!r}")
    return jax.random.split(key, int(samples))


@eqx.filter_jit
def _act_samples(act: MTJActivation, z, keys):
    return jax.vmap(lambda k: jnp.stack(act.read(z, key=k), axis=-1))(keys)


def _act_single(act: MTJActivation, name: str = "device") -> None:
    if act.n_devices is not None:
        raise ValueError(
            f"{name}: MTJActivation with {act.n_devices} per-neuron devices; "
            "use mtjax.plot.population for device populations"
        )


def _readouts(device, z: np.ndarray, key, samples: int, input_scale=None):
    """(values (S, n, 2), input scale (A)) of one device at inputs z; S = 1 without key."""
    if isinstance(device, MTJActivation):
        _act_single(device)
        if input_scale is not None:
            raise ValueError("input_scale: an MTJActivation uses its own input_scale")
        zz = jnp.asarray(z, dtype=jnp.result_type(float))
        if key is None:
            vals = jnp.stack(device.read(zz), axis=-1)[None]
        else:
            vals = _act_samples(device, zz, _keys(key, samples, "noise bands"))
        return np.asarray(vals), device.input_scale
    _check_single(device, "device")
    scale = current_scale(device) if input_scale is None else _positive_scale(input_scale)
    currents = jnp.asarray(z * float(scale), dtype=jnp.result_type(float))
    if key is None:
        return np.asarray(response_curves(device, currents))[None], scale
    _keys(key, samples, "noise bands")
    tiled = jnp.tile(currents, int(samples))
    vals = response_curves(device, tiled, key=key).reshape(int(samples), z.size, 2)
    return np.asarray(vals), scale


def _positive_scale(input_scale) -> float:
    s = float(input_scale)
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"input_scale: must be finite and > 0 (A), got {input_scale!r}")
    return s


def _check_derivative(derivative: str) -> None:
    if derivative not in DERIVATIVE_SIGNALS:
        raise ValueError(f"derivative: choose from {DERIVATIVE_SIGNALS}, got {derivative!r}")


def _signal2(vals: np.ndarray, derivative: str) -> np.ndarray:
    return vals[..., 1] ** 2 if derivative == "mz2" else vals[..., 1]


def _references(ax, xs, z, which=("p1", "p2"), derivative="mz", **kw) -> None:
    sech = 1 / np.cosh(z)
    style = dict(color="0.3", linestyle="--", linewidth=1.0) | kw
    if "p1" in which:
        ax.plot(xs, np.tanh(z), label="tanh(z)", **style)
    if "p2" in which:
        if derivative == "mz2":
            ax.plot(xs, sech**2, label="sech²(z)", **(style | {"linestyle": ":"}))
        else:
            ax.plot(xs, sech, label="sech(z)", **(style | {"linestyle": ":"}))


def _p2_label(derivative: str) -> str:
    return "(m·p2)²" if derivative == "mz2" else "m·p2"


# --------------------------------------------------------------------------- device


def response(
    device: DeviceParams | MTJActivation,
    ax: Axes | None = None,
    *,
    z: Float[ArrayLike, " n"] | None = None,
    x: str = "z",
    derivative: str = "mz",
    key: PRNGKeyArray | None = None,
    samples: int = 32,
    input_scale: float | None = None,
    reference: bool = True,
    label: str | None = None,
) -> Axes:
    """m.p1 and m.p2 (or (m.p2)² with `derivative="mz2"`) after one pulse against the input,
    with the tanh(z) and sech(z) (sech²) references.

    `device`: one `DeviceParams` (P1 current z * input_scale, default I_s =
    `current_scale(device)`; ODE solve) or an `MTJActivation` with one shared device (its
    `read`, current z * its input_scale). `x`: "z" (dimensionless input) or "current" (P1
    current in µA). With `key`, the curves are the mean over `samples` Monte Carlo
    evaluations with a +-1 std band (thermal field for `DeviceParams`; the activation's own
    noise: "sde" mode, read noise). Lines, in order: m.p1, tanh, m.p2, sech (references
    only if `reference`)."""
    _check_x(x)
    _check_derivative(derivative)
    z = _z_grid(z)
    vals, scale = _readouts(device, z, key, samples, input_scale)
    xs = _x_values(z, x, scale)
    ax = _axes(ax)
    prefix = f"{label}: " if label else ""
    sigs = (vals[..., 0], _signal2(vals, derivative))
    names = ("m·p1", _p2_label(derivative))
    for i, (sig, name) in enumerate(zip(sigs, names, strict=True)):
        mean = sig.mean(axis=0)
        (line,) = ax.plot(xs, mean, color=f"C{i}", label=prefix + name)
        if key is not None:
            std = sig.std(axis=0, ddof=1)
            ax.fill_between(
                xs, mean - std, mean + std, color=line.get_color(), alpha=0.25, linewidth=0,
                label=f"{prefix}{name} ± 1 std ({sig.shape[0]} samples)",
            )  # fmt: skip
        if reference:
            _references(ax, xs, z, which=("p1",) if i == 0 else ("p2",), derivative=derivative)
    ax.set_xlabel(XLABELS[x])
    ax.set_ylabel(READOUT_LABEL)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return ax


def population(
    devices: DeviceParams | MTJActivation,
    ax: Axes | None = None,
    *,
    nominal: DeviceParams | None = None,
    z: Float[ArrayLike, " n"] | None = None,
    x: str = "z",
    which: str = "p1",
    input_scale: float | None = None,
    reference: bool = True,
) -> Axes:
    """One faint m.p1 (or m.p2, `which="p2"`) curve per device of a population, the
    `nominal` device highlighted.

    `devices`: a 1-D batch of `DeviceParams` (e.g. `mtjax.sample_devices`) or an
    `MTJActivation` with per-neuron devices (noise-free read). All devices get the same
    current z * input_scale: default `current_scale(nominal)` (mean over the batch without
    `nominal`; the activation's `input_scale`). Lines: one per device, then nominal, then
    the reference (tanh or sech)."""
    _check_x(x)
    if which not in ("p1", "p2"):
        raise ValueError(f"which: choose 'p1' or 'p2', got {which!r}")
    z = _z_grid(z)
    col = 0 if which == "p1" else 1
    if nominal is not None:
        _check_single(nominal, "nominal")
    if isinstance(devices, MTJActivation):
        if devices.n_devices is None:
            raise ValueError("devices: MTJActivation with one shared device; use plot.response")
        scale = devices.input_scale if input_scale is None else _positive_scale(input_scale)
        n, clean = devices.n_devices, devices.noise_free()
        per_z = jax.vmap(lambda zi: jnp.stack(clean.read(jnp.full((n,), zi)), axis=-1))
        curves = np.asarray(per_z(jnp.asarray(z, jnp.result_type(float))))[..., col].T
    else:
        if not isinstance(devices, DeviceParams) or len(devices.batch_shape) != 1:
            raise ValueError(
                "devices: expected a 1-D batch of DeviceParams or a per-neuron MTJActivation"
            )
        if input_scale is None:
            ref = nominal if nominal is not None else devices
            input_scale = jnp.mean(current_scale(ref))
        scale = _positive_scale(input_scale)
        currents = jnp.asarray(z * float(scale), jnp.result_type(float))
        curves = np.asarray(response_curves(devices, currents))[..., col]
    xs = _x_values(z, x, scale)
    ax = _axes(ax)
    for i, c in enumerate(curves):
        label = f"devices (n = {len(curves)})" if i == 0 else None
        ax.plot(xs, c, color="C0", alpha=0.25, linewidth=0.8, label=label)
    if nominal is not None:
        currents = jnp.asarray(z * float(scale), jnp.result_type(float))
        nom = np.asarray(response_curves(nominal, currents))[:, col]
        ax.plot(xs, nom, color="k", linewidth=2.0, label="nominal")
    if reference:
        _references(ax, xs, z, which=(which,), color="C3")
    ax.set_xlabel(XLABELS[x])
    ax.set_ylabel(f"m·{which} (normalized, dimensionless)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return ax


def readout_histogram(
    device: DeviceParams | MTJActivation,
    z: float,
    ax: Axes | None = None,
    *,
    key: PRNGKeyArray,
    samples: int = 1000,
    bins: int = 40,
    reference: bool = True,
) -> Axes:
    """Histograms of the two read-outs m.p1, m.p2 at one input `z` (Monte Carlo).

    `DeviceParams`: `samples` thermal pulses (current z * I_s). `MTJActivation`: `samples`
    noisy reads (per-neuron devices: all neurons of each read pooled). Dashed lines: tanh(z)
    and sech(z) (if `reference`). Legend: mean +- std of each read-out."""
    if not np.isfinite(z):
        raise ValueError(f"z: must be finite, got {z!r}")
    keys = _keys(key, samples, "histograms")
    if isinstance(device, MTJActivation) and device.n_devices is not None:
        zz = jnp.full((device.n_devices,), z, jnp.result_type(float))
        vals = np.asarray(_act_samples(device, zz, keys)).reshape(-1, 2)
    else:
        vals = _readouts(device, np.array([float(z)]), key, samples)[0][:, 0, :]
    ax = _axes(ax)
    for i, name in enumerate(("m·p1", "m·p2")):
        v = vals[:, i]
        ax.hist(
            v, bins=bins, alpha=0.6, color=f"C{i}",
            label=f"{name}: {v.mean():.4f} ± {v.std(ddof=1):.4f} ({v.size} samples)",
        )  # fmt: skip
    if reference:
        ax.axvline(np.tanh(z), color="C0", linestyle="--", label=f"tanh({z:g})")
        ax.axvline(1 / np.cosh(z), color="C1", linestyle="--", label=f"sech({z:g})")
    ax.set_xlabel(READOUT_LABEL)
    ax.set_ylabel("count (samples per bin)")
    ax.legend(fontsize="small")
    return ax


def trajectory_sphere(
    traj: Trajectory,
    ax: Axes | None = None,
    *,
    params: DeviceParams | None = None,
    wireframe: bool = True,
    label: str | None = None,
) -> Axes:
    """Magnetization path of a `Trajectory` on the unit sphere (3-D Axes), with the
    polarizer directions P1, P2 of `params` (default `DeviceParams()`: P1 = +x, P2 = +z),
    start (circle) and end (square) markers. Returns the 3-D Axes (`ax` must be one)."""
    if not isinstance(traj, Trajectory):
        raise TypeError(f"traj: expected mtjax.Trajectory, got {type(traj).__name__}")
    ms = np.asarray(traj.ms, dtype=np.float64)
    if ms.ndim != 2 or ms.shape[1] != 3:
        raise ValueError(f"traj: one trajectory of shape (n, 3) expected, got {ms.shape}")
    params = DeviceParams() if params is None else params
    _check_single(params)
    if ax is None:
        ax = new_figure(figsize=(5.0, 5.0), layout="constrained").add_subplot(projection="3d")
    elif getattr(ax, "name", None) != "3d":
        raise ValueError("ax: trajectory_sphere needs a 3-D Axes (projection='3d')")
    if wireframe:
        u, v = np.meshgrid(np.linspace(0, 2 * np.pi, 25), np.linspace(0, np.pi, 13))
        ax.plot_wireframe(
            np.cos(u) * np.sin(v), np.sin(u) * np.sin(v), np.cos(v),
            color="0.75", linewidth=0.4,
        )  # fmt: skip
    t_ns = float(np.asarray(traj.ts)[-1]) * 1e9
    ax.plot(
        ms[:, 0], ms[:, 1], ms[:, 2], color="C3", linewidth=2, label=label or f"m(t), {t_ns:.3g} ns"
    )
    ax.scatter(*ms[0], color="C3", marker="o", s=30, label="start")
    ax.scatter(*ms[-1], color="C3", marker="s", s=30, label="end")
    for k, (name, p) in enumerate((("P1", params.p1), ("P2", params.p2))):
        d = np.asarray(p, dtype=np.float64)
        d = d / np.linalg.norm(d)
        ax.quiver(0, 0, 0, *d, length=1.25, color=f"C{k}", arrow_length_ratio=0.1)
        ax.text(*(1.35 * d), name, color=f"C{k}")
    lim, ticks = (-1.1, 1.1), (-1, 0, 1)
    ax.set(xlim=lim, ylim=lim, zlim=lim, xticks=ticks, yticks=ticks, zticks=ticks)
    ax.set_xlabel("m_x (dimensionless)")
    ax.set_ylabel("m_y (dimensionless)")
    ax.set_zlabel("m_z (dimensionless)")
    ax.set_box_aspect((1, 1, 1))
    ax.legend(fontsize="small", loc="upper left")
    return ax


def _value_label(name: str, value) -> str:
    unit = (SCALAR_FIELDS | VECTOR_FIELDS)[name][1]
    v = np.asarray(value, dtype=np.float64)
    if unit == "s" and v.shape == ():
        return f"{name} = {float(v) * 1e9:g} ns"
    text = f"{float(v):g}" if v.shape == () else "(" + ", ".join(f"{c:g}" for c in v) + ")"
    return f"{name} = {text}" + ("" if unit == "1" else f" {unit}")


def sweep(
    params: DeviceParams,
    name: str,
    values: Sequence[Any],
    axes: Sequence[Axes] | None = None,
    *,
    z: Float[ArrayLike, " n"] | None = None,
    x: str = "z",
    derivative: str = "mz",
    input_scale: float | None = None,
    reference: bool = True,
) -> list[Axes]:
    """How one `DeviceParams` field distorts the response: m.p1 (left) and m.p2 or (m.p2)²
    (right) for `params.replace(name=value)` for each value, at the same current
    z * input_scale (default `current_scale(params)`: the circuit is designed for the
    unchanged device). Lines per panel: one per value, then the reference."""
    _check_single(params)
    _check_x(x)
    _check_derivative(derivative)
    if name not in SCALAR_FIELDS and name not in VECTOR_FIELDS:
        raise ValueError(f"name: {name!r} is not a DeviceParams field")
    if len(values) < 1:
        raise ValueError("values: need at least one value")
    z = _z_grid(z)
    scale = current_scale(params) if input_scale is None else _positive_scale(input_scale)
    devs = [params.replace(**{name: v}) for v in values]
    batch = jax.tree.map(lambda *leaves: jnp.stack(leaves), *devs)
    currents = jnp.asarray(z * float(scale), jnp.result_type(float))
    vals = np.asarray(response_curves(batch, currents))  # (n_values, n_z, 2)
    xs = _x_values(z, x, scale)
    ax1, ax2 = _axes_list(axes, 2, (9.0, 3.6))
    for i, v in enumerate(values):
        style = dict(color=f"C{i}", label=_value_label(name, v))
        ax1.plot(xs, vals[i, :, 0], **style)
        ax2.plot(xs, _signal2(vals[i], derivative), **style)
    for ax, which, ylab in ((ax1, "p1", "m·p1"), (ax2, "p2", _p2_label(derivative))):
        if reference:
            _references(ax, xs, z, which=(which,), derivative=derivative, color="k")
        ax.set_xlabel(XLABELS[x])
        ax.set_ylabel(f"{ylab} (normalized, dimensionless)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return [ax1, ax2]


# --------------------------------------------------------------------------- training


def _records(history: Sequence[Mapping], event: str) -> list[Mapping]:
    return [r for r in history if r.get("event") == event]


def training_curves(
    history: Sequence[Mapping[str, Any]],
    axes: Sequence[Axes] | None = None,
    *,
    label: str | None = None,
) -> list[Axes]:
    """Loss against step (train per logged step, train and test per epoch) and test accuracy
    (%) against epoch, from a `mtjax.train` history (records with "event": "step" /
    "epoch"). Pass the same `axes` with another `label` to overlay runs."""
    steps, epochs = _records(history, "step"), _records(history, "epoch")
    if not steps and not epochs:
        raise ValueError("history: no 'step' or 'epoch' records to plot")
    ax_loss, ax_acc = _axes_list(axes, 2, (9.0, 3.5))
    prefix = f"{label}: " if label else ""
    if steps:
        ax_loss.plot(
            [r["step"] for r in steps], [r["train_loss"] for r in steps],
            alpha=0.6, label=prefix + "train (logged steps)",
        )  # fmt: skip
    if epochs:
        ep_steps = [r["step"] for r in epochs]
        ax_loss.plot(ep_steps, [r["train_loss"] for r in epochs], "o-", label=prefix + "train")
        ax_loss.plot(ep_steps, [r["test_loss"] for r in epochs], "s-", label=prefix + "test")
        ax_acc.plot(
            [r["epoch"] for r in epochs], [100 * r["test_accuracy"] for r in epochs], "o-",
            label=label,
        )  # fmt: skip
    ax_loss.set(xlabel="training step", ylabel="cross-entropy loss (nats)", title="loss")
    ax_loss.legend(fontsize="small", loc="upper right")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    ax_acc.grid(alpha=0.3)
    if label:
        ax_acc.legend(fontsize="small")
    return [ax_loss, ax_acc]


def accuracy_curves(
    histories: Mapping[str, Sequence[Mapping[str, Any]]], ax: Axes | None = None
) -> Axes:
    """Test accuracy (%) per epoch of several runs (label -> `mtjax.train` history)."""
    if not histories:
        raise ValueError("histories: no runs to plot")
    ax = _axes(ax)
    for label, history in histories.items():
        epochs = _records(history, "epoch")
        if not epochs:
            raise ValueError(f"histories[{label!r}]: no 'epoch' records")
        ax.plot(
            [r["epoch"] for r in epochs], [100 * r["test_accuracy"] for r in epochs], "o-",
            label=label,
        )  # fmt: skip
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return ax


# --------------------------------------------------------------------------- studies


def _grid(result: Mapping, grid: str) -> np.ndarray:
    grids = result["accuracy_pp"]
    if grid not in grids:
        raise ValueError(f"grid: {grid!r} not in the result; available: {list(grids)}")
    g = np.asarray(grids[grid], dtype=np.float64)
    shape = (len(result["variation"]), len(result["read_noise"]))
    if g.shape != shape:
        raise ValueError(f"result: grid {grid!r} has shape {g.shape}, expected {shape}")
    return g


def robustness_heatmap(
    result: Mapping[str, Any],
    grid: str = "inference",
    ax: Axes | None = None,
    *,
    vmin: float | None = None,
    vmax: float | None = None,
    colorbar: bool = True,
) -> Axes:
    """One grid ("inference" or "training") of `mtjax.paper.robustness_study`: test
    accuracy (%) over device variation (rows) x read noise (columns), values annotated
    (with +- the std over seeds when the result has "std_over_seeds_pp")."""
    g = _grid(result, grid)
    sd = result.get("std_over_seeds_pp", {}).get(grid)
    sd = None if sd is None else np.asarray(sd, dtype=np.float64).reshape(g.shape)
    ax = _axes(ax, (4.6, 3.8))
    im = ax.imshow(g, cmap="viridis", origin="lower", aspect="auto", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(g.shape[1]), [f"{r:g}" for r in result["read_noise"]])
    ax.set_yticks(range(g.shape[0]), [f"{s:g}" for s in result["variation"]])
    ax.set_xlabel("read noise (std, normalized signal)")
    ax.set_ylabel("device variation (relative std)")
    sw = result.get("software_accuracy_pp")
    ax.set_title(grid + (f" (software {sw:.2f} %)" if sw is not None else ""))
    for (i, j), v in np.ndenumerate(g):
        text = f"{v:.1f}" if sd is None else f"{v:.1f}\n±{sd[i, j]:.1f}"
        ax.text(j, i, text, ha="center", va="center", color="w", fontsize=7)
    if colorbar:
        ax.figure.colorbar(im, ax=ax, label="test accuracy (%)")
    return ax


def robustness_heatmaps(
    result: Mapping[str, Any], axes: Sequence[Axes] | None = None
) -> list[Axes]:
    """`robustness_heatmap` of every grid in `result`, one panel each, common color scale."""
    names = list(result["accuracy_pp"])
    grids = [_grid(result, n) for n in names]
    axes = _axes_list(axes, len(names), (4.6 * len(names), 3.8))
    lo, hi = min(g.min() for g in grids), max(g.max() for g in grids)
    for ax, name in zip(axes, names, strict=True):
        robustness_heatmap(result, name, ax, vmin=lo, vmax=hi)
    return axes


def energy_accuracy(
    fronts: Mapping[str, Sequence[tuple[float, float, float]]],
    ax: Axes | None = None,
    *,
    xlabel: str = "energy per inference (J)",
    ylabel: str = "test accuracy (%)",
) -> Axes:
    """Energy-accuracy fronts: for each labeled method, points (energy_J, acc_mean, acc_std)
    joined in order of energy, +-std error bars, log energy axis. One errorbar container per
    method."""
    if not fronts:
        raise ValueError("fronts: no methods to plot")
    ax = _axes(ax)
    for label, points in fronts.items():
        pts = np.asarray(points, dtype=np.float64)
        if pts.ndim != 2 or pts.shape[1] != 3 or pts.shape[0] < 1:
            raise ValueError(
                f"fronts[{label!r}]: expected (energy_J, acc_mean, acc_std) triples, "
                f"got shape {pts.shape}"
            )
        if not np.all(np.isfinite(pts)) or np.any(pts[:, 0] <= 0) or np.any(pts[:, 2] < 0):
            raise ValueError(
                f"fronts[{label!r}]: energies must be finite and > 0, stds finite and >= 0"
            )
        pts = pts[np.argsort(pts[:, 0], kind="stable")]
        ax.errorbar(pts[:, 0], pts[:, 1], yerr=pts[:, 2], marker="o", capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    return ax


def curve_study(result: Mapping, axes: Sequence[Axes] | None = None) -> list[Axes]:
    """`mtjax.paper.device_curve_study` in two panels: each device's m.p1 - tanh z (solid)
    and m.p2 - sech z (dashed) against z, and its test-accuracy gap to software tanh (pp,
    mean +- std over seeds, paired) per derivative."""
    devices = result.get("devices")
    if not devices:
        raise ValueError("result: no 'devices' to plot (a device_curve_study result)")
    ax_c, ax_g = _axes_list(axes, 2, (11.0, 4.0))
    ders = list(next(iter(devices.values()))["gap_vs_tanh_pp"])
    width = 0.8 / len(ders)
    for i, (label, e) in enumerate(devices.items()):
        dev = e["deviation"]
        z = np.asarray(dev["z"])
        (line,) = ax_c.plot(z, np.asarray(dev["p1"]) - np.tanh(z), label=label)
        ax_c.plot(z, np.asarray(dev["p2"]) - 1 / np.cosh(z), "--", color=line.get_color())
        for j, d in enumerate(ders):
            g = e["gap_vs_tanh_pp"][d]
            ax_g.bar(i + (j - (len(ders) - 1) / 2) * width, g["mean"], width, yerr=g["std"],
                     capsize=2, color=f"C{j}", label=d if i == 0 else None)  # fmt: skip
    ax_c.set(xlabel=XLABELS["z"], ylabel="device - software (dimensionless)",
             title="m.p1 - tanh (solid), m.p2 - sech (dashed)")  # fmt: skip
    ax_c.grid(alpha=0.3)
    ax_c.legend(fontsize="x-small")
    ax_g.axhline(0, color="k", lw=0.8)
    ax_g.set_xticks(range(len(devices)), list(devices), rotation=30, ha="right",
                    fontsize="small")  # fmt: skip
    ax_g.set(ylabel="tanh - MTJ test accuracy (pp)", title="accuracy cost, per derivative")
    ax_g.legend(fontsize="small", title="derivative")
    return [ax_c, ax_g]


def distill_sweep(result: Mapping, axes: Sequence[Axes] | None = None) -> list[Axes]:
    """`mtjax.paper.distill_sweep` in three panels: the KD gain (KD - alone, pp, mean +- std
    over seeds) against temperature (one line per alpha), against student width and against
    training length (the best temperature and alpha)."""
    grid = result.get("grid")
    if not grid:
        raise ValueError("result: no 'grid' to plot (a distill_sweep result)")
    ax_t, ax_w, ax_e = _axes_list(axes, 3, (13.0, 3.8))
    temps = [row[0]["temperature"] for row in grid]
    for j, a in enumerate(result["alphas"]):
        gains = [row[j]["gain_pp"] for row in grid]
        ax_t.errorbar(temps, [g["mean"] for g in gains], yerr=[g["std"] for g in gains],
                      marker="o", capsize=3, label=f"alpha {a:g}")  # fmt: skip
    ax_t.set(xscale="log", xlabel="KD temperature T", title="KD gain at the reference student")
    ax_t.legend(fontsize="small")
    b = result["best"]
    lines = ((ax_w, result["widths"], "width", "student hidden width"),
             (ax_e, result["epochs"], "epochs", "training epochs"))  # fmt: skip
    for ax, line, key, label in lines:
        xs = [c[key] for c in line]
        ax.errorbar(xs, [c["gain_pp"]["mean"] for c in line],
                    yerr=[c["gain_pp"]["std"] for c in line], marker="o", capsize=3)  # fmt: skip
        ax.set(xscale="log", xlabel=label,
               title=f"T = {b['temperature']:g}, alpha = {b['alpha']:g}")  # fmt: skip
        ax.set_xticks(xs, [str(x) for x in xs])
    for ax in (ax_t, ax_w, ax_e):
        ax.axhline(0, color="k", lw=0.8)
        ax.grid(alpha=0.3)
        ax.set_ylabel("KD - alone test accuracy (pp)")
    return [ax_t, ax_w, ax_e]


# --------------------------------------------------------------------------- files


def _figure(obj) -> Figure:
    if isinstance(obj, (list, tuple, np.ndarray)):
        flat = np.ravel(np.asarray(obj, dtype=object))
        if flat.size == 0:
            raise ValueError("fig_or_ax: empty sequence of Axes")
        obj = flat[0]
    fig = getattr(obj, "figure", None)
    if fig is None:
        raise TypeError(f"fig_or_ax: expected a Figure or Axes, got {type(obj).__name__}")
    while fig.figure is not fig:  # a SubFigure's .figure is its parent
        fig = fig.figure
    return fig


def save(fig_or_ax, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write the figure of `fig_or_ax` (a Figure, an Axes, or a list of Axes of one figure)
    to a PNG at `path`, atomically (`mtjax.fileio.save_figure`)."""
    if Path(path).suffix.lower() != ".png":
        raise ValueError(f"path: figures are written as PNG; use a .png name, got {str(path)!r}")
    if not (isinstance(dpi, int | float) and math.isfinite(dpi) and dpi > 0):
        raise ValueError(f"dpi: must be > 0, got {dpi!r}")
    return save_figure(_figure(fig_or_ax), path, dpi=dpi)
