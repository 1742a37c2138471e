"""Which way to move the device: d(test loss)/d(design), checked by finite steps.

`design_sensitivity(model, test_data, ...)` takes a model with one `codesign.DesignedMTJ`
layer (e.g. software weights deployed on it) and returns, for each free design variable x,

- the gradient of the mean test cross-entropy in relative units, dL/d ln x (a 1 % larger x
  changes the loss by ~0.01 dL/d ln x), through live tables (exact design gradient);
- a central finite difference of the same loss with the same noise keys (common random
  numbers), x exp(+-h), through rebuilt caches: a check of the gradient itself;
- the measured test loss and accuracy (mean +- std over the noise keys, paired with the
  same keys at the paper design) after a finite step x exp(-s sign(dL/d ln x)), the
  direction the gradient says lowers the loss, and whether the loss did go down.

Response-inert variables (`DesignedMTJ.inert`: no effect on the activations, e.g. eta1 with
a calibrated driver) have exactly zero loss gradient and are reported as such, not stepped.
Variables with a non-positive lower bound (signed: h_bias, hk) use units of their bound range
instead of ln x.

The gradient is taken in batches of `grad_batch` examples with one table pull-back: the
tables are built once inside `jax.vjp`, each batch's loss gradient reaches the built tables,
params and gain as they are (`MTJActivation.with_given_tables`), the batch gradients are
summed, and the sum is pulled back through the build once. Memory is one table cotangent per
example and key of a batch (the whole test set at once, 10k examples x 256 thermal devices,
needed ~160 GB). `grad_examples` limits the loss, gradient and finite differences to the
first test examples (accuracies always use all).
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from mtjax import train as _train
from mtjax.codesign import Design, DesignedMTJ, designed_layers, refresh, set_live
from mtjax.experiments import accuracies_over_keys, mean_std


def _only_layer(model) -> DesignedMTJ:
    layers = designed_layers(model)
    if len(layers) != 1:
        raise ValueError(f"model: expected exactly one DesignedMTJ layer, found {len(layers)}")
    return layers[0]


def _with_design(model, design: Design):
    is_d = lambda x: isinstance(x, DesignedMTJ)
    return jax.tree_util.tree_map(
        lambda x: eqx.tree_at(lambda s: s.design, x, design) if is_d(x) else x, model, is_leaf=is_d
    )


def example_keys(keys, n: int):
    """Per-example noise keys (n_keys, n): key k of example i, the same however the examples
    are batched."""
    return jnp.stack([jax.random.split(k, n) for k in keys])


def _mean_loss(model, x, y, ks):
    """Mean cross-entropy over the examples x and noise keys (`ks` from `example_keys`), all
    keys in one vmapped pass."""
    logits = jax.vmap(lambda kk: jax.vmap(lambda xi, ki: model(xi, key=ki))(x, kk))(ks)
    return jnp.mean(jax.vmap(lambda lg: _train.cross_entropy(lg, x, y))(logits))


def _with_layer(model, layer):
    """`model` with its `DesignedMTJ` replaced by `layer` (any activation)."""
    is_d = lambda x: isinstance(x, DesignedMTJ)
    return jax.tree_util.tree_map(lambda x: layer if is_d(x) else x, model, is_leaf=is_d)


@eqx.filter_jit
def _built_activation(layer: DesignedMTJ):
    """The live activation of `layer` with its tables built (used as given), and the vjp of
    that build with respect to the design's theta."""

    def build(theta):
        design = eqx.tree_at(lambda d: d.theta, layer.design, theta)
        act = eqx.tree_at(lambda s: s.design, layer, design).activation().rebuild()
        return act.with_given_tables()

    return eqx.filter_vjp(build, layer.design.theta)


@eqx.filter_jit
def _batch_loss_and_grad(model, act, x, y, ks):
    """Mean loss of one batch and its gradient with respect to `act`'s arrays (tables as
    given)."""
    return eqx.filter_value_and_grad(lambda a: _mean_loss(_with_layer(model, a), x, y, ks))(act)


def _loss_and_theta_grad(model, x, y, ks, batch: int):
    """Mean loss over all of x and keys and its gradient with respect to the design's theta
    (batched, one pull-back through the table build; see the module doc)."""
    act, vjp_fn = _built_activation(_only_layer(model))
    n = x.shape[0]
    loss, grad = 0.0, None
    for i in range(0, n, batch):
        w = min(batch, n - i) / n
        l_b, g_b = _batch_loss_and_grad(
            model, act, x[i : i + batch], y[i : i + batch], ks[:, i : i + batch]
        )
        loss = loss + w * l_b
        grad = (
            jax.tree.map(lambda g, w=w: w * g, g_b)
            if grad is None
            else jax.tree.map(lambda acc, g, w=w: acc + w * g, grad, g_b)
        )
    (g_theta,) = vjp_fn(grad)
    return loss, g_theta


_cached_loss = eqx.filter_jit(_mean_loss)


def _units(design: Design, name: str) -> tuple[str, Any]:
    """("relative", None) for positive variables (steps in ln x), else ("range", hi - lo)."""
    lo, hi = design.space.bound(name)
    return ("relative", None) if lo > 0 else ("range", hi - lo)


def _coordinate(design: Design, name: str) -> np.ndarray:
    """Variable `name` in its units: ln x, or x / (hi - lo)."""
    x = np.asarray(design.value(name), dtype=np.float64)
    lo, hi = design.space.bound(name)
    return np.log(x) if _units(design, name)[0] == "relative" else x / (hi - lo)


def _moved(design: Design, name: str, h: float) -> tuple[Design, float]:
    """`design` with variable `name` moved by h in its units (x e^h, or x + h (hi - lo)),
    clipped strictly inside the bounds, and the move actually made (h, unless clipped)."""
    lo, hi = design.space.bound(name)
    x = np.asarray(design.value(name), dtype=np.float64)
    unit, span = _units(design, name)
    new = x * np.exp(h) if unit == "relative" else x + h * span
    pad = 1e-6 * (hi - lo)
    moved = design.with_values({name: np.clip(new, lo + pad, hi - pad)})
    return moved, float(np.sum(_coordinate(moved, name) - _coordinate(design, name)))


def design_sensitivity(
    model,
    test_data,
    *,
    n_keys: int = 5,
    fd_step: float = 0.02,
    step: float = 0.1,
    seed: int = 0,
    batch_size: int = 1000,
    grad_examples: int | None = None,
    grad_batch: int = 100,
    log=print,
) -> dict[str, Any]:
    """Sensitivity table of `model`'s one `DesignedMTJ` layer on `test_data` (x, y); see the
    module doc. `fd_step`, `step`: finite-difference and finite-step sizes in ln x (or in
    bound ranges). `grad_batch`: examples per batch of the gradient. Returns a JSON-able
    dict."""
    if not (isinstance(n_keys, int) and n_keys >= 1):
        raise ValueError(f"n_keys: must be an integer >= 1, got {n_keys!r}")
    for label, h in (("fd_step", fd_step), ("step", step)):
        if not (np.isfinite(h) and h > 0):
            raise ValueError(f"{label}: must be finite and > 0, got {h!r}")
    if grad_examples is not None and not (isinstance(grad_examples, int) and grad_examples >= 1):
        raise ValueError(f"grad_examples: must be None or an integer >= 1, got {grad_examples!r}")
    if not (isinstance(grad_batch, int) and grad_batch >= 1):
        raise ValueError(f"grad_batch: must be an integer >= 1, got {grad_batch!r}")
    x, y = (jnp.asarray(a)[:grad_examples] for a in test_data)
    layer = _only_layer(model)
    n_dev = layer.n_devices or 1
    table = layer.template.table
    n_batch = min(grad_batch, x.shape[0])
    cot_bytes = n_batch * (0 if table is None else table.coef.size) * 4 * n_keys
    if cot_bytes > 8 * 2**30:
        raise ValueError(
            f"grad_batch: a gradient batch of {n_batch} examples x {n_dev} devices x "
            f"{n_keys} keys needs ~{cot_bytes / 2**30:.0f} GiB of table cotangents; pass a "
            "smaller grad_batch"
        )
    keys = example_keys([jax.random.key(10_000 * (seed + 1) + k) for k in range(n_keys)],
                        x.shape[0])  # fmt: skip
    model = refresh(set_live(model, False))
    layer = _only_layer(model)
    design = layer.design
    loss0, g_theta = _loss_and_theta_grad(model, x, y, keys, n_batch)
    acc0 = accuracies_over_keys(model, test_data, n_keys, seed=seed, batch_size=batch_size)
    out: dict[str, Any] = {
        "test_loss": float(loss0), "test_accuracy": mean_std(acc0), "accuracies": acc0,
        "n_keys": n_keys, "grad_examples": int(x.shape[0]), "grad_batch": n_batch,
        "fd_step": fd_step, "step": step,
        "values": design.values(), "variables": {},
    }  # fmt: skip
    for name in design.space.free:
        unit, span = _units(design, name)
        th = design.theta[name]

        # d x / d theta (elementwise transform), then dL/d ln x = x dL/dx or span dL/dx
        def value(t, n=name):
            return eqx.tree_at(lambda d: d.theta[n], design, t).value(n)

        dx = jax.jvp(value, (th,), (jnp.ones_like(th),))[1]
        x_val = design.value(name)
        dl_dx = g_theta[name] / dx
        grad = np.asarray(dl_dx * (x_val if unit == "relative" else span), np.float64)
        row: dict[str, Any] = {"unit": "d loss / d ln x" if unit == "relative" else
                               "d loss / d (x / bound range)",
                               "value": np.asarray(x_val).tolist(), "gradient": grad.tolist(),
                               "inert": name in layer.inert}  # fmt: skip
        if name in layer.inert or grad.size != 1:
            row["note"] = (
                "response-inert: held, zero loss gradient"
                if row["inert"]
                else ("vector variable: finite checks skipped")
            )
            out["variables"][name] = row
            log(f"{name}: gradient {grad.tolist()} ({row['note']})")
            continue
        losses, moves = [], []
        for h in (fd_step, -fd_step):
            moved, made = _moved(design, name, h)  # made != h where a bound clips the move
            losses.append(float(_cached_loss(refresh(_with_design(model, moved)), x, y, keys)))
            moves.append(made)
        row["finite_difference"] = (losses[0] - losses[1]) / (moves[0] - moves[1])
        row["fd_moves"] = moves
        sign = -float(np.sign(grad))
        stepped_design, made = _moved(design, name, sign * step)
        stepped = refresh(_with_design(model, stepped_design))
        acc = accuracies_over_keys(stepped, test_data, n_keys, seed=seed, batch_size=batch_size)
        loss_s = float(_cached_loss(stepped, x, y, keys))
        row.update(
            step_direction=sign, step_made=made,
            stepped_value=np.asarray(stepped_design.value(name)).tolist(),
            predicted_loss_change=float(grad) * made, loss_change=loss_s - float(loss0),
            accuracy_change=mean_std(np.asarray(acc) - np.asarray(acc0)),
            loss_decreased=bool(loss_s < float(loss0)),
        )  # fmt: skip
        out["variables"][name] = row
        log(
            f"{name}: dL/dlnx {float(grad):+.4g} (FD {row['finite_difference']:+.4g}); step "
            f"{sign * step:+g}: loss {row['loss_change']:+.4g} (predicted "
            f"{row['predicted_loss_change']:+.4g}), accuracy "
            f"{100 * row['accuracy_change']['mean']:+.3f} ± "
            f"{100 * row['accuracy_change']['std']:.3f} pp"
        )
    return out
