"""mamlpp_tf: MAML++ ("How to train your MAML", Antoniou et al., ICLR 2019) in Keras 3 / TF2.

The public API is small: `LearnerConfig` and `MamlPlusPlus` for meta-learning,
the layers `PerStepBatchNorm` and `PerStepLearningRates`, the `VGGBackbone`,
and the schedules in `mamlpp_tf.schedules`. Data lives in `mamlpp_tf.data`.
"""

import os

# TensorFlow's C++ INFO lines (oneDNN, CPU features) are noise for our users;
# an explicit TF_CPP_MIN_LOG_LEVEL in the environment still wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

# pylint: disable=g-import-not-at-top,wrong-import-position
from mamlpp_tf.backbone import VGGBackbone
from mamlpp_tf.config import LearnerConfig
from mamlpp_tf.layers import PerStepBatchNorm, PerStepLearningRates
from mamlpp_tf.learner import MamlPlusPlus

__all__ = [
    "LearnerConfig",
    "MamlPlusPlus",
    "PerStepBatchNorm",
    "PerStepLearningRates",
    "VGGBackbone",
]
__version__ = "0.1.0"
