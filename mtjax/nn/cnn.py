"""Convolutional models for transfer learning onto MTJ neurons.

- `SmallCNN`: two `conv3x3 -> activation -> avgpool(2)` stages and an `MLP` head, for
  Fashion-MNIST; every activation (conv and head) may be an `MTJActivation`.
- `ResNetFeatures`: a small ResNet (GroupNorm, ReLU, global average pool) mapping an image
  to a feature vector; software only.
- `HeadedClassifier`: features followed by an `MLP` head whose hidden neurons are the
  (MTJ-capable) activations; `cifar_model` builds one for CIFAR-100.

Images are ONE example of shape (H, W, C) (channels-last, as `mtjax.data` gives); they are
transposed to Equinox's channels-first layout inside. Use `jax.vmap` for batches.
`SmallCNN` and `HeadedClassifier` swap their activations with `with_activations` (what
`mtjax.nn.deploy` calls) and keep every weight; `ResNetFeatures` has none to swap.
"""

from __future__ import annotations

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from mtjax.nn.models import MLP, Activation, apply_activation

__all__ = ["HeadedClassifier", "ResNetFeatures", "SmallCNN", "cifar_model"]


def _conv_activations(activation, n: int, what: str = "activation") -> tuple[Activation, ...]:
    """One activation per conv layer (a single callable is shared). Per-neuron MTJ devices
    are rejected: a conv layer's neurons are (channel, position) pairs, not a fixed vector."""
    if isinstance(activation, (list, tuple)):
        acts = tuple(activation)
        if len(acts) != n:
            raise ValueError(f"{what}: got {len(acts)} activations for {n} conv layers")
    else:
        acts = (activation,) * n
    for i, act in enumerate(acts):
        if not callable(act):
            raise TypeError(f"{what}[{i}]: expected a callable, got {type(act).__name__}")
        if getattr(act, "accepts_key", False) and getattr(act, "n_devices", None) is not None:
            raise ValueError(
                f"{what}[{i}]: an MTJActivation with {act.n_devices} per-neuron devices cannot "
                "drive a conv layer (its pre-activations are a (channels, H, W) map); use a "
                "shared device (params with no batch shape) for the conv layers, e.g. "
                "deploy(model, per_neuron_act, conv_activation=shared_act)"
            )
    return acts


def _channels_first(x: ArrayLike, in_channels: int) -> Array:
    x = jnp.asarray(x)
    if x.ndim == 2 and in_channels == 1:
        x = x[..., None]
    if x.ndim != 3 or x.shape[-1] != in_channels:
        raise ValueError(f"x: expected one image (H, W, {in_channels}), got shape {x.shape}")
    return jnp.transpose(x, (2, 0, 1))


class SmallCNN(eqx.Module):
    """`[conv3x3 (same padding) -> activation -> avgpool 2x2] x len(widths)`, flatten, then
    `MLP((flat, *hidden, n_classes), head_activation)`.

    `activation`: callable, `MTJActivation` with a shared device, or a sequence with one per
    conv layer. `head_activation`: the head's hidden activation(s), default `activation`
    (may be a per-neuron `MTJActivation` of width `hidden`). `image_size`: (H, W) of the
    inputs (28 for Fashion-MNIST); it fixes the head's input width.
    """

    convs: tuple[eqx.nn.Conv2d, ...]
    conv_activations: tuple[Activation, ...]
    head: MLP
    in_channels: int = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        n_classes: int,
        *,
        activation: Activation | Sequence[Activation] = jnp.tanh,
        head_activation: Activation | Sequence[Activation] | None = None,
        widths: Sequence[int] = (16, 32),
        hidden: int | Sequence[int] = 128,
        image_size: int | tuple[int, int] = 28,
        key: PRNGKeyArray,
    ):
        widths = tuple(int(w) for w in widths)
        hidden = (int(hidden),) if isinstance(hidden, int) else tuple(int(h) for h in hidden)
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if in_channels < 1 or n_classes < 1 or min(widths, default=1) < 1:
            raise ValueError("in_channels, n_classes and widths must be >= 1")
        for _ in widths:
            h, w = h // 2, w // 2
        if h < 1 or w < 1:
            raise ValueError(f"image_size {image_size} is too small for {len(widths)} poolings")
        k_conv, k_head = jax.random.split(key)
        keys = jax.random.split(k_conv, max(len(widths), 1))
        chans = (int(in_channels),) + widths
        self.convs = tuple(
            eqx.nn.Conv2d(a, b, 3, padding=1, key=k)
            for a, b, k in zip(chans[:-1], chans[1:], keys, strict=False)
        )
        self.conv_activations = _conv_activations(activation, len(widths))
        if head_activation is None:
            if isinstance(activation, (list, tuple)):
                raise ValueError("head_activation: required when activation is a sequence")
            head_activation = activation
        self.head = MLP((chans[-1] * h * w, *hidden, int(n_classes)), head_activation, key=k_head)
        self.in_channels = int(in_channels)

    def __call__(
        self, x: Float[ArrayLike, "H W C"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " n_classes"]:
        """Logits for one image (H, W, C). `key` is split over the conv activations and the
        head (needed by MTJ layers with mode="sde" or read noise, ignored otherwise)."""
        x = _channels_first(x, self.in_channels)
        n = len(self.convs)
        keys = [None] * (n + 1)
        if key is not None:
            keys = list(jax.random.split(key, n + 1))
        for conv, act, k in zip(self.convs, self.conv_activations, keys[:n], strict=True):
            x = conv(x)
            x = apply_activation(act, x, k)
            x = _avg_pool2(x)
        return self.head(x, key=keys[n])

    def with_activations(
        self,
        activation: Activation | Sequence[Activation],
        *,
        conv_activation: Activation | Sequence[Activation] | None = None,
    ) -> SmallCNN:
        """The same weights with `activation` for the head and, unless `conv_activation` is
        given, for the conv layers too (see `mtjax.nn.deploy`)."""
        conv = activation if conv_activation is None else conv_activation
        what = "activation" if conv_activation is None else "conv_activation"
        conv_acts = _conv_activations(conv, len(self.convs), what)
        model = eqx.tree_at(lambda m: m.head, self, self.head.with_activations(activation))
        return eqx.tree_at(lambda m: m.conv_activations, model, conv_acts)


def _avg_pool2(x: Float[Array, "C H W"]) -> Float[Array, "C H//2 W//2"]:
    """2x2 average pooling, stride 2 (odd trailing rows/columns dropped)."""
    c, h, w = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(c, h // 2, 2, w // 2, 2).mean(axis=(2, 4))


def _group_norm(groups: int, channels: int) -> eqx.nn.GroupNorm:
    if channels % groups:
        raise ValueError(f"groups: {groups} does not divide a stage width of {channels}")
    return eqx.nn.GroupNorm(groups, channels)


class _Block(eqx.Module):
    """Basic residual block: conv3x3 -> GN -> ReLU -> conv3x3 -> GN, plus the shortcut
    (identity, or 1x1 conv -> GN when the shape changes), then ReLU."""

    conv1: eqx.nn.Conv2d
    norm1: eqx.nn.GroupNorm
    conv2: eqx.nn.Conv2d
    norm2: eqx.nn.GroupNorm
    shortcut: tuple[eqx.nn.Conv2d, eqx.nn.GroupNorm] | None

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int, *, key: PRNGKeyArray):
        k1, k2, k3 = jax.random.split(key, 3)
        self.conv1 = eqx.nn.Conv2d(c_in, c_out, 3, stride, padding=1, use_bias=False, key=k1)
        self.norm1 = _group_norm(groups, c_out)
        self.conv2 = eqx.nn.Conv2d(c_out, c_out, 3, padding=1, use_bias=False, key=k2)
        self.norm2 = _group_norm(groups, c_out)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            proj = eqx.nn.Conv2d(c_in, c_out, 1, stride, use_bias=False, key=k3)
            self.shortcut = (proj, _group_norm(groups, c_out))

    def __call__(self, x: Float[Array, "C H W"]) -> Float[Array, "C2 H2 W2"]:
        y = jax.nn.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        if self.shortcut is not None:
            proj, norm = self.shortcut
            x = norm(proj(x))
        return jax.nn.relu(x + y)


class ResNetFeatures(eqx.Module):
    """Small ResNet feature extractor: conv3x3 stem -> GN -> ReLU, then one stage per width
    with `blocks_per_stage` residual blocks (the first block of every stage after the first
    has stride 2), then global average pooling -> (widths[-1],).

    GroupNorm (`groups` must divide every width) instead of BatchNorm: no running state, so
    a model maps one example like every other model here. Deterministic; `key` is ignored.
    """

    stem: eqx.nn.Conv2d
    stem_norm: eqx.nn.GroupNorm
    blocks: tuple[_Block, ...]
    in_channels: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        *,
        widths: Sequence[int] = (32, 64, 128),
        blocks_per_stage: int = 1,
        groups: int = 8,
        key: PRNGKeyArray,
    ):
        widths = tuple(int(w) for w in widths)
        if not widths or min(widths) < 1 or blocks_per_stage < 1 or groups < 1:
            raise ValueError("widths must be non-empty and >= 1; blocks_per_stage, groups >= 1")
        k_stem, k_blocks = jax.random.split(key)
        keys = iter(jax.random.split(k_blocks, len(widths) * blocks_per_stage))
        self.stem = eqx.nn.Conv2d(in_channels, widths[0], 3, padding=1, use_bias=False, key=k_stem)
        self.stem_norm = _group_norm(groups, widths[0])
        blocks = []
        c = widths[0]
        for s, w in enumerate(widths):
            for b in range(blocks_per_stage):
                stride = 2 if (s > 0 and b == 0) else 1
                blocks.append(_Block(c, w, stride, groups, key=next(keys)))
                c = w
        self.blocks = tuple(blocks)
        self.in_channels = int(in_channels)
        self.out_features = widths[-1]

    def __call__(
        self, x: Float[ArrayLike, "H W C"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " out_features"]:
        """Feature vector of one image (H, W, C)."""
        del key
        x = _channels_first(x, self.in_channels)
        x = jax.nn.relu(self.stem_norm(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        return jnp.mean(x, axis=(1, 2))


class HeadedClassifier(eqx.Module):
    """`head(features(x))`: a feature extractor (e.g. `ResNetFeatures`, software) and an `MLP`
    head whose hidden activations may be `MTJActivation`s. `key` goes to the head only."""

    features: eqx.Module
    head: MLP

    def __init__(self, features: eqx.Module, head: MLP):
        if not isinstance(head, MLP):
            raise TypeError(f"head: expected an mtjax.nn.MLP, got {type(head).__name__}")
        n_feat = getattr(features, "out_features", None)
        if n_feat is not None and head.layers[0].in_features != n_feat:
            raise ValueError(
                f"head: takes {head.layers[0].in_features} inputs but features gives {n_feat}"
            )
        self.features = features
        self.head = head

    def __call__(
        self, x: Float[ArrayLike, "H W C"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " n_classes"]:
        """Logits for one image."""
        return self.head(self.features(x), key=key)

    def with_activations(
        self,
        activation: Activation | Sequence[Activation],
        *,
        conv_activation: Activation | Sequence[Activation] | None = None,
    ) -> HeadedClassifier:
        """The same weights with `activation` for the head's hidden layers; the features are
        untouched (see `mtjax.nn.deploy`). `conv_activation` must be None."""
        if conv_activation is not None:
            raise ValueError("conv_activation: a HeadedClassifier only deploys its head")
        return eqx.tree_at(lambda m: m.head, self, self.head.with_activations(activation))


def cifar_model(
    n_classes: int = 100,
    head_sizes: Sequence[int] = (256,),
    head_activation: Activation | Sequence[Activation] = jnp.tanh,
    *,
    widths: Sequence[int] = (32, 64, 128),
    blocks_per_stage: int = 1,
    groups: int = 8,
    in_channels: int = 3,
    key: PRNGKeyArray,
) -> HeadedClassifier:
    """`HeadedClassifier(ResNetFeatures(...), MLP((widths[-1], *head_sizes, n_classes)))` for
    CIFAR-100 (32x32x3); train it with a software head, then `deploy` an MTJ head."""
    k_feat, k_head = jax.random.split(key)
    features = ResNetFeatures(
        in_channels, widths=widths, blocks_per_stage=blocks_per_stage, groups=groups, key=k_feat
    )
    sizes = (features.out_features, *(int(s) for s in head_sizes), int(n_classes))
    return HeadedClassifier(features, MLP(sizes, head_activation, key=k_head))
