"""Neural-network layers built on the MTJ device model.

`MTJActivation` (device neurons as an activation, five modes, device-read-out derivatives),
`MLP`, `deploy` (swap activations, keep weights), `rebuild_tables` and `trainable` (for
co-design and optimizers with weight decay).
"""

from mtjax.nn.activation import (
    DERIVATIVES,
    MODES,
    MTJActivation,
    ResponseTable,
    build_table,
)
from mtjax.nn.models import MLP, deploy, rebuild_tables, trainable

__all__ = [
    "DERIVATIVES",
    "MLP",
    "MODES",
    "MTJActivation",
    "ResponseTable",
    "build_table",
    "deploy",
    "rebuild_tables",
    "trainable",
]
