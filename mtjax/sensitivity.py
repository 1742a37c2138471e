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

Memory: the live gradient over all examples at once holds one table cotangent per example
and per-neuron device (10k examples x 256 thermal devices needed ~160 GB); with per-neuron
devices pass `grad_examples` (the gradient, finite differences and loss use the first
`grad_examples` test examples; accuracies always use all). Batching the gradient with one
table pull-back is not implemented yet.
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


def _mean_loss(model, x, y, keys):
    """Mean cross-entropy over all examples and noise keys, in one vmapped pass: a live
    layer then rebuilds its tables once, not once per key (the rebuild's residuals for
    per-neuron thermal devices are the gradient's largest memory)."""
    ks = jnp.stack([jax.random.split(k, x.shape[0]) for k in keys])
    logits = jax.vmap(lambda kk: jax.vmap(lambda xi, ki: model(xi, key=ki))(x, kk))(ks)
    return jnp.mean(jax.vmap(lambda lg: _train.cross_entropy(lg, x, y))(logits))


@eqx.filter_jit
def _loss_and_theta_grad(model, x, y, keys):
    live = set_live(model, True)
    theta = _only_layer(live).design.theta

    def f(th):
        layer = _only_layer(live)
        return _mean_loss(_with_design(live, eqx.tree_at(lambda d: d.theta, layer.design, th)),
                          x, y, keys)  # fmt: skip

    return jax.value_and_grad(f)(theta)


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
    log=print,
) -> dict[str, Any]:
    """Sensitivity table of `model`'s one `DesignedMTJ` layer on `test_data` (x, y); see the
    module doc. `fd_step`, `step`: finite-difference and finite-step sizes in ln x (or in
    bound ranges). Returns a JSON-able dict."""
    if not (isinstance(n_keys, int) and n_keys >= 1):
        raise ValueError(f"n_keys: must be an integer >= 1, got {n_keys!r}")
    for label, h in (("fd_step", fd_step), ("step", step)):
        if not (np.isfinite(h) and h > 0):
            raise ValueError(f"{label}: must be finite and > 0, got {h!r}")
    if grad_examples is not None and not (isinstance(grad_examples, int) and grad_examples >= 1):
        raise ValueError(f"grad_examples: must be None or an integer >= 1, got {grad_examples!r}")
    x, y = (jnp.asarray(a)[:grad_examples] for a in test_data)
    layer = _only_layer(model)
    n_dev = layer.n_devices or 1
    table = layer.template.table
    cot_bytes = x.shape[0] * (0 if table is None else table.coef.size) * 4 * n_keys
    if cot_bytes > 8 * 2**30:
        raise ValueError(
            f"grad_examples: the live gradient over {x.shape[0]} examples x {n_dev} devices x "
            f"{n_keys} keys needs ~{cot_bytes / 2**30:.0f} GiB of table cotangents; pass a "
            "smaller grad_examples"
        )
    keys = [jax.random.key(10_000 * (seed + 1) + k) for k in range(n_keys)]
    model = refresh(set_live(model, False))
    layer = _only_layer(model)
    design = layer.design
    loss0, g_theta = _loss_and_theta_grad(model, x, y, keys)
    acc0 = accuracies_over_keys(model, test_data, n_keys, seed=seed, batch_size=batch_size)
    out: dict[str, Any] = {
        "test_loss": float(loss0), "test_accuracy": mean_std(acc0), "accuracies": acc0,
        "n_keys": n_keys, "grad_examples": int(x.shape[0]), "fd_step": fd_step, "step": step,
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
