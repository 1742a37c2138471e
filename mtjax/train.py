"""Training loop for Equinox classifiers: Optax, checkpoints, exact resume, metrics, plots.

A model is an Equinox module mapping ONE example to logits, ``model(x, *, key=None)``; batches
go through `jax.vmap`, each example getting its own PRNG key (for stochastic MTJ neurons:
thermal or read noise; models may ignore it).

`train` runs ``config.epochs`` epochs of `mtjax.data.batches` (shuffled per ``(seed, epoch)``,
``drop_last=False``: the last batch of an epoch is padded and masked, so every example is used
once per epoch and the step has one static shape). Each update is one call of `train_step`:
the masked mean of the per-example loss (default softmax cross-entropy), its gradient by
``eqx.filter_value_and_grad`` and the Optax update, in one ``eqx.filter_jit`` that donates the
model and optimizer state. Step ``k`` (0-based count of updates done before it) uses the key
``fold_in(key(seed), k)``, so a run depends only on ``(model, data, config)`` and can be
stopped and resumed anywhere.

Optimizer (documented choice): Adam whose learning rate follows a cosine decay from ``lr`` to 0
over all ``epochs * steps_per_epoch`` steps (``optax.cosine_decay_schedule``); no warm-up.
``schedule="constant"`` keeps ``lr``; ``optimizer="sgd"`` uses plain SGD; a callable such as
``optax.adamw`` is called with the schedule; a ready ``optax.GradientTransformation`` is used as
is (``lr`` and ``schedule`` are then ignored). `make_schedule` / `make_optimizer` build them.

Devices (`mtjax.sharding`): with more than one JAX device (or a ``mesh`` passed in), `train`
is data-parallel on a `jax.sharding.Mesh` with a ``"data"`` axis: each batch is split along
it, the model and optimizer state are replicated, and XLA reduces the gradients. The
per-example keys are the same as on one device (``split(fold_in(key(seed), k), batch)[i]``),
so a run differs between device counts only by floating-point reduction order;
``batch_size`` must be a multiple of the data-axis size. Multi-host runs (after
`mtjax.sharding.initialize_distributed`) work the same way: every process loads the data and
computes the same batch order, transfers only its devices' shards, and process 0 writes the
run files (``out_dir`` must then be a folder every host sees).

The run folder ``out_dir`` (optional) is claimed with `run_folder`: an exclusive lock on
``.lock`` while the run writes there; a folder that already holds files is refused unless
``resume`` (continue the run) or ``overwrite`` (delete this module's files and start again).
Files:

- ``metrics.jsonl``: one JSON object a line. ``{"event": "step", ...}`` every ``log_every``
  steps (mean train loss since the previous one, learning rate from the schedule);
  ``{"event": "epoch", ...}`` at each epoch end (epoch-mean train loss, ``test_loss``,
  ``test_accuracy``); ``"step"`` counts updates done, ``"epoch"`` is 1-based for epoch records
  and 0-based for step records, and ``"wall_time"`` is seconds of training summed over resumed
  sessions. A torn last line (a kill mid-write) is ignored when read.
- ``checkpoints/<step>/``: orbax-checkpoint steps (`orbax.checkpoint.CheckpointManager`:
  written to a temporary folder and renamed when complete, the last
  ``config.keep_checkpoints`` kept, optionally saved in the background). Each holds the
  items ``model`` and ``opt_state`` (the array leaves, saved as sharded ``jax.Array``s, so a
  checkpoint written on N devices restores on M) and ``mtjax``, a JSON header: step, config,
  ``run_info``, the importable ``model_builder``, data fingerprint, running loss sums, the
  path/shape/dtype of every leaf, a SHA-256 of each item's array bytes and one of the header.

``resume=True`` continues from the latest checkpoint (the model passed in is the template): it
skips the batches already done in the interrupted epoch and gives bit-identical weights and
metrics (other than wall time) to an uninterrupted run on the same devices. Everything that
defines the run must match the checkpoint (`CheckpointError` names what differs): the config
(all fields but ``checkpoint_every``, ``keep_checkpoints`` and ``async_checkpoints``),
``run_info`` (a JSON-able description of the run, compared key by key), the data, and the
model/optimizer-state structure; the device count may differ. `load_checkpoint` reads a
checkpoint into a template, `load_run` rebuilds the trained model from the run folder alone
when the run recorded a ``model_builder``. A non-finite loss (or an update that would make a
parameter non-finite) is not applied; `NonFiniteLossError` names the step, and the checkpoint
on disk stays the last finite one. Epoch-end evaluation uses one fixed key per run,
``fold_in(key(seed), 2**31 - 1)`` (deterministic models ignore it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib
import itertools
import json
import math
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, PyTree

from mtjax import data as _data
from mtjax import nn as _nn
from mtjax import plot
from mtjax import sharding as _sharding
from mtjax._tqdm import tqdm  # no "IProgress not found" warning in Jupyter
from mtjax.fileio import atomic_write_bytes

try:
    import fcntl
except ImportError:  # not POSIX: run folders are not locked
    fcntl = None

__all__ = [
    "CHECKPOINT_NAME",
    "LOCK_NAME",
    "METRICS_NAME",
    "Batch",
    "CheckpointError",
    "LoadedRun",
    "NonFiniteLossError",
    "RunFolderError",
    "StepResult",
    "TrainConfig",
    "TrainResult",
    "accuracy_curve_png",
    "cross_entropy",
    "evaluate",
    "init_state",
    "load_checkpoint",
    "load_run",
    "make_optimizer",
    "make_schedule",
    "plot_history",
    "read_metrics",
    "run_folder",
    "train",
    "train_step",
]

StrPath = str | os.PathLike[str]

CHECKPOINT_NAME = "checkpoints"  # folder of orbax checkpoint steps
METRICS_NAME = "metrics.jsonl"
LOCK_NAME = ".lock"
# checkpoint.eqx/.json: the single-file format of mtjax before orbax (refused on resume)
_LEGACY_CHECKPOINT = "checkpoint.eqx"
_RUN_FILES = (CHECKPOINT_NAME, _LEGACY_CHECKPOINT, "checkpoint.json", METRICS_NAME)
_FORMAT = "mtjax.train.checkpoint/3"
_HEADER_ITEM = "mtjax"  # orbax item names inside a step folder
_ARRAY_ITEMS = ("model", "opt_state")
_OPTIMIZERS = ("adam", "sgd")
_SCHEDULES = ("cosine", "constant")
# Config fields that may change on resume (they do not change the trajectory or the metrics).
_RESUME_FREE = ("checkpoint_every", "keep_checkpoints", "async_checkpoints")
# Temporary files of `mtjax.fileio.atomic_write_bytes` (tempfile.mkstemp): ".NAME.XXXXXXXX.tmp".
_TEMP_FILE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


class NonFiniteLossError(FloatingPointError):
    """The loss (or the updated parameters) of update ``step`` (1-based) was not finite.

    The update was not applied; ``checkpoint_step`` is the step of the checkpoint on disk
    (``None`` without one), which the error never overwrites.
    """

    def __init__(
        self,
        message: str,
        *,
        step: int,
        epoch: int,
        loss: float,
        checkpoint_step: int | None,
        checkpoint_path: Path | None,
    ) -> None:
        super().__init__(message)
        self.step = step
        self.epoch = epoch
        self.loss = loss
        self.checkpoint_step = checkpoint_step
        self.checkpoint_path = checkpoint_path


class RunFolderError(RuntimeError):
    """A run folder cannot be used: not a folder, not writable, in use by another run, or it
    holds files and neither ``resume`` nor ``overwrite`` was given. The message names it."""


class CheckpointError(ValueError):
    """A checkpoint is unreadable, corrupt or edited, or does not match the run resuming it.
    The message names the file (and the differing setting)."""


# --------------------------------------------------------------------------- config


def _is_int(v: object) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_)


def _optimizer_name(opt: object) -> str:
    if isinstance(opt, str):
        return opt
    if isinstance(opt, optax.GradientTransformation):
        return "custom GradientTransformation"
    func = getattr(opt, "func", opt)  # functools.partial
    name = f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', repr(func))}"
    return f"callable {name}"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of `train`; invalid values raise ``ValueError`` naming the field.

    - ``optimizer``: ``"adam"`` (default) or ``"sgd"``; or a callable taking the learning-rate
      schedule and returning an ``optax.GradientTransformation`` (``optax.adamw``,
      ``functools.partial(optax.sgd, momentum=0.9)``); or a ready GradientTransformation.
    - ``schedule``: ``"cosine"`` (default: decay from ``lr`` to 0 over all steps) or
      ``"constant"``.
    - ``seed``: ``0 <= seed < 2**32`` (larger seeds would alias smaller ones in
      ``jax.random.key``).
    - ``checkpoint_every``: steps between checkpoints; ``None`` checkpoints at each epoch end.
      The last step (and a ``stop_after_steps`` stop) is always checkpointed.
    - ``log_every``: steps between ``"step"`` records in the metrics.
    - ``keep_checkpoints``: how many of the latest checkpoints to keep (>= 1).
    - ``async_checkpoints``: write checkpoints in the background (orbax; the arrays are
      copied off the devices before the next step); `train` waits for them before returning.
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    optimizer: str | Callable[..., optax.GradientTransformation] | optax.GradientTransformation = (
        "adam"
    )
    schedule: str = "cosine"
    eval_batch_size: int = 1000
    checkpoint_every: int | None = None
    log_every: int = 50
    keep_checkpoints: int = 2
    async_checkpoints: bool = False

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size", "log_every", "keep_checkpoints"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 1, got {v!r}")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**32:
            raise ValueError(
                f"TrainConfig.seed must be an integer in [0, 2**32), got {self.seed!r}"
            )
        if not isinstance(self.async_checkpoints, bool | np.bool_):
            v = self.async_checkpoints
            raise ValueError(f"TrainConfig.async_checkpoints must be True or False, got {v!r}")
        ce = self.checkpoint_every
        if ce is not None and (not _is_int(ce) or ce < 1):
            raise ValueError(f"TrainConfig.checkpoint_every must be None or >= 1, got {ce!r}")
        lr = self.lr
        if (
            isinstance(lr, bool)
            or not isinstance(lr, int | float | np.floating | np.integer)
            or not math.isfinite(lr)
            or lr <= 0
        ):
            raise ValueError(f"TrainConfig.lr must be a finite number > 0, got {lr!r}")
        if self.schedule not in _SCHEDULES:
            raise ValueError(
                f"TrainConfig.schedule must be one of {_SCHEDULES}, got {self.schedule!r}"
            )
        opt = self.optimizer
        if isinstance(opt, str):
            if opt not in _OPTIMIZERS:
                raise ValueError(
                    f"TrainConfig.optimizer must be one of {_OPTIMIZERS}, a callable or an "
                    f"optax.GradientTransformation; got {opt!r}"
                )
        elif not (isinstance(opt, optax.GradientTransformation) or callable(opt)):
            raise ValueError(
                f"TrainConfig.optimizer must be a name, a callable or an "
                f"optax.GradientTransformation; got {type(opt).__name__}"
            )

    def to_json(self) -> dict[str, Any]:
        """JSON-able dict of the fields; a non-string optimizer becomes a description."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["optimizer"] = _optimizer_name(self.optimizer)
        d["lr"] = float(self.lr)
        for k in ("epochs", "batch_size", "seed", "eval_batch_size", "log_every"):
            d[k] = int(d[k])
        d["keep_checkpoints"] = int(d["keep_checkpoints"])
        d["async_checkpoints"] = bool(d["async_checkpoints"])
        if d["checkpoint_every"] is not None:
            d["checkpoint_every"] = int(d["checkpoint_every"])
        return d


# Both caches keep the same objects for the same settings, so jit caches are reused.
@functools.lru_cache(maxsize=32)
def _cached_schedule(schedule: str, lr: float, total_steps: int) -> optax.Schedule:
    if schedule == "cosine":
        return optax.cosine_decay_schedule(lr, decay_steps=max(total_steps, 1), alpha=0.0)
    return optax.constant_schedule(lr)


@functools.lru_cache(maxsize=32)
def _cached_optimizer(opt, schedule) -> optax.GradientTransformation:
    if isinstance(opt, optax.GradientTransformation):
        return opt
    if opt == "adam":
        return optax.adam(schedule)
    if opt == "sgd":
        return optax.sgd(schedule)
    return opt(schedule)


def make_schedule(config: TrainConfig, total_steps: int) -> optax.Schedule | None:
    """The learning-rate schedule `make_optimizer` uses (``None`` for a ready
    ``optax.GradientTransformation``, which has its own)."""
    if isinstance(config.optimizer, optax.GradientTransformation):
        return None
    return _cached_schedule(config.schedule, float(config.lr), int(total_steps))


def make_optimizer(config: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """The optimizer `train` uses for ``total_steps`` steps, driven by `make_schedule`."""
    schedule = make_schedule(config, total_steps)
    try:
        return _cached_optimizer(config.optimizer, schedule)
    except TypeError:  # unhashable callable
        return _cached_optimizer.__wrapped__(config.optimizer, schedule)


# --------------------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What `train` returns.

    ``test_loss``/``test_accuracy`` are for the returned model; ``wall_time`` is seconds of
    training summed over resumed sessions; ``completed`` is False after ``stop_after_steps``;
    ``checkpoint_path`` is the folder of the last checkpoint (``<out_dir>/checkpoints/<step>``).
    """

    model: Any
    opt_state: Any
    history: list[dict[str, Any]]
    test_loss: float
    test_accuracy: float
    wall_time: float
    step: int
    total_steps: int
    completed: bool
    checkpoint_path: Path | None


# --------------------------------------------------------------------------- data checks


def _check_data(data: object, what: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        x, y = data  # type: ignore[misc]
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a pair (x, y)") from None
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim < 1 or y.ndim != 1:
        raise ValueError(f"{what}: y must be 1-D and x at least 1-D; got {x.shape} and {y.shape}")
    if len(x) != len(y):
        raise ValueError(f"{what}: x has {len(x)} examples but y has {len(y)} labels")
    if len(x) == 0:
        raise ValueError(f"{what} is empty")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{what}: y must hold integer labels, got dtype {y.dtype}")
    return x, y


def _fingerprint(*arrays: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        h.update(f"{a.dtype.str}{a.shape};".encode())
        h.update(memoryview(np.ascontiguousarray(a)).cast("B"))
    return h.hexdigest()


def _normal_run_info(run_info: object) -> dict[str, Any] | None:
    """``run_info`` as it reads back from JSON (tuples become lists), or ValueError."""
    if run_info is None:
        return None
    if not isinstance(run_info, dict):
        raise ValueError(f"run_info must be a dict or None, got {type(run_info).__name__}")
    try:
        return json.loads(json.dumps(run_info, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise ValueError(f"run_info must be JSON-able (finite numbers): {err}") from None


# --------------------------------------------------------------------------- the step


def cross_entropy(
    logits: Float[Array, "batch classes"], x: ArrayLike, y: Int[Array, " batch"]
) -> Float[Array, " batch"]:
    """Default per-example training loss: softmax cross-entropy with integer labels."""
    del x
    # at least float32 (bf16/f16 logits are promoted; float64 stays float64)
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


class Batch(NamedTuple):
    """The inputs of one `train_step` that are not donated.

    ``mask`` is False for padding examples; ``step`` is the number of updates done before
    this one; the step's key is ``fold_in(key, step)``, split over the examples. ``loss_fn``
    ``(logits, x, y) -> per-example loss`` may be an Equinox module holding arrays (never
    trained).
    """

    x: Float[ArrayLike, "batch ..."]
    y: Int[ArrayLike, " batch"]
    mask: Bool[ArrayLike, " batch"]
    step: Int[ArrayLike, ""]
    key: PRNGKeyArray
    loss_fn: Callable[..., Any] = cross_entropy


class StepResult(NamedTuple):
    """What `train_step` returns; ``applied`` is False when the update was skipped (loss or
    updated parameters not finite): ``model``/``opt_state`` are then the inputs' values."""

    model: PyTree
    opt_state: PyTree
    loss: Float[Array, ""]
    loss_finite: Bool[Array, ""]
    applied: Bool[Array, ""]


def _own(tree):
    """Fresh, strongly typed copies of the array leaves (they get donated to the step)."""

    def copy(a):
        if not eqx.is_array(a):
            return a
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            return jnp.copy(a)
        return jnp.array(a, dtype=a.dtype, copy=True)

    return jax.tree.map(copy, tree)


def init_state(
    model: PyTree, optimizer: optax.GradientTransformation, filter_spec: Any = None
) -> tuple[PyTree, PyTree, PyTree]:
    """``(model, opt_state, trainable)`` to start `train_step` from.

    ``trainable`` is a bool per leaf of ``model``: selected by the Equinox ``filter_spec``
    (default `mtjax.nn.trainable`: every inexact array but raw device arrays; a spec that
    selects those raises ValueError) and an inexact array. ``model`` is a copy of the given one (the
    step donates its arrays); ``opt_state = optimizer.init`` of its trainable part.
    """
    spec = _nn.trainable(model) if filter_spec is None else filter_spec
    _nn.check_trainable(model, spec)
    selected = eqx.filter(model, spec)
    trainable = jax.tree.map(
        lambda v: v is not None and eqx.is_inexact_array(v),
        selected,
        is_leaf=lambda v: v is None,
    )
    model = _own(model)
    return model, _own(optimizer.init(eqx.filter(model, trainable))), trainable


def _logits(model, x, key):
    if key is None:
        return jax.vmap(lambda xi: model(xi, key=None))(x)
    keys = jax.random.split(key, x.shape[0])
    return jax.vmap(lambda xi, ki: model(xi, key=ki))(x, keys)


def _loss(params, static, x, y, mask, key, loss_fn):
    model = eqx.combine(params, static)
    logits = _logits(model, x, key)
    if getattr(loss_fn, "needs_model", False):  # e.g. an energy term of a co-design loss
        per_example = loss_fn(logits, x, y, model=model, key=key)
    else:
        per_example = loss_fn(logits, x, y)
    w = mask.astype(jnp.float32)
    return jnp.sum(jnp.where(mask, per_example, 0.0)) / jnp.maximum(jnp.sum(w), 1.0)


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(tree) if eqx.is_inexact_array(v)]
    return jnp.stack(leaves).all() if leaves else jnp.array(True)


def _strong(v):
    return jax.lax.convert_element_type(v, v.dtype) if eqx.is_inexact_array(v) else v


@eqx.filter_jit(donate="all-except-first")
def _step_jit(fixed, model, opt_state) -> StepResult:
    # `fixed` (batch, optimizer, trainable) is never donated: loss_fn or optimizer may hold
    # arrays the caller keeps.
    (x, y, mask, step, base_key, loss_fn), optimizer, trainable = fixed
    params, static = eqx.partition(model, trainable)
    key = jax.random.fold_in(base_key, step)
    loss, grads = eqx.filter_value_and_grad(_loss)(params, static, x, y, mask, key, loss_fn)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = eqx.apply_updates(params, updates)
    loss_ok = jnp.isfinite(loss)
    ok = loss_ok & _all_finite(new_params)

    def keep_good(new, old):
        return jnp.where(ok, new, old) if eqx.is_array(new) else new

    new_params = jax.tree.map(_strong, jax.tree.map(keep_good, new_params, params))
    new_opt_state = jax.tree.map(_strong, jax.tree.map(keep_good, new_opt_state, opt_state))
    return StepResult(eqx.combine(new_params, static), new_opt_state, loss, loss_ok, ok)


def train_step(
    batch: Batch,
    model: PyTree,
    opt_state: PyTree,
    optimizer: optax.GradientTransformation,
    trainable: PyTree,
) -> StepResult:
    """One training update, the compiled step `train` runs (``eqx.filter_jit``).

    Minimizes the masked mean of ``batch.loss_fn`` over the batch; updates only the leaves
    marked in ``trainable``. ``model`` and ``opt_state`` are DONATED (their arrays are invalid
    afterwards): start from `init_state` and feed the returned ones back. An update whose loss
    or new parameters are not finite is not applied (``StepResult.applied`` is False).
    """
    return _step_jit((batch, optimizer, trainable), model, opt_state)


# --------------------------------------------------------------------------- evaluation


def _masked_ce(logits, y, mask):
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
    return jnp.sum(jnp.where(mask, ce, 0.0))


@eqx.filter_jit
def _eval_batch(model, x, y, mask, key, index):
    if key is not None:
        key = jax.random.fold_in(key, index)
    logits = _logits(model, x, key)
    total = _masked_ce(logits, y, mask)
    correct = jnp.sum(jnp.where(mask, jnp.argmax(logits, axis=-1) == y, False))
    return jnp.stack([total, correct.astype(jnp.float32)])


def evaluate(
    model,
    x,
    y,
    batch_size: int,
    *,
    key: jax.Array | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on all of ``(x, y)``.

    Batches of ``batch_size`` in order; the last one is padded and masked, so no example is
    dropped or counted twice. ``key=None`` calls the model with ``key=None`` (deterministic);
    otherwise batch ``b`` uses ``fold_in(key, b)`` split over its examples. ``mesh``: run on
    its devices (`mtjax.sharding`), each batch split along ``"data"`` when the batch size is
    a multiple of the data axis, else computed replicated; the numbers do not depend on it
    beyond floating-point summation order.
    """
    x, y = _check_data((x, y), "evaluate")
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    n = len(x)
    bs = min(int(batch_size), n)
    it = _data.batches(x, y, bs, seed=0, epoch=0, shuffle=False, drop_last=False)
    put_batch = put_fixed = lambda tree: tree
    if mesh is not None and _sharding.n_data(_sharding.check_mesh(mesh)) > 1:
        rep = _sharding.replicated(mesh)
        split = _sharding.batch_sharding(mesh) if bs % _sharding.n_data(mesh) == 0 else rep
        put_batch = lambda tree: _sharding._place(tree, lambda p, v: split)
        put_fixed = lambda tree: _sharding._place(tree, lambda p, v: rep)
        model, key = put_fixed((model, key))
    sums = [
        _eval_batch(model, *put_batch((xb, yb, mb)), key, put_fixed(np.asarray(b, np.uint32)))
        for b, (xb, yb, mb) in enumerate(it)
    ]
    total = np.asarray(np.stack([_sharding.to_host(v) for v in sums]), np.float64).sum(axis=0)
    return float(total[0] / n), float(total[1] / n)


# --------------------------------------------------------------------------- run folder


def _lock(fd: int, folder: Path) -> None:
    if fcntl is None:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        who = f" (pid {holder})" if holder.isdigit() else ""
        raise RunFolderError(
            f"run folder {folder} is in use by another run{who}: {folder / LOCK_NAME} is locked"
        ) from None
    except OSError as err:
        raise RunFolderError(f"cannot lock run folder {folder}: {err.strerror}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


@contextlib.contextmanager
def run_folder(path: StrPath, *, resume: bool = False, overwrite: bool = False) -> Iterator[Path]:
    """Claim the folder of one run for the ``with`` block; yields it as a ``Path``.

    Creates it; holds an exclusive, non-blocking ``fcntl.flock`` on ``path/.lock`` (a second
    claim, from this or another process, raises `RunFolderError` naming the folder); refuses a
    folder holding anything besides the lock unless ``resume`` or ``overwrite`` (which only
    allow it; deleting is the caller's business); removes orphan temporary files of
    `mtjax.fileio.atomic_write_bytes` (``.NAME.XXXXXXXX.tmp``) left by a killed run.

    Multi-host (`mtjax.sharding.multi_process`): process 0 creates and locks the folder; the
    others only check it; all meet at a barrier before the block runs.
    """
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other")
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"run folder {folder} exists and is not a folder")
    if not _sharding.is_primary():
        if folder.is_dir():
            _check_folder_entries(folder, resume or overwrite)
        _sharding.sync(f"mtjax.run_folder:{folder}")
        yield folder
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise RunFolderError(f"cannot write to run folder {folder}: {err.strerror}") from None
    try:
        _lock(fd, folder)
        for p in _check_folder_entries(folder, resume or overwrite):
            p.unlink(missing_ok=True)
        _sharding.sync(f"mtjax.run_folder:{folder}")
        yield folder
    finally:
        os.close(fd)  # releases the lock


def _check_folder_entries(folder: Path, reuse: bool) -> list[Path]:
    """The orphan temporary files of ``folder``; `RunFolderError` if it holds anything else
    (besides the lock) and not ``reuse``."""
    entries = [p for p in folder.iterdir() if p.name != LOCK_NAME]
    temps = [p for p in entries if _TEMP_FILE.match(p.name) and p.is_file()]
    others = sorted(p.name for p in entries if p not in temps)
    if others and not reuse:
        raise RunFolderError(
            f"run folder {folder} is not empty (it holds {', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''}): resume the run or overwrite it"
        )
    return temps


# --------------------------------------------------------------------------- checkpoints


def _is_key_array(v) -> bool:
    return eqx.is_array(v) and jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key)


def _array_leaves(tree) -> list[tuple[str, Any]]:
    """``(path, leaf)`` of every array leaf of ``tree``, in flattening order."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(eqx.filter(tree, eqx.is_array))
    return [(jax.tree_util.keystr(p), v) for p, v in leaves]


def _tree_structure(tree, prefix: str = "") -> list[list[Any]]:
    """``[path, shape, dtype]`` of every array leaf, in flattening order."""
    return [[prefix + p, list(v.shape), str(v.dtype)] for p, v in _array_leaves(tree)]


def _structure_diff(saved: list | None, now: list) -> str | None:
    """The first difference between two `_tree_structure` lists, in words (None if equal)."""
    if not isinstance(saved, list):
        return "the checkpoint has no leaf list"
    old = {p: f"{d}{s}" for p, s, d in saved}
    new = {p: f"{d}{s}" for p, s, d in now}
    for p, desc in new.items():
        if p not in old:
            return f"leaf {p} ({desc}) is not in the checkpoint"
        if old[p] != desc:
            return f"leaf {p}: checkpoint {old[p]}, now {desc}"
    for p, desc in old.items():
        if p not in new:
            return f"checkpoint leaf {p} ({desc}) is not in the model/optimizer state"
    if [p for p, _, _ in saved] != [p for p, _, _ in now]:
        return "the leaves are in a different order"
    return None


def _storable(v):
    """What orbax stores for a leaf: the raw data of a PRNG key array, else the array."""
    return jax.random.key_data(v) if _is_key_array(v) else v


def _item_arrays(tree) -> dict[str, Any]:
    return {f"{i:05d}": _storable(v) for i, (_, v) in enumerate(_array_leaves(tree))}


def _item_digest(tree) -> str:
    """SHA-256 over the path, dtype, shape and bytes of every array leaf of ``tree``."""
    h = hashlib.sha256()
    for path, v in _array_leaves(tree):
        a = np.ascontiguousarray(_sharding.to_host(_storable(v)))
        h.update(f"{path}|{v.dtype}|{a.shape};".encode())
        h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()


def _header_digest(header: dict[str, Any]) -> str:
    """SHA-256 over the canonical JSON of ``header`` without its "sha256" field."""
    body = {k: v for k, v in header.items() if k != "sha256"}
    canonical = json.dumps(body, sort_keys=True, allow_nan=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _manager(root: Path, config: TrainConfig | None = None):
    """An `orbax.checkpoint.CheckpointManager` on ``root`` (read-only without ``config``)."""
    import orbax.checkpoint as ocp

    writing = config is not None
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.keep_checkpoints if writing else None,
        enable_async_checkpointing=bool(writing and config.async_checkpoints),
        create=writing,
        read_only=not writing,
        cleanup_tmp_directories=writing,
    )
    # orbax's array writer refuses a relative path (ValueError "Checkpoint path should be
    # absolute" from tensorstore's kvstore spec; `scripts/train.py` writes under runs/)
    root = Path(root).absolute()
    return ocp.CheckpointManager(root, options=options, item_names=(_HEADER_ITEM, *_ARRAY_ITEMS))


def _save_checkpoint(manager, step: int, header: dict[str, Any], trees: dict[str, Any]) -> None:
    import orbax.checkpoint as ocp

    header = {
        **header,
        "format": _FORMAT,
        "structure": {k: _tree_structure(t, k) for k, t in trees.items()},
        "digests": {k: _item_digest(t) for k, t in trees.items()},
    }
    header["sha256"] = _header_digest(header)
    args = {_HEADER_ITEM: ocp.args.JsonSave(header)}
    for k, t in trees.items():
        if header["structure"][k]:  # orbax refuses an empty tree
            args[k] = ocp.args.StandardSave(_item_arrays(t))
    manager.save(step, args=ocp.args.Composite(**args), force=True)


def _read_header(manager, step: int, step_dir: Path) -> dict[str, Any]:
    """The header of checkpoint ``step``, its hash checked, else `CheckpointError`."""
    import orbax.checkpoint as ocp

    if not (step_dir / _HEADER_ITEM).is_dir():
        raise CheckpointError(f"{step_dir}: not a {_FORMAT} checkpoint (no {_HEADER_ITEM}/)")
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            **{_HEADER_ITEM: ocp.args.JsonRestore()}
        ))  # fmt: skip
        header = restored[_HEADER_ITEM]
    except Exception as err:  # noqa: BLE001 - any failure here means an unusable header
        raise CheckpointError(
            f"{step_dir}: corrupt or edited header ({type(err).__name__}: {err})"
        ) from None
    if not isinstance(header, dict) or header.get("format") != _FORMAT:
        raise CheckpointError(f"{step_dir}: not a {_FORMAT} checkpoint")
    if header.get("sha256") != _header_digest(header):
        raise CheckpointError(f"{step_dir}: corrupt or edited (SHA-256 of the header differs)")
    return header


def _abstract(tree, sharding) -> dict[str, jax.ShapeDtypeStruct]:
    out = {}
    for i, (_, v) in enumerate(_array_leaves(tree)):
        s = jax.eval_shape(_storable, v)
        out[f"{i:05d}"] = jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding)
    return out


def _fill(like, values: dict[str, Any]):
    """``like`` with its array leaves replaced by ``values`` (as `_item_arrays` names them)."""
    arrays, static = eqx.partition(like, eqx.is_array)
    flat, treedef = jax.tree.flatten(arrays)
    new = []
    for i, template in enumerate(flat):
        v = values[f"{i:05d}"]
        if _is_key_array(template):
            v = jax.random.wrap_key_data(v, impl=jax.random.key_impl(template))
        new.append(v)
    return eqx.combine(jax.tree.unflatten(treedef, new), static)


def _restore_items(manager, step: int, step_dir: Path, header, like: dict[str, Any], sharding):
    """The items of ``like`` (name -> template or None) restored and hash-checked."""
    import orbax.checkpoint as ocp

    structure = header.get("structure") or {}
    for k, tree in like.items():
        if tree is None:
            continue
        diff = _structure_diff(structure.get(k), _tree_structure(tree, k))
        if diff is not None:
            raise CheckpointError(f"{step_dir}: the model/optimizer structure differs: {diff}")
    wanted = {k: t for k, t in like.items() if t is not None and structure[k]}
    restored = {}
    if wanted:
        args = {k: ocp.args.StandardRestore(_abstract(t, sharding)) for k, t in wanted.items()}
        try:
            restored = manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as err:  # noqa: BLE001 - any failure here means unusable arrays
            raise CheckpointError(
                f"{step_dir}: corrupt or truncated arrays, cannot restore "
                f"({type(err).__name__}: {str(err)[:300]})"
            ) from None
    out = {}
    for k, tree in like.items():
        if tree is None:
            out[k] = None
            continue
        value = _fill(tree, restored[k]) if k in wanted else tree
        if _item_digest(value) != (header.get("digests") or {}).get(k):
            raise CheckpointError(
                f"{step_dir}: corrupt or edited (SHA-256 of the {k} arrays differs)"
            )
        out[k] = value
    return out


def _state_sharding(mesh):
    """Where restored state lives: replicated over ``mesh``, or the first local device."""
    if mesh is not None and _sharding.n_data(_sharding.check_mesh(mesh)) > 1:
        return _sharding.replicated(mesh)
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _locate(path: StrPath, step: int | None) -> tuple[Path, int, Any]:
    """``(step folder, step, read-only manager)`` of a run folder, a ``checkpoints`` folder
    or a step folder; the latest step unless ``step``."""
    path = Path(path)
    if path.name.isdigit() and (path / _HEADER_ITEM).is_dir():
        root, step = path.parent, int(path.name) if step is None else step
    elif (path / CHECKPOINT_NAME).is_dir():
        root = path / CHECKPOINT_NAME
    elif path.is_dir() and path.name == CHECKPOINT_NAME:
        root = path
    else:
        legacy = path if path.name == _LEGACY_CHECKPOINT else path / _LEGACY_CHECKPOINT
        if legacy.is_file():
            raise CheckpointError(_legacy_message(legacy))
        what = "is not a folder" if path.exists() else "does not exist"
        raise CheckpointError(f"{path}: not a checkpoint: {path} {what}")
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a checkpoint folder")
    manager = _manager(root)
    steps = sorted(manager.all_steps())
    problem = None
    if not steps:
        legacy = root.parent / _LEGACY_CHECKPOINT
        problem = _legacy_message(legacy) if legacy.is_file() else f"{root}: holds no checkpoint"
    elif step is not None and int(step) not in steps:
        problem = f"{root}: no checkpoint of step {step} (steps: {steps})"
    if problem is not None:
        manager.close()
        raise CheckpointError(problem)
    step = steps[-1] if step is None else int(step)
    return root / str(step), step, manager


def _legacy_message(path: Path) -> str:
    return (
        f"{path}: a single-file checkpoint of an earlier mtjax (format "
        "mtjax.train.checkpoint/2); this version reads orbax checkpoints only: train again "
        "(overwrite=True / --overwrite)"
    )


def load_checkpoint(
    path: StrPath,
    like: tuple[Any, Any] | None = None,
    *,
    step: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[dict[str, Any], Any]:
    """``(header, (model, opt_state))`` of a `train` checkpoint.

    ``path``: a run folder, its ``checkpoints`` folder, or one step folder
    (``checkpoints/<step>``); the latest step unless ``step``. ``like``: the templates
    ``(model, opt_state)``; ``(model, None)`` restores the model only (opt_state None);
    ``None`` reads the checked header only (tree None). ``mesh``: restore the arrays
    replicated over its devices (default: on the first local device). Raises
    `CheckpointError` naming the folder if it is malformed, corrupt, edited, or its leaves do
    not match ``like``. Without a template, see `load_run`.
    """
    if like is not None and not (isinstance(like, tuple) and len(like) == 2):
        raise TypeError("like must be None or a pair (model, opt_state or None)")
    step_dir, step, manager = _locate(path, step)
    try:
        header = _read_header(manager, step, step_dir)
        if like is None:
            return header, None
        items = _restore_items(manager, step, step_dir, header,
                               dict(zip(_ARRAY_ITEMS, like, strict=True)),
                               _state_sharding(mesh))  # fmt: skip
    finally:
        manager.close()
    return header, (items["model"], items["opt_state"])


class LoadedRun(NamedTuple):
    """What `load_run` returns: the trained model and its checkpoint's header."""

    model: Any
    header: dict[str, Any]


def _import_builder(name: object) -> Callable[[dict[str, Any]], Any]:
    """The callable ``"package.module:function"`` names; ``ValueError`` if there is none."""
    if not isinstance(name, str) or name.count(":") != 1:
        raise ValueError(f"model_builder must be 'package.module:function', got {name!r}")
    module, _, attr = name.partition(":")
    try:
        fn = importlib.import_module(module)
        for part in attr.split("."):
            fn = getattr(fn, part)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"model_builder {name!r} cannot be imported: {err}") from None
    if not callable(fn):
        raise ValueError(f"model_builder {name!r} is not callable")
    return fn


def load_run(
    path: StrPath, *, step: int | None = None, mesh: jax.sharding.Mesh | None = None
) -> LoadedRun:
    """The trained model of a run folder, rebuilt without a hand-made template.

    The checkpoint's ``model_builder`` (recorded by `train`; `mtjax.experiments.run`
    records ``"mtjax.experiments:model_from_run_info"``) is imported and called with the
    stored ``run_info`` to build the template, which the checkpoint then fills. ``path``,
    ``step``, ``mesh``: as in `load_checkpoint`. A run trained from a model the caller built
    has no builder: `CheckpointError` (use ``load_checkpoint(path, (template, None))``).
    """
    step_dir, step, manager = _locate(path, step)
    try:
        header = _read_header(manager, step, step_dir)
        name = header.get("model_builder")
        if name is None:
            raise CheckpointError(
                f"{step_dir}: the run recorded no model_builder; build the model template "
                "yourself and use load_checkpoint(path, (template, None))"
            )
        try:
            template = _import_builder(name)(header.get("run_info"))
        except ValueError as err:
            raise CheckpointError(f"{step_dir}: {err}") from None
        items = _restore_items(manager, step, step_dir, header,
                               {"model": template, "opt_state": None},
                               _state_sharding(mesh))  # fmt: skip
    finally:
        manager.close()
    return LoadedRun(items["model"], header)


def _check_resumable(
    path: Path,
    header: dict[str, Any],
    config: TrainConfig,
    run_info: dict[str, Any] | None,
    fingerprint: str,
) -> None:
    saved, now = header.get("config", {}), config.to_json()
    diff = [
        f"{k}: checkpoint {saved.get(k)!r}, now {now[k]!r}"
        for k in now
        if k not in _RESUME_FREE and saved.get(k) != now[k]
    ]
    saved_info, now_info = header.get("run_info") or {}, run_info or {}
    missing = "<not set>"
    diff += [
        f"{k}: checkpoint {saved_info.get(k, missing)!r}, now {now_info.get(k, missing)!r}"
        for k in sorted(saved_info.keys() | now_info.keys())
        if saved_info.get(k, missing) != now_info.get(k, missing)
    ]
    if diff:
        raise CheckpointError(f"cannot resume from {path}: settings differ ({'; '.join(diff)})")
    if header.get("data_fingerprint") != fingerprint:
        raise CheckpointError(f"cannot resume from {path}: the training or test data differ")


# --------------------------------------------------------------------------- metrics


def read_metrics(path: StrPath) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (blank lines skipped).

    A last line that is not a JSON record (torn by a kill mid-write) is ignored with a
    warning; a bad line elsewhere raises ``ValueError`` naming the file and line.
    """
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    records = []
    for i, (n, line) in enumerate(lines):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            if i == len(lines) - 1:
                warnings.warn(f"{path}: ignoring torn last line {n}", stacklevel=2)
                break
            raise ValueError(f"{path}, line {n}: not a JSON record ({err})") from None
        records.append(record)
    return records


def _write_metrics(path: Path, records: Sequence[dict[str, Any]]) -> None:
    text = "".join(json.dumps(r, allow_nan=True) + "\n" for r in records)
    atomic_write_bytes(path, text.encode())


# --------------------------------------------------------------------------- train


def _zero_sums() -> dict[str, Any]:
    return {"epoch_loss_sum": 0.0, "epoch_loss_count": 0, "log_loss_sum": 0.0, "log_loss_count": 0}


class _Session:
    """One call of `train`: the fixed setup and the state that the phases advance."""

    def __init__(
        self, model, data, config, *, out, run_info, filter_spec, loss_fn, progress,
        stop_after_steps, mesh, model_builder, on_step=None,
    ):  # fmt: skip
        (self.x, self.y), (self.xt, self.yt) = data
        self.config, self.run_info, self.model_builder = config, run_info, model_builder
        self.progress = progress
        self.primary = _sharding.is_primary()
        # devices: one (no placement) or a mesh (batch split on "data", the rest replicated)
        self.mesh = mesh if _sharding.n_data(mesh) > 1 else None
        self.state_sharding = _state_sharding(self.mesh)
        self.steps_per_epoch = _data.num_batches(len(self.x), config.batch_size, drop_last=False)
        self.total_steps = config.epochs * self.steps_per_epoch
        self.stop_at = self.total_steps
        if stop_after_steps is not None:
            self.stop_at = min(self.total_steps, int(stop_after_steps))
        self.schedule = make_schedule(config, self.total_steps)
        self.optimizer = make_optimizer(config, self.total_steps)
        self.model, self.opt_state, self.trainable = init_state(model, self.optimizer, filter_spec)
        self.fingerprint = _fingerprint(self.x, self.y, self.xt, self.yt)
        self.base_key = jax.random.key(config.seed)
        # stochastic models (thermal/read noise) are evaluated with a fixed key per run
        self.eval_key = jax.random.fold_in(jax.random.key(config.seed), 2**31 - 1)
        self.loss_fn = loss_fn
        self.on_step = on_step
        if self.mesh is not None:
            self.model, self.opt_state, self.base_key, self.loss_fn = _sharding.replicate(
                (self.model, self.opt_state, self.base_key, loss_fn), self.mesh
            )
            self.batch_sharding = _sharding.batch_sharding(self.mesh)
        self.out = out
        self.ckpt_root = None if out is None else out / CHECKPOINT_NAME
        self.manager = None  # opened by open_checkpoints
        self.metrics_path = None if out is None else out / METRICS_NAME
        # state
        self.step = 0
        self.ckpt_step: int | None = None
        self.sums = _zero_sums()
        self.history: list[dict[str, Any]] = []
        self.last_eval: tuple[int, float, float] | None = None
        self.wall_before = 0.0
        self.t0 = time.perf_counter()

    def wall(self) -> float:
        return self.wall_before + (time.perf_counter() - self.t0)

    @property
    def ckpt_path(self) -> Path | None:
        """The folder of the last checkpoint written (None before the first)."""
        return None if self.ckpt_step is None else self.ckpt_root / str(self.ckpt_step)

    # ---- setup / resume

    def open_checkpoints(self) -> None:
        root, legacy = self.ckpt_root, self.out / _LEGACY_CHECKPOINT
        if root.exists() and not root.is_dir():
            raise CheckpointError(f"{root}: not a checkpoint folder (a file is in the way)")
        if legacy.exists() and not root.exists():
            raise CheckpointError(_legacy_message(legacy))
        self.manager = _manager(root, self.config)

    def close(self) -> None:
        """Wait for background checkpoint writes and release the manager."""
        if self.manager is not None:
            self.manager.wait_until_finished()
            self.manager.close()
            self.manager = None

    def resume(self) -> None:
        """Continue from the latest checkpoint, if any (after checking it defines this run)."""
        step = self.manager.latest_step()
        if step is None:
            return
        path = self.ckpt_root / str(step)
        header = _read_header(self.manager, step, path)
        _check_resumable(path, header, self.config, self.run_info, self.fingerprint)
        items = _restore_items(self.manager, step, path, header,
                               {"model": self.model, "opt_state": self.opt_state},
                               self.state_sharding)  # fmt: skip
        self.model, self.opt_state = items["model"], items["opt_state"]  # fresh arrays
        self.step = self.ckpt_step = int(header["step"])
        self.wall_before = float(header["wall_time"])
        self.sums = {k: header[k] for k in _zero_sums()}
        if header.get("last_eval") is not None:
            self.last_eval = tuple(header["last_eval"])
        if self.metrics_path.exists():
            records = read_metrics(self.metrics_path)
            self.history = [r for r in records if r.get("step", 0) <= self.step]

    def start_metrics(self) -> None:
        """Rewrite the metrics file with the records up to the checkpoint."""
        if self.primary:
            _write_metrics(self.metrics_path, self.history)

    def emit(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.metrics_path is not None and self.primary:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    # ---- epoch loop

    def run(self) -> None:
        cfg, spe = self.config, self.steps_per_epoch
        start_epoch, start_batch = divmod(self.step, spe)
        bars = dict(disable=not self.progress)
        with tqdm(total=cfg.epochs, initial=min(start_epoch, cfg.epochs), desc="epochs",
                  unit="epoch", position=0, **bars) as epoch_bar:  # fmt: skip
            for epoch in range(start_epoch, cfg.epochs):
                if self.step >= self.stop_at:
                    break
                first = start_batch if epoch == start_epoch else 0
                batches = _data.batches(
                    self.x, self.y, cfg.batch_size, seed=cfg.seed, epoch=epoch, drop_last=False
                )
                with tqdm(total=spe, initial=first, desc=f"epoch {epoch + 1}", unit="step",
                          leave=False, position=1, **bars) as bar:  # fmt: skip
                    for xb, yb, mb in itertools.islice(batches, first, None):
                        loss = self.train_one(epoch, xb, yb, mb)
                        bar.update(1)
                        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                        if self.step % spe == 0:
                            acc = self.end_epoch(epoch)
                            epoch_bar.update(1)
                            epoch_bar.set_postfix(test_acc=f"{acc:.4f}", refresh=False)
                        if self.checkpoint_due():
                            self.checkpoint()
                        if self.step >= self.stop_at:
                            break

    # ---- one step

    def train_one(self, epoch: int, xb, yb, mb) -> float:
        """One update; its loss. Raises `NonFiniteLossError` (update not applied) if needed."""
        step = np.asarray(self.step, np.uint32)
        if self.mesh is not None:  # this process's shards of the global batch
            xb, yb, mb = (_sharding.global_array(a, self.batch_sharding) for a in (xb, yb, mb))
            step = _sharding.global_array(step, self.state_sharding)
        if self.on_step is not None:
            self.model = self.on_step(self.step, self.model)
            if self.mesh is not None:
                self.model = _sharding.replicate(self.model, self.mesh)
        batch = Batch(xb, yb, mb, step, self.base_key, self.loss_fn)
        out = train_step(batch, self.model, self.opt_state, self.optimizer, self.trainable)
        self.model, self.opt_state = out.model, out.opt_state
        loss, loss_ok, applied = (
            _sharding.to_host(v).item() for v in (out.loss, out.loss_finite, out.applied)
        )
        if not applied:
            self.stop_nonfinite(epoch, loss, loss_ok)
        self.step += 1
        for k in ("epoch_loss", "log_loss"):
            self.sums[f"{k}_sum"] += loss
            self.sums[f"{k}_count"] += 1
        if self.step % self.config.log_every == 0:
            lr = None if self.schedule is None else float(np.asarray(self.schedule(self.step - 1)))
            self.emit({
                "event": "step", "step": self.step, "epoch": epoch,
                "train_loss": self.sums["log_loss_sum"] / self.sums["log_loss_count"],
                "lr": lr, "wall_time": self.wall(),
            })  # fmt: skip
            self.sums["log_loss_sum"], self.sums["log_loss_count"] = 0.0, 0
        return loss

    def stop_nonfinite(self, epoch: int, loss: float, loss_ok: bool) -> None:
        step, spe = self.step + 1, self.steps_per_epoch
        what = "loss" if not loss_ok else "updated parameters"
        last = (
            f"last checkpoint: step {self.ckpt_step} in {self.ckpt_path}"
            if self.ckpt_step is not None
            else "no checkpoint written"
        )
        self.emit({
            "event": "nonfinite", "step": step, "epoch": epoch,
            "train_loss": loss if math.isfinite(loss) else None, "wall_time": self.wall(),
        })  # fmt: skip
        raise NonFiniteLossError(
            f"non-finite {what} at step {step} (epoch {epoch + 1}, batch "
            f"{self.step % spe + 1}/{spe}; loss {loss}); the update was not applied; {last}",
            step=step, epoch=epoch, loss=loss, checkpoint_step=self.ckpt_step,
            checkpoint_path=self.ckpt_path,
        )  # fmt: skip

    # ---- evaluation

    def evaluate(self) -> tuple[float, float]:
        return evaluate(self.model, self.xt, self.yt, self.config.eval_batch_size,
                        key=self.eval_key, mesh=self.mesh)  # fmt: skip

    def end_epoch(self, epoch: int) -> float:
        """Evaluate on the test data and write the epoch record; the test accuracy."""
        test_loss, test_acc = self.evaluate()
        self.last_eval = (self.step, test_loss, test_acc)
        self.emit({
            "event": "epoch", "step": self.step, "epoch": epoch + 1,
            "train_loss": self.sums["epoch_loss_sum"] / self.sums["epoch_loss_count"],
            "test_loss": test_loss, "test_accuracy": test_acc, "wall_time": self.wall(),
        })  # fmt: skip
        self.sums["epoch_loss_sum"], self.sums["epoch_loss_count"] = 0.0, 0
        return test_acc

    # ---- checkpoint

    def checkpoint_due(self) -> bool:
        if self.manager is None:
            return False
        every = self.config.checkpoint_every
        epoch_end = self.step % self.steps_per_epoch == 0
        return (epoch_end if every is None else self.step % every == 0) or self.step == self.stop_at

    def checkpoint(self) -> None:
        spe = self.steps_per_epoch
        last_eval = self.last_eval  # the header is strict JSON: drop a non-finite evaluation
        if last_eval is not None and not all(map(math.isfinite, last_eval[1:])):
            last_eval = None
        header = {
            "step": self.step, "epoch": self.step // spe, "batch_in_epoch": self.step % spe,
            "steps_per_epoch": spe, "total_steps": self.total_steps,
            "config": self.config.to_json(), "run_info": self.run_info,
            "model_builder": self.model_builder, "data_fingerprint": self.fingerprint,
            "wall_time": self.wall(), "last_eval": last_eval, **self.sums,
            "devices": 1 if self.mesh is None else self.mesh.size,
            "processes": jax.process_count(), "jax_version": jax.__version__,
        }  # fmt: skip
        trees = {"model": self.model, "opt_state": self.opt_state}
        _save_checkpoint(self.manager, self.step, header, trees)
        self.ckpt_step = self.step

    def result(self) -> TrainResult:
        if self.last_eval is not None and self.last_eval[0] == self.step:
            _, test_loss, test_acc = self.last_eval
        else:
            test_loss, test_acc = self.evaluate()
        return TrainResult(
            model=self.model,
            opt_state=self.opt_state,
            history=self.history,
            test_loss=test_loss,
            test_accuracy=test_acc,
            wall_time=self.wall(),
            step=self.step,
            total_steps=self.total_steps,
            completed=self.step == self.total_steps,
            checkpoint_path=self.ckpt_path if self.ckpt_step is not None else None,
        )


def train(
    model,
    train_data: tuple[np.ndarray, np.ndarray],
    test_data: tuple[np.ndarray, np.ndarray],
    config: TrainConfig,
    *,
    out_dir: StrPath | None = None,
    resume: bool = False,
    overwrite: bool = False,
    run_info: dict[str, Any] | None = None,
    filter_spec=None,
    progress: bool = True,
    stop_after_steps: int | None = None,
    loss_fn=cross_entropy,
    mesh: jax.sharding.Mesh | None = None,
    model_builder: str | None = None,
    on_step: Callable[[int, Any], Any] | None = None,
) -> TrainResult:
    """Train ``model`` on ``train_data = (x, y)``; evaluate on ``test_data`` each epoch.

    ``out_dir``: the run folder (see the module doc), claimed with `run_folder` for the whole
    call. A folder that already holds files is refused (`RunFolderError`) unless
    ``resume`` (continue from its latest checkpoint if there is one, fresh otherwise) or
    ``overwrite`` (delete the checkpoints and metrics there, then start fresh).
    ``run_info``: a JSON-able dict describing everything else that defines the run (device
    settings, model sizes, ...; `mtjax.experiments.run` passes its `RunSpec`), stored in the
    checkpoint and compared key by key on resume.
    ``filter_spec``: an Equinox filter (bool or callable per leaf, a prefix of ``model``)
    restricting what is trained; by default `mtjax.nn.trainable` (every inexact array except
    raw device arrays, which are never optimized: devices are designed with
    `mtjax.codesign`).
    ``stop_after_steps``: stop (and checkpoint) once the global step count, resumed steps
    included, reaches this value. The caller's ``model`` arrays are copied, never donated.
    ``on_step(step, model) -> model``: called before every update (outside jit) with the
    number of updates done; it may change array values of the model but not its structure
    (`mtjax.codesign.DesignSchedule` switches co-design layers between live and cached).
    ``loss_fn(logits, x, y) -> per-example loss``: the training objective (default
    `cross_entropy`; `mtjax.distill.DistillationLoss` for KD); it may be an Equinox module
    holding arrays (a frozen teacher), which are never trained. A loss with the attribute
    ``needs_model = True`` is called as ``loss_fn(logits, x, y, model=model, key=key)`` (the
    step's key), e.g. `mtjax.codesign.EnergyLoss`. Test metrics stay cross-entropy.
    ``mesh``: a `jax.sharding.Mesh` with a ``"data"`` axis to train data-parallel on
    (`mtjax.sharding.data_mesh`); default: all devices when there are several
    (`mtjax.sharding.default_mesh`), one device otherwise; ``data_mesh(1)`` forces one.
    ``config.batch_size`` must be a multiple of the data-axis size.
    ``model_builder``: ``"package.module:function"`` that rebuilds an untrained ``model``
    from ``run_info``; stored in the checkpoint so that `load_run` needs only the folder.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    data = _check_data(train_data, "train_data"), _check_data(test_data, "test_data")
    if stop_after_steps is not None and (not _is_int(stop_after_steps) or stop_after_steps < 0):
        raise ValueError(f"stop_after_steps must be None or >= 0, got {stop_after_steps!r}")
    if (resume or overwrite) and out_dir is None:
        raise ValueError(f"{'resume' if resume else 'overwrite'}=True needs out_dir")
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other")
    run_info = _normal_run_info(run_info)
    if model_builder is not None:
        _import_builder(model_builder)
    mesh = _sharding.default_mesh() if mesh is None else _sharding.check_mesh(mesh)
    n_dev = _sharding.n_data(mesh)
    if config.batch_size % n_dev:
        raise ValueError(
            f"TrainConfig.batch_size {config.batch_size} is not a multiple of the {n_dev} "
            f"devices of the data axis; use a batch size divisible by {n_dev} or fewer "
            "devices (mesh=mtjax.sharding.data_mesh(n))"
        )
    if _sharding.multi_process() and n_dev < jax.device_count():
        raise ValueError(
            f"mesh: a multi-host run must use all {jax.device_count()} devices, got {n_dev}"
        )
    kwargs = dict(run_info=run_info, filter_spec=filter_spec, loss_fn=loss_fn,
                  progress=progress, stop_after_steps=stop_after_steps, mesh=mesh,
                  model_builder=model_builder, on_step=on_step)  # fmt: skip
    if out_dir is None:
        session = _Session(model, data, config, out=None, **kwargs)
        session.run()
        return session.result()
    with run_folder(out_dir, resume=resume, overwrite=overwrite) as out:
        session = _Session(model, data, config, out=out, **kwargs)
        if overwrite and session.primary:
            for name in _RUN_FILES:  # the checkpoints first: never a stale one to resume
                path = out / name
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
        _sharding.sync(f"mtjax.train.start:{out}")
        try:
            session.open_checkpoints()
            if resume:
                session.resume()
            session.start_metrics()
            session.run()
        finally:
            session.close()
        return session.result()


# --------------------------------------------------------------------------- plots


def plot_history(history: Sequence[dict[str, Any]], path: StrPath) -> Path:
    """PNG of `mtjax.plot.training_curves` (loss against step, test accuracy against epoch),
    written atomically."""
    return plot.save(plot.training_curves(history), path, dpi=100)


def accuracy_curve_png(metrics_path: StrPath, png_path: StrPath) -> Path:
    """`plot_history` of the records in ``metrics_path`` (a ``metrics.jsonl``)."""
    return plot_history(read_metrics(metrics_path), png_path)
