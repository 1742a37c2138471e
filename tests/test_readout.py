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
