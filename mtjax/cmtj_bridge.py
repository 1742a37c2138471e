"""Build a cmtj `Junction` with the same macrospin physics as `mtjax` (cross-checks, benchmarks).

cmtj (https://github.com/LemurPwned/cmtj) is a dev extra: it is imported lazily, on the first
call that needs it, so importing this module never requires it.

cmtj 1.15 model (read from its ``core/junction.hpp`` and checked numerically, see
tests/test_cmtj.py) -- one free layer, every field in A/m::

    Heff = Hext + 2 K (u.m) u / Ms_T - (N m) Ms_T / mu0_c
    dm/dt = -GYRO / (1+alpha^2) [ m x Heff + alpha m x (m x Heff)
                                  + (Hfl - alpha Hdl) m x p + (Hdl + alpha Hfl) m x (m x p) ]

with GYRO = gamma mu0 = 220880 m/(A s) (``cmtj.constants.PhysicalConstants.gyromagnetic_ratio()``,
runtime-settable), mu0_c = 1.2566e-6 (``magnetic_permeability()``), u the anisotropy axis
(used as given: we pass a unit vector), p the reference layer, Hdl/Hfl the values of the
damping-like / field-like torque drivers ("SOT" drivers; their unit is **A/m**, not T: the
driver value is multiplied by GYRO in m/(A s)). This is the Landau-Lifshitz form of the
Gilbert equation, i.e. exactly mtjax's `physics.llgs_rhs`. cmtj's RK4 renormalizes |m| after
each step, like mtjax's `rk4_scan`.

Unit mapping, mtjax `DeviceParams` -> cmtj:

===================  ==========================  ==========================================
mtjax                cmtj                        mapping
===================  ==========================  ==========================================
Ms [A/m]             Layer Ms [T]                Ms_T = mu0_c * Ms (cmtj's own mu0, so the
                                                 demag field Ms_T / mu0_c = Ms exactly)
hk [A/m], hk_axis    anis (unit), K [J/m^3]      K = Ms_T * hk / 2 = mu0 Ms hk / 2, constant
                                                 anisotropy driver, anis = hk_axis/|hk_axis|
demag (Nx,Ny,Nz)     demagTensor (3 CVectors)    rows (Nx,0,0), (0,Ny,0), (0,0,Nz)
h_bias [A/m]         external field [A/m]        AxialDriver(hx, hy, hz), no conversion
alpha                damping                     same
gamma [rad/(s T)]    GYRO = gamma mu0 [m/(A s)]  cmtj has no per-layer gamma: the bridge
                                                 requires params.gamma * MU0 == GYRO; use
                                                 `with_cmtj_gamma(params)` (gamma =
                                                 220880 / MU0 = 1.7577e11 vs mtjax's
                                                 default 1.76086e11, a 0.18 % difference)
thickness [m]        thickness [m]               same
area [m^2]           cellSurface [m^2]           pi dx dy / 4 (volume for thermal noise)
temperature [K]      temperature driver [K]      only with ``thermal=True``; same noise
                                                 strength sqrt(2 alpha kB T/(Ms_T V GYRO))
===================  ==========================  ==========================================

Spin torques (``torque="direct"``, default, both polarizers, needs lambda = 1): the torque
drivers are set to mtjax's amplitudes, Hdl = a_k = hbar eta_k J_k / (2 e mu0 Ms t) [A/m]
(`physics.stt_amplitude`, J_k = I_k / area) and Hfl = b_k = xi_k a_k, with reference layer
p1 (primary drivers) and p2 (secondary drivers, ``setSecondaryReferenceLayer``). Since cmtj
adds the alpha cross terms itself, this is term-by-term mtjax's spin torque; a positive current
drives m towards +p_k (tested).

``torque="stt"`` (polarizer 1 only, any lambda1): cmtj's Slonczewski layer
(``Layer.createSTTLayer``) with spinPolarisation = eta1, SlonczewskiSpacerLayerParameter =
lambda1 and current density J1 (current driver, A/m^2). cmtj's STT term is
-GYRO/(1+alpha^2) [kappa aJ g m x (m x p) - beta aJ g m x p] with aJ = hbar J/(e Ms_T t)
and g = eta lambda^2 / (lambda^2 + 1 + (lambda^2 - 1) m.p), i.e. aJ g = mtjax's a1 (including
the Slonczewski factor), so beta = alpha - xi1 and kappa = 1 + alpha xi1 reproduce mtjax; J is
rescaled by the ratio of mtjax's to cmtj's hbar / (e mu0) (a 3e-5 relative difference).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np

from mtjax.constants import E_CHARGE, HBAR, MU0
from mtjax.params import DeviceParams
from mtjax.physics import stt_amplitude

LAYER_ID = "free"
TORQUE_MODES = ("direct", "stt")


def _cmtj():
    try:
        import cmtj
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("mtjax.cmtj_bridge needs cmtj (a dev extra): pip install cmtj") from err
    return cmtj


def _constants():
    """cmtj's runtime physical constants (a `PhysicalConstants` class)."""
    _cmtj()
    import _cmtj as ext  # the compiled extension that `cmtj` re-exports

    return ext.constants.PhysicalConstants


def cmtj_gyro() -> float:
    """cmtj's gamma * mu0 (m/(A s)), default 220880."""
    _cmtj()
    return float(_constants().gyromagnetic_ratio())


def cmtj_gamma() -> float:
    """The mtjax `gamma` (rad/(s T)) whose gamma * MU0 equals cmtj's GYRO."""
    return cmtj_gyro() / MU0


def with_cmtj_gamma(params: DeviceParams) -> DeviceParams:
    """`params` with gamma set to cmtj's gyromagnetic ratio (needed by `to_cmtj_junction`)."""
    return params.replace(gamma=cmtj_gamma())


def _scalar(x) -> float:
    a = np.asarray(x, dtype=np.float64)
    if a.shape != ():
        raise ValueError(f"expected a scalar, got shape {a.shape}")
    return float(a)


def _vec(x) -> tuple[float, float, float]:
    a = np.asarray(x, dtype=np.float64)
    if a.shape != (3,):
        raise ValueError(f"expected a 3-vector, got shape {a.shape}")
    return float(a[0]), float(a[1]), float(a[2])


def _unit(x) -> tuple[float, float, float]:
    a = np.asarray(_vec(x))
    return tuple(float(c) for c in a / np.linalg.norm(a))


def _currents(currents) -> tuple[float, float]:
    c = np.asarray(currents, dtype=np.float64)
    if c.shape == ():
        return float(c), 0.0
    if c.shape != (2,):
        raise ValueError(
            f"currents: expected a scalar P1 current or a (P1, P2) pair in A, got shape {c.shape}"
        )
    if not np.all(np.isfinite(c)):
        raise ValueError(f"currents: non-finite value {c}")
    return float(c[0]), float(c[1])


def to_cmtj_junction(
    params: DeviceParams,
    currents: float | Sequence[float] = 0.0,
    m0: Sequence[float] | None = None,
    *,
    torque: str = "direct",
    thermal: bool = False,
    seed: int | None = None,
    gamma_rtol: float = 1e-6,
):
    """A one-layer cmtj `Junction` (layer id ``"free"``) with the physics of `params`.

    `currents`: constant P1 current or (P1, P2) pair in A. `m0`: initial magnetization
    (default +z, normalized). `torque`: ``"direct"`` (cmtj's damping/field-like torque drivers
    set to mtjax's a_k, b_k; both polarizers; lambda must be 1 for a polarizer with current)
    or ``"stt"`` (cmtj's Slonczewski STT layer; polarizer 1 only, any lambda1). `thermal`:
    add cmtj's thermal field at `params.temperature` (then run with a Heun solver mode);
    `seed` seeds its RNG. Raises ValueError if params.gamma * MU0 differs from cmtj's GYRO by
    more than `gamma_rtol` (use `with_cmtj_gamma`).
    """
    cmtj = _cmtj()
    const = _constants()
    if params.batch_shape != ():
        raise ValueError(f"params: one device expected, got batch shape {params.batch_shape}")
    if torque not in TORQUE_MODES:
        raise ValueError(f"torque: choose from {TORQUE_MODES}, got {torque!r}")
    gyro = float(const.gyromagnetic_ratio())
    gamma0 = _scalar(params.gamma) * MU0
    if abs(gamma0 - gyro) > gamma_rtol * gyro:
        raise ValueError(
            f"params.gamma * mu0 = {gamma0:.6g} m/(A s) but cmtj uses {gyro:.6g}: "
            "use mtjax.cmtj_bridge.with_cmtj_gamma(params)"
        )
    mu0_c = float(const.magnetic_permeability())
    i1, i2 = _currents(currents)

    Ms = _scalar(params.Ms)
    ms_t = mu0_c * Ms
    alpha = _scalar(params.alpha)
    thickness = _scalar(params.thickness)
    area = math.pi * _scalar(params.diameter_x) * _scalar(params.diameter_y) / 4
    hk = _scalar(params.hk)
    axis = _unit(params.hk_axis)
    nx, ny, nz = _vec(params.demag)
    demag = [cmtj.CVector(nx, 0.0, 0.0), cmtj.CVector(0.0, ny, 0.0), cmtj.CVector(0.0, 0.0, nz)]
    mag = cmtj.CVector(*_unit((0.0, 0.0, 1.0) if m0 is None else m0))
    p1 = cmtj.CVector(*_unit(params.p1))
    p2 = cmtj.CVector(*_unit(params.p2))
    xi1, xi2 = _scalar(params.xi1), _scalar(params.xi2)
    lam1, lam2 = _scalar(params.lambda1), _scalar(params.lambda2)

    if torque == "direct":
        for k, (lam, cur) in enumerate(((lam1, i1), (lam2, i2)), start=1):
            if cur != 0.0 and lam != 1.0:
                raise ValueError(
                    f"torque='direct' has no Slonczewski angular factor: lambda{k} must be 1 "
                    f"(got {lam}); use torque='stt' for polarizer 1"
                )
        layer = cmtj.Layer(
            LAYER_ID, mag, cmtj.CVector(*axis), ms_t, thickness, area, demag, damping=alpha
        )
    else:
        if i2 != 0.0:
            raise ValueError("torque='stt' models polarizer 1 only: the P2 current must be 0")
        layer = cmtj.Layer.createSTTLayer(
            LAYER_ID,
            mag,
            cmtj.CVector(*axis),
            ms_t,
            thickness,
            area,
            demag,
            damping=alpha,
            SlonczewskiSpacerLayerParameter=lam1,
            beta=alpha - xi1,
            spinPolarisation=_scalar(params.eta1),
        )
        layer.setKappa(1.0 + alpha * xi1)
    layer.setReferenceLayer(p1)
    junction = cmtj.Junction([layer])

    const_driver = cmtj.ScalarDriver.getConstantDriver
    junction.setLayerAnisotropyDriver(LAYER_ID, const_driver(ms_t * hk / 2))
    hb = _vec(params.h_bias)
    junction.setLayerExternalFieldDriver(
        LAYER_ID, cmtj.AxialDriver(const_driver(hb[0]), const_driver(hb[1]), const_driver(hb[2]))
    )
    if torque == "direct":
        with jax.enable_x64(True):  # float64 even when params hold float32 leaves
            p64 = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
            a1 = float(stt_amplitude(p64, np.float64(i1), 1))
            a2 = float(stt_amplitude(p64, np.float64(i2), 2))
        junction.setLayerDampingLikeTorqueDriver(LAYER_ID, const_driver(a1))
        junction.setLayerFieldLikeTorqueDriver(LAYER_ID, const_driver(xi1 * a1))
        junction.getLayer(LAYER_ID).setSecondaryReferenceLayer(p2)
        junction.setLayerSecondaryDampingLikeTorqueDriver(LAYER_ID, const_driver(a2))
        junction.setLayerSecondaryFieldLikeTorqueDriver(LAYER_ID, const_driver(xi2 * a2))
    else:
        # cmtj: hbar_c J / (e_c mu0_c Ms t) * P...; mtjax: HBAR J / (E_CHARGE MU0 Ms t) * eta...
        scale = (HBAR / (E_CHARGE * MU0)) / (
            float(const.hbar()) / (float(const.elementary_charge()) * mu0_c)
        )
        junction.setLayerCurrentDriver(LAYER_ID, const_driver(scale * i1 / area))
    if thermal:
        junction.setLayerTemperatureDriver(LAYER_ID, const_driver(_scalar(params.temperature)))
        if seed is not None:
            junction.setLayerSeed(LAYER_ID, int(seed))
    return junction


def run_cmtj(
    params: DeviceParams,
    currents: float | Sequence[float],
    t1: float,
    dt: float,
    m0: Sequence[float] | None = None,
    *,
    save_every: int = 1,
    torque: str = "direct",
    thermal: bool = False,
    seed: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Integrate with cmtj (RK4; stochastic Heun if `thermal`) over n = round(t1/dt) steps.

    Returns (ts, m): times (s) and magnetizations, shapes (k,) and (k, 3), k = n/save_every + 1,
    starting with (0, m0) and then every `save_every` steps (n must be a multiple of it).
    """
    n = round(t1 / dt)
    if n < 1 or save_every < 1 or n % save_every:
        raise ValueError(f"need t1/dt = {n} >= 1 steps, a multiple of save_every={save_every}")
    # cmtj logs every step, at time i dt, the state *after* that step, i.e. m((i + 1) dt).
    junction = _run(params, currents, n, dt, m0, 1, torque, thermal, seed)
    m_init = np.asarray(_unit((0.0, 0.0, 1.0) if m0 is None else m0))
    log = junction.getLog()
    ms = np.stack([np.asarray(log[f"{LAYER_ID}_m{c}"]) for c in "xyz"], axis=-1)
    if ms.shape[0] != n:
        raise RuntimeError(f"cmtj logged {ms.shape[0]} states, expected {n}")
    ms = np.concatenate([m_init[None], ms], axis=0)[::save_every]
    ts = np.arange(0, n + 1, save_every) * dt
    return ts, ms


def cmtj_final_m(
    params: DeviceParams,
    currents: float | Sequence[float],
    t1: float,
    dt: float,
    m0: Sequence[float] | None = None,
    *,
    torque: str = "direct",
    thermal: bool = False,
    seed: int | None = None,
) -> np.ndarray:
    """m after n = round(t1/dt) cmtj steps, logging as little as possible (for timing)."""
    n = round(t1 / dt)
    junction = _run(params, currents, n, dt, m0, n, torque, thermal, seed)
    return np.asarray(junction.getLayerMagnetisation(LAYER_ID).tolist())


def _run(params, currents, n, dt, m0, write_every, torque, thermal, seed):
    """Build the junction and run n steps (RK4, or stochastic Heun if thermal), logging every
    `write_every` steps. cmtj truncates totalTime/timeStep and writeFrequency/timeStep to
    ints, hence the half steps."""
    cmtj = _cmtj()
    junction = to_cmtj_junction(params, currents, m0, torque=torque, thermal=thermal, seed=seed)
    mode = cmtj.Heun if thermal else cmtj.RK4
    junction.runSimulation((n + 0.5) * dt, dt, (write_every + 0.5) * dt, False, False, mode)
    return junction
