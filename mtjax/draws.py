"""Cheap standard-normal draws from a JAX key, for per-neuron noise inside training steps.

`jax.random.normal` runs 20 Threefry rounds per 32-bit word; for thermal neurons (two
normals per neuron per example per step) that was a third of a 784-256-10 training step on
CPU (`benchmarks/activation_overhead.py`). `normals` instead hashes the counter of each draw
with the key's words through two rounds of the murmur3 finalizer (a keyed bijection of the
32-bit counter, so no two draws of one key share a word) and maps the top 23 bits to a
normal by the inverse CDF, as `jax.random.normal` does. In float32 the inverse error
function is M. Giles' single-precision approximation ("Approximating the erfinv function",
GPU Computing Gems, 2011; one log, one square root, two degree-8 polynomials): on XLA CPU
`jax.scipy.special.erfinv` cost 2.5x more, and on every one of the 2^23 inputs it is within
5e-7 (relative) of float64 scipy, where jax's float32 erfinv is off by up to 6e-6 (tested);
other dtypes use `jax.scipy.special.erfinv`. It is a function of (key, shape) only, like
`jax.random`: vmapped per-example keys give the same draws on any number of
devices. Statistical quality is tested in `tests/test_draws.py` (moments, independence of
streams, neighbours and keys); not for cryptography.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray

_M1 = 0x85EBCA6B
_M2 = 0xC2B2AE35
_GOLDEN = 0x9E3779B9


def _fmix32(x: Array) -> Array:
    """murmur3's 32-bit finalizer (a bijection with full avalanche)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(_M1)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(_M2)
    return x ^ (x >> 16)


def _key_words(key: PRNGKeyArray) -> tuple[Array, Array]:
    """Two 32-bit words mixed from all words of `key` (typed or raw uint32 key)."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    words = jnp.asarray(key, jnp.uint32).reshape(-1)
    k0, k1 = jnp.uint32(0x243F6A88), jnp.uint32(0x85A308D3)
    for i in range(words.shape[0]):
        k0 = _fmix32(k0 ^ words[i])
        k1 = _fmix32(k1 + words[i] * jnp.uint32(_GOLDEN))
    return k0, k1


def uniform_bits(key: PRNGKeyArray, shape: tuple[int, ...]) -> Array:
    """uint32 words of `shape`, one per counter 0..n-1, hashed with `key`."""
    k0, k1 = _key_words(key)
    n = math.prod(shape)
    if n >= 2**32:
        raise ValueError(f"shape: {shape} has {n} elements, more than 2**32 counters")
    c = jnp.arange(n, dtype=jnp.uint32).reshape(shape)
    return _fmix32(_fmix32(c ^ k0) + k1)


# Giles (2011), single precision: erfinv(x) = x p(w), w = -log((1 - x)(1 + x)), with p a
# polynomial in w - 2.5 (w < 5) or in sqrt(w) - 3 (tails); highest degree first.
_ERFINV_CENTRAL = (
    2.81022636e-08, 3.43273939e-07, -3.5233877e-06, -4.39150654e-06, 0.00021858087,
    -0.00125372503, -0.00417768164, 0.246640727, 1.50140941,
)  # fmt: skip
_ERFINV_TAIL = (
    -0.000200214257, 0.000100950558, 0.00134934322, -0.00367342844, 0.00573950773,
    -0.0076224613, 0.00943887047, 1.00167406, 2.83297682,
)  # fmt: skip


def _horner(coefs, x):
    acc = jnp.full_like(x, coefs[0])
    for c in coefs[1:]:
        acc = acc * x + c
    return acc


def erfinv32(x: Array) -> Array:
    """Inverse error function of float32 `x` in (-1, 1) (Giles' approximation)."""
    w = -jnp.log((1.0 - x) * (1.0 + x))
    central = _horner(_ERFINV_CENTRAL, w - 2.5)
    tail = _horner(_ERFINV_TAIL, jnp.sqrt(w) - 3.0)
    return jnp.where(w < 5.0, central, tail) * x


def normals(key: PRNGKeyArray, shape: tuple[int, ...], dtype=None) -> Array:
    """Standard-normal array of `shape` (default float dtype), a function of (key, shape).

    Each draw uses the top 23 bits k of its word: v = (2k + 1 - 2^23) / 2^23, exact and
    symmetric in (-1, 1), and e = sqrt(2) erfinv(v), so |e| <= 5.3 and the mean is 0."""
    dtype = jnp.result_type(float) if dtype is None else dtype
    k = (uniform_bits(key, tuple(shape)) >> 9).astype(jnp.int32)
    v = (2 * k + (1 - 2**23)).astype(dtype) * (2.0**-23)
    if jnp.dtype(dtype).itemsize <= 4:
        return (math.sqrt(2.0) * erfinv32(v.astype(jnp.float32))).astype(dtype)
    return (math.sqrt(2.0) * jax.scipy.special.erfinv(v)).astype(dtype)
