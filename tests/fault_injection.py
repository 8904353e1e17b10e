"""Subprocess side of the fault tests: an entry point with one fault injected.

python tests/fault_injection.py nan ITERATION TRAIN_FLAGS...
Runs `python -m mamlpp_tf.train TRAIN_FLAGS...` in this process with the
support images of meta-iteration ITERATION (1-based, counted over the whole
run: a resumed job skips the ones before its checkpoint) made NaN, so that
meta-step's loss and gradients are not finite. Exits with the job's status.

python tests/fault_injection.py sigterm MODULE:ATTRIBUTE ENTRY_MODULE FLAGS...
Runs `python -m ENTRY_MODULE FLAGS...` in this process; the first call of
`MODULE.ATTRIBUTE` (e.g. `mamlpp_tf_export.saved_models:write_warmup`) sends this
process SIGTERM and goes on, so the signal lands inside that call.

The fault is injected here, from outside the package, so the production loop
carries no test hook.
"""

import importlib
import os
import runpy
import signal
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


def sigterm_inside(target: str) -> None:
    """Makes the first call of `target` ("module:Class.method") SIGTERM this process."""
    module, attribute = target.split(":")
    *path, name = attribute.split(".")
    owner = importlib.import_module(module)
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, name)
    sent = []

    def signalled(*args, **kwargs):
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    setattr(owner, name, signalled)


def run_entry_point(module: str, argv: list[str]) -> None:
    """`python -m module argv...` in this process; exits with its status."""
    sys.argv = [module] + argv
    runpy.run_module(module, run_name="__main__")


if __name__ == "__main__":
    if sys.argv[1] == "nan":
        poison_iteration(int(sys.argv[2]))
        run_entry_point("mamlpp_tf.train", sys.argv[3:])
    elif sys.argv[1] == "sigterm":
        sigterm_inside(sys.argv[2])
        run_entry_point(sys.argv[3], sys.argv[4:])
    else:
        raise SystemExit(f"unknown fault {sys.argv[1]!r}")
