"""Experiment building blocks shared by `scripts/train.py` and `scripts/reproduce.py`.

A `RunSpec` names one training run (data, MLP sizes, activation and device settings); `run`
trains it with `mtjax.train.train` and returns a JSON-able summary. Device settings:
`variation` is the relative spread of `mtjax.variation.Spreads.relative` (one sampled
device per hidden neuron), `read_noise` is in units of the normalized read-out signal,
`temperature > 0` makes the neurons thermal: `mode="thermal"` (moment tables, table speed)
unless the spec asks for the reference `mode="sde"`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from mtjax import codesign
from mtjax import data as _data
from mtjax import plot as _plot
from mtjax import train as _train
from mtjax.analytic import current_scale
from mtjax.codesign import Design, DesignedMTJ, DesignSchedule, DesignSpace, joint_optimizer
from mtjax.nn import MLP, MTJActivation, deploy, trainable
from mtjax.params import SCALAR_FIELDS, VECTOR_FIELDS, DeviceParams
from mtjax.variation import Spreads, sample_deviations, sample_reset_states

DATASETS = ("fashion_mnist", "cifar100")
ACTIVATIONS = ("tanh", "mtj")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run. `sizes` = MLP layer sizes incl. input (H*W*C) and classes."""

    dataset: str = "fashion_mnist"
    sizes: tuple[int, ...] = (784, 256, 10)
    activation: str = "tanh"
    mode: str = "table"
    derivative: str = "mz2"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    variation: float = 0.0
    read_noise: float = 0.0
    reset_offset: float = 0.0
    temperature: float = 0.0
    train_subset: int | None = None
    test_subset: int | None = None
    train_device: tuple[str, ...] = ()
    design_lr: float = 0.05
    design_every: int = 1
    device: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset: unknown {self.dataset!r}; known: {', '.join(DATASETS)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation: unknown {self.activation!r}; known: {ACTIVATIONS}")
        if len(self.sizes) < 2 or min(self.sizes) < 1:
            raise ValueError(f"sizes: need at least (n_in, n_out), all >= 1, got {self.sizes}")
        for name in ("variation", "read_noise", "reset_offset", "temperature"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(f"{name}: must be finite and >= 0, got {value}")
        self.config()  # epochs, batch_size, lr, seed: ValueError naming the field
        self.nominal()  # device: ValueError naming an unknown or non-physical field
        if self.train_device:
            if self.activation != "mtj":
                raise ValueError("train_device: only MTJ neurons have a device to design")
            DesignSpace(free=self.train_device)  # ValueError naming an unknown variable
            if self.reset_offset > 0:
                raise ValueError("reset_offset: not supported with train_device")
            if not (np.isfinite(self.design_lr) and self.design_lr > 0):
                raise ValueError(f"design_lr: must be finite and > 0, got {self.design_lr}")
            DesignSchedule(every=self.design_every)

    def nominal(self) -> DeviceParams:
        """The nominal device: `DeviceParams.paper` with `device` overrides, e.g.
        ``(("xi1", 0.3), ("h_bias", (0.0, 0.0, 4e3)))``, at `temperature`."""
        overrides = dict(self.device)
        if len(overrides) != len(self.device) or "temperature" in overrides:
            raise ValueError(f"device: repeated field or temperature (use `temperature`): "
                             f"{self.device}")  # fmt: skip
        unknown = set(overrides) - set(SCALAR_FIELDS) - set(VECTOR_FIELDS)
        if unknown:
            raise ValueError(f"device: unknown DeviceParams field(s) {sorted(unknown)}")
        try:
            return DeviceParams.paper(temperature=self.temperature, **overrides)
        except (ValueError, TypeError) as err:
            raise ValueError(f"device: {err}") from err

    def run_info(self) -> dict[str, Any]:
        """Everything that defines the run, for `mtjax.train.train(run_info=...)`."""
        return dataclasses.asdict(self)

    def config(self) -> _train.TrainConfig:
        optimizer = "adam"
        if self.train_device:
            optimizer = functools.partial(joint_optimizer, design_lr=self.design_lr)
        return _train.TrainConfig(
            epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, seed=self.seed,
            optimizer=optimizer,
        )  # fmt: skip


def parse_device_override(text: str) -> tuple[str, Any]:
    """``"xi1=0.3"`` -> ``("xi1", 0.3)``; ``"h_bias=0,0,4e3"`` -> ``("h_bias", (0.0, 0.0,
    4000.0))`` (a `RunSpec.device` entry; ValueError naming the text)."""
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or name not in {**SCALAR_FIELDS, **VECTOR_FIELDS}:
        raise ValueError(
            f"device override {text!r}: expected NAME=VALUE with NAME a DeviceParams field "
            f"({', '.join((*SCALAR_FIELDS, *VECTOR_FIELDS))})"
        )
    try:
        parts = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise ValueError(f"device override {text!r}: value must be numbers") from None
    want = 3 if name in VECTOR_FIELDS else 1
    if len(parts) != want:
        raise ValueError(f"device override {text!r}: {name} takes {want} number(s)")
    return name, parts if want == 3 else parts[0]


def load_arrays(
    dataset: str,
    *,
    data_dir: str | os.PathLike | None = None,
    train_subset: int | None = None,
    test_subset: int | None = None,
    label: str = "fine",
    download: bool = False,
):
    """Normalized float32 `(x, y)` train and test arrays (first `*_subset` examples);
    `download=True` lets `mtjax.data.load` download missing data (`mtjax.fetch`)."""
    out = []
    for split, subset in (("train", train_subset), ("test", test_subset)):
        x, y = _data.load(dataset, split, data_dir=data_dir, label=label, download=download)
        if subset is not None:
            x, y = x[:subset], y[:subset]
        out.append((_data.normalize(x), np.asarray(y)))
    return tuple(out)


def make_activation(spec: RunSpec, width: int, key: jax.Array):
    """`jnp.tanh` or an `MTJActivation` for a hidden layer of `width` neurons."""
    if spec.activation == "tanh":
        return jnp.tanh
    nominal = spec.nominal()
    deviations = None
    if spec.variation > 0:
        spreads = Spreads.relative(
            spec.variation, distribution="normal" if spec.variation < 1 / 3 else "lognormal"
        )
        deviations = sample_deviations(key, width, spreads)
    if spec.train_device:
        design = Design(nominal, DesignSpace(free=spec.train_device))
        return DesignedMTJ(
            design, deviations=deviations, mode=neuron_mode(spec), derivative=spec.derivative,
            read_noise=spec.read_noise,
        )  # fmt: skip
    params = nominal if deviations is None else deviations.apply(nominal)
    m0 = None
    if spec.reset_offset > 0:  # imperfect reset: per-neuron start states near +z
        m0 = sample_reset_states(jax.random.fold_in(key, 1), width, spec.reset_offset)
    return MTJActivation(
        params,
        m0=m0,
        mode=neuron_mode(spec),
        derivative=spec.derivative,
        read_noise=spec.read_noise,
        input_scale=current_scale(nominal),  # the circuit is designed for the nominal device
    )


def neuron_mode(spec: RunSpec) -> str:
    """The MTJ mode a spec runs: its `mode`, made thermal ("thermal") when the temperature
    is > 0 and the mode has no thermal noise ("sde" stays the reference)."""
    if spec.temperature > 0 and spec.mode not in ("sde", "thermal"):
        return "thermal"
    return spec.mode


def hidden_activations(spec: RunSpec, key: jax.Array) -> list:
    """One activation per hidden layer (independent devices per layer)."""
    widths = spec.sizes[1:-1]
    keys = jax.random.split(key, max(len(widths), 1))
    return [make_activation(spec, w, k) for w, k in zip(widths, keys, strict=False)]


def make_model(spec: RunSpec) -> MLP:
    k_model, k_dev = jax.random.split(jax.random.key(spec.seed))
    return MLP(spec.sizes, hidden_activations(spec, k_dev), key=k_model)


#: What `run` records as the checkpoint's ``model_builder`` (see `mtjax.train.load_run`).
MODEL_BUILDER = "mtjax.experiments:model_from_run_info"


def model_from_run_info(run_info: dict[str, Any]) -> MLP:
    """`make_model` of the `RunSpec` whose `RunSpec.run_info` is ``run_info`` (as read back
    from JSON): the untrained template `mtjax.train.load_run` fills."""
    if not isinstance(run_info, dict):
        raise ValueError(f"run_info must be a RunSpec dict, got {type(run_info).__name__}")
    fields = {**run_info, "sizes": tuple(run_info["sizes"])}
    fields["train_device"] = tuple(fields.get("train_device", ()))
    fields["device"] = tuple(
        (k, tuple(v) if isinstance(v, list) else v) for k, v in fields.get("device", ())
    )
    return make_model(RunSpec(**fields))


def run(
    spec: RunSpec,
    train_data,
    test_data,
    *,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    model: eqx.Module | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[dict[str, Any], _train.TrainResult]:
    """Train `spec` (or the given initial `model`); return (summary, TrainResult).

    `out_dir`, `resume`, `overwrite`, `mesh`: as in `mtjax.train.train`; the whole `spec` is
    its `run_info`, so resuming with any other setting is refused. Without `model`, the
    checkpoints record `MODEL_BUILDER`, so `mtjax.train.load_run(out_dir)` rebuilds the
    trained model from the folder alone."""
    n_in = int(np.prod(train_data[0].shape[1:]))
    if spec.sizes[0] != n_in:
        raise ValueError(f"sizes: first size {spec.sizes[0]} != input size {n_in} of the data")
    builder = MODEL_BUILDER if model is None else None
    model = make_model(spec) if model is None else model
    result = _train.train(
        model,
        train_data,
        test_data,
        spec.config(),
        out_dir=out_dir,
        resume=resume,
        overwrite=overwrite,
        run_info=spec.run_info(),
        progress=progress,
        filter_spec=trainable(model),
        mesh=mesh,
        model_builder=builder,
        on_step=DesignSchedule(every=spec.design_every) if spec.train_device else None,
    )
    summary = {
        "spec": spec.run_info(),
        "test_accuracy": result.test_accuracy,
        "test_loss": result.test_loss,
        "wall_time_s": result.wall_time,
        "steps": result.step,
    }
    designed = codesign.designed_layers(result.model)
    if designed:
        summary["design"] = designed[0].design.values()
    return summary, result


def is_stochastic(model) -> bool:
    """True when some neuron of `model` draws noise (read noise, thermal noise) per call."""
    is_layer = lambda x: isinstance(x, MTJActivation | DesignedMTJ)
    leaves = jax.tree_util.tree_leaves(model, is_leaf=is_layer)
    return any(
        (a if isinstance(a, MTJActivation) else a.template).stochastic
        for a in leaves
        if is_layer(a)
    )


def accuracies_over_keys(
    model, test_data, n_keys: int = 5, *, seed: int = 0, batch_size: int = 1000
) -> list[float]:
    """Test accuracy of `model` for each of `n_keys` noise keys (key k of `seed`:
    ``key(10_000 (seed + 1) + k)``); a deterministic model is evaluated once (one entry)."""
    if not isinstance(n_keys, int) or n_keys < 1:
        raise ValueError(f"n_keys must be an integer >= 1, got {n_keys!r}")
    if not is_stochastic(model):
        return [_train.evaluate(model, *test_data, batch_size)[1]]
    keys = [jax.random.key(10_000 * (seed + 1) + k) for k in range(n_keys)]
    return [_train.evaluate(model, *test_data, batch_size, key=k)[1] for k in keys]


def evaluate_with(model, spec: RunSpec, test_data, *, n_keys: int = 5) -> list[float]:
    """Accuracies of `model`'s weights with the hidden activations of `spec` (deploy, no
    retraining), one per noise key (`accuracies_over_keys`; one if noise-free)."""
    acts = hidden_activations(spec, jax.random.key(spec.seed + 10_000))
    return accuracies_over_keys(deploy(model, acts), test_data, n_keys, seed=spec.seed)


def mean_std(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}


def plot_curves(histories: dict[str, list[dict]], path: str | os.PathLike) -> Path:
    """Test accuracy per epoch of several runs (label -> `TrainResult.history`), PNG
    (`mtjax.plot.accuracy_curves`)."""
    return _plot.save(_plot.accuracy_curves(histories), path)


def command_line(script: str, args, defaults, skip: Sequence[str] = ("out", "no_progress")) -> str:
    """The command that reproduces a run of `script` with `args` (an `argparse.Namespace`):
    the settings that differ from `defaults` (that parser's defaults), sequences
    comma-joined, flags bare; `skip` (output folder, progress bar) left out."""
    given, base = vars(args), vars(defaults)
    flags = []
    for name, value in given.items():
        if name in skip or value == base.get(name) or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, (tuple, list)):
            value = ",".join(map(str, value))
        flags.append(flag if value is True else f"{flag} {value}")
    return " ".join([f"python {script}", *flags])


def software_mlp(
    sizes: Sequence[int], train_data, test_data, epochs: int, *, batch_size: int = 128,
    lr: float = 1e-3, progress: bool = True,
) -> _train.TrainResult:  # fmt: skip
    """A software-tanh `MLP(sizes, tanh, key=key(0))` trained with Adam: the baseline whose
    weights the co-design scripts deploy on MTJ neurons."""
    model = MLP(tuple(sizes), jnp.tanh, key=jax.random.key(0))
    config = _train.TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr)
    return _train.train(model, train_data, test_data, config, progress=progress)
