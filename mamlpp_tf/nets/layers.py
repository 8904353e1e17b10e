"""MAML++'s per-step batch norm (BNWB+BNRS) and its normalisation modes, for every network.

The layer is stateless with respect to the inner loop: it never holds fast
weights. The network passes the step index (a Python int, because the inner
loop is unrolled) and the context set; the layer contributes its own
meta-parameters (gamma/beta per step, TaskNorm's blend) and keeps the per-step
running statistics.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf

BN_STATS_MODES = ("batch", "running", "support", "tasknorm", "rn")
# `bn_stats` modes whose statistics come from the support set (plus, for
# TaskNorm and RN, the image itself), so that a query's answer never depends
# on the other queries.
CONTEXT_BN_STATS = ("support", "tasknorm", "rn")
# Modes that blend the context moments with each image's instance moments.
BLENDED_BN_STATS = ("tasknorm", "rn")
# What TaskNorm's blend α is learned for: each step of a layer (one scalar
# per step), the layer (one scalar, the reference code's), or each channel
# and step.
TASKNORM_ALPHAS = ("step", "layer", "channel")


def batch_moments(x: tf.Tensor, axes: Sequence[int]
                  ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Mean, biased variance and centred input of `x` over `axes`, differentiable twice.

    `tf.nn.moments` stops the gradient through the mean inside the variance,
    which keeps first derivatives right but makes the second derivatives that
    second-order MAML needs wrong. Computing `mean(square(x - mean))` keeps the
    whole dependency in the graph. The centred input is returned so that
    normalisation reuses it: one full-size tensor instead of two, in the
    forward pass and in what the gradients keep.

    Args:
        x: Input tensor.
        axes: Axes to reduce.

    Returns:
        `(mean, variance, centred)`: mean and variance keep the reduced axes
        (size 1), `centred = x - mean`.
    """
    mean = tf.reduce_mean(x, axis=axes, keepdims=True)
    centred = x - mean
    variance = tf.reduce_mean(tf.square(centred), axis=axes, keepdims=True)
    return mean, variance, centred


def leading_rows(x: tf.Tensor, axis: int, rows: int | tf.Tensor) -> tf.Tensor:
    """The first `rows` entries of `x` along `axis`."""
    return x[(slice(None),) * axis + (slice(0, rows),)]


def _size(x: tf.Tensor, axis: int) -> int | tf.Tensor:
    """Length of `x` along `axis`: static when known, else a scalar tensor."""
    return tf.shape(x)[axis] if x.shape[axis] is None else x.shape[axis]


def _unbiased(variance: tf.Tensor, count: int | tf.Tensor) -> tf.Tensor:
    """The unbiased estimate of a biased `variance` of `count` elements (as is, for one)."""
    count = tf.cast(count, variance.dtype)
    return variance * count / tf.maximum(count - 1.0, 1.0)


@keras.saving.register_keras_serializable(package="mamlpp_tf")
class PerStepBatchNorm(keras.layers.Layer):
    """Batch norm with one set of gamma/beta and running statistics per inner step.

    MAML++'s BNWB+BNRS: the network uses row `step` of `gamma`, `beta`,
    `running_mean` and `running_var` at inner step `step`. Gamma and beta are
    meta-parameters: the outer optimiser trains them, the inner loop never
    adapts them.

    A pass may name its first `context` images (along the batch axis) as the
    context set: the batch statistics are then computed from those images
    alone and applied to every image of the pass. The learner passes a task's
    support set as the context of its query passes under the context modes.

    Normalisation statistics (`bn_stats`):
    * `"batch"` — what the official PyTorch code really does: every pass,
      support and query, training and evaluation, is normalised with the
      statistics of its own batch (transductive over the query set).
      Running statistics are tracked but never read.
    * `"running"` — training passes use batch statistics; evaluation passes
      (`training=False`) use the stored statistics of row `step`. A served
      task model's layers use it, with the support set's statistics stored
      there; a learner trained this way (the paper's stated BNRS intent,
      the per-step running statistics at evaluation) scores at chance, so
      `LearnerConfig` refuses it.
    * `"support"` — MetaBN (Bronskill et al., ICML 2020): the statistics of
      the context (support) images, in training and evaluation alike; the
      learner makes every query pass carry the support set as its context.
    * `"tasknorm"` — TaskNorm-I (Bronskill et al., ICML 2020): the context
      moments blended with each image's own instance moments (over H, W),
      `μ = α·μ_ctx + (1−α)·μ_img`, `σ² = α·(σ²_ctx + (μ_ctx−μ)²) +
      (1−α)·(σ²_img + (μ_img−μ)²)`, with `α = sigmoid(a·n + b)` for a context
      of `n` images and meta-learned `a`, `b`, initialised to 0 (α = 0.5) as
      in the reference code (cambridge-mlg/cnaps). Every image of a pass,
      the context's own included, is normalised with its blended moments.
      `tasknorm_alpha` says what `a`, `b` are learned for (`TASKNORM_ALPHAS`:
      each step, the layer as the reference does, or each channel and step);
      `tasknorm_unbiased` uses unbiased variances as the reference does
      (the biased ones by default).
    * `"rn"` — Reptile's non-transductive "reptile normalisation" (Nichol et
      al. 2018): a pass without a context (the support set adapting) uses its
      own batch statistics; every image of a pass with a context is
      normalised with the moments of the context *plus that image*, i.e. the
      blend above with the fixed `α = n/(n+1)`; the context images of such a
      pass keep the context's own moments, as in their own pass, so that the
      support moments a task model stores are the ones every later layer
      sees. A query's answer depends on the support set and itself only.

    A layer of an exported task model (`context_size` set) has no support set
    at hand: at evaluation it reads its context moments from the
    `running_mean`/`running_var` row, computed from `context_size` support
    images when the model was exported. Under `"support"` that is the
    `"running"` computation, so only the blended modes take `context_size`.

    Running statistics follow PyTorch's convention: `running = (1 - momentum) *
    running + momentum * batch_stat` with momentum 0.1 and the *unbiased* batch
    variance. They are not updated inside `call`: the learner gathers the batch
    moments of a meta-batch and calls `update_running_stats` once per pass, so
    the update does not depend on how tasks are laid out (per-task loop, task
    batching or replicas).

    With `per_step=False` the layer is the plain-MAML baseline: one shared
    gamma/beta of shape `[C]` (and one `a`, `b`), no running statistics.

    Args:
        num_steps: Number of inner steps `S` (rows of the per-step variables).
        per_step: Per-step variables (MAML++) or one shared set (MAML).
        bn_stats: One of `BN_STATS_MODES` (see above).
        momentum: PyTorch-style running-statistics momentum.
        epsilon: Added to the variance before the square root.
        context_size: For a served task's `"tasknorm"` or `"rn"` layer: the
            support size its stored context moments come from. None for a
            learner's layers.
        tasknorm_alpha: One of `TASKNORM_ALPHAS` (`"tasknorm"` only).
        tasknorm_unbiased: Blend unbiased variances (`"tasknorm"` only).
        **kwargs: Standard `keras.layers.Layer` arguments (`name`, `dtype`).

    Raises:
        ValueError: on a non-positive `num_steps`, an unknown `bn_stats` or
            `tasknorm_alpha`, `bn_stats="running"` with `per_step=False`,
            `context_size` without a blended `bn_stats` and `per_step`, or
            TaskNorm options with another mode.
    """

    def __init__(self,
                 num_steps: int,
                 per_step: bool = True,
                 bn_stats: str = "batch",
                 momentum: float = 0.1,
                 epsilon: float = 1e-5,
                 context_size: int | None = None,
                 tasknorm_alpha: str = "step",
                 tasknorm_unbiased: bool = False,
                 **kwargs):
        super().__init__(**kwargs)
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
        if bn_stats not in BN_STATS_MODES:
            raise ValueError(f"bn_stats must be one of {BN_STATS_MODES}, got {bn_stats!r}.")
        if bn_stats == "running" and not per_step:
            raise ValueError("bn_stats='running' needs per_step=True: the shared "
                             "(plain MAML) batch norm keeps no running statistics.")
        if context_size is not None and (bn_stats not in BLENDED_BN_STATS or not per_step or
                                         context_size < 1):
            raise ValueError("context_size (stored context moments) needs bn_stats in "
                             f"{BLENDED_BN_STATS}, per_step=True and a positive size; got "
                             f"{context_size} with bn_stats={bn_stats!r}, per_step={per_step}.")
        if tasknorm_alpha not in TASKNORM_ALPHAS:
            raise ValueError(f"tasknorm_alpha must be one of {TASKNORM_ALPHAS}, got "
                             f"{tasknorm_alpha!r}.")
        if bn_stats != "tasknorm" and (tasknorm_alpha != "step" or tasknorm_unbiased):
            raise ValueError(f"tasknorm_alpha={tasknorm_alpha!r} and tasknorm_unbiased="
                             f"{tasknorm_unbiased} are TaskNorm's options; bn_stats is "
                             f"{bn_stats!r}.")
        self.num_steps = int(num_steps)
        self.per_step = bool(per_step)
        self.bn_stats = bn_stats
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.context_size = None if context_size is None else int(context_size)
        self.tasknorm_alpha = tasknorm_alpha
        self.tasknorm_unbiased = bool(tasknorm_unbiased)

    def build(self, input_shape: Sequence[int | None]) -> None:
        """Creates gamma/beta, TaskNorm's `a`, `b` and the per-step running statistics."""
        channels = int(input_shape[-1])
        shape = (self.num_steps, channels) if self.per_step else (channels,)
        self.gamma = self.add_weight(name="gamma",
                                     shape=shape,
                                     initializer="ones",
                                     trainable=True)
        self.beta = self.add_weight(name="beta",
                                    shape=shape,
                                    initializer="zeros",
                                    trainable=True)
        if self.bn_stats == "tasknorm":
            rows = (self.num_steps,) if self.per_step and self.tasknorm_alpha != "layer" else ()
            if self.tasknorm_alpha == "channel":
                rows += (channels,)
            # α = sigmoid(a·n + b): 0.5 at initialisation, as in the reference code.
            self.alpha_scale = self.add_weight(name="alpha_scale", shape=rows,
                                               initializer="zeros", trainable=True)
            self.alpha_offset = self.add_weight(name="alpha_offset", shape=rows,
                                                initializer="zeros", trainable=True)
        if self.per_step:
            self.running_mean = self.add_weight(name="running_mean",
                                                shape=shape,
                                                initializer="zeros",
                                                trainable=False,
                                                aggregation="mean")
            self.running_var = self.add_weight(name="running_var",
                                               shape=shape,
                                               initializer="ones",
                                               trainable=False,
                                               aggregation="mean")

    def _row(self, variable: keras.Variable, step: int) -> tf.Tensor:
        if not self.per_step or variable.shape.rank == 0:  # Shared, or a per-layer α.
            return tf.convert_to_tensor(variable)
        if not 0 <= step < self.num_steps:
            raise ValueError(f"step {step} outside the {self.num_steps} per-step "
                             f"rows of {self.name}.")
        return tf.convert_to_tensor(variable)[step]

    def alpha(self, step: int, context_size: int | tf.Tensor) -> tf.Tensor:
        """The blend of step `step` for `n` context images.

        TaskNorm's learned `α = sigmoid(a·n + b)` (a scalar, or `[C]` per
        channel), or RN's `n/(n+1)`: the context's share of the `n+1` images
        whose moments normalise one image.
        """
        n = tf.cast(context_size, self.compute_dtype)
        if self.bn_stats == "rn":
            return n / (n + 1.0)
        return tf.sigmoid(self._row(self.alpha_scale, step) * n +
                          self._row(self.alpha_offset, step))

    def call(self,
             x: tf.Tensor,
             step: int = 0,
             training: bool | None = None,
             axes: Sequence[int] | None = None,
             context: int | tf.Tensor | None = None) -> tf.Tensor:
        """Normalises `x` with the statistics `bn_stats` prescribes.

        Args:
            x: Activations `[..., C]`.
            step: Inner step (Python int) selecting the per-step row.
            training: Whether this is a meta-training pass. Only the `"running"`
                mode and stored-context layers look at it.
            axes: Axes holding one batch, the batch axis first. Defaults to all
                but the last; a task-batched caller passes e.g. `(1, 2, 3)` so
                each task keeps its own statistics.
            context: Images (along the batch axis) whose statistics normalise
                the whole pass; None = all of them.

        Returns:
            The normalised, scaled and shifted tensor.
        """
        return self.normalize(x, step=step, training=training, axes=axes,
                              context=context)[0]

    def normalize(self,
                  x: tf.Tensor,
                  *,
                  step: int,
                  training: bool | None,
                  axes: Sequence[int] | None = None,
                  context: int | tf.Tensor | None = None
                  ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """`call`, also returning the batch moments for `update_running_stats`.

        The network calls this directly, so that the moments it records and
        the ones it normalises with are one computation.

        Args:
            x: Activations `[..., C]`.
            step: Inner step (Python int) selecting the per-step row.
            training: As in `call`.
            axes: As in `call`.
            context: As in `call`.

        Returns:
            `(normalised x, batch mean, biased batch variance)`: the moments of
            the context images (all images without a context) with `axes`
            removed (e.g. `[C]`, or `[T, C]` for `axes=(1, 2, 3)`).
        """
        axes = tuple(range(x.shape.rank - 1)) if axes is None else tuple(axes)
        gamma, beta = self._row(self.gamma, step), self._row(self.beta, step)
        sample = x if context is None else leading_rows(x, axes[0], context)
        mean, variance, centred = batch_moments(sample, axes)
        moments = tf.squeeze(mean, axes), tf.squeeze(variance, axes)
        stored = not training and (self.bn_stats == "running" or self.context_size is not None)
        if stored:
            mean = self._row(self.running_mean, step)
            variance = self._row(self.running_var, step)
        # RN's support pass (no context) keeps the support set's own statistics.
        blended = self.bn_stats == "tasknorm" or (self.bn_stats == "rn" and
                                                 (context is not None or stored))
        if blended:
            size = self.context_size if stored else _size(sample, axes[0])
            pooled_mean, pooled_variance = self._blend(x, axes, size, self.alpha(step, size),
                                                       mean, variance)
            if self.bn_stats == "rn" and context is not None:
                # The context images keep their own moments, as in their own
                # pass, so a task model's stored support moments are the ones
                # this pass's later layers see.
                is_context = tf.range(_size(x, axes[0])) < context
                shape = [1] * x.shape.rank
                shape[axes[0]] = -1
                is_context = tf.reshape(is_context, shape)
                pooled_mean = tf.where(is_context, mean, pooled_mean)
                pooled_variance = tf.where(is_context, variance, pooled_variance)
            mean, variance = pooled_mean, pooled_variance
        if context is not None or stored or blended:
            centred = x - mean
        # Scale and gamma meet at the statistics' size before touching `x`.
        normalised = centred * (tf.math.rsqrt(variance + self.epsilon) * gamma) + beta
        return (normalised,) + moments

    def _blend(self, x: tf.Tensor, axes: Sequence[int], context_size: int | tf.Tensor,
               alpha: tf.Tensor, mean: tf.Tensor, variance: tf.Tensor
               ) -> tuple[tf.Tensor, tf.Tensor]:
        """The pooled moments of every image: context and instance moments blended.

        Args:
            x: Activations `[..., C]`.
            axes: The batch's axes, the batch axis first; the others are an
                image's own (spatial) axes.
            context_size: Images the context `mean` and `variance` come from.
            alpha: The context's weight.
            mean: Context mean (reduced axes kept).
            variance: Biased context variance (reduced axes kept).
        """
        spatial_axes = axes[1:]
        instance_mean, instance_variance, _ = batch_moments(x, spatial_axes)
        if self.tasknorm_unbiased:
            pixels = 1
            for axis in spatial_axes:
                pixels *= _size(x, axis)
            variance = _unbiased(variance, context_size * pixels)
            instance_variance = _unbiased(instance_variance, pixels)
        pooled_mean = alpha * mean + (1.0 - alpha) * instance_mean
        pooled_variance = (
            alpha * (variance + tf.square(mean - pooled_mean)) +
            (1.0 - alpha) * (instance_variance + tf.square(instance_mean - pooled_mean)))
        return pooled_mean, pooled_variance

    def update_running_stats(self, step: int, mean: tf.Tensor, variance: tf.Tensor,
                             count: int | tf.Tensor) -> None:
        """Applies one PyTorch-style momentum update to row `step`.

        Args:
            step: Row to update.
            mean: Batch mean `[C]` (already averaged over tasks if several).
            variance: Biased batch variance `[C]`; converted to the unbiased
                estimate with `count` as PyTorch does.
            count: Number of elements each statistic was computed from.
        """
        if not self.per_step:
            return
        unbiased = _unbiased(variance, count)
        m = self.momentum
        one_hot = tf.one_hot(step, self.num_steps, dtype=self.running_mean.dtype)[:,
                                                                                  None]
        for variable, value in ((self.running_mean, mean), (self.running_var,
                                                            unbiased)):
            current = tf.convert_to_tensor(variable)
            variable.assign(current + one_hot * m *
                            (tf.stop_gradient(value)[None] - current))

    def get_config(self) -> dict:
        """The constructor arguments, for Keras serialization."""
        config = super().get_config()
        config.update(num_steps=self.num_steps,
                      per_step=self.per_step,
                      bn_stats=self.bn_stats,
                      momentum=self.momentum,
                      epsilon=self.epsilon,
                      context_size=self.context_size,
                      tasknorm_alpha=self.tasknorm_alpha,
                      tasknorm_unbiased=self.tasknorm_unbiased)
        return config
