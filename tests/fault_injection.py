"""Subprocess side of the fault tests: the training job with one fault injected.

python tests/fault_injection.py nan ITERATION TRAIN_FLAGS...
Runs `python -m mamlpp_tf.train TRAIN_FLAGS...` in this process with the
support images of meta-iteration ITERATION (1-based, counted over the whole
run: a resumed job skips the ones before its checkpoint) made NaN, so that
meta-step's loss and gradients are not finite. Exits with the job's status.

The fault is injected here, from outside the package, so the production loop
carries no test hook.
"""

import os
import runpy
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# pylint: disable=g-import-not-at-top
import tensorflow as tf

from mamlpp_tf.training.run import Run

# pylint: enable=g-import-not-at-top


def poison_iteration(iteration: int) -> None:
    """Makes `Run.train_tasks` yield NaN support images at meta-iteration `iteration`."""
    train_tasks = Run.train_tasks

    def poisoned(self, start_iteration: int) -> tf.data.Dataset:
        index = iteration - start_iteration - 1  # Position in this stream.

        def maybe_poison(position, batch):
            nan = tf.fill(tf.shape(batch[0]), tf.constant(float("nan"), batch[0].dtype))
            return (tf.where(position == index, nan, batch[0]),) + tuple(batch[1:])

        return train_tasks(self, start_iteration).enumerate().map(maybe_poison)

    Run.train_tasks = poisoned


def run_training(argv: list[str]) -> None:
    """`python -m mamlpp_tf.train argv...` in this process; exits with its status."""
    sys.argv = ["mamlpp_tf.train"] + argv
    runpy.run_module("mamlpp_tf.train", run_name="__main__")


if __name__ == "__main__":
    if sys.argv[1] == "nan":
        poison_iteration(int(sys.argv[2]))
        run_training(sys.argv[3:])
    else:
        raise SystemExit(f"unknown fault {sys.argv[1]!r}")
