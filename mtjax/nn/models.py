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
from mtjax.params import DeviceParams
from mtjax.variation import Deviations

Activation = Callable[..., Array]


def apply_activation(act: Activation, x: Array, key: PRNGKeyArray | None) -> Array:
    """`act(x, key=key)` for activations that take a key (their class sets
    `accepts_key = True`, like `MTJActivation`), else `act(x)`."""
    return act(x, key=key) if getattr(act, "accepts_key", False) else act(x)


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
        n_dev = getattr(act, "n_devices", None) if getattr(act, "accepts_key", False) else None
        if n_dev not in (None, width):
            raise ValueError(
                f"activation[{i}]: {n_dev} per-neuron devices for a hidden layer of width {width}"
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
            x = apply_activation(act, x, k)
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


def _frozen(x) -> bool:
    """Nodes whose arrays an optimizer must never move directly: MTJ layers (device side,
    tables, reset states), raw device parameters, fixed deviations, and modules that declare
    `never_trained = True` (fixed circuit settings and caches, e.g. `mtjax.energy`'s
    `ResetModel` and `EnergyTable`: an energy loss would otherwise train the reset target)."""
    return isinstance(x, MTJActivation | DeviceParams | Deviations) or (
        isinstance(x, eqx.Module) and getattr(x, "never_trained", False) is True
    )


def trainable(model: PyTree) -> PyTree:
    """Filter spec (bool pytree) for `eqx.partition`/`eqx.filter`: every inexact array except
    the arrays of `MTJActivation` layers, `DeviceParams`, `Deviations` and `never_trained`
    modules (energy reset model and tables) anywhere in the model. Raw device parameters
    are never optimized (an optimizer step could make them non-physical); devices are
    designed through `mtjax.codesign`, whose unconstrained variables are ordinary trainable
    arrays. `mtjax.train` uses this by default."""

    def spec(x):
        if _frozen(x):
            return jax.tree_util.tree_map(lambda _: False, x)
        return eqx.is_inexact_array(x)

    return jax.tree_util.tree_map(spec, model, is_leaf=_frozen)


def check_trainable(model: PyTree, spec: PyTree) -> None:
    """Raise ValueError if the Equinox filter `spec` selects raw device arrays of `model`
    (inexact arrays under the nodes that `trainable` freezes)."""
    selected = eqx.filter(model, spec)
    bad = []

    def visit(path, x):
        if _frozen(x) and any(eqx.is_inexact_array(v) for v in jax.tree_util.tree_leaves(x)):
            bad.append(jax.tree_util.keystr(path))

    jax.tree_util.tree_map_with_path(visit, selected, is_leaf=_frozen)
    if bad:
        raise ValueError(
            f"filter_spec selects raw device arrays or fixed circuit settings "
            f"({', '.join(bad[:3])}): an optimizer would move them without keeping them "
            "physical; design devices with "
            "mtjax.codesign (bounded, well-scaled variables) or use mtjax.nn.trainable"
        )
