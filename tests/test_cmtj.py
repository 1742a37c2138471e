"""Cross-check of mtjax's LLGS trajectories against cmtj (an independent C++ macrospin code).

The device has every ingredient at once: tilted uniaxial anisotropy, demagnetization, a bias
field off all axes, STT from P1 (and P2), damping, a tilted m0. mtjax (adaptive Tsit5, x64,
tight tolerances) and cmtj (RK4, 0.5 ps) must agree within TOL over a 2 ns trajectory
that moves far from m0; negative controls show the comparison would catch a sign or a
gamma error.
"""

import cmtj  # noqa: F401  the only independent reference: a dev dependency, required
import jax
import numpy as np
import pytest

from mtjax import DeviceParams, current_scale, pulse_response, simulate
from mtjax import cmtj_bridge as cb
from mtjax.constants import MU0

TOL = 1e-3  # component-wise max |m_mtjax - m_cmtj| over the whole trajectory
T1 = 2e-9
DT = 5e-13  # cmtj RK4 step
SAVE_EVERY = 20  # compare every 10 ps: 201 points
M0 = np.array([0.3, -0.5, 0.8]) / np.linalg.norm([0.3, -0.5, 0.8])

BASE = dict(
    Ms=1e6,
    alpha=0.02,
    hk=3e4,
    hk_axis=(0.3, 0.2, 1.0),
    demag=(0.02, 0.03, 0.05),
    h_bias=(6e3, -4e3, 7e3),
    p1=(1.0, 0.0, 0.0),
    p2=(0.0, 0.0, 1.0),
)


def _params(**overrides):
    return cb.with_cmtj_gamma(DeviceParams(**(BASE | overrides)))


def _mtjax(params, currents):
    n = round(T1 / DT) // SAVE_EVERY + 1
    tr = simulate(params, currents, T1, m0=M0, saveat=n, rtol=1e-10, atol=1e-10, max_steps=2**18)
    return np.asarray(tr.ts), np.asarray(tr.ms)


def _currents(params, scale_p1, scale_p2=0.0):
    i_s = float(current_scale(params))
    return np.array([scale_p1 * i_s, scale_p2 * i_s])


CASES = {
    "stt_p1": (dict(), "direct", (1.5, 0.0)),
    "field_like_xi0.2": (dict(xi1=0.2), "direct", (1.5, 0.0)),
    "dual_polarizer": (dict(xi1=0.2, xi2=-0.1, alpha=0.04), "direct", (1.2, -0.8)),
    "slonczewski_lambda1.5": (dict(xi1=0.2, lambda1=1.5), "stt", (1.5, 0.0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_trajectory_matches_cmtj(case):
    overrides, torque, scales = CASES[case]
    with jax.enable_x64(True):
        params = _params(**overrides)
        currents = _currents(params, *scales)
        ts, m_ref = _mtjax(params, currents)
    ts_c, m_c = cb.run_cmtj(params, currents, T1, DT, M0, save_every=SAVE_EVERY, torque=torque)
    np.testing.assert_allclose(ts_c, ts, rtol=0, atol=1e-18)
    # the trajectory is non-trivial: it ends far from m0
    assert np.linalg.norm(m_ref[-1] - M0) > 0.3
    err = np.abs(m_ref - m_c).max()
    assert err <= TOL, f"{case}: max |diff| {err:.3g}"

    # Sensitivity: the sign-flipped current gives a clearly different trajectory.
    _, m_flip = cb.run_cmtj(params, -currents, T1, DT, M0, save_every=SAVE_EVERY, torque=torque)
    assert np.abs(m_ref - m_flip).max() > 100 * TOL


def test_rk4_scan_equals_cmtj_rk4_step_for_step():
    """Same algorithm (classical RK4 + renormalization), same step: agreement to roundoff."""
    with jax.enable_x64(True):
        params = _params(xi1=0.2)
        currents = _currents(params, 1.5)
        n = round(T1 / DT)
        tr = simulate(
            params, currents, T1, m0=M0, saveat=n // SAVE_EVERY + 1, solver="rk4_scan", steps=n
        )
        m_scan = np.asarray(tr.ms)
    _, m_c = cb.run_cmtj(params, currents, T1, DT, M0, save_every=SAVE_EVERY)
    assert np.abs(m_scan - m_c).max() < 1e-9


def test_positive_current_drives_towards_p1():
    """From +z with no field, +I drives m towards +p1 in both codes (and -I away)."""
    with jax.enable_x64(True):
        params = cb.with_cmtj_gamma(DeviceParams.paper(p1=(0.0, 1.0, 0.0)))
        i_s = float(current_scale(params))
        for torque in cb.TORQUE_MODES:
            for sign in (1.0, -1.0):
                _, m_c = cb.run_cmtj(params, sign * i_s, 1e-9, 1e-12, torque=torque)
                my = m_c[-1, 1]
                assert sign * my == pytest.approx(np.tanh(1.0), abs=1e-3)
        tr = simulate(params, i_s, 1e-9, rtol=1e-10, atol=1e-10)
        assert float(tr.ms[-1, 1]) == pytest.approx(np.tanh(1.0), abs=1e-6)


def test_gamma_mismatch_is_refused_and_would_be_detected():
    assert cb.cmtj_gyro() == pytest.approx(cb.cmtj_gamma() * MU0, rel=1e-15)
    with jax.enable_x64(True):
        matched = _params()
        codata = matched.replace(gamma=DeviceParams().gamma)  # mtjax's default gamma
        assert abs(float(codata.gamma) * MU0 / cb.cmtj_gyro() - 1) > 1e-3
        with pytest.raises(ValueError, match="with_cmtj_gamma"):
            cb.to_cmtj_junction(codata, 1e-4)
        # Forcing the mismatch through: the 0.18 % gamma difference exceeds TOL over 2 ns.
        currents = _currents(matched, 1.5)
        _, m_codata = _mtjax(codata, currents)
    _, m_c = cb.run_cmtj(matched, currents, T1, DT, M0, save_every=SAVE_EVERY)
    assert np.abs(m_codata - m_c).max() > TOL


def test_bridge_rejects_unsupported_configurations():
    params = _params(lambda1=2.0)
    with pytest.raises(ValueError, match="lambda1"):
        cb.to_cmtj_junction(params, 1e-4, torque="direct")
    cb.to_cmtj_junction(params, 0.0, torque="direct")  # no current through P1: fine
    with pytest.raises(ValueError, match="P2"):
        cb.to_cmtj_junction(params, (1e-4, 1e-4), torque="stt")
    with pytest.raises(ValueError, match="torque"):
        cb.to_cmtj_junction(params, 0.0, torque="sot")
    with pytest.raises(ValueError, match="currents"):
        cb.to_cmtj_junction(params, (1.0, 2.0, 3.0))


def test_thermal_ensembles_agree():
    """Same thermal field strength: <m_z> after 1 ns of free diffusion from +z agrees (4 sigma).

    A factor-2 error in the noise variance would move <m_z> from ~0.79 to ~0.63."""
    n_cmtj, n_jax, steps = 300, 1000, 2000
    with jax.enable_x64(True):
        params = cb.with_cmtj_gamma(
            DeviceParams.paper(alpha=0.05, diameter_x=20e-9, diameter_y=20e-9, thickness=1e-9)
        )
        keys = jax.random.split(jax.random.key(0), n_jax)
        run = jax.vmap(
            lambda k: pulse_response(params, 0.0, key=k, solver="heun_scan", steps=steps)
        )
        mz_jax = np.asarray(jax.jit(run)(keys))[:, 2]
    mz_cmtj = np.array(
        [
            cb.cmtj_final_m(params, 0.0, 1e-9, 1e-9 / steps, thermal=True, seed=k + 1)[2]
            for k in range(n_cmtj)
        ]
    )
    assert mz_cmtj.std() > 0.05 and mz_jax.std() > 0.05
    sigma = np.hypot(mz_cmtj.std() / np.sqrt(n_cmtj), mz_jax.std() / np.sqrt(n_jax))
    assert abs(mz_cmtj.mean() - mz_jax.mean()) < 4 * sigma
    assert 0.7 < mz_jax.mean() < 0.88
