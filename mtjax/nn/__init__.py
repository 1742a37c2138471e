"""Neural-network layers built on the MTJ device model.

`MTJActivation` (device neurons as an activation, five modes, device-read-out derivatives),
`MLP`, the convolutional `SmallCNN`, `ResNetFeatures`, `HeadedClassifier` and `cifar_model`,
`deploy` (swap activations, keep weights), `rebuild_tables` and `trainable` (for co-design
and optimizers with weight decay).
"""

from mtjax.nn.activation import (
    DERIVATIVES,
    MODES,
    MTJActivation,
    ResponseTable,
    TableGrid,
    build_table,
)
from mtjax.nn.cnn import HeadedClassifier, ResNetFeatures, SmallCNN, cifar_model
from mtjax.nn.models import MLP, check_trainable, deploy, rebuild_tables, trainable

__all__ = [
    "DERIVATIVES",
    "HeadedClassifier",
    "MLP",
    "MODES",
    "MTJActivation",
    "ResNetFeatures",
    "ResponseTable",
    "TableGrid",
    "SmallCNN",
    "build_table",
    "check_trainable",
    "cifar_model",
    "deploy",
    "rebuild_tables",
    "trainable",
]
