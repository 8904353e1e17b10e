"""The training job of one run: epochs, validation, top-k epoch checkpoints, resume, test.

`train(config)` builds the run's `Run` (strategy, run directory, data,
learner, trainer), meta-trains it with its `Trainer` (the distributed
meta-step), validates after every epoch, keeps the checkpoints of the
`--ensemble_top_k` best epochs and finally tests the best epoch and their
logit ensemble. As TF Model Garden's Controller does around its Trainer: the
loop, the checkpoint cadence and the summaries live here, the step there.

Re-running the same run resumes from the last checkpoint (a kill at any
moment loses at most `--checkpoint_every` iterations); a finished run returns
its results instead of training again. SIGTERM/SIGINT raise
`stop_signals.Interrupted`: in a meta-step after checkpointing it, elsewhere
(tracing, validation, the final test) at once. With several workers, only
the chief (`strategy.extended.should_checkpoint`) writes; the others take
part in every save. What the job is doing goes to a `progress.Progress`
(each epoch, validation and test phase, every meta-step, the means of every
`log_every` meta-steps, which the TensorBoard training scalars record too).
"""

from __future__ import annotations

import contextlib
import os
import platform
import time

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from mamlpp_tf import data, schedules
from mamlpp_tf.config import RunConfig
from mamlpp_tf.learner import MamlPlusPlus
from mamlpp_tf.training import distribute, evaluation, progress, stop_signals
from mamlpp_tf.training.run import Run
from mamlpp_tf.training.run_dir import CheckpointItems, RunDir, RunLock
from mamlpp_tf.training.trainer import Trainer

# The checkpoint key of the open training window's sums (`_Loop.window`).
_WINDOW = "train_window"


class NonFiniteUpdate(Exception):
    """A meta-step produced a NaN/Inf loss or gradient under `--nan_policy=stop`."""


def train(config: RunConfig, log_every: int = 10, override_config: bool = False,
          reporter: progress.Progress | None = None) -> dict:
    """Trains (or resumes) the run of `config` and returns its results.

    Nothing is written to `model_dir` before the run has passed every check
    (flags against the run directory, data, episode shapes, task splits), so a
    failed start leaves it as it was.

    Args:
      config: The run.
      log_every: Meta-iterations per training window: the TensorBoard training
        loss and accuracy are the means of each window, as `reporter` gets them.
      override_config: Resume a `model_dir` made with other flags anyway
        (recording the new ones) instead of refusing.
      reporter: Gets what the job is doing (its phases, every meta-step, the
        windows, where the results went); default: shown nowhere.

    Returns:
      The content of `results.json`.

    Raises:
      ValueError: incompatible `model_dir`, episodes that do not fit the data, or
        a `model_dir` in use by another process (`run_dir.RunLockedError`).
      data.DatasetNotFoundError: the dataset is missing.
      stop_signals.Interrupted: a signal stopped the job (or another worker of it).
      distribute.WorkerLost: another worker is gone (multi-worker training).
      NonFiniteUpdate: a non-finite update under `--nan_policy=stop`.
    """
    start_time = time.time()
    reporter = reporter or progress.Progress()
    directory = RunDir(config.model_dir)
    with stop_signals.StopSignals(resume=lambda: _resume_text(directory)) as signals:
        run = Run(config, distribute.resolve(config.strategy, config.meta_batch_size,
                                             config.cpu_replicas))
        signals.reinstall()  # A multi-worker strategy's runtime took SIGTERM.
        if run.chief:
            run.dir.check_config(config, override=override_config)
        finished = run.dir.read_results()
        if finished is not None:
            logging.info("Run in %s already finished; not training again. Its results: %s",
                         config.model_dir, progress.shown_path(run.dir.results_path))
            return finished
        reporter.phase("loading", detail=f"the {config.dataset} classes of every split and the "
                       "fixed validation and test tasks; building the learner")
        run.build()  # Fails on bad data or flags before anything is written.
        try:
            with RunLock(config.model_dir) if run.chief else contextlib.nullcontext():
                if run.chief:
                    run.dir.write_or_check_config(config, override=override_config)
                loop = _Loop(run, signals, log_every, reporter)
                loop.train()
                return loop.test(start_time)
        except distribute.PEER_ERRORS as error:
            if distribute.num_workers(run.strategy) == 1:
                raise
            raise distribute.worker_lost(error, signals.phase, _resume_text(directory)) from None


def _resume_text(directory: RunDir) -> str:
    """What a resume of the run in `directory` starts from, for `Interrupted`'s message."""
    latest = tf.train.latest_checkpoint(directory.latest_dir)  # None without a checkpoint.
    if latest is None:
        return "no checkpoint yet"
    return f"resumes from {os.path.basename(latest)}"


class _Loop:
    """One process's share of training a run: the state its iterations share.

    Built once this process owns the run directory; restores the newest
    readable checkpoint.

    Args:
      run: The run.
      signals: The job's signal handling; the loop sets its phase and defers
        it around steps and writes.
      log_every, reporter: As for `train`.
    """

    def __init__(self, run: Run, signals: stop_signals.StopSignals, log_every: int,
                 reporter: progress.Progress):
        self.run, self.signals, self.log_every, self.reporter = run, signals, log_every, reporter
        self.config, self.trainer = run.config, run.trainer
        self.per_epoch = run.config.learner.iterations_per_epoch
        self.total = run.config.learner.epochs * self.per_epoch
        self.val_tasks = run.eval_tasks("val")
        # The open training window: sums of its meta-steps' loss and accuracy, and
        # their count. Saved with the training state, so that a resumed run's
        # windows (their logged means, TensorBoard's) are an uninterrupted one's.
        self.window = tf.Variable(tf.zeros([3], tf.float64), trainable=False, name=_WINDOW)
        training_state = self.trainer.checkpoint_items()
        self.manager = run.dir.latest_manager({**training_state, _WINDOW: self.window})
        _restore_latest(self.manager, training_state, self.window)
        self.iteration = int(self.trainer.step.numpy())
        # The training state of an epoch's end is saved before its validation, and
        # its history entry after: entries of later epochs are from a crash and are
        # recomputed (identically: training is deterministic given the seed), and an
        # epoch restored unvalidated is validated first.
        self.history = [h for h in run.dir.read_history()
                        if h["epoch"] < self.iteration // self.per_epoch]
        self.writers = {
            name: tf.summary.create_file_writer(os.path.join(run.dir.tensorboard_dir, name))
            for name in ("train", "val")} if run.chief else {}
        # The (msl, second_order) modes whose meta-step this process has traced, and
        # whether it has traced the evaluation step.
        self.traced_modes: set[tuple[bool, bool]] = set()
        self.traced_eval = False

    def train(self) -> None:
        """Meta-trains from the restored iteration to the last one.

        A signal while meta-training (during a meta-step or the fetch of the
        next batch) lets the current step finish, checkpoints and raises, so
        no step is lost whatever `--checkpoint_every`; during validation it
        raises at once (the epoch's end is checkpointed already; a resume
        validates it again).

        Raises:
          stop_signals.Interrupted: a signal stopped training.
          NonFiniteUpdate: as `_non_finite`.
        """
        if self.iteration and self.iteration % self.per_epoch == 0 and len(
                self.history) < self.iteration // self.per_epoch:
            self.history.append(self._end_epoch(self.iteration // self.per_epoch - 1))
        if self.iteration >= self.total:
            return
        tasks = distribute.distribute_dataset(self.run.strategy,
                                              self.run.train_tasks(self.iteration))
        signals = self.signals
        started = None
        batches = iter(tasks)
        while True:
            epoch = self.iteration // self.per_epoch
            signals.phase = f"meta-iteration {self.iteration + 1} (epoch {epoch})"
            # From the next batch's fetch to the checkpoint: a signal between two
            # meta-steps, too, is answered by a checkpoint of the steps done.
            with signals.deferred():
                batch = next(batches, None)
                if batch is None:
                    break
                if epoch != started:
                    self._start_epoch(epoch)
                    started = epoch
                self._step(batch, epoch)
                # Every worker stops at the same iteration, after the same save.
                stop = distribute.max_over_workers(self.run.strategy, signals.signum or 0)
                if (self.iteration % self.per_epoch == 0 or stop or
                        self.iteration % self.config.checkpoint_every == 0):
                    self._save()
            if stop:
                signals.raise_interrupted(stop)
            if self.iteration % self.per_epoch == 0:
                self.history.append(self._end_epoch(epoch))
            if self.iteration >= self.total:
                break

    def _start_epoch(self, epoch: int) -> None:
        """Reports the meta-training of `epoch` from the current iteration as a phase."""
        end = min((epoch + 1) * self.per_epoch, self.total)
        detail = f"meta-iterations {self.iteration + 1}-{end} of {self.total}"
        msl, second_order, _ = self.trainer.learner.epoch_modes(epoch)
        if (msl, second_order) not in self.traced_modes:
            self.traced_modes.add((msl, second_order))
            detail += (f"; the first traces the {'second' if second_order else 'first'}-order "
                       f"meta-step {'with' if msl else 'without'} multi-step loss, minutes for "
                       "a large network")
        self.reporter.phase(f"epoch {epoch}", end - self.iteration, unit="meta-iteration",
                            detail=detail)

    def _step(self, batch, epoch: int) -> None:
        """One meta-step, its bookkeeping and progress; closes a window when one is due.

        A window closes every `log_every` meta-iterations and at the last one:
        its means go to the reporter and, from the chief, to TensorBoard.
        """
        metrics = self.trainer.train_step(batch)
        self.iteration = int(self.trainer.step.numpy())
        if not bool(metrics["applied"]):
            self._non_finite()
        loss, accuracy = float(metrics["loss"]), float(metrics["accuracy"])
        self.reporter.step(self.iteration, loss, accuracy)
        self.window.assign_add(tf.constant([loss, accuracy, 1.0], tf.float64))
        if self.iteration % self.log_every and self.iteration < self.total:
            return
        loss_sum, accuracy_sum, size = self.window.numpy()
        window = progress.Window(iteration=self.iteration, total=self.total, epoch=epoch,
                                 loss=float(loss_sum / size), accuracy=float(accuracy_sum / size),
                                 size=int(size))
        self.window.assign(tf.zeros([3], tf.float64))
        self.reporter.window(window)
        if self.run.chief:
            _train_summaries(self.writers["train"], self.trainer, window)

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
        logging.warning("Skipped the non-finite update of iteration %d (%d skipped so far).",
                        self.iteration, int(self.trainer.skipped_updates.numpy()))

    def _save(self) -> None:
        """The chief checkpoints the training state; other workers only take part."""
        if self.run.chief:
            self.run.dir.save_latest(self.manager, self.iteration)
        else:
            distribute.write_as_non_chief(self.manager.checkpoint)

    def _end_epoch(self, epoch: int) -> dict:
        """Validates the checkpointed end of `epoch`, then keeps its model and history entry."""
        run = self.run
        self.signals.phase = f"validation of epoch {epoch}"
        tasks = self.config.val_tasks
        detail = f"{tasks} tasks" + (
            "" if self.traced_eval else "; the first meta-batch traces the evaluation step")
        self.traced_eval = True
        self.reporter.phase(f"validating epoch {epoch}", tasks, detail=detail)
        result = evaluation.evaluate(self.trainer, self.val_tasks, run.strategy,
                                     on_tasks=self.reporter.advance)
        entry = dict(epoch=epoch, loss=float(result.losses.mean()),
                     **evaluation.summarize(result.accuracies))
        logging.info("epoch %d: val accuracy %.4f ± %.4f, loss %.4f", epoch,
                     entry["accuracy"], entry["ci95"], entry["loss"])
        self.signals.phase = f"the writes of epoch {epoch}"
        with self.signals.deferred():
            # Order matters for crash safety: the model of this epoch, then the
            # history that ranks it and marks the epoch done.
            run.save_epoch(epoch)
            if run.chief:
                history = self.history + [entry]
                run.dir.write_history(history)
                run.dir.prune_epochs(run.dir.best_epochs(self.config.ensemble_top_k, history))
                _epoch_summaries(self.writers, self.trainer.learner, self.config, entry,
                                 self.iteration)
            # A barrier: other workers may read this epoch's checkpoint (final test)
            # once past here. And an agreement: all stop here if any got a signal.
            stop = distribute.max_over_workers(run.strategy, self.signals.signum or 0)
        if stop:
            self.signals.raise_interrupted(stop)
        return entry

    def test(self, start_time: float) -> dict:
        """The final test; the chief writes `results.json`.

        Args:
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
        results = evaluation.run_test(self.run, self.history, reporter=self.reporter)
        results.update(validation=self.history, config=config.to_dict(), seeds=_seeds(config),
                       versions=_versions(), iterations=self.total,
                       skipped_updates=int(self.trainer.skipped_updates.numpy()),
                       wall_time_s=round(time.time() - start_time, 1))
        if self.run.chief:
            self.signals.phase = "the write of results.json"
            self.run.dir.write_results(results)
            path = progress.shown_path(self.run.dir.results_path)
            self.reporter.message(f"results written to {path}")
        return results


def _restore_latest(manager: tf.train.CheckpointManager, training_state: CheckpointItems,
                    window: tf.Variable) -> None:
    """Restores the newest readable checkpoint, falling back past damaged ones.

    Every object of `training_state` must be in it; `window` is restored if it
    is (checkpoints of older versions have none: their window starts empty).

    Raises:
      ValueError: if checkpoints exist but none can be read.
    """
    candidates = list(reversed(manager.checkpoints))
    for index, path in enumerate(candidates):
        try:
            tf.train.Checkpoint(**training_state).restore(
                path).assert_existing_objects_matched()
            tf.train.Checkpoint(**{_WINDOW: window}).restore(path).expect_partial()
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


def _train_summaries(writer, trainer: Trainer, window: progress.Window) -> None:
    """The window's mean loss and accuracy, and the meta learning rate and skips at its end."""
    with writer.as_default(step=window.iteration):
        tf.summary.scalar("loss", window.loss)
        tf.summary.scalar("accuracy", window.accuracy)
        tf.summary.scalar("meta_lr", float(trainer.optimizer.learning_rate))
        tf.summary.scalar("skipped_updates", float(trainer.skipped_updates.numpy()))


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
