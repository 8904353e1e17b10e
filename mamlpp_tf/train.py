"""The main job: meta-train, validate every epoch, keep the top-k, test the ensemble.

    python -m mamlpp_tf.train --flagfile=flags/omniglot.cfg --model_dir=runs/omniglot

Re-running the same command resumes from the last checkpoint (a kill at any
moment loses at most `--checkpoint_every` iterations); a finished run prints its
results instead of training again. SIGTERM/SIGINT end the job within seconds
in any phase, with status 128 + signal number and a line saying where it
stopped and what a resume starts from (`mamlpp_tf.training.stop_signals`).
Exit status 74: a write the storage refused (the line names the path); 69:
another worker of a multi-worker job is gone; 3: a non-finite update under
`--nan_policy=stop`; 2: bad flags or data. Each comes with one `error:` line.

Flags, data and task splits are checked before anything is written to
`--model_dir`, so a start that fails claims nothing; a directory that holds no
checkpoint (e.g. only the `config.json` of an older failed start) takes any
flags. Progress: a live bar on a terminal; in a log file (stdout not a
terminal), a line every `--log_every` iterations with the rate and the ETA.
`--help` lists the job's flags, `--helpfull` those of every library too.

This module is the command line (flags → `RunConfig` → `loop.train`)
and its progress display; the job itself is `mamlpp_tf.training.loop`.
"""

from __future__ import annotations

from collections.abc import Callable
import sys
import time

from absl import flags, logging
import keras
import numpy as np
import tensorflow as tf

from mamlpp_tf import cli
from mamlpp_tf import flags as run_flags
from mamlpp_tf.training import distribute, evaluation, loop

# Exit status when another worker of a multi-worker job is gone (sysexits' EX_UNAVAILABLE).
WORKER_LOST = 69


class ProgressBar:
    """Training progress on a terminal: Keras' live progress bar.

    Args:
      total: Iterations of the whole run.
    """

    def __init__(self, total: int):
        self._bar = keras.utils.Progbar(total, unit_name="meta-iteration",
                                        stateful_metrics=["loss", "accuracy", "epoch"])

    def update(self, iteration: int, epoch: int, loss: float, accuracy: float) -> None:
        """Shows meta-iteration `iteration` (1-based) and its batch's metrics."""
        self._bar.update(iteration, [("loss", loss), ("accuracy", accuracy), ("epoch", epoch)])


class ProgressLines:
    """Training progress for log files: one log line every `every` iterations.

    Without a terminal, Keras' bar prints only when the whole run ends; a line
    per `every` iterations shows that a job of days is alive and when it will end.

    Args:
      total: Iterations of the whole run.
      every: Iterations between lines (the last iteration always gets one).
      clock: Seconds of a monotonic clock (tests pass their own).
    """

    def __init__(self, total: int, every: int,
                 clock: Callable[[], float] = time.monotonic):
        self._total = total
        self._every = every
        self._clock = clock
        self._since_line: list[tuple[float, float]] = []
        # (iteration, time) at the end of this process's first step: the rate
        # leaves out its tracing, and includes validation.
        self._start: tuple[int, float] | None = None

    def update(self, iteration: int, epoch: int, loss: float, accuracy: float) -> None:
        """Records meta-iteration `iteration` (1-based); logs a line when one is due.

        The line shows iterations done/total, the epoch, the mean loss and
        accuracy of the training batches since the previous line, iterations
        per second since this process's first step and the time left at that
        rate.
        """
        now = self._clock()
        if self._start is None:
            self._start = (iteration, now)
        self._since_line.append((loss, accuracy))
        if iteration % self._every and iteration < self._total:
            return
        done, elapsed = iteration - self._start[0], now - self._start[1]
        if done and elapsed > 0:
            rate = done / elapsed
            speed = (f"{rate:.3g} iterations/s, ETA "
                     f"{format_duration((self._total - iteration) / rate)}")
        else:
            speed = "speed: after the next line"
        losses, accuracies = np.mean(self._since_line, axis=0)
        logging.info("iteration %d/%d (epoch %d): train loss %.4f, accuracy %.4f (mean of "
                     "%d); %s", iteration, self._total, epoch, losses, accuracies,
                     len(self._since_line), speed)
        self._since_line.clear()


def progress_reporter(total: int, every: int, terminal: bool) -> ProgressBar | ProgressLines:
    """Keras' live bar on a terminal, a log line every `every` iterations otherwise."""
    return ProgressBar(total) if terminal else ProgressLines(total, every)


def format_duration(seconds: float) -> str:
    """`seconds` as the two largest units, e.g. "2d 05h", "3h 07m", "4m 09s", "12s"."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def _train() -> str:
    config = run_flags.run_config_from_flags()
    tf.config.experimental.enable_op_determinism()
    log_every = run_flags.FLAGS.log_every
    total = config.learner.epochs * config.learner.iterations_per_epoch
    progress = progress_reporter(total, log_every, terminal=sys.stdout.isatty())
    try:
        results = loop.train(config, log_every=log_every,
                                   override_config=run_flags.FLAGS.override_config,
                                   progress=progress.update)
    except loop.NonFiniteUpdate as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(3)
    except distribute.WorkerLost as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(WORKER_LOST)
    return evaluation.format_results(results)


if __name__ == "__main__":
    # --help lists the main module's flags; the job's are defined in mamlpp_tf.flags.
    flags.adopt_module_key_flags(run_flags)
    flags.declare_key_flag("flagfile")
    cli.run(_train, job="the training job")
