"""Models with MTJ (or software) activations: `MLP`, `deploy` (any model with a
`with_activations` method, e.g. those of `mtjax.nn.cnn`), and training helpers.

Like every Equinox module here, a model maps ONE example; use `jax.vmap` for batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, PyTree

from mtjax.nn.activation import MTJActivation

Activation = Callable[..., Array]


def _per_layer(activation, widths: Sequence[int]) -> tuple[Activation, ...]:
    """One activation per hidden layer: a single callable is shared by all of them."""
    if isinstance(activation, (list, tuple)):
        acts = tuple(activation)
        if len(acts) != len(widths):
            raise ValueError(
                f"activation: got {len(acts)} activations for {len(widths)} hidden layers"
            )
    else:
        acts = (activation,) * len(widths)
    for i, (act, width) in enumerate(zip(acts, widths, strict=True)):
        if not callable(act):
            raise TypeError(f"activation[{i}]: expected a callable, got {type(act).__name__}")
        if isinstance(act, MTJActivation) and act.n_devices not in (None, width):
            raise ValueError(
                f"activation[{i}]: {act.n_devices} per-neuron devices for a hidden layer of "
                f"width {width}"
            )
    return acts


class MLP(eqx.Module):
    """Fully connected network: `Linear -> activation` for every hidden layer, then a linear
    output layer (logits).

    `sizes = (n_in, h_1, ..., n_out)`. `activation`: any callable (e.g. `jnp.tanh`) or an
    `MTJActivation` (shared device or one device per neuron), used for every hidden layer,
    or a sequence with one per hidden layer.
    """

    layers: tuple[eqx.nn.Linear, ...]
    activations: tuple[Activation, ...]

    def __init__(
        self,
        sizes: Sequence[int],
        activation: Activation | Sequence[Activation],
        *,
        key: PRNGKeyArray,
    ):
        sizes = tuple(int(s) for s in sizes)
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"sizes: need at least (n_in, n_out), all >= 1, got {sizes}")
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = tuple(
            eqx.nn.Linear(a, b, key=k) for a, b, k in zip(sizes[:-1], sizes[1:], keys, strict=True)
        )
        self.activations = _per_layer(activation, sizes[1:-1])

    def __call__(
        self, x: Float[ArrayLike, "..."], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " n_out"]:
        """Logits for one example (flattened). `key` is split over the hidden layers (needed
        by MTJ layers with mode="sde" or read noise, ignored otherwise); for a batch give
        every example its own key: `jax.vmap(lambda x, k: model(x, key=k))(xs, keys)`."""
        x = jnp.ravel(jnp.asarray(x))
        keys = [None] * len(self.activations)
        if key is not None:
            keys = list(jax.random.split(key, len(self.activations)))
        for layer, act, k in zip(self.layers[:-1], self.activations, keys, strict=True):
            x = layer(x)
            x = act(x, key=k) if isinstance(act, MTJActivation) else act(x)
        return self.layers[-1](x)

    def with_activations(
        self,
        activation: Activation | Sequence[Activation],
        *,
        conv_activation: Activation | Sequence[Activation] | None = None,
    ) -> MLP:
        """The same weights with `activation` (one, or one per hidden layer) as the hidden
        activations. Per-neuron devices must match the layer widths. `conv_activation` is
        accepted for a uniform `deploy` signature and must be None."""
        if conv_activation is not None:
            raise ValueError("conv_activation: an MLP has no conv layers")
        widths = [layer.out_features for layer in self.layers[:-1]]
        return eqx.tree_at(lambda m: m.activations, self, _per_layer(activation, widths))


def deploy(
    model: PyTree,
    activation: Activation | Sequence[Activation],
    *,
    conv_activation: Activation | Sequence[Activation] | None = None,
) -> PyTree:
    """The same weights with a different activation (e.g. software tanh -> `MTJActivation`):
    the transfer-learning entry point. Calls `model.with_activations(activation,
    conv_activation=conv_activation)`, which every mtjax model with swappable activations has:

    - `MLP`: `activation` (one, or one per hidden layer) replaces its hidden activations.
      Per-neuron devices must match the layer widths.
    - `mtjax.nn.HeadedClassifier`: replaces the head's (`MLP`) activations; the features
      are untouched.
    - `mtjax.nn.SmallCNN`: `activation` replaces the head's activations and, unless
      `conv_activation` is given, the conv activations too. Conv layers need a shared device
      (or a software callable): a per-neuron `MTJActivation` there raises ValueError, so pass
      per-neuron devices for the head with `conv_activation=` a shared one.

    `conv_activation` is only accepted for `SmallCNN`. Every weight leaf is kept as is."""
    swap = getattr(model, "with_activations", None)
    if not callable(swap):
        raise TypeError(
            f"deploy: unsupported model type {type(model).__name__}; expected a model with a "
            "`with_activations` method (MLP, HeadedClassifier or SmallCNN)"
        )
    return swap(activation, conv_activation=conv_activation)


def _is_mtj(x) -> bool:
    return isinstance(x, MTJActivation)


def rebuild_tables(model: PyTree) -> PyTree:
    """Recompute the tables of every table-mode `MTJActivation` in `model` from its params
    (call inside the loss when co-designing devices with mode="table")."""
    return jax.tree_util.tree_map(
        lambda x: x.rebuild() if _is_mtj(x) else x, model, is_leaf=_is_mtj
    )


def trainable(model: PyTree) -> PyTree:
    """Filter spec (bool pytree) for `eqx.partition`/`eqx.filter`: every array, except the
    device side of `MTJActivation` layers (params, input_scale) unless `train_device=True`,
    and never the tables (they are derived from params; see `rebuild_tables`).

    Use it instead of `eqx.is_array` when the optimizer has weight decay, which would
    otherwise shrink frozen device parameters."""

    def spec(x):
        if _is_mtj(x):
            on = x.train_device
            filt = jax.tree_util.tree_map(lambda leaf: on and eqx.is_array(leaf), x)
            filt = eqx.tree_at(lambda a: a.m0, filt, False)  # the reset state is not designed
            if x.table is not None:
                filt = eqx.tree_at(
                    lambda a: a.table, filt, jax.tree_util.tree_map(lambda _: False, x.table)
                )
            return filt
        return eqx.is_array(x)

    return jax.tree_util.tree_map(spec, model, is_leaf=_is_mtj)
