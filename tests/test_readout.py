import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtjax
from mtjax import readout


@pytest.mark.parametrize("polarizer", [1, 2])
def test_parallel_antiparallel_and_inverse(polarizer):
    p = mtjax.DeviceParams.paper(tmr1=1.5, tmr2=0.8, ra1=4e-12, ra2=9e-12)
    pvec = p.p1 if polarizer == 1 else p.p2
    tmr = 1.5 if polarizer == 1 else 0.8
    ra = 4e-12 if polarizer == 1 else 9e-12
    g_p = readout.conductance(p, pvec, polarizer)
    g_ap = readout.conductance(p, -pvec, polarizer)
    np.testing.assert_allclose(g_p, p.area / ra, rtol=1e-6)
    np.testing.assert_allclose(g_p / g_ap, 1 + tmr, rtol=1e-6)
    m = jnp.array([[0.3, 0.1, 0.9], [-0.6, 0.0, 0.8]])
    g = readout.conductance(p, m, polarizer)
    np.testing.assert_allclose(
        readout.projection_from_conductance(p, g, polarizer), m @ pvec, atol=1e-6
    )
    np.testing.assert_allclose(readout.read_current(p, m, polarizer, v_read=0.1), 0.1 * g)


def test_bad_polarizer():
    with pytest.raises(ValueError, match="polarizer"):
        readout.conductance(mtjax.DeviceParams.paper(), jnp.ones(3), 3)


def test_response_curves_match_pulse_response_per_device():
    p = mtjax.DeviceParams.paper()
    devs = mtjax.sample_devices(p, jax.random.key(0), 2, mtjax.Spreads.relative(0.1))
    currents = jnp.array([-1.0, 0.5, 2.0]) * mtjax.current_scale(p)
    out = readout.response_curves(devs, currents)
    assert out.shape == (2, 3, 2)
    for i in range(2):
        dev = jax.tree.map(lambda x, i=i: x[i], devs)
        for j, c in enumerate(currents):
            m = mtjax.pulse_response(dev, c)
            np.testing.assert_allclose(out[i, j], [m[0], m[2]], atol=1e-6)  # p1 = x, p2 = z
    single = readout.response_curves(p, currents)
    assert single.shape == (3, 2)
    np.testing.assert_allclose(single[:, 0], jnp.tanh(jnp.array([-1.0, 0.5, 2.0])), atol=1e-4)


def test_response_curves_thermal_keys():
    p = mtjax.DeviceParams.paper()
    currents = jnp.zeros(4)
    a = readout.response_curves(p, currents, key=jax.random.key(1), steps=50)
    b = readout.response_curves(p, currents, key=jax.random.key(1), steps=50)
    np.testing.assert_array_equal(a, b)  # reproducible from the key
    assert len(np.unique(np.asarray(a[:, 0]))) == 4  # independent noise per current
    with pytest.raises(ValueError, match="currents"):
        readout.response_curves(p, jnp.zeros((2, 2)))
    with pytest.raises(ValueError, match="solver"):
        readout.response_curves(p, currents, solver="euler")
