"""The task model: the network adapted to one support set, answering one image at a time.

This is what `export/` serves as a plain classifier and what the final test
scores as the *served* accuracy next to the protocol's. A `task_network` is a
one-step copy of the learner's network; `bake_task` stores in it the weights
adapted to a support set (by `learner.adapt`, whatever the variant: only the
adapted weights differ from the meta-parameters), the batch-norm gamma/beta of
the last inner step (the last trained one's when evaluation takes more steps) and
fixed normalisation statistics, so that an image's answer never depends on the
other images of a request. The statistics (`bn_stats`):

* `"support"`: the batch statistics of the support set through the adapted
  weights at the last step's batch-norm row. For `--bn_stats=support` runs
  this is exactly the computation the run was trained and scored with. For
  `--bn_stats=batch` runs (transductive: each query batch normalised with its
  own statistics) it is the export-time estimate of those statistics: the
  support set is the only sample of the task's classes known in advance, and
  the gap shows in the run's `served_accuracy`.
* `"rn"`: the support set's moments as for `"support"`, pooled with each
  image's own (Reptile's normalisation: the moments of the support set plus
  the one image answered). For `--bn_stats=rn` runs exactly the run's
  computation; for `batch` and `support` runs a serving-only swap that needs
  no retraining.
* `"tasknorm"` (`--bn_stats=tasknorm` runs only): the support set's moments
  blended with each image's instance moments by the learned α, exactly the
  run's computation.

The per-step running statistics (BNRS) are no task model's: a `batch` run
served with the last step's running statistics for the queries scored 64 %
against 86 % with the support set's (Omniglot 5-way 1-shot), and runs trained
to use them at evaluation score at chance (see docs/algorithm.md).
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from mamlpp_tf.config import LearnerConfig
from mamlpp_tf.learner import MamlPlusPlus
from mamlpp_tf.nets import Backbone

BN_STATS = ("support", "rn", "tasknorm")
# Task models that pool the stored support moments with each image's own.
_BLENDED = ("tasknorm", "rn")


def default_bn_stats(config: LearnerConfig) -> str:
    """The task model's statistics for a run: its own `bn_stats` mode's evaluation statistics."""
    return config.bn_stats if config.bn_stats in _BLENDED else "support"


def check_bn_stats(config: LearnerConfig, bn_stats: str, flag: str = "--bn_stats") -> None:
    """Raises `ValueError` unless `bn_stats` is usable with the run's network.

    Args:
      config: The run's learner config.
      bn_stats: The task model's statistics.
      flag: The flag that chose `bn_stats`, named in the error.
    """
    if bn_stats not in BN_STATS:
        raise ValueError(f"{flag}={bn_stats!r} must be one of {BN_STATS}")
    if (bn_stats == "tasknorm") != (config.bn_stats == "tasknorm"):
        raise ValueError(f"{flag}={bn_stats} needs a run trained with "
                         "--bn_stats=tasknorm, and such a run is served only with it "
                         f"(this run: --bn_stats={config.bn_stats})")


def task_network(learner: MamlPlusPlus, bn_stats: str,
                 support_size: int | None = None) -> Backbone:
    """A one-step copy of the learner's network that normalises with stored statistics.

    Args:
      learner: The meta-trained learner.
      bn_stats: One of `BN_STATS`.
      support_size: Support images per task; needed for `"tasknorm"` and
        `"rn"`, whose blend depends on it.

    Raises:
      ValueError: as `check_bn_stats`, or a blended mode without `support_size`.
    """
    check_bn_stats(learner.config, bn_stats)
    blended = bn_stats in _BLENDED
    if blended and not support_size:
        raise ValueError(f"a {bn_stats} task model needs the support size")
    return learner.backbone.variant(
        num_steps=1, per_step_bn=True, bn_stats=bn_stats if blended else "running",
        context_size=support_size if blended else None, name="task_network")


def bake_task(learner: MamlPlusPlus, network: Backbone, support_x: tf.Tensor,
              support_y: tf.Tensor, bn_stats: str) -> None:
    """Adapts to a support set and stores the result in `network` (a `task_network`).

    Works eagerly and inside a `tf.function`. `network.forward(x,
    network.initial_params(), 0, False)` then gives the task model's logits.

    Args:
      learner: The meta-trained learner (left unchanged).
      network: Receives the adapted weights, the last step's batch-norm
        variables and the fixed statistics.
      support_x: Support images `[n, H, W, C]` in the learner's dtype.
      support_y: Labels `[n]` in `[0, n_way)`.
      bn_stats: One of `BN_STATS` (see the module docstring).

    Raises:
      ValueError: as `check_bn_stats`.
    """
    check_bn_stats(learner.config, bn_stats)
    # The batch-norm row of the last evaluation step (the last trained one's beyond them).
    step = learner.trained_step(learner.config.eval_inner_steps - 1)
    params = learner.adapt(support_x, support_y)
    # training=True: the support set's own statistics in every layer, which
    # is what a query pass of the context modes normalises with.
    _, moments = learner.backbone.forward(support_x, params, step, True)
    statistics = [(m.mean, m.variance) for m in moments]
    for name, value in params.items():
        network.weights_by_name[name].assign(value)
    for source, target, (mean, variance) in zip(learner.backbone.norms, network.norms,
                                                statistics):
        rows = [(target.gamma, source.gamma), (target.beta, source.beta)]
        if bn_stats == "tasknorm":
            rows += [(target.alpha_scale, source.alpha_scale),
                     (target.alpha_offset, source.alpha_offset)]
        for variable, value in rows:
            variable.assign(_one_step(tf.convert_to_tensor(value), step, variable.shape))
        target.running_mean.assign(mean[None])
        target.running_var.assign(variance[None])


def _one_step(value: tf.Tensor, step: int, shape: tf.TensorShape) -> tf.Tensor:
    """Row `step` of a learner's batch-norm variable, as the one-step task model's `shape`.

    A per-step variable gives its row; one shared by all steps (plain MAML's,
    or TaskNorm's per-layer α) is kept whole, with a step axis if `shape`
    has one.
    """
    if value.shape == shape:
        return value
    if value.shape.rank == shape.rank:
        return value[step:step + 1]
    return value[None]


def served_logits_fn(learner: MamlPlusPlus, bn_stats: str,
                     support_size: int) -> Callable[[tf.Tensor, tf.Tensor, tf.Tensor],
                                                    tf.Tensor]:
    """`f(support_x, support_y, query_x) -> logits`: one task through its task model.

    The traced function bakes the task model of `support_x` and classifies
    `query_x` with it. Its statistics are fixed, so every query's logits are
    those it gets alone (the export tests check this to 1e-6).

    Args:
      learner: The meta-trained learner (left unchanged).
      bn_stats: One of `BN_STATS`.
      support_size: Support images per task (every call must match it).
    """
    network = task_network(learner, bn_stats, support_size)

    def served(support_x: tf.Tensor, support_y: tf.Tensor, query_x: tf.Tensor) -> tf.Tensor:
        bake_task(learner, network, support_x, support_y, bn_stats)
        logits, _ = network.forward(query_x, network.initial_params(), 0, False)
        return logits

    return tf.function(served, autograph=False)
