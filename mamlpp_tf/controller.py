"""The training job of one run: epochs, validation, top-k epoch checkpoints, resume, test.

`train(config)` meta-trains the run of `config` with a `Trainer` (the
distributed meta-step), validates after every epoch, keeps the checkpoints of
the `--ensemble_top_k` best epochs and finally tests the best epoch and their
logit ensemble. As TF Model Garden's Controller does around its Trainer: the
loop, the checkpoint cadence and the summaries live here, the step there.

Re-running the same run resumes from the last checkpoint (a kill at any
moment loses at most `--checkpoint_every` iterations); a finished run returns
its results instead of training again. SIGTERM/SIGINT raise
`stop_signals.Interrupted`: in a meta-step after checkpointing it, elsewhere
(tracing, validation, the final test) at once. With several workers, only
the chief (`strategy.extended.should_checkpoint`) writes; the others take
part in every save.
"""

from __future__ import annotations

from collections.abc import Callable
import contextlib
import os
import platform
import time

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from mamlpp_tf import data, distribute, evaluation, experiment, runs, schedules, stop_signals
from mamlpp_tf.config import RunConfig
from mamlpp_tf.learner import MamlPlusPlus
from mamlpp_tf.trainer import Trainer

# Test hook: 1-based meta-iteration whose support images are made NaN.
INJECT_NAN_ENV = "MAMLPP_TF_INJECT_NAN_AT"

# `progress(iteration, epoch, loss, accuracy)` after every meta-step.
Progress = Callable[[int, int, float, float], None]


class NonFiniteUpdate(Exception):
    """A meta-step produced a NaN/Inf loss or gradient under `--nan_policy=stop`."""


def train(config: RunConfig, log_every: int = 10,
          on_iteration: Callable[[int], None] | None = None,
          override_config: bool = False, progress: Progress | None = None) -> dict:
    """Trains (or resumes) the run of `config` and returns its results.

    Nothing is written to `model_dir` before the run has passed every check
    (flags against the run directory, data, episode shapes, task splits), so a
    failed start leaves it as it was.

    Args:
      config: The run.
      log_every: Iterations between TensorBoard training summaries.
      on_iteration: Called with the iteration count after every meta-step
        (tests use it to inject faults).
      override_config: Resume a `model_dir` made with other flags anyway
        (recording the new ones) instead of refusing.
      progress: Called after every meta-step with the iteration count, the
        epoch, and the batch's loss and accuracy (the CLI shows them).

    Returns:
      The content of `results.json`.

    Raises:
      ValueError: incompatible `model_dir`, episodes that do not fit the data, or
        a `model_dir` in use by another process (`runs.RunLockedError`).
      data.DatasetNotFoundError: the dataset is missing.
      stop_signals.Interrupted: a signal stopped the job.
      NonFiniteUpdate: a non-finite update under `--nan_policy=stop`.
    """
    start_time = time.time()
    run = runs.RunDir(config.model_dir)
    with stop_signals.StopSignals(resume=lambda: _resume_text(run)) as signals:
        strategy = distribute.resolve(config.strategy, config.meta_batch_size,
                                      config.cpu_replicas)
        chief = strategy.extended.should_checkpoint
        if chief:
            run.check_config(config, override=override_config)
        finished = run.read_results()
        if finished is not None:
            logging.info("Run in %s already finished; not training again.", config.model_dir)
            return finished
        sets = experiment.load_class_sets(config)
        learner = experiment.build_learner(config, strategy)
        with strategy.scope():
            trainer = Trainer(learner)
        replicas = strategy.num_replicas_in_sync
        val_tasks = experiment.eval_tasks(config, sets["val"], "val", config.val_tasks, replicas)
        # Built only to fail now, not after training, if the test tasks do not fit.
        experiment.eval_tasks(config, sets["test"], "test", config.test_tasks, replicas)
        with runs.RunLock(config.model_dir) if chief else contextlib.nullcontext():
            if chief:
                run.write_or_check_config(config, override=override_config)
            loop = _Loop(config, strategy, run, trainer, val_tasks, log_every,
                         on_iteration, progress, signals)
            loop.train(sets["train"])
            return loop.test(sets["test"], start_time)


def _resume_text(run: runs.RunDir) -> str:
    """What a resume of `run` starts from, for the message of `Interrupted`."""
    latest = tf.train.latest_checkpoint(run.latest_dir)  # None without a checkpoint.
    if latest is None:
        return "no checkpoint yet"
    return f"resumes from {os.path.basename(latest)}"


class _Loop:
    """One process's share of training a run: the state its iterations share.

    Built once this process owns the run directory; restores the newest
    readable checkpoint.

    Args:
      config: The run.
      strategy: The distribution strategy of `trainer`.
      run: The run directory.
      trainer: The trainer, built under `strategy.scope()`.
      val_tasks: The fixed validation tasks.
      log_every, on_iteration, progress: As for `train`.
      signals: The job's signal handling; the loop sets its phase and defers
        it around steps and writes.
    """

    def __init__(self, config: RunConfig, strategy: tf.distribute.Strategy, run: runs.RunDir,
                 trainer: Trainer, val_tasks: tf.data.Dataset, log_every: int,
                 on_iteration: Callable[[int], None] | None, progress: Progress | None,
                 signals: stop_signals.StopSignals):
        self.config, self.strategy, self.run, self.trainer = config, strategy, run, trainer
        self.val_tasks, self.log_every = val_tasks, log_every
        self.on_iteration, self.progress, self.signals = on_iteration, progress, signals
        self.chief = strategy.extended.should_checkpoint
        self.per_epoch = config.learner.iterations_per_epoch
        self.total = config.learner.epochs * self.per_epoch
        # Progress is counted apart from the optimiser: a skipped (non-finite)
        # update still consumes its meta-batch of the task stream.
        self.counters = {name: tf.Variable(0, dtype=tf.int64, trainable=False, name=name)
                         for name in ("iteration", "skipped_updates")}
        self.manager = run.latest_manager(trainer, self.counters)
        _restore_latest(self.manager)
        self.iteration = int(self.counters["iteration"].numpy())
        # The training state of an epoch's end is saved before its validation, and
        # its history entry after: entries of later epochs are from a crash and are
        # recomputed (identically: training is deterministic given the seed), and an
        # epoch restored unvalidated is validated first.
        self.history = [h for h in run.read_history()
                        if h["epoch"] < self.iteration // self.per_epoch]
        self.writers = {
            name: tf.summary.create_file_writer(os.path.join(run.tensorboard_dir, name))
            for name in ("train", "val")} if self.chief else {}

    def train(self, train_set: data.ClassSet) -> None:
        """Meta-trains from the restored iteration to the last one.

        A signal during a meta-step lets the step finish, checkpoints and
        raises; during validation it raises at once (the epoch's end is
        checkpointed already; a resume validates it again).

        Raises:
          stop_signals.Interrupted: a signal stopped training.
          NonFiniteUpdate: as `_non_finite`.
        """
        if self.iteration and self.iteration % self.per_epoch == 0 and len(
                self.history) < self.iteration // self.per_epoch:
            self.history.append(self._end_epoch(self.iteration // self.per_epoch - 1))
        if self.iteration >= self.total:
            return
        tasks = experiment.train_tasks(self.config, train_set, self.iteration)
        poison_at = int(os.environ.get(INJECT_NAN_ENV, "0"))
        if poison_at > self.iteration:
            tasks = _poison(tasks, poison_at - self.iteration - 1)
        tasks = distribute.distribute_dataset(self.strategy, tasks)
        signals = self.signals
        for batch in tasks:
            epoch = self.iteration // self.per_epoch
            signals.phase = f"meta-iteration {self.iteration + 1} (epoch {epoch})"
            with signals.deferred():
                self._step(batch, epoch)
                if (self.iteration % self.per_epoch == 0 or signals.signum or
                        self.iteration % self.config.checkpoint_every == 0):
                    self._save()
            if signals.signum:
                signals.raise_interrupted()
            if self.iteration % self.per_epoch == 0:
                self.history.append(self._end_epoch(epoch))
            if self.iteration >= self.total:
                break

    def _step(self, batch, epoch: int) -> None:
        """One meta-step, its bookkeeping, progress and training summaries."""
        metrics = self.trainer.train_step(batch, epoch)
        self.iteration += 1
        if not bool(metrics["applied"]):
            self._non_finite()
        self.counters["iteration"].assign(self.iteration)
        if self.on_iteration is not None:
            self.on_iteration(self.iteration)
        values = {k: float(metrics[k]) for k in ("loss", "accuracy")}
        values["skipped_updates"] = float(self.counters["skipped_updates"].numpy())
        if self.progress is not None:
            self.progress(self.iteration, epoch, values["loss"], values["accuracy"])
        if self.chief and (self.iteration % self.log_every == 0 or
                           self.iteration % self.per_epoch == 0):
            _train_summaries(self.writers["train"], self.trainer, values, self.iteration)

    def _non_finite(self) -> None:
        """Applies `--nan_policy` to a meta-step whose update was withheld.

        Raises:
          NonFiniteUpdate: under the `stop` policy, naming the iteration and the
            last good checkpoint.
        """
        if self.config.nan_policy == "stop":
            raise NonFiniteUpdate(
                f"non-finite meta-loss or meta-gradient at iteration {self.iteration}; no "
                f"update was applied; last good checkpoint: "
                f"{self.manager.latest_checkpoint or 'none yet'} "
                "(--nan_policy=skip goes on past such batches)")
        self.counters["skipped_updates"].assign_add(1)
        logging.warning("Skipped the non-finite update of iteration %d (%d skipped so far).",
                        self.iteration, int(self.counters["skipped_updates"].numpy()))

    def _save(self) -> None:
        """The chief checkpoints the training state; other workers only take part."""
        if self.chief:
            self.manager.save(checkpoint_number=self.iteration)
        else:
            distribute.write_as_non_chief(self.manager.checkpoint)

    def _end_epoch(self, epoch: int) -> dict:
        """Validates the checkpointed end of `epoch`, then keeps its model and history entry."""
        learner = self.trainer.learner
        self.signals.phase = f"validation of epoch {epoch}"
        result = evaluation.evaluate(self.trainer, self.val_tasks, self.strategy)
        entry = dict(epoch=epoch, loss=float(result.losses.mean()),
                     **evaluation.summarize(result.accuracies))
        logging.info("epoch %d: val accuracy %.4f ± %.4f, loss %.4f", epoch,
                     entry["accuracy"], entry["ci95"], entry["loss"])
        self.signals.phase = f"the writes of epoch {epoch}"
        with self.signals.deferred():
            if self.chief:
                # Order matters for crash safety: the model of this epoch, then the
                # history that ranks it and marks the epoch done.
                self.run.save_epoch(learner, epoch)
                self.run.write_history(self.history + [entry])
                self.run.prune_epochs(runs.top_epochs(self.history + [entry],
                                                      self.config.ensemble_top_k))
                _epoch_summaries(self.writers, learner, self.config, entry, self.iteration)
            else:  # The same saves as the chief's, in the same order.
                distribute.write_as_non_chief(tf.train.Checkpoint(**learner.checkpoint_items()))
            # Other workers may read this epoch's checkpoint (final test) once past here.
            distribute.barrier(self.strategy)
        if self.signals.signum:
            self.signals.raise_interrupted()
        return entry

    def test(self, test_set: data.ClassSet, start_time: float) -> dict:
        """The final test; the chief writes `results.json`.

        Args:
          test_set: The test classes.
          start_time: When the job started (`time.time()`), for the wall time.

        Returns:
          The results.

        Raises:
          ValueError: if no epoch was validated.
        """
        if not self.history:
            raise ValueError(f"--model_dir={self.config.model_dir}: no validated epoch to test")
        config = self.config
        self.signals.phase = "the final test"
        results = evaluation.run_test(config, self.run, self.trainer, test_set, self.history,
                                      self.strategy)
        results.update(validation=self.history, config=config.to_dict(), seeds=_seeds(config),
                       versions=_versions(), iterations=self.total,
                       skipped_updates=int(self.counters["skipped_updates"].numpy()),
                       wall_time_s=round(time.time() - start_time, 1))
        if self.chief:
            self.signals.phase = "the write of results.json"
            self.run.write_results(results)
        return results


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


def _poison(tasks: tf.data.Dataset, index: int) -> tf.data.Dataset:
    """Test hook: makes the support images of meta-batch `index` NaN."""

    def maybe_poison(position, batch):
        support_x = tf.where(position == index, tf.fill(tf.shape(batch[0]), float("nan")),
                             batch[0])
        return (support_x,) + tuple(batch[1:])

    return tasks.enumerate().map(maybe_poison)


def _train_summaries(writer, trainer: Trainer, values: dict, iteration: int) -> None:
    with writer.as_default(step=iteration):
        tf.summary.scalar("loss", values["loss"])
        tf.summary.scalar("accuracy", values["accuracy"])
        tf.summary.scalar("meta_lr", float(trainer.optimizer.learning_rate))
        tf.summary.scalar("skipped_updates", values["skipped_updates"])


def _epoch_summaries(writers: dict, learner: MamlPlusPlus, config: RunConfig, entry: dict,
                     iteration: int) -> None:
    """Validation metrics, MSL weights, the inner learning rates and per-step BN summaries."""
    with writers["val"].as_default(step=iteration):
        for key in ("loss", "accuracy", "ci95"):
            tf.summary.scalar(key, entry[key])
    epoch = entry["epoch"]
    msl_weights = schedules.msl_weights(epoch, config.learner.inner_steps,
                                        config.learner.msl_epochs)
    groups = learner.variable_groups()
    rule = learner.update_rule
    with writers["train"].as_default(step=iteration):
        for step, weight in enumerate(msl_weights):
            tf.summary.scalar(f"msl_weight/step_{step}", float(weight))
        for name, rate in groups["update_rule"].items():
            tag = f"{rule.name}/{name.replace('/', '_')}"
            rows = rate.numpy() if rule.per_step else rate.numpy()[None]
            for step, row in enumerate(rows):
                if row.ndim:  # Meta-SGD: a rate per element.
                    tf.summary.histogram(f"{tag}/step_{step}", row)
                    tf.summary.scalar(f"{tag}_mean/step_{step}", float(row.mean()))
                else:
                    tf.summary.scalar(f"{tag}/step_{step}", float(row))
        for name, variable in groups["batch_norm"].items():  # {norm}/gamma or beta
            for step, row in enumerate(np.atleast_2d(variable.numpy())):
                tf.summary.histogram(f"bn/{name}/step_{step}", row)
                tf.summary.scalar(f"bn/{name}_mean/step_{step}", float(row.mean()))


def _seeds(config: RunConfig) -> dict:
    return dict(seed=config.seed, val_seed=config.val_seed,
                derived_train_seed=data.derive_seed(config.seed),
                derived_val_seed=data.derive_seed(config.val_seed))


def _versions() -> dict:
    from mamlpp_tf import __version__  # pylint: disable=g-import-not-at-top
    return dict(mamlpp_tf=__version__, tensorflow=tf.__version__, keras=keras.__version__,
                numpy=np.__version__, python=platform.python_version())
