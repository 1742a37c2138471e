"""mtjax: differentiable physics of dual-polarizer magnetic tunnel junction neurons in JAX."""

from mtjax import constants, physics, readout
from mtjax.analytic import analytic_response, current_scale, pulse_angles
from mtjax.params import DeviceParams
from mtjax.solve import Trajectory, pulse_response, simulate

__all__ = [
    "DeviceParams",
    "Trajectory",
    "analytic_response",
    "constants",
    "current_scale",
    "physics",
    "pulse_angles",
    "pulse_response",
    "readout",
    "simulate",
]
__version__ = "0.1.0"
