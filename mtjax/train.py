"""Training loop for Equinox classifiers: Optax, checkpoints, exact resume, metrics, plots.

A model is an Equinox module mapping ONE example to logits, ``model(x, *, key=None)``; batches
go through `jax.vmap`, each example getting its own PRNG key (for stochastic MTJ neurons:
thermal or read noise; models may ignore it).

`train` runs ``config.epochs`` epochs of `mtjax.data.batches` (shuffled per ``(seed, epoch)``,
``drop_last=False``: the last batch of an epoch is padded and masked, so every example is used
once per epoch and the step has one static shape). Each step minimizes the masked mean of
``optax.softmax_cross_entropy_with_integer_labels`` with ``eqx.filter_value_and_grad`` inside
one ``eqx.filter_jit`` that donates the model and optimizer state. Step ``k`` (0-based count of
updates done before it) uses the key ``fold_in(key(seed), k)``, so a run depends only on
``(model, data, config)`` and can be stopped and resumed anywhere.

Optimizer (documented choice): Adam whose learning rate follows a cosine decay from ``lr`` to 0
over all ``epochs * steps_per_epoch`` steps (``optax.cosine_decay_schedule``); no warm-up.
``schedule="constant"`` keeps ``lr``; ``optimizer="sgd"`` uses plain SGD; a callable such as
``optax.adamw`` is called with the schedule; a ready ``optax.GradientTransformation`` is used as
is (``lr`` and ``schedule`` are then ignored).

Files in ``out_dir`` (all optional):

- ``metrics.jsonl``: one JSON object a line. ``{"event": "step", ...}`` every ``log_every``
  steps (mean train loss since the previous one, learning rate); ``{"event": "epoch", ...}`` at
  each epoch end (epoch-mean train loss, ``test_loss``, ``test_accuracy``); ``"step"`` counts
  updates done, ``"epoch"`` is 1-based for epoch records and 0-based for step records, and
  ``"wall_time"`` is seconds of training summed over resumed sessions.
- ``checkpoint.eqx``: one file, written atomically (temporary file in ``out_dir`` then
  `os.replace`): a one-line JSON header (step, epoch, config, data fingerprint, running loss
  sums, SHA-256 of the payload), a newline, then ``eqx.tree_serialise_leaves`` of
  ``(model, opt_state)``. The header is authoritative; ``checkpoint.json`` is a readable copy of
  it, written after the checkpoint, with the payload hash to check the pair.

``resume=True`` continues from ``checkpoint.eqx`` (the model passed in is the template for
``tree_deserialise_leaves``): it skips the batches already done in the interrupted epoch and
gives bit-identical weights and metrics (other than wall time) to an uninterrupted run. The
trajectory-defining config fields and the data must match the checkpoint. A non-finite loss
(or an update that would make a parameter non-finite) is not applied; `NonFiniteLossError`
names the step, and the checkpoint on disk stays the last finite one. Epoch-end evaluation
uses one fixed key per run, ``fold_in(key(seed), 2**31 - 1)`` (deterministic models ignore it).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from mtjax import data as _data
from mtjax.fileio import atomic_write_bytes, new_figure, save_figure

__all__ = [
    "CHECKPOINT_NAME",
    "METRICS_NAME",
    "SIDECAR_NAME",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainResult",
    "accuracy_curve_png",
    "evaluate",
    "load_checkpoint",
    "make_optimizer",
    "plot_history",
    "read_metrics",
    "train",
]

StrPath = str | os.PathLike[str]

CHECKPOINT_NAME = "checkpoint.eqx"
SIDECAR_NAME = "checkpoint.json"
METRICS_NAME = "metrics.jsonl"
_FORMAT = "mtjax.train.checkpoint/1"
_OPTIMIZERS = ("adam", "sgd")
_SCHEDULES = ("cosine", "constant")
# Config fields that change the trajectory; they must match the checkpoint on resume.
_TRAJECTORY_FIELDS = ("epochs", "batch_size", "lr", "seed", "optimizer", "schedule")


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
    - ``checkpoint_every``: steps between checkpoints; ``None`` checkpoints at each epoch end.
      The last step (and a ``stop_after_steps`` stop) is always checkpointed.
    - ``log_every``: steps between ``"step"`` records in the metrics.
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

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size", "log_every"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 1, got {v!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"TrainConfig.seed must be an integer >= 0, got {self.seed!r}")
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
        if d["checkpoint_every"] is not None:
            d["checkpoint_every"] = int(d["checkpoint_every"])
        return d


@functools.lru_cache(maxsize=32)
def _cached_optimizer(opt, schedule: str, lr: float, total_steps: int):
    if isinstance(opt, optax.GradientTransformation):
        return opt
    if schedule == "cosine":
        sched = optax.cosine_decay_schedule(lr, decay_steps=max(total_steps, 1), alpha=0.0)
    else:
        sched = optax.constant_schedule(lr)
    if opt == "adam":
        return optax.adam(sched)
    if opt == "sgd":
        return optax.sgd(sched)
    return opt(sched)


def make_optimizer(config: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """The optimizer `train` uses for ``total_steps`` steps (cached, so jit caches are reused)."""
    try:
        return _cached_optimizer(config.optimizer, config.schedule, float(config.lr), total_steps)
    except TypeError:  # unhashable callable
        return _cached_optimizer.__wrapped__(
            config.optimizer, config.schedule, float(config.lr), total_steps
        )


def _learning_rate(config: TrainConfig, step: int, total_steps: int) -> float | None:
    """The scheduled learning rate at ``step`` for the built-in schedules (for the metrics)."""
    if isinstance(config.optimizer, optax.GradientTransformation):
        return None
    if config.schedule == "constant":
        return float(config.lr)
    frac = min(step, total_steps) / max(total_steps, 1)
    return float(config.lr) * 0.5 * (1.0 + math.cos(math.pi * frac))


# --------------------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What `train` returns.

    ``test_loss``/``test_accuracy`` are for the returned model; ``wall_time`` is seconds of
    training summed over resumed sessions; ``completed`` is False after ``stop_after_steps``.
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


# --------------------------------------------------------------------------- jitted pieces


def _own(tree):
    """Fresh, strongly typed copies of the array leaves (they get donated to the step)."""

    def copy(a):
        if not eqx.is_array(a):
            return a
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            return jnp.copy(a)
        return jnp.array(a, dtype=a.dtype, copy=True)

    return jax.tree.map(copy, tree)


def _trainable_spec(model, filter_spec):
    """A bool per leaf of ``model``: selected by ``filter_spec`` and an inexact array."""
    selected = eqx.filter(model, eqx.is_array if filter_spec is None else filter_spec)
    return jax.tree.map(
        lambda v: v is not None and eqx.is_inexact_array(v),
        selected,
        is_leaf=lambda v: v is None,
    )


def _logits(model, x, key):
    if key is None:
        return jax.vmap(lambda xi: model(xi, key=None))(x)
    keys = jax.random.split(key, x.shape[0])
    return jax.vmap(lambda xi, ki: model(xi, key=ki))(x, keys)


def _masked_ce(logits, y, mask):
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
    w = mask.astype(jnp.float32)
    return jnp.sum(jnp.where(mask, ce, 0.0)), w


def cross_entropy(logits, x, y):
    """Default per-example training loss: softmax cross-entropy with integer labels."""
    del x
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)


def _loss(params, static, x, y, mask, key, loss_fn):
    per_example = loss_fn(_logits(eqx.combine(params, static), x, key), x, y)
    w = mask.astype(jnp.float32)
    return jnp.sum(jnp.where(mask, per_example, 0.0)) / jnp.maximum(jnp.sum(w), 1.0)


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(tree) if eqx.is_inexact_array(v)]
    return jnp.stack(leaves).all() if leaves else jnp.array(True)


def _strong(v):
    return jax.lax.convert_element_type(v, v.dtype) if eqx.is_inexact_array(v) else v


@eqx.filter_jit(donate="all-except-first")
def _train_step(batch, model, opt_state, optimizer, spec):
    x, y, mask, step, base_key, loss_fn = batch  # batch is never donated (loss_fn may hold arrays)
    params, static = eqx.partition(model, spec)
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
    return eqx.combine(new_params, static), new_opt_state, loss, loss_ok, ok


@eqx.filter_jit
def _eval_batch(model, x, y, mask, key, index):
    if key is not None:
        key = jax.random.fold_in(key, index)
    logits = _logits(model, x, key)
    total, w = _masked_ce(logits, y, mask)
    correct = jnp.sum(jnp.where(mask, jnp.argmax(logits, axis=-1) == y, False))
    return jnp.stack([total, correct.astype(jnp.float32)])


def evaluate(model, x, y, batch_size: int, *, key: jax.Array | None = None) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on all of ``(x, y)``.

    Batches of ``batch_size`` in order; the last one is padded and masked, so no example is
    dropped or counted twice. ``key=None`` calls the model with ``key=None`` (deterministic);
    otherwise batch ``b`` uses ``fold_in(key, b)`` split over its examples.
    """
    x, y = _check_data((x, y), "evaluate")
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    n = len(x)
    bs = min(int(batch_size), n)
    it = _data.batches(x, y, bs, seed=0, epoch=0, shuffle=False, drop_last=False)
    sums = [
        _eval_batch(model, xb, yb, mb, key, np.asarray(b, np.uint32))
        for b, (xb, yb, mb) in enumerate(it)
    ]
    total = np.asarray(jnp.stack(sums), dtype=np.float64).sum(axis=0)
    return float(total[0] / n), float(total[1] / n)


# --------------------------------------------------------------------------- files


def _save_checkpoint(path: Path, header: dict[str, Any], tree) -> None:
    buf = io.BytesIO()
    eqx.tree_serialise_leaves(buf, tree)
    payload = buf.getvalue()
    header = {
        **header,
        "format": _FORMAT,
        "payload_bytes": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
    }
    line = json.dumps(header, sort_keys=True, allow_nan=False).encode()
    atomic_write_bytes(path, line + b"\n" + payload)
    sidecar = json.dumps({**header, "checkpoint": path.name}, sort_keys=True, indent=2)
    atomic_write_bytes(path.with_name(SIDECAR_NAME), sidecar.encode() + b"\n")


def load_checkpoint(path: StrPath, like) -> tuple[dict[str, Any], Any]:
    """Read ``(header, tree)`` from a `train` checkpoint; ``like`` is the template tree
    (``(model, opt_state)`` for `train`'s). Raises ``ValueError`` if the file is malformed."""
    path = Path(path)
    blob = path.read_bytes()
    head, sep, payload = blob.partition(b"\n")
    try:
        header = json.loads(head)
        ok = sep and isinstance(header, dict) and header.get("format") == _FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise ValueError(f"{path}: not a {_FORMAT} checkpoint")
    if len(payload) != header.get("payload_bytes") or (
        hashlib.sha256(payload).hexdigest() != header.get("payload_sha256")
    ):
        raise ValueError(f"{path}: payload does not match its header (truncated or corrupt)")
    return header, eqx.tree_deserialise_leaves(io.BytesIO(payload), like)


def read_metrics(path: StrPath) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_metrics(path: Path, records: Sequence[dict[str, Any]]) -> None:
    text = "".join(json.dumps(r, allow_nan=True) + "\n" for r in records)
    atomic_write_bytes(path, text.encode())


def _check_resumable(header: dict[str, Any], config: TrainConfig, fingerprint: str, path) -> None:
    saved = header.get("config", {})
    now = config.to_json()
    diff = []
    for k in _TRAJECTORY_FIELDS:
        if k == "optimizer" and not isinstance(config.optimizer, str):
            continue  # a custom optimizer cannot be compared; the caller vouches for it
        if saved.get(k) != now[k]:
            diff.append(f"{k}: checkpoint {saved.get(k)!r}, now {now[k]!r}")
    if diff:
        raise ValueError(f"cannot resume from {path}: config differs ({'; '.join(diff)})")
    if header.get("data_fingerprint") != fingerprint:
        raise ValueError(f"cannot resume from {path}: the training or test data differ")


# --------------------------------------------------------------------------- train


def train(
    model,
    train_data: tuple[np.ndarray, np.ndarray],
    test_data: tuple[np.ndarray, np.ndarray],
    config: TrainConfig,
    *,
    out_dir: StrPath | None = None,
    resume: bool = False,
    filter_spec=None,
    progress: bool = True,
    stop_after_steps: int | None = None,
    loss_fn=cross_entropy,
) -> TrainResult:
    """Train ``model`` on ``train_data = (x, y)``; evaluate on ``test_data`` each epoch.

    ``filter_spec``: an Equinox filter (bool or callable per leaf, a prefix of ``model``)
    restricting what is trained; by default every inexact array (leaves whose gradient is
    zero, e.g. behind ``stop_gradient``, are then simply not changed by Adam/SGD).
    ``stop_after_steps``: stop (and checkpoint) once the global step count, resumed steps
    included, reaches this value. ``resume``: continue from ``out_dir/checkpoint.eqx`` if it
    exists (starts fresh otherwise); without ``resume`` an existing checkpoint and metrics are
    overwritten. The caller's ``model`` arrays are copied, never donated.
    ``loss_fn(logits, x, y) -> per-example loss``: the training objective (default
    `cross_entropy`; `mtjax.distill.DistillationLoss` for KD); it may be an Equinox module
    holding arrays (a frozen teacher), which are never trained. Test metrics stay cross-entropy.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    x, y = _check_data(train_data, "train_data")
    xt, yt = _check_data(test_data, "test_data")
    if stop_after_steps is not None and (not _is_int(stop_after_steps) or stop_after_steps < 0):
        raise ValueError(f"stop_after_steps must be None or >= 0, got {stop_after_steps!r}")
    if resume and out_dir is None:
        raise ValueError("resume=True needs out_dir")

    steps_per_epoch = _data.num_batches(len(x), config.batch_size, drop_last=False)
    total_steps = config.epochs * steps_per_epoch
    stop_at = total_steps if stop_after_steps is None else min(total_steps, int(stop_after_steps))
    optimizer = make_optimizer(config, total_steps)
    spec = _trainable_spec(model, filter_spec)
    model = _own(model)
    opt_state = _own(optimizer.init(eqx.filter(model, spec)))
    fingerprint = _fingerprint(x, y, xt, yt)

    step = 0
    wall_before = 0.0
    sums = {"epoch_loss_sum": 0.0, "epoch_loss_count": 0, "log_loss_sum": 0.0, "log_loss_count": 0}
    history: list[dict[str, Any]] = []
    last_eval: tuple[int, float, float] | None = None
    ckpt_path = metrics_path = None
    ckpt_step: int | None = None
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        ckpt_path, metrics_path = out / CHECKPOINT_NAME, out / METRICS_NAME
        if resume and ckpt_path.exists():
            header, (model, opt_state) = load_checkpoint(ckpt_path, (model, opt_state))
            _check_resumable(header, config, fingerprint, ckpt_path)
            model, opt_state = _own(model), _own(opt_state)
            step = ckpt_step = int(header["step"])
            wall_before = float(header["wall_time"])
            sums = {k: header[k] for k in sums}
            if header.get("last_eval") is not None:
                last_eval = tuple(header["last_eval"])
            if metrics_path.exists():
                history = [r for r in read_metrics(metrics_path) if r.get("step", 0) <= step]
        _write_metrics(metrics_path, history)

    def emit(record: dict[str, Any]) -> None:
        history.append(record)
        if metrics_path is not None:
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    t0 = time.perf_counter()
    wall = lambda: wall_before + (time.perf_counter() - t0)
    base_key = jax.random.key(config.seed)
    # stochastic models (thermal/read noise) are evaluated with a fixed key per run
    eval_key = jax.random.fold_in(jax.random.key(config.seed), 2**31 - 1)
    start_epoch, start_batch = divmod(step, steps_per_epoch)
    epoch_bar = tqdm(
        total=config.epochs, initial=min(start_epoch, config.epochs), desc="epochs",
        unit="epoch", disable=not progress, position=0,
    )  # fmt: skip
    try:
        for epoch in range(start_epoch, config.epochs):
            if step >= stop_at:
                break
            first = start_batch if epoch == start_epoch else 0
            it = _data.batches(
                x, y, config.batch_size, seed=config.seed, epoch=epoch, drop_last=False
            )
            with tqdm(
                total=steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}", unit="step",
                leave=False, disable=not progress, position=1,
            ) as bar:  # fmt: skip
                for xb, yb, mb in itertools.islice(it, first, None):
                    batch = (xb, yb, mb, np.asarray(step, np.uint32), base_key, loss_fn)
                    model, opt_state, loss, loss_ok, ok = _train_step(
                        batch, model, opt_state, optimizer, spec
                    )
                    loss_f, loss_ok, ok = (v.item() for v in jax.device_get((loss, loss_ok, ok)))
                    if not ok:
                        what = "loss" if not loss_ok else "updated parameters"
                        msg = (
                            f"non-finite {what} at step {step + 1} (epoch {epoch + 1}, batch "
                            f"{step % steps_per_epoch + 1}/{steps_per_epoch}; loss {loss_f}); "
                            "the update was not applied; "
                            + (
                                f"last checkpoint: step {ckpt_step} in {ckpt_path}"
                                if ckpt_step is not None
                                else "no checkpoint written"
                            )
                        )
                        emit({
                            "event": "nonfinite", "step": step + 1, "epoch": epoch,
                            "train_loss": loss_f if math.isfinite(loss_f) else None,
                            "wall_time": wall(),
                        })  # fmt: skip
                        raise NonFiniteLossError(
                            msg, step=step + 1, epoch=epoch, loss=loss_f,
                            checkpoint_step=ckpt_step, checkpoint_path=ckpt_path,
                        )  # fmt: skip
                    step += 1
                    for k in ("epoch_loss", "log_loss"):
                        sums[f"{k}_sum"] += loss_f
                        sums[f"{k}_count"] += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_f:.4f}", refresh=False)
                    if step % config.log_every == 0:
                        emit({
                            "event": "step", "step": step, "epoch": epoch,
                            "train_loss": sums["log_loss_sum"] / sums["log_loss_count"],
                            "lr": _learning_rate(config, step - 1, total_steps),
                            "wall_time": wall(),
                        })  # fmt: skip
                        sums["log_loss_sum"], sums["log_loss_count"] = 0.0, 0
                    epoch_end = step % steps_per_epoch == 0
                    if epoch_end:
                        test_loss, test_acc = evaluate(
                            model, xt, yt, config.eval_batch_size, key=eval_key
                        )
                        last_eval = (step, test_loss, test_acc)
                        emit({
                            "event": "epoch", "step": step, "epoch": epoch + 1,
                            "train_loss": sums["epoch_loss_sum"] / sums["epoch_loss_count"],
                            "test_loss": test_loss, "test_accuracy": test_acc,
                            "wall_time": wall(),
                        })  # fmt: skip
                        sums["epoch_loss_sum"], sums["epoch_loss_count"] = 0.0, 0
                        epoch_bar.update(1)
                        epoch_bar.set_postfix(test_acc=f"{test_acc:.4f}", refresh=False)
                    every = config.checkpoint_every
                    due = epoch_end if every is None else step % every == 0
                    if ckpt_path is not None and (due or step == stop_at):
                        header = {
                            "step": step, "epoch": step // steps_per_epoch,
                            "batch_in_epoch": step % steps_per_epoch,
                            "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
                            "config": config.to_json(), "data_fingerprint": fingerprint,
                            "wall_time": wall(), "last_eval": last_eval, **sums,
                        }  # fmt: skip
                        _save_checkpoint(ckpt_path, header, (model, opt_state))
                        ckpt_step = step
                    if step >= stop_at:
                        break
    finally:
        epoch_bar.close()

    if last_eval is None or last_eval[0] != step:
        test_loss, test_acc = evaluate(model, xt, yt, config.eval_batch_size, key=eval_key)
    else:
        _, test_loss, test_acc = last_eval
    return TrainResult(
        model=model,
        opt_state=opt_state,
        history=history,
        test_loss=test_loss,
        test_accuracy=test_acc,
        wall_time=wall(),
        step=step,
        total_steps=total_steps,
        completed=step == total_steps,
        checkpoint_path=ckpt_path if ckpt_step is not None else None,
    )


# --------------------------------------------------------------------------- plots


def plot_history(history: Sequence[dict[str, Any]], path: StrPath) -> Path:
    """PNG of train loss against step and test accuracy against epoch, written atomically."""
    steps = [r for r in history if r.get("event") == "step"]
    epochs = [r for r in history if r.get("event") == "epoch"]
    fig = new_figure(figsize=(9, 3.5), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    if steps:
        ax_loss.plot([r["step"] for r in steps], [r["train_loss"] for r in steps], label="train")
    if epochs:
        ep_steps = [r["step"] for r in epochs]
        ax_loss.plot(ep_steps, [r["train_loss"] for r in epochs], "o-", label="train (epoch)")
        ax_loss.plot(ep_steps, [r["test_loss"] for r in epochs], "s-", label="test")
        ax_acc.plot([r["epoch"] for r in epochs], [100 * r["test_accuracy"] for r in epochs], "o-")
    ax_loss.set(xlabel="step", ylabel="cross-entropy", title="loss")
    ax_loss.legend(loc="upper right")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    ax_acc.grid(alpha=0.3)
    return save_figure(fig, path, dpi=100)


def accuracy_curve_png(metrics_path: StrPath, png_path: StrPath) -> Path:
    """`plot_history` of the records in ``metrics_path`` (a ``metrics.jsonl``)."""
    return plot_history(read_metrics(metrics_path), png_path)
