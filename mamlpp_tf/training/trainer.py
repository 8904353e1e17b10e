"""`Trainer`: MAML++'s traced, distributed meta-step and evaluation step.

The learner (`MamlPlusPlus`) computes one replica's share of a meta-step;
the trainer runs it on every replica of the strategy (`strategy.run`),
all-reduces the gradients and batch moments once, clips the summed gradients
of the network's variable groups (never the inner learning rates'), withholds
an update whose loss or gradient is not finite, applies the outer optimiser
(Adam with the official per-epoch cosine schedule) and moves the batch-norm
running statistics. With one device every reduction is
the identity and this is the plain step.

The trainer counts meta-iterations (`step`: every meta-batch taken, its update
applied or withheld). It is the run's one step counter: the epoch, and from
it the MSL weights, the derivative order and the cosine meta learning rate,
all derive from it, so a resumed run or one that withheld non-finite updates
follows the same schedules as an uninterrupted one. As in TF Model Garden, where a Task
holds the single-replica maths and a Trainer the strategy and the optimiser.
`mamlpp_tf.training.loop` runs the training loop around it.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import tensorflow as tf

from mamlpp_tf import batch_checks, schedules
from mamlpp_tf.inner_loop import Batch, PassRecord
from mamlpp_tf.learner import CLIPPED_GROUPS, MamlPlusPlus, ReplicaGradients
from mamlpp_tf.nets import BatchMoments


def _traced(fn: Callable, jit_compile: bool | None) -> Callable:
    """`fn` as a `tf.function`, without AutoGraph.

    The steps are straight-line Python over static shapes (their one
    data-dependent branch is an explicit `tf.cond`), so AutoGraph has nothing
    to convert, yet wrapping every call it makes added seconds to each trace
    of a paper-sized meta-step (timings in benchmarks/README.md).
    """
    return tf.function(fn, jit_compile=jit_compile, autograph=False)


def _all_reduced(share: ReplicaGradients) -> ReplicaGradients:
    """A replica's share summed over replicas, its batch moments averaged (replica context).

    Two collectives, each batched over its tensors. The inner steps and element
    counts of the moments are static and stay as they are.
    """
    context = tf.distribute.get_replica_context()
    moments = context.all_reduce(tf.distribute.ReduceOp.MEAN,
                                 [[(m.mean, m.variance) for m in pass_moments]
                                  for _, pass_moments in share.records])
    loss, accuracy, grads = context.all_reduce(
        tf.distribute.ReduceOp.SUM, (share.loss, share.accuracy, share.grads))
    records = [(step, [BatchMoments(mean, variance, m.count)
                       for (mean, variance), m in zip(reduced, pass_moments)])
               for (step, pass_moments), reduced in zip(share.records, moments)]
    return ReplicaGradients(loss, accuracy, grads, records)


class Trainer:
    """Meta-trains and evaluates a `MamlPlusPlus` under the current strategy.

    Build it under `strategy.scope()`, as the learner: the optimiser's
    variables are created in the constructor. Call `train_step` outside it.

    Args:
      learner: The learner to train.
      optimizer: Outer optimiser; defaults to Adam(β=(0.9, 0.999), ε from the
        config) with the official code's per-epoch cosine schedule of `step`.
        (A Keras `LearningRateSchedule` given here follows the optimiser's own
        count of applied updates instead.)

    Attributes:
      learner: The `MamlPlusPlus`.
      optimizer: The outer Keras optimiser.
      step: Meta-iterations taken, applied or withheld (int64 variable).
      skipped_updates: Meta-iterations whose update was withheld because the
        loss or a gradient was not finite (int64 variable).
      trace_count: How many times a train/eval step has been traced (tests
        use it to prove the steps do not retrace per iteration).
    """

    def __init__(self, learner: MamlPlusPlus,
                 optimizer: keras.optimizers.Optimizer | None = None):
        config = learner.config
        self.learner = learner
        self._strategy = tf.distribute.get_strategy()
        self.step, self.skipped_updates = (
            tf.Variable(0, dtype=tf.int64, trainable=False, name=name,
                        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            for name in ("meta_iteration", "skipped_updates"))
        if optimizer is None:
            schedule = schedules.CosineMetaLearningRate(
                config.meta_lr, config.min_meta_lr, config.epochs, config.iterations_per_epoch)
            optimizer = keras.optimizers.Adam(
                learning_rate=lambda: schedule(self.step),
                beta_1=0.9, beta_2=0.999, epsilon=config.adam_epsilon)
        self.optimizer = optimizer
        self.optimizer.build(learner.trainable_variables)
        self.trace_count = 0
        self._train_fns: dict[tuple[bool, bool], Callable] = {}
        self._eval_fn: Callable | None = None

    @property
    def epoch(self) -> int:
        """The epoch of the next meta-iteration, `step // iterations_per_epoch`."""
        return int(self.step.numpy()) // self.learner.config.iterations_per_epoch

    def checkpoint_items(self) -> dict[str, object]:
        """The trackable objects of the training state: what a resume restores.

        The model (`MamlPlusPlus.checkpoint_items`), the optimiser and the
        counters; `iteration` positions the task stream on resume.
        """
        return dict(**self.learner.checkpoint_items(), optimizer=self.optimizer,
                    iteration=self.step, skipped_updates=self.skipped_updates)

    # --------------------------------------------------------------- training

    def train_step(self, batch: Batch | tf.distribute.DistributedValues
                   ) -> dict[str, tf.Tensor]:
        """Meta-iteration `step + 1` on `batch` (a `tf.function`, traced once per mode).

        The MSL weights and derivative order are those of `epoch`. The weights
        enter as a tensor, so their annealing never retraces; the two Python
        modes (MSL on/off, first/second order) select one of at most four
        traced functions. `step` counts the iteration whether or not its
        update is applied.

        Args:
          batch: A meta-batch, or a distributed one under a strategy.

        Returns:
          `{"loss", "accuracy", "applied"}`: meta-loss and query accuracy of the
          batch, and whether the update was applied (False when the loss or a
          gradient was not finite: then no variable changed).

        Raises:
          RuntimeError: if called inside a non-default `strategy.scope()`.
          ValueError: as `batch_checks.check_batch`, for each replica's part.
        """
        if tf.distribute.has_strategy() and tf.distribute.in_cross_replica_context():
            raise RuntimeError("call train_step outside `strategy.scope()`: the "
                               "meta-update is applied once, from the default context")
        self._check_batch(batch)
        msl, second_order, weights = self.learner.epoch_modes(self.epoch)
        return self.train_step_function(msl, second_order)(
            batch, tf.constant(weights, self.learner.config.dtype))

    def train_step_function(self, msl: bool, second_order: bool) -> Callable:
        """The `tf.function` behind `train_step` in one mode: `fn(batch, msl_weights)`.

        For profiling and cost models (`get_concrete_function`); `train_step`
        picks the mode from the epoch and checks the batch first.
        """
        key = (msl, second_order)
        if key not in self._train_fns:
            self._train_fns[key] = self._make_train_fn(msl, second_order)
        return self._train_fns[key]

    def _make_train_fn(self, msl: bool, second_order: bool) -> Callable:
        """The traced meta-step: per-replica gradients, one reduction, clip, apply.

        Each replica scales its tasks' loss by 1/global tasks, so the sum over
        replicas of their gradients is the gradient of the global meta-loss,
        and the mean over replicas of their task-mean batch moments is the
        global task mean. Both are all-reduced once (one batched collective
        each) in the replica context. Clipping (element-wise, so it must see
        the sum), the optimiser and the running-statistics update follow in the
        default context, where Keras' optimiser does not all-reduce again and
        every replica's copy of a variable gets the same update.
        """
        strategy, learner = self._strategy, self.learner
        variables = learner.trainable_variables

        def replica_grads(batch: Batch, weights: tf.Tensor):
            return learner.replica_gradients(
                batch, weights if msl else None, second_order=second_order,
                replicas=strategy.num_replicas_in_sync)

        replica_jit, step_jit = self._jit_placement()
        if replica_jit:
            replica_grads = _traced(replica_grads, jit_compile=True)

        def replica_step(batch: Batch, weights: tf.Tensor) -> ReplicaGradients:
            return _all_reduced(replica_grads(batch, weights))

        def step(batch, weights):
            self.trace_count += 1
            share = strategy.run(replica_step, args=(batch, weights))
            grads = [self._first_local(g) for g in share.grads]
            loss = self._first_local(share.loss)
            finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(x))
                                    for x in [loss] + grads])

            def update() -> tf.Tensor:
                # Identities move every gradient into this branch's graph (Keras'
                # all-reduce rejects a mix of branch and captured tensors).
                clipped = [tf.identity(g) for g in self._clip(grads)]
                self.optimizer.apply_gradients(zip(clipped, variables))
                self._update_running_stats(
                    tf.nest.map_structure(self._first_local, share.records))
                return tf.constant(True)

            def withhold() -> tf.Tensor:
                self.skipped_updates.assign_add(1)
                return tf.constant(False)

            # A non-finite loss or gradient never reaches a variable (the
            # optimiser's counter and slots included); the caller decides
            # whether to stop or to go on with the next meta-batch.
            applied = tf.cond(finite, update, withhold)
            self.step.assign_add(1)  # After the update, whose learning rate reads it.
            return dict(loss=loss, accuracy=self._first_local(share.accuracy), applied=applied)

        return _traced(step, jit_compile=step_jit)

    def _update_running_stats(self, records: list[PassRecord]) -> None:
        """Moves the batch-norm running statistics by the moments of each pass, in order."""
        for step, moments in records:
            for norm, moment in zip(self.learner.backbone.norms, moments):
                norm.update_running_stats(step, moment.mean, moment.variance, moment.count)

    def _first_local(self, value):
        """This worker's first copy of an all-reduced value (every replica holds the same)."""
        return self._strategy.experimental_local_results(value)[0]

    def _clip(self, grads: list[tf.Tensor]) -> list[tf.Tensor]:
        """Element-wise clip of the summed gradients of the learner's `CLIPPED_GROUPS`.

        The network's, batch norm's and TaskNorm's gradients are clipped, the
        inner learning rates' never (as officially).
        """
        clip = self.learner.config.grad_clip
        if not clip:
            return grads
        groups = self.learner.variable_groups()
        clipped = {id(variable) for group in CLIPPED_GROUPS
                   for variable in groups[group].values()}
        return [tf.clip_by_value(g, -clip, clip) if id(variable) in clipped else g
                for g, variable in zip(grads, self.learner.trainable_variables)]

    def _jit_placement(self) -> tuple[bool, bool | None]:
        """Where XLA goes with `jit_compile`: `(per-replica computation, whole step)`.

        XLA cannot compile a function spanning several devices, so with
        several replicas it compiles each replica's computation instead, called
        from a Python replica function so that it is traced on (and reads the
        variables of) each replica.
        """
        if not self.learner.config.jit_compile:
            return False, None
        if self._strategy.num_replicas_in_sync > 1:
            return True, None
        return False, True

    def _check_batch(self, batch) -> None:
        """`batch_checks.check_batch` of each local replica's part of `batch`."""

        def local_parts(value) -> tuple:
            if isinstance(value, tf.distribute.DistributedValues):
                return tuple(self._strategy.experimental_local_results(value))
            return (value,)

        batch_checks.check_batch(self.learner.config, batch, local_parts)

    # ------------------------------------------------------------- evaluation

    def eval_step(self, batch: Batch | tf.distribute.DistributedValues
                  ) -> dict[str, tf.Tensor]:
        """`MamlPlusPlus.eval_results` on every replica (a `tf.function`); changes no variable.

        Args:
          batch: A meta-batch (or a distributed one).

        Returns:
          `{"loss" [T], "accuracy" [T], "logits" [T, N·Q, n_way], "labels"
          [T, N·Q]}` per task, gathered from every replica of every worker in
          replica order.

        Raises:
          ValueError: as `batch_checks.check_batch`, for each replica's part.
        """
        self._check_batch(batch)
        return self.eval_step_function()(batch)

    def eval_step_function(self) -> Callable:
        """The `tf.function` behind `eval_step`: `fn(batch)` (see `train_step_function`)."""
        if self._eval_fn is None:
            self._eval_fn = self._make_eval_fn()
        return self._eval_fn

    def _make_eval_fn(self) -> Callable:
        strategy = self._strategy
        replica_results = self.learner.eval_results
        replica_jit, step_jit = self._jit_placement()
        if replica_jit:
            replica_results = _traced(replica_results, jit_compile=True)

        def replica_step(batch: Batch) -> dict[str, tf.Tensor]:  # See `_jit_placement`.
            return replica_results(batch)

        def step(batch):
            self.trace_count += 1
            results = strategy.run(replica_step, args=(batch,))
            return {key: strategy.gather(value, axis=0) for key, value in results.items()}

        return _traced(step, jit_compile=step_jit)
