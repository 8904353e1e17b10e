"""The MAML++ inner loop: adapting to each task of a meta-batch and scoring its queries.

A meta-batch is a tuple `(support_x [T, N·K, H, W, C], support_y [T, N·K],
query_x [T, N·Q, H, W, C], query_y [T, N·Q])` of `T` tasks with equal shapes.

For every task the inner loop starts from the meta-parameters `θ_0`, takes
`S` steps `θ_{i+1} = θ_i − α[·][i] ∇L_support(θ_i)` with the learned per-layer,
per-step rates (LSLR) and per-step batch norm, and scores the query set. The
task loss is the multi-step loss `Σ_i v_i(e) L_query(θ_{i+1})` while MSL is
active, else the final-step query loss. Second order keeps the inner gradients
in the graph of the outer tape; first order treats them as constants.

Batch norm follows `config.bn_stats` (see `PerStepBatchNorm`). Under the
non-transductive `bn_stats` modes `support` and `tasknorm`, every query pass carries
the task's support set as the context of its batch norms, so training,
evaluation and the exported models normalise a query with the support set's
statistics alone: its prediction never depends on the other queries.

Two task layouts compute the same numbers: `loop` runs tasks one after another
(the simple reference) and `batched` runs them through the network together
(the backbone's optional `forward_tasks`; `auto` uses it where it pays and the
network has it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import tensorflow as tf

from mamlpp_tf.config import LearnerConfig
from mamlpp_tf.nets import (
    CONTEXT_BN_STATS,
    Backbone,
    BatchMoments,
    build_backbone,
    check_backbone,
    has_task_batched_pass,
)
from mamlpp_tf.update_rules import PerStepLearningRates

Batch = tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]
# One pass of the network: (batch-norm step, moments of each BN layer).
PassRecord = tuple[int, list[BatchMoments]]

# Query images per task up to which `auto` batches tasks. Per second-order
# meta-iteration on CPU, batching beat the per-task loop with 5 and 20 queries
# per task (Omniglot 5-/20-way) and lost with 75 (mini-ImageNet); the figures
# are in benchmarks/README.md. Batching always traced faster and peaked lower
# in memory; pass task_impl="batched" where that matters more than step time.
_AUTO_BATCHED_MAX_QUERY = 40


def cross_entropy(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Mean cross-entropy over the last batch axis (per task when batched)."""
    return tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits),
        axis=-1)


def accuracy(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Fraction of correct argmax predictions over the last batch axis."""
    predictions = tf.argmax(logits, axis=-1, output_type=labels.dtype)
    return tf.reduce_mean(tf.cast(tf.equal(predictions, labels), logits.dtype), axis=-1)


class InnerLoop:
    """The network, its per-step inner learning rates and the inner loop over them.

    The base of `MamlPlusPlus`, which adds the meta-objective, its gradients,
    evaluation and the serving API.

    Args:
      config: The learner's hyper-parameters.
      backbone: The network (a `mamlpp_tf.nets.Backbone`); defaults to the one
        `config.backbone` names, built from the registry.

    Attributes:
      config: The `LearnerConfig`.
      backbone: The network holding the fast weights' and per-step BN variables.
      lslr: The `PerStepLearningRates` layer.

    Raises:
      TypeError: `backbone` lacks a member of `mamlpp_tf.nets.Backbone`.
      ValueError: `task_impl="batched"` for a network without `forward_tasks`.
    """

    def __init__(self, config: LearnerConfig, backbone: Backbone | None = None):
        self.config = config
        self.backbone = build_backbone(config) if backbone is None else backbone
        check_backbone(self.backbone)
        _check_norms(config, self.backbone)
        if config.task_impl == "batched" and not has_task_batched_pass(self.backbone):
            raise ValueError(f"task_impl='batched' needs a task-batched pass (forward_tasks), "
                             f"which {type(self.backbone).__name__} does not have: use "
                             "task_impl='loop' or 'auto'")
        self.lslr = PerStepLearningRates(
            self.backbone.param_names, config.inner_steps, config.inner_lr,
            trainable=config.learn_inner_lr, dtype=config.dtype, name="lslr")

    # ------------------------------------------------------------ inner loop

    def _task_impl(self, query_per_task: int) -> str:
        impl = self.config.task_impl
        if impl == "auto":
            return ("batched" if query_per_task <= _AUTO_BATCHED_MAX_QUERY and
                    has_task_batched_pass(self.backbone) else "loop")
        return impl

    def run_tasks(self, batch: Batch, *, num_steps: int, training: bool,
                  second_order: bool, msl_weights: tf.Tensor | None
                  ) -> tuple[tf.Tensor, tf.Tensor, list[PassRecord]]:
        """Adapts to every task of `batch` and scores its query set.

        The building block of `MamlPlusPlus.meta_loss`, `replica_gradients` and
        `eval_results`, public for analyses that need per-task or per-step losses. Changes no
        variable.

        Args:
          batch: A meta-batch (see module docstring).
          num_steps: Inner steps.
          training: Meta-training passes (`bn_stats="running"`, moments).
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
                BatchMoments(tf.reduce_mean(tf.stack([r[2][p][1][k].mean for r in results]), 0),
                             tf.reduce_mean(
                                 tf.stack([r[2][p][1][k].variance for r in results]), 0),
                             moments[k].count) for k in range(len(moments))
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
                support_loss = tf.reduce_sum(cross_entropy(support_y, logits))
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
                query_loss = cross_entropy(query_y, logits)
                loss = loss + (query_loss if msl_weights is None else
                               msl_weights[step] * query_loss)
        return loss, logits, records

    def _query_pass(self, forward: Callable, support_x: tf.Tensor, query_x: tf.Tensor,
                    params: dict[str, tf.Tensor], step: int, training: bool, *,
                    batch_axis: int) -> tuple[tf.Tensor, list[BatchMoments]]:
        """Query logits at inner step `step` under `params`, normalised as `bn_stats` says.

        Under the context modes (`support`, `tasknorm`) the support set
        travels with the queries as the context of every batch norm: the
        statistics are those of the support images through the same weights
        and the same batch-norm row as the queries (one extra support forward
        per query pass), and no query influences another. The moments
        returned are then the support set's.
        """
        if self.config.bn_stats not in CONTEXT_BN_STATS:
            return forward(query_x, params, step, training)
        support = support_x.shape[batch_axis]
        if support is None:
            support = tf.shape(support_x)[batch_axis]
        logits, moments = forward(tf.concat([support_x, query_x], batch_axis), params, step,
                                  training, context=support)
        return logits[(slice(None),) * batch_axis + (slice(support, None),)], moments

def _mean_over_tasks(moments: Iterable[BatchMoments], tasks: int | None) -> list[BatchMoments]:
    """Averages task-batched moments `[T, C]` over tasks (single-task ones pass through)."""
    if tasks is None:
        return list(moments)
    return [BatchMoments(tf.reduce_mean(m.mean, 0), tf.reduce_mean(m.variance, 0), m.count)
            for m in moments]


def _check_norms(config: LearnerConfig, backbone: Backbone) -> None:
    """Raises `ValueError` unless every batch norm of `backbone` has the config's settings."""
    for norm in backbone.norms:
        got = (norm.bn_stats, norm.per_step, norm.num_steps if norm.per_step else None)
        want = (config.bn_stats, config.per_step_bn,
                config.inner_steps if config.per_step_bn else None)
        if got != want:
            raise ValueError(
                f"batch norm {norm.name} of the backbone has (bn_stats, per_step, num_steps) = "
                f"{got}, the learner's config {want}: build the backbone with "
                "bn_stats=config.bn_stats, per_step_bn=config.per_step_bn and "
                "num_steps=config.inner_steps")
