"""mtjax: differentiable physics of dual-polarizer magnetic tunnel junction neurons in JAX.

Layers (imports point down): constants/params/variation/sharding -> physics ->
integrators/solve/ensemble/moments -> readout/analytic -> nn -> energy/plot/validity -> fetch ->
data/train/distill/codesign -> experiments/findings/sensitivity -> scripts.
"""

from mtjax import (
    codesign,
    constants,
    data,
    distill,
    energy,
    fetch,
    nn,
    physics,
    plot,
    readout,
    sensitivity,
    sharding,
    train,
    validity,
    variation,
)
from mtjax.analytic import analytic_response, current_scale, pulse_angles
from mtjax.energy import (
    EnergyBreakdown,
    NetworkEnergy,
    ResetModel,
    activation_energy,
    energy_table,
    needed_energy_steps,
    network_energy,
)
from mtjax.ensemble import pulse_ensemble
from mtjax.params import DeviceParams
from mtjax.solve import Trajectory, pulse_response, simulate
from mtjax.variation import (
    Deviations,
    Spreads,
    sample_deviations,
    sample_devices,
    sample_reset_states,
)

__all__ = [
    "DeviceParams",
    "Deviations",
    "EnergyBreakdown",
    "NetworkEnergy",
    "ResetModel",
    "Spreads",
    "Trajectory",
    "activation_energy",
    "analytic_response",
    "codesign",
    "constants",
    "current_scale",
    "data",
    "distill",
    "energy",
    "energy_table",
    "fetch",
    "needed_energy_steps",
    "network_energy",
    "nn",
    "physics",
    "plot",
    "pulse_angles",
    "pulse_ensemble",
    "pulse_response",
    "readout",
    "sample_deviations",
    "sample_devices",
    "sample_reset_states",
    "sensitivity",
    "sharding",
    "simulate",
    "train",
    "validity",
    "variation",
]
__version__ = "0.1.0"
