"""`mtjax.draws`: the hashed normal draws of the thermal neurons are standard normal,
independent across streams, neighbours and keys, and a function of (key, shape) only."""

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special
import scipy.stats

from mtjax.draws import erfinv32, normals, uniform_bits

N = 1 << 20


def test_normals_have_standard_normal_moments_and_shape():
    e = np.asarray(normals(jax.random.key(0), (N,)), np.float64)
    assert abs(e.mean()) < 4 / np.sqrt(N)
    assert abs(e.var() - 1) < 4 * np.sqrt(2 / N)
    assert abs(scipy.stats.skew(e)) < 4 * np.sqrt(6 / N)
    assert abs(scipy.stats.kurtosis(e)) < 4 * np.sqrt(24 / N)
    assert scipy.stats.kstest(e[: 1 << 16], "norm").pvalue > 1e-3
    assert np.abs(e).max() < 5.4  # 23-bit inverse CDF
    # tails: P(|e| > 3) = 2.7e-3
    assert abs(np.mean(np.abs(e) > 3) - 2.6998e-3) < 4 * np.sqrt(2.7e-3 / N)


def test_streams_neighbours_and_keys_are_uncorrelated():
    ka, kb = jax.random.split(jax.random.key(1))
    e = np.asarray(normals(ka, (2, N // 2)), np.float64)
    f = np.asarray(normals(kb, (2, N // 2)), np.float64)
    bound = 4 / np.sqrt(N // 2)
    assert abs(np.corrcoef(e[0], e[1])[0, 1]) < bound  # the two read-outs' draws
    assert abs(np.corrcoef(e[0, :-1], e[0, 1:])[0, 1]) < bound  # neighbouring neurons
    assert abs(np.corrcoef(e[0], f[0])[0, 1]) < bound  # two examples' keys
    assert abs(np.corrcoef(e[0] ** 2, e[1] ** 2)[0, 1]) < bound  # not only linear


def test_bits_are_uniform_and_distinct_per_key():
    b = np.asarray(uniform_bits(jax.random.key(2), (1 << 16,)))
    assert len(np.unique(b)) == b.size  # a bijection of the counter
    counts = np.bincount(b >> 24, minlength=256)  # top byte
    assert scipy.stats.chisquare(counts).pvalue > 1e-3
    low = np.bincount(b & 0xFF, minlength=256)  # low byte
    assert scipy.stats.chisquare(low).pvalue > 1e-3


def test_a_function_of_key_and_shape_only():
    keys = jax.random.split(jax.random.key(3), 8)
    batched = jax.jit(jax.vmap(lambda k: normals(k, (2, 5))))(keys)
    one = jnp.stack([jax.jit(lambda k: normals(k, (2, 5)))(k) for k in keys])
    np.testing.assert_array_equal(batched, one)
    # the first block does not depend on how many blocks are drawn (m.p1 of read vs call)
    np.testing.assert_array_equal(normals(keys[0], (1, 5))[0], normals(keys[0], (2, 5))[0])
    assert not np.array_equal(one[0], one[1])
    raw = jax.random.key_data(keys[0])  # raw uint32 keys are accepted and agree
    np.testing.assert_array_equal(normals(raw, (3,)), normals(keys[0], (3,)))
    assert normals(keys[0], (3,), jnp.float16).dtype == jnp.float16


def test_float32_erfinv_is_accurate_on_every_input():
    # normals' float32 inverse CDF (Giles' approximation) on all 2^23 inputs it can see,
    # against float64 scipy (jax's float32 erfinv is off by up to 6e-6 in the far tails)
    k = np.arange(2**23, dtype=np.int64)
    v = (2 * k + (1 - 2**23)) * (2.0**-23)
    ours = np.asarray(jax.jit(erfinv32)(jnp.asarray(v, jnp.float32)), np.float64)
    ref = scipy.special.erfinv(v)
    assert np.max(np.abs(ours - ref) / np.abs(ref)) < 5e-7
    assert np.all(np.diff(ours) > 0)  # monotone: the draws keep their quantiles
    with jax.enable_x64(True):  # float64 draws use jax's erfinv
        e64 = normals(jax.random.key(0), (5,), jnp.float64)
        assert e64.dtype == jnp.float64
        np.testing.assert_allclose(e64, normals(jax.random.key(0), (5,)), rtol=1e-6)
