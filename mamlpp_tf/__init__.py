"""mamlpp_tf: MAML++ ("How to train your MAML", Antoniou et al., ICLR 2019) in Keras 3 / TF2.

The public API is small: `LearnerConfig`, `MamlPlusPlus` (the algorithm) and
`Trainer` (its distributed meta-step and optimiser) for meta-learning, the
layers `PerStepBatchNorm` and `PerStepLearningRates`, the `VGGBackbone`, and the
schedules in `mamlpp_tf.schedules`. Networks (the `Backbone` interface, its
registry, the built-in networks and `KerasBackbone` for any Keras model) live in
`mamlpp_tf.nets`, data in `mamlpp_tf.data`.
"""

from collections.abc import Iterator
import contextlib
import io
import os
import sys
import tempfile

# TensorFlow's C++ INFO lines (CPU features) are noise for our users; an
# explicit TF_CPP_MIN_LOG_LEVEL in the environment still wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

# Notices TensorFlow 2.21 writes to file descriptor 2 while its libraries load
# and it first looks for devices, whatever TF_CPP_MIN_LOG_LEVEL says: the first
# two from every wheel, the last two from the full `tensorflow` wheel (built
# with CUDA) on a machine without a GPU driver, where they say only that the
# CPU will be used.
_LOAD_NOTICES = ("All log messages before absl::InitializeLog() is called",
                 "oneDNN custom operations are on",
                 "Could not find cuda drivers on your machine, GPU will not be used",
                 "failed call to cuInit")


@contextlib.contextmanager
def drop_stderr_lines(patterns: tuple[str, ...]) -> Iterator[None]:
    """Inside the block, lines written to file descriptor 2 that contain a pattern are dropped.

    TensorFlow's load notices come from C++ before any logging is configured,
    so file descriptor 2 is the only place to filter them. Everything else
    written meanwhile (a real warning or error) is written back unchanged when
    the block ends. Where stderr has no file descriptor, nothing is filtered.
    """
    try:
        stderr_fd = sys.stderr.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(stderr_fd)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), stderr_fd)
        try:
            yield
        finally:
            os.dup2(saved, stderr_fd)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode("utf-8", "replace").splitlines(keepends=True)
            kept = [line for line in lines if not any(p in line for p in patterns)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


# TF_CPP_MIN_LOG_LEVEL=0 asks for every line, these included. Listing the
# physical devices here makes TensorFlow probe for GPUs inside the filter; it
# leaves the runtime unconfigured (logical devices and strategies come later).
with (drop_stderr_lines(_LOAD_NOTICES) if os.environ["TF_CPP_MIN_LOG_LEVEL"] != "0" else
      contextlib.nullcontext()):
    import keras
    import tensorflow
    tensorflow.config.list_physical_devices()
del keras, tensorflow  # Imported only to load them here; the package's modules import them.

# pylint: disable=g-import-not-at-top,wrong-import-position
from mamlpp_tf.config import LearnerConfig
from mamlpp_tf.learner import MamlPlusPlus
from mamlpp_tf.nets import PerStepBatchNorm, VGGBackbone
from mamlpp_tf.training.trainer import Trainer
from mamlpp_tf.update_rules import PerStepLearningRates

__all__ = [
    "LearnerConfig",
    "MamlPlusPlus",
    "PerStepBatchNorm",
    "PerStepLearningRates",
    "Trainer",
    "VGGBackbone",
]
__version__ = "0.1.0"
