"""Networks for meta-learning: the `Backbone` interface, its registry and the built-in networks.

* `Backbone`, `check_backbone`: what the learner needs of a network (fast
  weights as explicit arguments of its forward pass; `nets.base`).
* `register_backbone`, `build_backbone`, `backbone_names`: the registry that
  `--backbone` names (`nets.registry`).
* Built in: `VGGBackbone` (`vgg`, the paper's network), `ResNet12Backbone`
  (`resnet12`, ALFA/MeTAL's), `MLPBackbone` (`mlp`, the original MAML's Omniglot MLP).
* `KerasBackbone`: any Keras model as a backbone (`nets.keras_model`).
* `PerStepBatchNorm`: MAML++'s per-step batch norm, which every network uses
  (`nets.layers`).
"""

from mamlpp_tf.nets.base import (
    Backbone,
    BatchMoments,
    FastWeightNetwork,
    check_backbone,
    has_task_batched_pass,
)
from mamlpp_tf.nets.keras_model import KerasBackbone
from mamlpp_tf.nets.layers import (
    BN_STATS_MODES,
    CONTEXT_BN_STATS,
    TASKNORM_ALPHAS,
    PerStepBatchNorm,
    differentiated_twice,
)
from mamlpp_tf.nets.mlp import MLPBackbone
from mamlpp_tf.nets.registry import backbone_names, build_backbone, register_backbone
from mamlpp_tf.nets.resnet12 import ResNet12Backbone
from mamlpp_tf.nets.vgg import VGGBackbone

__all__ = [
    "BN_STATS_MODES",
    "CONTEXT_BN_STATS",
    "TASKNORM_ALPHAS",
    "Backbone",
    "BatchMoments",
    "FastWeightNetwork",
    "KerasBackbone",
    "MLPBackbone",
    "PerStepBatchNorm",
    "ResNet12Backbone",
    "VGGBackbone",
    "backbone_names",
    "build_backbone",
    "check_backbone",
    "differentiated_twice",
    "has_task_batched_pass",
    "register_backbone",
]
