"""`MamlPlusPlus`: the MAML++ learner — inner loop, meta-loss and meta-steps.

A meta-batch is a tuple `(support_x [T, N·K, H, W, C], support_y [T, N·K],
query_x [T, N·Q, H, W, C], query_y [T, N·Q])` of `T` tasks with equal shapes.

For every task the inner loop starts from the meta-parameters `θ_0`, takes
`S` steps `θ_{i+1} = θ_i − α[·][i] ∇L_support(θ_i)` with the learned per-layer,
per-step rates (LSLR) and per-step batch norm, and scores the query set. The
task loss is the multi-step loss `Σ_i v_i(e) L_query(θ_{i+1})` while MSL is
active, else the final-step query loss; the meta-loss is the mean over tasks.
Second order keeps the inner gradients in the graph of the outer tape; first
order treats them as constants (derivative-order annealing switches between the
two by epoch). Adam with a per-epoch cosine schedule updates the network,
the per-step batch-norm gamma/beta and the LSLR rates.

Batch norm follows `config.bn_stats` (see `PerStepBatchNorm`). Under the
non-transductive policies `support` and `tasknorm`, every query pass carries
the task's support set as the context of its batch norms, so training,
evaluation and the exported models normalise a query with the support set's
statistics alone: its prediction never depends on the other queries.

Two task layouts compute the same numbers: `loop` runs tasks one after another
(the simple reference) and `batched` runs them through the network together
(`VGGBackbone.forward_tasks`).
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import keras
import numpy as np
import tensorflow as tf

from mamlpp_tf import schedules
from mamlpp_tf.backbone import BatchMoments, VGGBackbone
from mamlpp_tf.config import LearnerConfig
from mamlpp_tf.layers import CONTEXT_POLICIES, PerStepLearningRates

Batch = tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]
# One pass of the network: (batch-norm step, moments of each BN layer).
PassRecord = tuple[int, list[BatchMoments]]

# Query images per task up to which `auto` batches tasks. Per second-order
# meta-iteration on a 2-core CPU (benchmarks/README.md), batching was 18% faster
# than the per-task loop with 5 queries per task (Omniglot 5-way) and 4% faster
# with 20 (20-way); the loop was 7% faster with 75 (mini-ImageNet). Batching
# always traced 1.4-4.6x faster and peaked lower in memory; pass
# task_impl="batched" where that matters more than step time.
_AUTO_BATCHED_MAX_QUERY = 40


def _traced(fn: Callable, jit_compile: bool | None) -> Callable:
    """`fn` as a `tf.function`, without AutoGraph.

    The steps are straight-line Python over static shapes (their one
    data-dependent branch is an explicit `tf.cond`), so AutoGraph has nothing
    to convert, yet wrapping every call it makes cost 1.5–3.4 s per trace of
    a paper-sized meta-step (benchmarks/README.md).
    """
    return tf.function(fn, jit_compile=jit_compile, autograph=False)


def _cross_entropy(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Mean cross-entropy over the last batch axis (per task when batched)."""
    return tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits),
        axis=-1)


def _accuracy(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Fraction of correct argmax predictions over the last batch axis."""
    predictions = tf.argmax(logits, axis=-1, output_type=labels.dtype)
    return tf.reduce_mean(tf.cast(tf.equal(predictions, labels), logits.dtype), axis=-1)


class MamlPlusPlus:
    """MAML++ (and, by configuration, plain MAML) for few-shot classification.

    Build it under `strategy.scope()` to train with a distribution strategy:
    every variable, optimiser slots included, is created in the constructor.

    Args:
      config: The learner's hyper-parameters.
      optimizer: Outer optimiser; defaults to Adam(β=(0.9, 0.999), ε from the
        config) with the official code's per-epoch cosine schedule.
      backbone: The network; defaults to the `VGGBackbone` the config
        describes. Any layer with the same fast-weight interface works
        (`param_names`, `initial_params()`, `forward`, `forward_tasks` for the
        batched layout, and `norms`, its `PerStepBatchNorm` layers in pass order).

    Attributes:
      config: The `LearnerConfig`.
      backbone: The `VGGBackbone` holding network and per-step BN variables.
      lslr: The `PerStepLearningRates` layer.
      optimizer: The outer Keras optimiser.
      trace_count: How many times a train/eval step has been traced (tests
        use it to prove the steps do not retrace per iteration).
    """

    def __init__(self, config: LearnerConfig,
                 optimizer: keras.optimizers.Optimizer | None = None,
                 backbone: keras.layers.Layer | None = None):
        self.config = config
        self._strategy = tf.distribute.get_strategy()
        self.backbone = backbone or VGGBackbone(
            n_way=config.n_way, image_shape=config.image_shape,
            num_filters=config.num_filters, num_stages=config.num_stages,
            max_pooling=config.max_pooling, num_steps=config.inner_steps,
            per_step_bn=config.per_step_bn, bn_policy=config.bn_stats,
            pool_impl="reshape" if config.jit_compile else "max_pool",
            dtype=config.dtype_policy, name="backbone")
        self.lslr = PerStepLearningRates(
            self.backbone.param_names, config.inner_steps, config.inner_lr,
            trainable=config.learn_inner_lr, dtype=config.dtype, name="lslr")
        if optimizer is None:
            optimizer = keras.optimizers.Adam(
                learning_rate=schedules.CosineMetaLearningRate(
                    config.meta_lr, config.min_meta_lr, config.epochs,
                    config.iterations_per_epoch),
                beta_1=0.9, beta_2=0.999, epsilon=config.adam_epsilon)
        self.optimizer = optimizer
        self.optimizer.build(self.trainable_variables)
        self.trace_count = 0
        self._train_fns: dict[tuple[bool, bool], Callable] = {}
        self._eval_fn: Callable | None = None

    # ------------------------------------------------------------------ state

    @property
    def network_variables(self) -> list[keras.Variable]:
        """Trainable network weights: conv/dense kernels and biases, BN gamma/beta."""
        return list(self.backbone.trainable_variables)

    @property
    def trainable_variables(self) -> list[keras.Variable]:
        """Every meta-parameter: network, per-step BN gamma/beta and (if learned) LSLR."""
        return self.network_variables + list(self.lslr.trainable_variables)

    @property
    def running_stat_variables(self) -> list[keras.Variable]:
        """Per-step batch-norm running statistics (not trained by gradients)."""
        return list(self.backbone.non_trainable_variables)

    @property
    def iterations(self) -> tf.Variable:
        """Meta-updates applied so far (the optimiser's counter)."""
        return self.optimizer.iterations

    def checkpoint_items(self) -> dict[str, object]:
        """The trackable objects a `tf.train.Checkpoint` of the learner must hold."""
        return dict(backbone=self.backbone, lslr=self.lslr, optimizer=self.optimizer)

    # ------------------------------------------------------------ inner loop

    def _task_impl(self, query_per_task: int) -> str:
        impl = self.config.task_impl
        if impl == "auto":
            return "batched" if query_per_task <= _AUTO_BATCHED_MAX_QUERY else "loop"
        return impl

    def run_tasks(self, batch: Batch, *, num_steps: int, training: bool,
                  second_order: bool, msl_weights: tf.Tensor | None
                  ) -> tuple[tf.Tensor, tf.Tensor, list[PassRecord]]:
        """Adapts to every task of `batch` and scores its query set.

        The building block of `meta_loss`, `train_step` and `eval_step`,
        public for analyses that need per-task or per-step losses. Changes no
        variable.

        Args:
          batch: A meta-batch (see module docstring).
          num_steps: Inner steps.
          training: Meta-training passes (batch-norm policy, moments).
          second_order: Keep the inner gradients differentiable.
          msl_weights: `[num_steps]` per-step query-loss weights, or None for
            the final-step loss only.

        Returns:
          `(task_losses [T], final_logits [T, N·Q, n_way], records)` where
          `records` holds, per network pass in order, the batch moments
          averaged over tasks.
        """
        support_x, support_y, query_x, query_y = batch
        tasks = support_x.shape[0]
        if self._task_impl(query_x.shape[1]) == "batched":
            return self._adapt_and_score(
                self.backbone.forward_tasks, support_x, support_y, query_x, query_y,
                tasks=tasks, num_steps=num_steps, training=training,
                second_order=second_order, msl_weights=msl_weights)
        results = [
            self._adapt_and_score(self.backbone.forward, support_x[t], support_y[t],
                                  query_x[t], query_y[t], tasks=None,
                                  num_steps=num_steps, training=training,
                                  second_order=second_order, msl_weights=msl_weights)
            for t in range(tasks)
        ]
        losses = tf.stack([r[0] for r in results])
        logits = tf.stack([r[1] for r in results])
        records = [
            (step, [
                BatchMoments(tf.reduce_mean(tf.stack([r[2][p][1][l].mean for r in results]), 0),
                             tf.reduce_mean(
                                 tf.stack([r[2][p][1][l].variance for r in results]), 0),
                             moments[l].count) for l in range(len(moments))
            ]) for p, (step, moments) in enumerate(results[0][2])
        ]
        return losses, logits, records

    def _adapt_and_score(self, forward: Callable, support_x: tf.Tensor,
                         support_y: tf.Tensor, query_x: tf.Tensor, query_y: tf.Tensor,
                         *, tasks: int | None, num_steps: int, training: bool,
                         second_order: bool, msl_weights: tf.Tensor | None
                         ) -> tuple[tf.Tensor, tf.Tensor, list[PassRecord]]:
        """The inner loop for one task (`tasks=None`) or a stack of `tasks` tasks."""
        params = self.backbone.initial_params()
        if tasks is not None:
            params = {name: tf.tile(value[None], [tasks] + [1] * value.shape.rank)
                      for name, value in params.items()}
        records: list[PassRecord] = []
        loss = tf.constant(0.0, dtype=self.config.dtype)
        for step in range(num_steps):
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(list(params.values()))
                logits, moments = forward(support_x, params, step, training)
                # Per-task losses are independent, so the gradient of their sum
                # is each task's own gradient.
                support_loss = tf.reduce_sum(_cross_entropy(support_y, logits))
            records.append((step, _mean_over_tasks(moments, tasks)))
            grads = tape.gradient(support_loss, params,
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO)
            if not second_order:
                grads = tf.nest.map_structure(tf.stop_gradient, grads)
            params = self.lslr.update(params, grads, step)
            if msl_weights is not None or step == num_steps - 1:
                logits, moments = self._query_pass(forward, support_x, query_x, params,
                                                   step, training,
                                                   batch_axis=0 if tasks is None else 1)
                records.append((step, _mean_over_tasks(moments, tasks)))
                query_loss = _cross_entropy(query_y, logits)
                loss = loss + (query_loss if msl_weights is None else
                               msl_weights[step] * query_loss)
        return loss, logits, records

    def _query_pass(self, forward: Callable, support_x: tf.Tensor, query_x: tf.Tensor,
                    params: dict[str, tf.Tensor], step: int, training: bool, *,
                    batch_axis: int) -> tuple[tf.Tensor, list[BatchMoments]]:
        """Query logits at inner step `step` under `params`, normalised as the policy says.

        Under the context policies (`support`, `tasknorm`) the support set
        travels with the queries as the context of every batch norm: the
        statistics are those of the support images through the same weights
        and the same batch-norm row as the queries (one extra support forward
        per query pass), and no query influences another. The moments
        returned are then the support set's.
        """
        if self.config.bn_stats not in CONTEXT_POLICIES:
            return forward(query_x, params, step, training)
        support = support_x.shape[batch_axis]
        if support is None:
            support = tf.shape(support_x)[batch_axis]
        logits, moments = forward(tf.concat([support_x, query_x], batch_axis), params, step,
                                  training, context=support)
        return logits[(slice(None),) * batch_axis + (slice(support, None),)], moments

    def _update_running_stats(self, records: Sequence[PassRecord]) -> None:
        for step, moments in records:
            for norm, moment in zip(self.backbone.norms, moments):
                norm.update_running_stats(step, moment.mean, moment.variance, moment.count)

    # ---------------------------------------------------------- input checks

    def _check_batch(self, batch: Batch | tf.distribute.DistributedValues) -> None:
        """Checks a meta-batch against the config before any tracing.

        Static shapes and dtypes are checked always; label values whenever they
        are known (arrays, eager tensors, each replica's part of a distributed
        batch), not for symbolic tensors inside a `tf.function`.

        Args:
          batch: A meta-batch, or a distributed one (each replica's part is checked).

        Raises:
          ValueError: naming the tensor at fault, its shape, dtype or label, and
            what this learner expects (rank, image shape, lengths per task,
            labels in `[0, n_way)`).
        """
        if not isinstance(batch, (tuple, list)) or len(batch) != 4:
            raise ValueError("a meta-batch is a tuple (support_x, support_y, query_x, "
                             f"query_y); got {type(batch).__name__}"
                             + (f" of {len(batch)}" if isinstance(batch, (tuple, list))
                                else ""))
        for support_x, support_y, query_x, query_y in zip(*map(self._local_parts, batch)):
            support = self._check_images("support_x", support_x, "T, N·K")
            query = self._check_images("query_x", query_x, "T, N·Q")
            if not support[:1].is_compatible_with(query[:1]):
                raise ValueError(f"support_x has {support[0]} tasks but query_x has "
                                 f"{query[0]}; a meta-batch has one of each per task")
            self._check_labels("support_y", support_y, "support_x", support[:2])
            self._check_labels("query_y", query_y, "query_x", query[:2])

    def _local_parts(self, value) -> tuple:
        """Each local replica's part of a distributed value; a plain value alone."""
        if isinstance(value, tf.distribute.DistributedValues):
            return tuple(self._strategy.experimental_local_results(value))
        return (value,)

    def _check_images(self, name: str, images, leading: str) -> tf.TensorShape:
        """Checks images `[*leading, H, W, C]` of the learner's shape and dtype.

        Args:
          name: The argument's name, for the message.
          images: A tensor, array or nested list.
          leading: The leading axes' names, e.g. "T, N·K".

        Returns:
          The static shape of `images`.

        Raises:
          ValueError: wrong rank, image shape, dtype, or an empty leading axis.
        """
        shape = _static_shape(images)
        image_shape = self.config.image_shape
        rank = len(leading.split(",")) + len(image_shape)
        if shape.rank is not None and (shape.rank != rank or not shape[-3:].is_compatible_with(
                image_shape) or 0 in shape[:-3].as_list()):
            raise ValueError(
                f"{name} must be non-empty images [{leading}, "
                f"{', '.join(map(str, image_shape))}] for this learner (image_shape="
                f"{image_shape}); got shape {_describe(shape)}")
        dtype = getattr(images, "dtype", None)
        if dtype is not None and tf.as_dtype(dtype) != tf.as_dtype(self.config.dtype):
            raise ValueError(f"{name} must be {self.config.dtype} (the learner's dtype); "
                             f"got {tf.as_dtype(dtype).name}")
        return shape

    def _check_labels(self, name: str, labels, images_name: str,
                      expected: tf.TensorShape) -> None:
        """Checks integer labels of shape `expected` with values in `[0, n_way)`.

        Raises:
          ValueError: wrong shape (one label per image of `images_name`), a
            non-integer dtype, or a label outside `[0, n_way)`.
        """
        shape = _static_shape(labels)
        if shape.rank is not None and not shape.is_compatible_with(expected):
            raise ValueError(f"{name} must hold one label per image of {images_name}, "
                             f"shape {_describe(expected)}; got {_describe(shape)}")
        dtype = getattr(labels, "dtype", None)
        if dtype is not None and not tf.as_dtype(dtype).is_integer:
            raise ValueError(f"{name} must be integer class labels; got "
                             f"{tf.as_dtype(dtype).name}")
        values = _known_values(labels)
        n_way = self.config.n_way
        if values is not None and values.size and (values.min() < 0 or values.max() >= n_way):
            raise ValueError(f"{name} holds labels {values.min()}..{values.max()}, but this "
                             f"learner is {n_way}-way: labels must be in [0, {n_way})")

    def _checked_steps(self, num_steps: int | None) -> int:
        """`num_steps`, defaulting to `eval_inner_steps`, within `[1, inner_steps]`.

        Raises:
          ValueError: if it is outside: per-step batch norm and LSLR have
            `inner_steps` rows.
        """
        if num_steps is None:
            return self.config.eval_inner_steps
        if not 1 <= num_steps <= self.config.inner_steps:
            raise ValueError(f"num_steps={num_steps} must be in [1, inner_steps="
                             f"{self.config.inner_steps}] (per-step batch norm and LSLR "
                             "have one row per step)")
        return num_steps

    # --------------------------------------------------------------- public

    def meta_loss(self, batch: Batch, epoch: int) -> tf.Tensor:
        """The differentiable meta-loss of `batch` at `epoch` (MSL and DA by epoch).

        Changes no variable, so an outer `tf.GradientTape` over it gives the
        meta-gradient that `train_step` applies (before clipping).

        Args:
          batch: A meta-batch.
          epoch: Integer epoch selecting the MSL weights and derivative order.

        Returns:
          Scalar: mean over tasks of the task losses.

        Raises:
          ValueError: as `_check_batch`.
        """
        self._check_batch(batch)
        msl, second_order, weights = self._epoch_modes(epoch)
        losses, _, _ = self.run_tasks(
            tuple(tf.convert_to_tensor(x) for x in batch), num_steps=self.config.inner_steps,
            training=True, second_order=second_order,
            msl_weights=tf.constant(weights, self.config.dtype) if msl else None)
        return tf.reduce_mean(losses)

    def _epoch_modes(self, epoch: int) -> tuple[bool, bool, np.ndarray]:
        config = self.config
        return (schedules.msl_active(epoch, config.msl_epochs),
                schedules.use_second_order(epoch, config.second_order,
                                           config.first_order_epochs),
                schedules.msl_weights(epoch, config.inner_steps, config.msl_epochs))

    def train_step(self, batch: Batch | tf.distribute.DistributedValues,
                   epoch: int) -> dict[str, tf.Tensor]:
        """One meta-update on `batch` (a `tf.function`, traced once per mode).

        The MSL weights enter as a tensor, so their annealing never retraces;
        the two Python modes (MSL on/off, first/second order) select one of at
        most four traced functions.

        Under a strategy, call it outside `strategy.scope()` (the update is
        applied from the default context; see `_make_train_fn`).

        Args:
          batch: A meta-batch, or a distributed one under a strategy.
          epoch: Integer epoch `iteration // iterations_per_epoch`.

        Returns:
          `{"loss", "accuracy", "applied"}`: meta-loss and query accuracy of the
          batch, and whether the update was applied (False when the loss or a
          gradient was not finite: then no variable changed).

        Raises:
          RuntimeError: if called inside a non-default `strategy.scope()`.
          ValueError: as `_check_batch`.
        """
        if tf.distribute.has_strategy() and tf.distribute.in_cross_replica_context():
            raise RuntimeError("call train_step outside `strategy.scope()`: the "
                               "meta-update is applied once, from the default context")
        self._check_batch(batch)
        msl, second_order, weights = self._epoch_modes(epoch)
        return self.train_step_function(msl, second_order)(
            batch, tf.constant(weights, self.config.dtype))

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
        every replica's copy of a variable gets the same update. With one
        device the reductions are the identity and this is the plain step.
        """
        strategy = self._strategy
        variables = self.trainable_variables
        # (inner step, [count of each BN layer]) of every network pass; static,
        # recorded when tracing the replica step.
        layout: list[tuple[int, list[int]]] = []

        def replica_grads(batch: Batch, weights: tf.Tensor):
            """This replica's share: loss, accuracy, gradients, moments of each pass."""
            global_tasks = _static_tasks(batch) * strategy.num_replicas_in_sync
            with tf.GradientTape() as tape:
                losses, logits, records = self.run_tasks(
                    batch, num_steps=self.config.inner_steps, training=True,
                    second_order=second_order, msl_weights=weights if msl else None)
                loss = tf.reduce_sum(losses) / global_tasks
            grads = tape.gradient(loss, variables,
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO)
            accuracy = tf.reduce_sum(_accuracy(batch[3], logits)) / global_tasks
            layout[:] = [(inner_step, [m.count for m in moments])
                         for inner_step, moments in records]
            return loss, accuracy, grads, [[(m.mean, m.variance) for m in moments]
                                           for _, moments in records]

        replica_jit, step_jit = self._jit_placement()
        if replica_jit:
            replica_grads = _traced(replica_grads, jit_compile=True)

        def replica_step(batch: Batch, weights: tf.Tensor):
            loss, accuracy, grads, moments = replica_grads(batch, weights)
            context = tf.distribute.get_replica_context()
            moments = context.all_reduce(tf.distribute.ReduceOp.MEAN, moments)
            loss, accuracy, grads = context.all_reduce(
                tf.distribute.ReduceOp.SUM, (loss, accuracy, grads))
            return loss, accuracy, grads, moments

        def step(batch, weights):
            self.trace_count += 1
            loss, accuracy, grads, moments = strategy.run(replica_step,
                                                          args=(batch, weights))

            def reduced(value):
                """Every replica holds the same value; this worker's first copy."""
                return strategy.experimental_local_results(value)[0]

            grads = [reduced(g) for g in grads]
            loss = reduced(loss)
            finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(x))
                                    for x in [loss] + grads])

            def update() -> tf.Tensor:
                # Identities move every gradient into this branch's graph (Keras'
                # all-reduce rejects a mix of branch and captured tensors).
                clipped = [tf.identity(g) for g in self._clip(grads)]
                self.optimizer.apply_gradients(zip(clipped, variables))
                self._update_running_stats([
                    (inner_step, [BatchMoments(reduced(mean), reduced(variance), count)
                                  for (mean, variance), count in zip(pass_moments, counts)])
                    for (inner_step, counts), pass_moments in zip(layout, moments)
                ])
                return tf.constant(True)

            # A non-finite loss or gradient never reaches a variable (the
            # optimiser's counter and slots included); the caller decides
            # whether to stop or to go on with the next meta-batch.
            applied = tf.cond(finite, update, lambda: tf.constant(False))
            return dict(loss=loss, accuracy=reduced(accuracy), applied=applied)

        return _traced(step, jit_compile=step_jit)

    def _jit_placement(self) -> tuple[bool, bool | None]:
        """Where XLA goes with `jit_compile`: `(per-replica computation, whole step)`.

        XLA cannot compile a function spanning several devices, so with
        several replicas it compiles each replica's computation instead, called
        from a Python replica function so that it is traced on (and reads the
        variables of) each replica.
        """
        if not self.config.jit_compile:
            return False, None
        if self._strategy.num_replicas_in_sync > 1:
            return True, None
        return False, True

    def _clip(self, grads: list[tf.Tensor]) -> list[tf.Tensor]:
        """Element-wise clip of the summed network gradients, never LSLR's (as officially)."""
        clip = self.config.grad_clip
        if not clip:
            return grads
        n = len(self.network_variables)
        return [tf.clip_by_value(g, -clip, clip) for g in grads[:n]] + list(grads[n:])

    def eval_step(self, batch: Batch | tf.distribute.DistributedValues
                  ) -> dict[str, tf.Tensor]:
        """Adapts first-order to each task and scores its query set; changes no variable.

        Args:
          batch: A meta-batch (or a distributed one).

        Returns:
          `{"loss" [T], "accuracy" [T], "logits" [T, N·Q, n_way], "labels"
          [T, N·Q]}` per task: the final-step query loss, accuracy and logits
          (logits are what the top-k ensemble averages) and the query labels,
          gathered from every replica of every worker in replica order.

        Raises:
          ValueError: as `_check_batch`.
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

        def replica_results(batch: Batch) -> dict[str, tf.Tensor]:
            _static_tasks(batch)
            losses, logits, _ = self.run_tasks(
                batch, num_steps=self.config.eval_inner_steps, training=False,
                second_order=False, msl_weights=None)
            return dict(loss=losses, accuracy=_accuracy(batch[3], logits),
                        logits=logits, labels=batch[3])

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

    def adapt(self, support_x: tf.Tensor, support_y: tf.Tensor,
              num_steps: int | None = None) -> dict[str, tf.Tensor]:
        """Fast weights adapted to one task's support set (first order, as at evaluation).

        Args:
          support_x: Support images `[N·K, H, W, C]`.
          support_y: Support labels `[N·K]` in `[0, n_way)`.
          num_steps: Inner steps; defaults to `eval_inner_steps`.

        Returns:
          The adapted weights by name; use them with `predict`.

        Raises:
          ValueError: images or labels that do not fit the learner (see
            `_check_batch`), or `num_steps` outside `[1, inner_steps]`.
        """
        num_steps = self._checked_steps(num_steps)
        shape = self._check_images("support_x", support_x, "n")
        self._check_labels("support_y", support_y, "support_x", shape[:1])
        params = self.backbone.initial_params()
        for step in range(num_steps):
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(list(params.values()))
                logits, _ = self.backbone.forward(support_x, params, step, False)
                loss = _cross_entropy(support_y, logits)
            grads = tape.gradient(loss, params,
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO)
            params = self.lslr.update(params, grads, step)
        return params

    def predict(self, images: tf.Tensor, params: dict[str, tf.Tensor],
                num_steps: int | None = None, *,
                support_x: tf.Tensor | None = None) -> tf.Tensor:
        """Logits of `images [B, H, W, C]` under adapted weights `params`.

        Batch norm uses the row of the last inner step, as the final query
        pass of the inner loop does.

        Args:
          images: Query images.
          params: Weights from `adapt`.
          num_steps: Inner steps `adapt` took; defaults to `eval_inner_steps`.
          support_x: The support images `params` were adapted to. Required
            under `bn_stats` `support` and `tasknorm`, whose statistics come
            from them; unused otherwise.

        Returns:
          Logits `[B, n_way]`.

        Raises:
          ValueError: if the policy needs `support_x` and it is missing, images
            that do not fit the learner, or `num_steps` outside `[1, inner_steps]`.
        """
        num_steps = self._checked_steps(num_steps)
        self._check_images("images", images, "B")
        if self.config.bn_stats in CONTEXT_POLICIES:
            if support_x is None:
                raise ValueError(f"bn_stats={self.config.bn_stats!r} normalises with the "
                                 "support set's statistics: pass support_x to predict")
            self._check_images("support_x", support_x, "n")
        else:
            support_x = None
        logits, _ = self._query_pass(self.backbone.forward, support_x, images, params,
                                     num_steps - 1, False, batch_axis=0)
        return logits


def _static_tasks(batch: Batch) -> int:
    """Tasks in this replica's share of a meta-batch; the inner loop needs it static.

    Raises:
      ValueError: if the leading dimension is unknown when tracing.
    """
    tasks = batch[0].shape[0]
    if tasks is None:
        raise ValueError("a meta-batch needs a static number of tasks per replica "
                         f"(got shape {batch[0].shape}); give the dataset a fixed "
                         "meta-batch size divisible by the replicas")
    return tasks


def _static_shape(value) -> tf.TensorShape:
    """Static shape of a tensor, array or nested list (unknown sizes as None)."""
    shape = getattr(value, "shape", None)
    return tf.TensorShape(np.shape(value) if shape is None else shape)


def _describe(shape: tf.TensorShape) -> str:
    """`shape` as `[2, 10, 28, 28, 1]` (`?` for an unknown size)."""
    if shape.rank is None:
        return "of unknown rank"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape.as_list()) + "]"


def _known_values(value) -> np.ndarray | None:
    """The values of an array, list or eager tensor; None for a symbolic tensor."""
    if tf.is_tensor(value):
        return None if tf.is_symbolic_tensor(value) else value.numpy()
    return np.asarray(value)


def _mean_over_tasks(moments: Iterable[BatchMoments], tasks: int | None) -> list[BatchMoments]:
    """Averages task-batched moments `[T, C]` over tasks (single-task ones pass through)."""
    if tasks is None:
        return list(moments)
    return [BatchMoments(tf.reduce_mean(m.mean, 0), tf.reduce_mean(m.variance, 0), m.count)
            for m in moments]
