"""The main job: meta-train, validate every epoch, keep the top-k, test the ensemble.

    python -m mamlpp_tf.train --flagfile=flags/omniglot.cfg --model_dir=runs/omniglot

Re-running the same command resumes from the last checkpoint (a kill at any
moment loses at most `--checkpoint_every` iterations); a finished run prints its
results instead of training again. SIGTERM/SIGINT save a checkpoint and exit
with status 128 + signal number.

Flags, data and task splits are checked before anything is written to
`--model_dir`, so a start that fails claims nothing; a directory that holds no
checkpoint (e.g. only the `config.json` of an older failed start) takes any
flags. Progress: a live bar on a terminal; in a log file (stdout not a
terminal), a line every `--log_every` iterations with the rate and the ETA.
`--help` lists the job's flags, `--helpfull` those of every library too.
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import sys
import time
from typing import Callable

from absl import flags
from absl import logging
import keras
import numpy as np
import tensorflow as tf

from mamlpp_tf import cli
from mamlpp_tf import data
from mamlpp_tf import distribute
from mamlpp_tf import evaluation
from mamlpp_tf import experiment
from mamlpp_tf import flags as run_flags
from mamlpp_tf import runs
from mamlpp_tf import schedules
from mamlpp_tf.config import RunConfig
from mamlpp_tf.learner import MamlPlusPlus


# Test hook: 1-based meta-iteration whose support images are made NaN.
INJECT_NAN_ENV = "MAMLPP_TF_INJECT_NAN_AT"


class Interrupted(Exception):
    """Training stopped on a signal after saving a checkpoint."""

    def __init__(self, signum: int, iteration: int):
        super().__init__(f"stopped by signal {signum} at iteration {iteration}; checkpoint "
                         "saved, re-run the same command to resume")
        self.signum = signum


class _SignalFlag:
    """Records SIGTERM/SIGINT so the loop can checkpoint at the next step boundary."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        if self.signum is not None:  # A second signal: stop now.
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def train(config: RunConfig, log_every: int = 10,
          on_iteration: Callable[[int], None] | None = None,
          override_config: bool = False) -> dict:
    """Trains (or resumes) the run of `config` and returns its results.

    Nothing is written to `model_dir` before the run has passed every check
    (flags against the run directory, data, episode shapes, task splits), so a
    failed start leaves it as it was.

    Args:
      config: The run.
      log_every: Iterations between TensorBoard training summaries and, when
        stdout is not a terminal, progress lines in the log.
      on_iteration: Called with the iteration count after every meta-step
        (tests use it to inject faults).
      override_config: Resume a `model_dir` made with other flags anyway
        (recording the new ones) instead of refusing.

    Returns:
      The content of `results.json`.

    Raises:
      ValueError: incompatible `model_dir`, episodes that do not fit the data, or
        a `model_dir` in use by another process (`runs.RunLockedError`).
      data.DatasetNotFoundError: the dataset is missing.
      Interrupted: a signal stopped training (after checkpointing).
    """
    start_time = time.time()
    strategy = distribute.resolve(config.strategy, config.meta_batch_size, config.cpu_replicas)
    chief = distribute.is_chief(strategy)
    run = runs.RunDir(config.model_dir)
    if chief:
        run.check_config(config, override=override_config)
    finished = run.read_results()
    if finished is not None:
        logging.info("Run in %s already finished; not training again.", config.model_dir)
        return finished
    sets = experiment.load_class_sets(config)
    learner = experiment.build_learner(config, strategy)
    replicas = strategy.num_replicas_in_sync
    val_tasks = experiment.eval_tasks(config, sets["val"], "val", config.val_tasks, replicas)
    # Built only to fail now, not after training, if the test tasks do not fit.
    experiment.eval_tasks(config, sets["test"], "test", config.test_tasks, replicas)
    with runs.RunLock(config.model_dir) if chief else contextlib.nullcontext():
        if chief:
            run.write_or_check_config(config, override=override_config)
        return _train_locked(config, strategy, chief, run, sets, learner, val_tasks,
                             start_time, log_every, on_iteration)


def _train_locked(config: RunConfig, strategy: tf.distribute.Strategy, chief: bool,
                  run: runs.RunDir, sets: dict[str, data.ClassSet], learner: MamlPlusPlus,
                  val_tasks: tf.data.Dataset, start_time: float, log_every: int,
                  on_iteration: Callable[[int], None] | None) -> dict:
    """`train` once the run is checked and this process owns the run directory."""
    # Progress is counted apart from the optimiser: a skipped (non-finite)
    # update still consumes its meta-batch of the task stream.
    counters = {name: tf.Variable(0, dtype=tf.int64, trainable=False, name=name)
                for name in ("iteration", "skipped_updates")}
    manager = run.latest_manager(learner, counters)
    _restore_latest(manager)
    iteration = int(counters["iteration"].numpy())
    per_epoch = config.learner.iterations_per_epoch
    total = config.learner.epochs * per_epoch
    # Epoch-end checkpoints are written after validation, so every epoch before
    # the restored one has a history entry; later entries are from a crash and
    # are recomputed (identically: training is deterministic given the seed).
    history = [h for h in run.read_history() if h["epoch"] < iteration // per_epoch]
    writers = {name: tf.summary.create_file_writer(os.path.join(run.tensorboard_dir, name))
               for name in ("train", "val")} if chief else {}
    if iteration < total:
        tasks = experiment.train_tasks(config, sets["train"], iteration)
        poison_at = int(os.environ.get(INJECT_NAN_ENV, "0"))
        if poison_at > iteration:
            tasks = _poison(tasks, poison_at - iteration - 1)
        tasks = distribute.distribute_dataset(strategy, tasks)
        progress = progress_reporter(total, log_every, terminal=sys.stdout.isatty())
        with _SignalFlag() as signals:
            for batch in tasks:
                epoch = iteration // per_epoch
                metrics = learner.train_step(batch, epoch)
                iteration += 1
                if not bool(metrics["applied"]):
                    _non_finite(config, manager, iteration, counters)
                counters["iteration"].assign(iteration)
                if on_iteration is not None:
                    on_iteration(iteration)
                values = {k: float(metrics[k]) for k in ("loss", "accuracy")}
                values["skipped_updates"] = float(counters["skipped_updates"].numpy())
                progress.update(iteration, epoch, values["loss"], values["accuracy"])
                if chief and (iteration % log_every == 0 or iteration % per_epoch == 0):
                    _train_summaries(writers["train"], learner, values, iteration)
                if iteration % per_epoch == 0:
                    history.append(_end_epoch(config, run, learner, manager, val_tasks,
                                              strategy, history, epoch, chief, writers))
                elif iteration % config.checkpoint_every == 0 or signals.signum:
                    _save(manager, iteration, chief)
                if signals.signum:
                    raise Interrupted(signals.signum, iteration)
                if iteration >= total:
                    break
    if not history:
        raise ValueError(f"--model_dir={config.model_dir}: no validated epoch to test")
    results = evaluation.run_test(config, run, learner, sets["test"], history, strategy)
    results.update(validation=history, config=config.to_dict(), seeds=_seeds(config),
                   versions=_versions(), iterations=total,
                   skipped_updates=int(counters["skipped_updates"].numpy()),
                   wall_time_s=round(time.time() - start_time, 1))
    if chief:
        run.write_results(results)
    return results


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


def _restore_latest(manager: tf.train.CheckpointManager) -> None:
    """Restores the newest readable checkpoint, falling back past damaged ones.

    Raises:
      ValueError: if checkpoints exist but none can be read.
    """
    candidates = list(reversed(manager.checkpoints))
    for index, path in enumerate(candidates):
        try:
            manager.checkpoint.restore(path).assert_existing_objects_matched()
        except (tf.errors.OpError, ValueError, AssertionError, IndexError) as error:
            logging.warning("Checkpoint %s is unreadable (%s).", path,
                            str(error).splitlines()[0])
            continue
        if index:
            logging.warning("Latest checkpoint %s is damaged; resumed from the previous "
                            "good one, %s.", candidates[0], path)
        else:
            logging.info("Resumed from %s.", path)
        return
    if candidates:
        raise ValueError(f"every checkpoint in {manager.directory} is damaged "
                         f"({', '.join(candidates)}); move them away to start afresh")


class NonFiniteUpdate(Exception):
    """A meta-step produced a NaN/Inf loss or gradient under `--nan_policy=stop`."""


def _non_finite(config: RunConfig, manager: tf.train.CheckpointManager, iteration: int,
                counters: dict[str, tf.Variable]) -> None:
    """Applies `--nan_policy` to a meta-step whose update was withheld.

    Raises:
      NonFiniteUpdate: under the `stop` policy, naming the iteration and the
        last good checkpoint.
    """
    if config.nan_policy == "stop":
        raise NonFiniteUpdate(
            f"non-finite meta-loss or meta-gradient at iteration {iteration}; no update was "
            f"applied; last good checkpoint: {manager.latest_checkpoint or 'none yet'} "
            "(--nan_policy=skip goes on past such batches)")
    counters["skipped_updates"].assign_add(1)
    logging.warning("Skipped the non-finite update of iteration %d (%d skipped so far).",
                    iteration, int(counters["skipped_updates"].numpy()))


def _poison(tasks: tf.data.Dataset, index: int) -> tf.data.Dataset:
    """Test hook: makes the support images of meta-batch `index` NaN."""

    def maybe_poison(position, batch):
        support_x = tf.where(position == index, tf.fill(tf.shape(batch[0]), float("nan")),
                             batch[0])
        return (support_x,) + tuple(batch[1:])

    return tasks.enumerate().map(maybe_poison)


def _save(manager: tf.train.CheckpointManager, iteration: int, chief: bool) -> None:
    """The chief checkpoints the training state; other workers only take part."""
    if chief:
        manager.save(checkpoint_number=iteration)
    else:
        distribute.write_as_non_chief(manager.checkpoint)


def _end_epoch(config: RunConfig, run: runs.RunDir, learner: MamlPlusPlus,
               manager: tf.train.CheckpointManager, val_tasks: tf.data.Dataset,
               strategy: tf.distribute.Strategy, history: list[dict], epoch: int,
               chief: bool, writers: dict) -> dict:
    """Validates, then saves model, history and training state in a crash-safe order."""
    result = evaluation.evaluate(learner, val_tasks, strategy)
    entry = dict(epoch=epoch, loss=float(result.losses.mean()),
                 **evaluation.summarize(result.accuracies))
    logging.info("epoch %d: val accuracy %.4f ± %.4f, loss %.4f", epoch, entry["accuracy"],
                 entry["ci95"], entry["loss"])
    if chief:
        # Order matters for crash safety: model of this epoch, then the history
        # that ranks it, then the training state that marks the epoch done.
        run.save_epoch(learner, epoch)
        run.write_history(history + [entry])
        manager.save(checkpoint_number=int(manager.checkpoint.iteration.numpy()))
        run.prune_epochs(runs.top_epochs(history + [entry], config.ensemble_top_k))
        _epoch_summaries(writers, learner, config, entry, int(manager.checkpoint.iteration.numpy()))
    else:  # The same saves as the chief's, in the same order.
        distribute.write_as_non_chief(
            tf.train.Checkpoint(backbone=learner.backbone, lslr=learner.lslr))
        distribute.write_as_non_chief(manager.checkpoint)
    # Other workers may read this epoch's checkpoint (final test) once past here.
    distribute.barrier(strategy)
    return entry


def _train_summaries(writer, learner: MamlPlusPlus, values: dict, iteration: int) -> None:
    with writer.as_default(step=iteration):
        tf.summary.scalar("loss", values["loss"])
        tf.summary.scalar("accuracy", values["accuracy"])
        tf.summary.scalar("meta_lr", float(learner.optimizer.learning_rate))
        tf.summary.scalar("skipped_updates", values["skipped_updates"])


def _epoch_summaries(writers: dict, learner: MamlPlusPlus, config: RunConfig, entry: dict,
                     iteration: int) -> None:
    """Validation metrics, MSL weights, every LSLR value and per-step BN summaries."""
    with writers["val"].as_default(step=iteration):
        for key in ("loss", "accuracy", "ci95"):
            tf.summary.scalar(key, entry[key])
    epoch = entry["epoch"]
    weights = schedules.msl_weights(epoch, config.learner.inner_steps,
                                    config.learner.msl_epochs)
    with writers["train"].as_default(step=iteration):
        for step, weight in enumerate(weights):
            tf.summary.scalar(f"msl_weight/step_{step}", float(weight))
        for name, rates in learner.lslr.rates.items():
            for step, rate in enumerate(rates.numpy()):
                tf.summary.scalar(f"lslr/{name.replace('/', '_')}/step_{step}", float(rate))
        for norm in learner.backbone.norms:
            for label, variable in (("gamma", norm.gamma), ("beta", norm.beta)):
                values = np.atleast_2d(variable.numpy())
                for step, row in enumerate(values):
                    tf.summary.histogram(f"bn/{norm.name}/{label}/step_{step}", row)
                    tf.summary.scalar(f"bn/{norm.name}/{label}_mean/step_{step}",
                                      float(row.mean()))


def _seeds(config: RunConfig) -> dict:
    return dict(seed=config.seed, val_seed=config.val_seed,
                derived_train_seed=data.derive_seed(config.seed),
                derived_val_seed=data.derive_seed(config.val_seed))


def _versions() -> dict:
    from mamlpp_tf import __version__  # pylint: disable=g-import-not-at-top
    return dict(mamlpp_tf=__version__, tensorflow=tf.__version__, keras=keras.__version__,
                numpy=np.__version__, python=platform.python_version())


def _train() -> str:
    config = run_flags.run_config_from_flags()
    tf.config.experimental.enable_op_determinism()
    try:
        results = train(config, log_every=run_flags.FLAGS.log_every,
                        override_config=run_flags.FLAGS.override_config)
    except NonFiniteUpdate as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(3)
    except Interrupted as stop:
        logging.warning("%s", stop)
        sys.exit(128 + stop.signum)
    return evaluation.format_results(results)


if __name__ == "__main__":
    # --help lists the main module's flags; the job's are defined in mamlpp_tf.flags.
    flags.adopt_module_key_flags(run_flags)
    flags.declare_key_flag("flagfile")
    cli.run(_train)
