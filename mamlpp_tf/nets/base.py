"""The backbone interface the learner talks to, and a base class for networks that implement it.

A backbone is a network whose adaptable weights are *explicit arguments* of its
forward pass: `forward(x, params, step, training, context)` takes the fast
weights as a dict keyed by stable names, so the inner loop never mutates a
layer (what keeps second-order gradients connected in TF2). The inner step
`step` selects the row of every per-step batch norm, and `context` names the
leading images whose statistics normalise the pass (the support set under the
non-transductive `bn_stats` modes).

`Backbone` states the interface as a `typing.Protocol`; `check_backbone` checks
an object against it when a learner is built, naming what is missing.
`FastWeightNetwork` is the base of the built-in networks (`nets.vgg`,
`nets.resnet12`, `nets.mlp`): it keeps the fast weights by name, reads them as
`θ_0`, builds the one-step copies that task models need, and casts products to
a mixed dtype policy's compute dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import keras
import tensorflow as tf

from mamlpp_tf.nets.layers import PerStepBatchNorm, moment_count

POOL_IMPLS = ("max_pool", "reshape")


class BatchMoments(NamedTuple):
    """Batch statistics of one batch-norm layer in one pass, for running-stat updates.

    Attributes:
      mean: `[C]` (single task) or `[T, C]` (task-batched).
      variance: Biased variance, same shape as `mean`.
      count: Elements per channel each statistic was computed from.
    """
    mean: tf.Tensor
    variance: tf.Tensor
    count: int | tf.Tensor


@runtime_checkable
class Backbone(Protocol):
    """What the learner needs of a network.

    Attributes:
      param_names: Names of the adaptable tensors (the fast weights), in
        network order.
      weights_by_name: The variables holding `θ_0`, by those names.
      norms: The network's `PerStepBatchNorm` layers in pass order (the
        moments `forward` returns follow it).
      trainable_variables: Every meta-parameter of the network (fast weights
        and batch-norm gamma/beta, TaskNorm's blend).
      non_trainable_variables: The batch norms' running statistics.
      compute_dtype: The dtype the network computes in.

    A network may also have `forward_tasks(x, params, step, training, context)`:
    the same function for a stack of tasks (`x [T, B, ...]`, every fast weight
    with a leading task axis), which the `batched` task layout runs.

    Optional members for the variants that adapt part of the network
    (`--adapt=head|body`, see `head_names`):

    * `head_param_names`: the names of `param_names` that belong to the
      classifier head (the last layer's kernel and bias), in network order.
    * `forward_body(x, params, step, training, context)` → `(features,
      moments)` and `forward_head(features, params)` → `logits`, with
      `forward = forward_head ∘ forward_body` (the head reads only the
      `head_param_names` weights, the body only the others), and their
      task-batched forms `forward_body_tasks` and `forward_head_tasks` beside
      `forward_tasks`. With them ANIL computes the body's features once per
      task and batch-norm row and reuses them across inner steps; without
      them it runs the whole `forward` at every step (the same numbers).
    """

    param_names: Sequence[str]
    weights_by_name: Mapping[str, keras.Variable]
    norms: Sequence[PerStepBatchNorm]
    trainable_variables: list
    non_trainable_variables: list
    compute_dtype: Any

    def initial_params(self) -> dict[str, tf.Tensor]:
        """The fast weights `θ_0`, read from `weights_by_name` (differentiably)."""

    def forward(self, x: tf.Tensor, params: Mapping[str, tf.Tensor], step: int,
                training: bool, context: int | tf.Tensor | None = None
                ) -> tuple[tf.Tensor, list[BatchMoments]]:
        """`(logits [B, n_way], moments of each norm)` of images `x [B, ...]` under `params`."""

    def variant(self, **overrides: Any) -> Backbone:
        """The same network with fresh variables and other batch-norm settings.

        `overrides` are any of `num_steps`, `per_step_bn`, `bn_stats`,
        `context_size` (see `PerStepBatchNorm`) and `name`; the task model
        (`mamlpp_tf.task_model`) asks for a one-step copy with stored
        statistics.
        """


REQUIRED_MEMBERS = ("param_names", "weights_by_name", "norms", "trainable_variables",
                    "non_trainable_variables", "compute_dtype", "initial_params", "forward",
                    "variant")
VARIANT_OVERRIDES = ("num_steps", "per_step_bn", "bn_stats", "context_size", "name")


def check_backbone(backbone: Any) -> None:
    """Checks `backbone` against `Backbone`.

    Raises:
      TypeError: naming the first missing member, or a `param_names` entry
        without a variable in `weights_by_name`.
    """
    kind = type(backbone).__name__
    for member in REQUIRED_MEMBERS:
        if not hasattr(backbone, member):
            raise TypeError(f"{kind} is not a mamlpp_tf backbone: it has no `{member}` "
                            f"(a backbone needs {', '.join(REQUIRED_MEMBERS)}; see "
                            "mamlpp_tf.nets.Backbone)")
    for member in ("initial_params", "forward", "variant"):
        if not callable(getattr(backbone, member)):
            raise TypeError(f"{kind}.{member} must be a method (see mamlpp_tf.nets.Backbone)")
    missing = [name for name in backbone.param_names if name not in backbone.weights_by_name]
    if missing or not backbone.param_names:
        raise TypeError(f"{kind}.param_names must be non-empty names of weights_by_name; "
                        f"{missing[:1] or 'none given'} has no variable")


def has_task_batched_pass(backbone: Backbone) -> bool:
    """Whether `backbone` has `forward_tasks`, the pass of the `batched` task layout."""
    return callable(getattr(backbone, "forward_tasks", None))


def head_names(backbone: Backbone) -> list[str]:
    """The classifier head's fast weights of `backbone`: its checked `head_param_names`.

    Raises:
      TypeError: `backbone` has no `head_param_names`.
      ValueError: `head_param_names` is empty, names a weight outside
        `param_names`, or names all of them (the body would be empty).
    """
    kind = type(backbone).__name__
    if not hasattr(backbone, "head_param_names"):
        raise TypeError(f"{kind} has no `head_param_names` (the names of its classifier "
                        "head's fast weights, see mamlpp_tf.nets.Backbone): adapting only "
                        "the head (adapt='head', ANIL) or only the body (adapt='body', BOIL) "
                        "needs it")
    head = list(backbone.head_param_names)
    outside = [name for name in head if name not in backbone.param_names]
    if not head or outside or len(set(head)) == len(backbone.param_names):
        raise ValueError(f"{kind}.head_param_names must be some but not all of param_names; "
                         f"got {head}" + (f" ({outside[0]!r} is not a fast weight)"
                                          if outside else ""))
    return [name for name in backbone.param_names if name in head]


def has_body_head_split(backbone: Backbone, batched: bool) -> bool:
    """Whether `backbone` has the body/head passes of the given task layout."""
    suffix = "_tasks" if batched else ""
    return all(callable(getattr(backbone, f"forward_{part}{suffix}", None))
               for part in ("body", "head"))


def pool(x: tf.Tensor, impl: str) -> tf.Tensor:
    """2×2/2 max pooling with floor, on `[B, H, W, C]`.

    `reshape` pools with `reduce_max` over a reshape, whose second derivative
    XLA computes exactly (XLA's max-pool second derivative does not). The two
    differ only where a window has tied maxima: `max_pool` routes the gradient
    to one of them (as PyTorch does), `reduce_max` splits it.
    """
    if impl == "max_pool":
        return tf.nn.max_pool2d(x, ksize=2, strides=2, padding="VALID")
    height, width = x.shape[1] // 2, x.shape[2] // 2
    x = x[:, :2 * height, :2 * width, :]
    x = tf.reshape(x, [-1, height, 2, width, 2, x.shape[-1]])
    return tf.reduce_max(x, axis=[2, 4])


class FastWeightNetwork(keras.layers.Layer):
    """Base of the built-in backbones: fast weights by name, `θ_0`, variants, mixed precision.

    A subclass creates its fast weights in `build` with `add_fast_weight` and
    its batch norms with `add_norm`, lists its adaptable names in
    `param_names`, implements `forward` (and optionally `forward_tasks`), and
    returns every constructor argument from `get_config`, the batch-norm ones
    under the names of `VARIANT_OVERRIDES`.

    Args:
      num_steps: Inner steps `S`, i.e. rows of the per-step batch norms.
      per_step_bn: Per-step gamma/beta/statistics (MAML++) or shared (MAML).
      bn_stats: One of `layers.BN_STATS_MODES`; see `PerStepBatchNorm`.
      context_size: For an exported task model under `"tasknorm"` or `"rn"`:
        the support size its stored context moments come from.
      tasknorm_alpha: TaskNorm's α granularity (`layers.TASKNORM_ALPHAS`).
      tasknorm_unbiased: TaskNorm blends unbiased variances.
      **kwargs: Standard layer arguments (`name`, `dtype`). A mixed dtype
        policy (`"mixed_bfloat16"`) runs the products given to `low_precision`
        in its compute dtype; variables, batch norm and everything the inner
        loop updates stay in the variable dtype.
    """

    def __init__(self, num_steps: int = 5, per_step_bn: bool = True, bn_stats: str = "batch",
                 context_size: int | None = None, tasknorm_alpha: str = "step",
                 tasknorm_unbiased: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.num_steps = int(num_steps)
        self.per_step_bn = bool(per_step_bn)
        self.bn_stats = bn_stats
        self.context_size = context_size
        self.tasknorm_alpha = tasknorm_alpha
        self.tasknorm_unbiased = bool(tasknorm_unbiased)
        self.norms: list[PerStepBatchNorm] = []
        self.weights_by_name: dict[str, keras.Variable] = {}

    def add_norm(self, name: str) -> PerStepBatchNorm:
        """A per-step batch norm with the network's settings, tracked as attribute `name`."""
        norm = PerStepBatchNorm(self.num_steps, per_step=self.per_step_bn,
                                bn_stats=self.bn_stats, context_size=self.context_size,
                                tasknorm_alpha=self.tasknorm_alpha,
                                tasknorm_unbiased=self.tasknorm_unbiased,
                                name=name, dtype=self.dtype_policy.variable_dtype)
        self.norms.append(norm)
        # Plain attributes are what tf.train.Checkpoint tracks (not list items).
        setattr(self, name, norm)
        return norm

    def add_fast_weight(self, name: str, shape: Sequence[int],
                        initializer: str | keras.initializers.Initializer) -> keras.Variable:
        """An adaptable weight, kept in `weights_by_name[name]` and tracked as an attribute."""
        variable = self.add_weight(name=name.replace("/", "_"), shape=tuple(shape),
                                   initializer=initializer)
        self.weights_by_name[name] = variable
        # Plain attributes are what tf.train.Checkpoint tracks (not dict items).
        setattr(self, name.replace("/", "_"), variable)
        return variable

    def initial_params(self) -> dict[str, tf.Tensor]:
        """The meta-parameters as the fast weights `θ_0` of an inner loop.

        Read inside a `GradientTape`, the outer gradient flows back to the
        variables through these tensors.
        """
        return {name: tf.convert_to_tensor(self.weights_by_name[name])
                for name in self.param_names}

    def variant(self, **overrides: Any) -> FastWeightNetwork:
        """This network rebuilt with fresh variables and other batch-norm settings.

        Raises:
          TypeError: an override other than those of `VARIANT_OVERRIDES`.
        """
        unknown = set(overrides) - set(VARIANT_OVERRIDES)
        if unknown:
            raise TypeError(f"variant() takes only {VARIANT_OVERRIDES}, got {sorted(unknown)}")
        return type(self).from_config({**self.get_config(), **overrides})

    def low_precision(self, fn: Callable[..., tf.Tensor], *tensors: tf.Tensor) -> tf.Tensor:
        """`fn(*tensors)` computed in the compute dtype, returned in the first tensor's dtype.

        With a plain dtype policy both casts are no-ops (`tf.cast` adds no op
        when the dtype already matches), so the float32/float64 graph is
        unchanged. Under `"mixed_bfloat16"` the products run in bfloat16
        (oneDNN's AVX-512 BF16 kernels where the CPU has them) and their
        gradients come back through the casts in the same precision.
        """
        dtype = tensors[0].dtype
        result = fn(*(tf.cast(t, self.compute_dtype) for t in tensors))
        return tf.cast(result, dtype)

    def normalize(self, norm: PerStepBatchNorm, x: tf.Tensor, moments: list[BatchMoments],
                  *, step: int, training: bool, context: int | tf.Tensor | None,
                  axes: Sequence[int] | None = None) -> tf.Tensor:
        """`norm` applied to `x`, its batch moments appended to `moments`.

        Args:
          norm: One of `self.norms`.
          x: Activations `[..., C]`.
          moments: The pass's moments so far.
          step: Inner step selecting the per-step row.
          training: Meta-training pass.
          context: Leading images (along `axes[0]`) whose statistics normalise.
          axes: Axes of one batch, the batch axis first; all but the last by
            default (a task-batched pass gives e.g. `(1, 2, 3)`).
        """
        axes = tuple(range(x.shape.rank - 1)) if axes is None else tuple(axes)
        count = moment_count(x, axes, context)
        x, mean, variance = norm.normalize(x, step=step, training=training, axes=axes,
                                           context=context)
        moments.append(BatchMoments(mean, variance, count))
        return x

    def get_config(self) -> dict:
        """The batch-norm settings; subclasses add their own arguments."""
        config = super().get_config()
        config.update(num_steps=self.num_steps, per_step_bn=self.per_step_bn,
                      bn_stats=self.bn_stats, context_size=self.context_size,
                      tasknorm_alpha=self.tasknorm_alpha,
                      tasknorm_unbiased=self.tasknorm_unbiased)
        return config
