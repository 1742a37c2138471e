import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtjax
from mtjax.variation import RELATIVE, Spreads, sample_devices


@pytest.mark.parametrize("distribution", ["normal", "lognormal"])
def test_sample_moments_match_spreads(distribution):
    p = mtjax.DeviceParams.paper(hk=100.0, h_bias=(10.0, 0.0, -20.0))
    spreads = Spreads(
        Ms=0.05,
        thickness=0.1,
        diameter=0.03,
        eta=0.04,
        alpha=0.2,
        pulse_duration=0.02,
        hk=300.0,
        h_bias=50.0,
        distribution=distribution,
    )
    n = 20000
    d = sample_devices(p, jax.random.key(0), n, spreads)
    assert d.batch_shape == (n,)
    for group, names in RELATIVE.items():
        s = getattr(spreads, group)
        for name in names:
            x = np.log(getattr(d, name)) if distribution == "lognormal" else getattr(d, name)
            x0 = float(getattr(p, name))
            std = np.std(x) if distribution == "lognormal" else np.std(x) / x0
            assert std == pytest.approx(s, rel=0.05), name
            center = np.median(getattr(d, name)) if distribution == "lognormal" else np.mean(x)
            assert center == pytest.approx(x0, rel=3 * s / np.sqrt(n) + 1e-3), name
    assert np.std(d.hk) == pytest.approx(300.0, rel=0.05)
    assert np.mean(d.hk) == pytest.approx(100.0, abs=10.0)
    np.testing.assert_allclose(np.std(d.h_bias, axis=0), 50.0, rtol=0.05)
    # untouched fields are copied, every device valid
    np.testing.assert_array_equal(d.p1, jnp.broadcast_to(p.p1, (n, 3)))
    assert np.all(np.asarray(d.Ms) > 0) and np.all(np.asarray(d.eta1) <= 1)


def test_wide_spreads_stay_physical():
    p = mtjax.DeviceParams.paper(eta1=0.95)
    d = sample_devices(p, jax.random.key(1), 5000, Spreads.relative(0.8, distribution="lognormal"))
    for name in ("Ms", "thickness", "diameter_x", "diameter_y", "alpha", "pulse_duration"):
        assert np.all(np.asarray(getattr(d, name)) > 0), name
    assert np.all((np.asarray(d.eta1) >= 0) & (np.asarray(d.eta1) <= 1))
    assert np.asarray(d.eta1).max() == 1.0  # the clip was exercised


def test_batch_runs_downstream():
    p = mtjax.DeviceParams.paper()
    d = sample_devices(p, jax.random.key(2), 16, {"Ms": 0.1})
    ms = jax.vmap(mtjax.pulse_response, in_axes=(0, None))(d, mtjax.current_scale(p))
    assert ms.shape == (16, 3)
    assert float(jnp.std(ms[:, 0])) > 1e-3  # variation shows up in the response


def test_bad_arguments():
    p = mtjax.DeviceParams.paper()
    with pytest.raises(ValueError, match="Spreads.Ms"):
        Spreads(Ms=-0.1)
    with pytest.raises(ValueError, match="lognormal"):
        Spreads(Ms=0.5)
    with pytest.raises(ValueError, match="distribution"):
        Spreads(distribution="uniform")
    with pytest.raises(ValueError, match="n must"):
        sample_devices(p, jax.random.key(0), 0)
    with pytest.raises(ValueError, match="nominal device"):
        sample_devices(sample_devices(p, jax.random.key(0), 2), jax.random.key(0), 3)
