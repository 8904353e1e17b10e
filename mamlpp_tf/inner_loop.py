"""The inner loop: adapting to each task of a meta-batch and scoring its queries.

A meta-batch is a tuple `(support_x [T, N·K, H, W, C], support_y [T, N·K],
query_x [T, N·Q, H, W, C], query_y [T, N·Q])` of `T` tasks with equal shapes.

For every task the inner loop starts from the meta-parameters `θ_0`, takes
`S` steps `θ_{i+1} = θ_i − α(i) ⊙ ∇L_support(θ_i)` on the *adapted* fast
weights with the learner's *update rule* (`mamlpp_tf.update_rules`: LSLR,
Meta-SGD or a fixed rate) and per-step batch norm, and scores the query set.
Which weights adapt is a part of its own (`adapted_names`): all of them (MAML,
MAML++), the classifier head only (ANIL) or all but the head (BOIL); the others
stay at `θ_0` within a task and learn in the outer loop only. `InnerLoop.inner_step`
is the one inner step that meta-training, evaluation, `adapt` (and with it the
served task model and the exported meta-model) all take.

The task loss is the multi-step loss `Σ_i v_i(e) L_query(θ_{i+1})` while MSL is
active, else the final-step query loss. Second order keeps the inner gradients
in the graph of the outer tape; first order treats them as constants. Steps
beyond the `inner_steps` trained ones (`--eval_inner_steps` above
`--inner_steps`) reuse the last trained step's batch-norm row and rates
(`InnerLoop.trained_step`).

Batch norm follows `config.bn_stats` (see `PerStepBatchNorm`). Under the
non-transductive `bn_stats` modes `support`, `tasknorm` and `rn`, every query pass carries
the task's support set as the context of its batch norms, so training,
evaluation and the exported models normalise a query with the support set's
statistics alone: its prediction never depends on the other queries.

Two task layouts compute the same numbers: `loop` runs tasks one after another
(the simple reference) and `batched` runs them through the network together
(the backbone's optional `forward_tasks`; `auto` uses it where it pays and the
network has it).
"""

from __future__ import annotations

from collections.abc import Iterable

import tensorflow as tf

from mamlpp_tf.config import LearnerConfig
from mamlpp_tf.nets import (
    CONTEXT_BN_STATS,
    Backbone,
    BatchMoments,
    build_backbone,
    check_backbone,
    differentiated_twice,
    has_task_batched_pass,
)
from mamlpp_tf.nets.base import has_body_head_split, head_names
from mamlpp_tf.update_rules import UpdateRule, build_update_rule

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


def adapted_names(adapt: str, backbone: Backbone) -> list[str]:
    """The fast weights of `backbone` that the inner loop adapts under `adapt`, in network order.

    * `all`: every fast weight (MAML, MAML++).
    * `head`: the classifier head's only (ANIL: Raghu et al., "Rapid Learning or
      Feature Reuse?", ICLR 2020); the body changes in the outer loop only.
    * `body`: all but the head's (BOIL: Oh et al., "BOIL: Towards
      Representation Change for Few-shot Learning", ICLR 2021, whose head has
      an inner learning rate of zero).

    Raises:
      TypeError: `head` or `body` for a backbone without `head_param_names`.
      ValueError: an unknown `adapt`, or a `head_param_names` that is not some
        but not all of `param_names`.
    """
    if adapt == "all":
        return list(backbone.param_names)
    if adapt not in ("head", "body"):
        raise ValueError(f"adapt={adapt!r} must be one of all, head, body")
    head = head_names(backbone)
    return head if adapt == "head" else [n for n in backbone.param_names if n not in head]


class _Passes:
    """The network's passes within one inner loop over one task (or one stack of tasks).

    `passes(role, x, params, row, training, context)` is the backbone's
    `forward` (or `forward_tasks`). With a frozen body (`adapt="head"`) and a
    network split into body and head, the body's features of each input
    (`role`: the support set, or the query pass's images) are computed once per
    batch-norm row, once in all without per-step batch norm, and reused by
    every later step: only the head runs again. The numbers are those of
    `forward`, since the body's weights do not change within the task.

    Args:
      backbone: The network.
      batched: The task-batched layout (`forward_tasks` and its parts).
      frozen_body: Whether the body's weights stay at `θ_0` in the inner loop.
      per_step_bn: Whether the body's pass depends on the batch-norm row.
    """

    def __init__(self, backbone: Backbone, *, batched: bool, frozen_body: bool,
                 per_step_bn: bool):
        suffix = "_tasks" if batched else ""
        self._forward = getattr(backbone, "forward" + suffix)
        self._reuse = frozen_body and has_body_head_split(backbone, batched)
        if self._reuse:
            self._body = getattr(backbone, "forward_body" + suffix)
            self._head = getattr(backbone, "forward_head" + suffix)
        self._per_step_bn = per_step_bn
        self._features: dict[tuple[str, int], tuple[tf.Tensor, list[BatchMoments]]] = {}

    def __call__(self, role: str, x: tf.Tensor, params: dict[str, tf.Tensor], row: int,
                 training: bool, context: int | tf.Tensor | None = None
                 ) -> tuple[tf.Tensor, list[BatchMoments]]:
        """`(logits, moments)` of `x` (the images of `role`) under `params` at BN row `row`."""
        if not self._reuse:
            return self._forward(x, params, row, training, context)
        key = (role, row if self._per_step_bn else 0)
        if key not in self._features:
            self._features[key] = self._body(x, params, row, training, context)
        features, moments = self._features[key]
        return self._head(features, params), moments


class InnerLoop:
    """The network, the inner loop's parts and the inner loop over them.

    The parts: the *adapted* fast weights (`adapted`, from `config.adapt`) and
    the inner *update rule* (`update_rule`, from `config.update_rule`), which
    holds rates for the adapted weights only. The base of `MamlPlusPlus`, which
    adds the meta-objective, its gradients, evaluation and the serving API.

    Args:
      config: The learner's hyper-parameters.
      backbone: The network (a `mamlpp_tf.nets.Backbone`); defaults to the one
        `config.backbone` names, built from the registry.

    Attributes:
      config: The `LearnerConfig`.
      backbone: The network holding the fast weights' and per-step BN variables.
      adapted: The names of the fast weights the inner loop adapts, in network order.
      update_rule: The `mamlpp_tf.update_rules.UpdateRule`.

    Raises:
      TypeError: `backbone` lacks a member of `mamlpp_tf.nets.Backbone`, or
        `head_param_names` where `config.adapt` needs it.
      ValueError: `task_impl="batched"` for a network without `forward_tasks`,
        or a `head_param_names` that is not some but not all fast weights.
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
        self.adapted = tuple(adapted_names(config.adapt, self.backbone))
        self.update_rule: UpdateRule = build_update_rule(
            config.update_rule,
            {name: tuple(self.backbone.weights_by_name[name].shape) for name in self.adapted},
            num_steps=config.inner_steps, initial_rate=config.inner_lr,
            per_step=config.meta_sgd_per_step, dtype=config.dtype)

    @property
    def lslr(self) -> UpdateRule:
        """The update rule, by the checkpoint key that holds it (`lslr`, MAML++'s rule)."""
        return self.update_rule

    # ------------------------------------------------------------ inner loop

    def trained_step(self, step: int) -> int:
        """The trained step whose batch-norm row and rates inner step `step` uses.

        Steps beyond the `inner_steps` of training (longer adaptation at
        evaluation) reuse the last trained step's.
        """
        return min(step, self.config.inner_steps - 1)

    def inner_step(self, passes: _Passes, support_x: tf.Tensor, support_y: tf.Tensor,
                   params: dict[str, tf.Tensor], step: int, *, training: bool,
                   second_order: bool) -> tuple[dict[str, tf.Tensor], list[BatchMoments]]:
        """One inner step on the support set: `θ_{i+1}` from `θ_i`; changes no variable.

        The one inner step of meta-training, evaluation and `adapt`: the
        gradient of the support loss with respect to the adapted weights, and
        the update rule's step on them at the trained step of `step`.

        Args:
          passes: The network's passes of this inner loop (`_passes`).
          support_x: Support images of one task, or of a stack of tasks.
          support_y: Their labels.
          params: `θ_i`, every fast weight by name.
          step: Inner step `i`.
          training: Meta-training pass (`bn_stats="running"`, moments).
          second_order: Keep the inner gradients differentiable.

        Returns:
          `(θ_{i+1}, moments)`: every fast weight (the adapted ones updated) and
          the support pass's batch moments.
        """
        row = self.trained_step(step)
        adapted = {name: params[name] for name in self.adapted}
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(list(adapted.values()))
            with differentiated_twice(second_order):
                logits, moments = passes("support", support_x, params, row, training)
            # Per-task losses are independent, so the gradient of their sum
            # is each task's own gradient.
            support_loss = tf.reduce_sum(cross_entropy(support_y, logits))
        grads = tape.gradient(support_loss, adapted,
                              unconnected_gradients=tf.UnconnectedGradients.ZERO)
        if not second_order:
            grads = tf.nest.map_structure(tf.stop_gradient, grads)
        updated = self.update_rule.update(adapted, grads, row)
        return {name: updated.get(name, value) for name, value in params.items()}, moments

    def _passes(self, batched: bool) -> _Passes:
        """Fresh passes for one inner loop (one task, or one stack of tasks if `batched`)."""
        return _Passes(self.backbone, batched=batched, frozen_body=self.config.adapt == "head",
                       per_step_bn=self.config.per_step_bn)

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
          num_steps: Inner steps (beyond `inner_steps`: see `trained_step`).
          training: Meta-training passes (`bn_stats="running"`, moments).
          second_order: Keep the inner gradients differentiable.
          msl_weights: `[num_steps]` per-step query-loss weights, or None for
            the final-step loss only.

        Returns:
          `(task_losses [T], final_logits [T, N·Q, n_way], records)` where
          `records` holds, per network pass in order, its batch-norm row and
          the batch moments averaged over tasks.
        """
        support_x, support_y, query_x, query_y = batch
        tasks = support_x.shape[0]
        if self._task_impl(query_x.shape[1]) == "batched":
            return self._adapt_and_score(
                self._passes(batched=True), support_x, support_y, query_x, query_y,
                tasks=tasks, num_steps=num_steps, training=training,
                second_order=second_order, msl_weights=msl_weights)
        results = [
            self._adapt_and_score(self._passes(batched=False), support_x[t], support_y[t],
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

    def _adapt_and_score(self, passes: _Passes, support_x: tf.Tensor,
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
            row = self.trained_step(step)
            params, moments = self.inner_step(passes, support_x, support_y, params, step,
                                              training=training, second_order=second_order)
            records.append((row, _mean_over_tasks(moments, tasks)))
            if msl_weights is not None or step == num_steps - 1:
                logits, moments = self._query_pass(passes, support_x, query_x, params,
                                                   row, training,
                                                   batch_axis=0 if tasks is None else 1)
                records.append((row, _mean_over_tasks(moments, tasks)))
                query_loss = cross_entropy(query_y, logits)
                loss = loss + (query_loss if msl_weights is None else
                               msl_weights[step] * query_loss)
        return loss, logits, records

    def _query_pass(self, passes: _Passes, support_x: tf.Tensor, query_x: tf.Tensor,
                    params: dict[str, tf.Tensor], row: int, training: bool, *,
                    batch_axis: int) -> tuple[tf.Tensor, list[BatchMoments]]:
        """Query logits at batch-norm row `row` under `params`, normalised as `bn_stats` says.

        Under the context modes (`support`, `tasknorm`, `rn`) the support set
        travels with the queries as the context of every batch norm: the
        statistics are those of the support images through the same weights
        and the same batch-norm row as the queries (one extra support forward
        per query pass), and no query influences another. The moments
        returned are then the support set's.
        """
        if self.config.bn_stats not in CONTEXT_BN_STATS:
            return passes("query", query_x, params, row, training)
        support = support_x.shape[batch_axis]
        if support is None:
            support = tf.shape(support_x)[batch_axis]
        logits, moments = passes("query", tf.concat([support_x, query_x], batch_axis), params,
                                 row, training, context=support)
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
        got = (norm.bn_stats, norm.per_step, norm.num_steps if norm.per_step else None,
               norm.tasknorm_alpha, norm.tasknorm_unbiased)
        want = (config.bn_stats, config.per_step_bn,
                config.inner_steps if config.per_step_bn else None, config.tasknorm_alpha,
                config.tasknorm_unbiased)
        if got != want:
            raise ValueError(
                f"batch norm {norm.name} of the backbone has (bn_stats, per_step, num_steps, "
                f"tasknorm_alpha, tasknorm_unbiased) = {got}, the learner's config {want}: "
                "build the backbone with the common arguments build_backbone gives "
                "(bn_stats, per_step_bn, num_steps, tasknorm_alpha, tasknorm_unbiased)")
