"""MAML++'s per-step batch norm (BNWB+BNRS) and its normalisation modes, for every network.

The layer is stateless with respect to the inner loop: it never holds fast
weights. The network passes the step index (a Python int, because the inner
loop is unrolled) and the context set; the layer contributes its own
meta-parameters (gamma/beta per step, TaskNorm's blend) and keeps the per-step
running statistics.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import contextlib
import math
import threading

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
    forward pass and in what the gradients keep. TensorFlow differentiates
    these ops itself; `standardize` is the same computation with a
    hand-derived gradient.

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


def standardize(x: tf.Tensor, axes: Sequence[int], epsilon: float
                ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """Batch moments of `x` over `axes` for normalisation, with a hand-derived gradient.

    The forward ops are `batch_moments`' and `rsqrt(variance + ε)`. The
    gradient, from `centred = x - mean` and `var = mean(centred²)` (whose
    own gradient has no mean term, as `Σ centred = 0`), is

        dx = dcentred - mean(dcentred) + dmean/n
             + centred · (2/n)·(dvar - inv_std³·dinv_std/2)

    (one reduction and three activation-sized operations, where
    TensorFlow's derivative of the forward ops broadcasts the mean and the
    variance gradients with `Tile` and differentiates the square). It is
    written in differentiable ops of `x`'s outputs here, so higher orders
    stay exact. The second-order meta-gradient reaches this gradient when it
    differentiates `normalize_with_batch_statistics`' own gradient.

    Args:
        x: Activations `[..., C]`.
        axes: Axes to reduce.
        epsilon: Added to the variance before the square root.

    Returns:
        `(mean, variance, centred, inv_std)`: `mean`, the biased `variance`
        and `inv_std = rsqrt(variance + ε)` keep the reduced axes (size 1);
        `centred = x - mean`.
    """
    axes = tuple(axes)
    count = moment_count(x, axes, None)

    outputs = []  # The op's own outputs, which the gradient reads (exact at any order).

    @tf.custom_gradient
    def moments(x):
        mean, variance, centred = batch_moments(x, axes)
        inv_std = tf.math.rsqrt(variance + epsilon)

        def gradient(dmean, dvariance, dcentred, dinv_std):
            _, _, centred, inv_std = outputs
            n = tf.cast(count, centred.dtype)
            shift = -tf.reduce_mean(dcentred, axis=axes, keepdims=True) + dmean / n
            slope = 2.0 / n * (dvariance - 0.5 * inv_std * tf.square(inv_std) * dinv_std)
            return dcentred + (centred * slope + shift)

        return (mean, variance, centred, inv_std), gradient

    outputs.extend(moments(x))
    return tuple(outputs)


def normalize_with_batch_statistics(centred: tf.Tensor, inv_std: tf.Tensor,
                                    gamma: tf.Tensor, beta: tf.Tensor, x: tf.Tensor,
                                    axes: Sequence[int]) -> tf.Tensor:
    """`centred · inv_std · gamma + beta`, with batch norm's gradient derived by hand.

    `centred = x - mean(x)` and `inv_std = rsqrt(var(x) + ε)` are `x`'s own
    moments over `axes` (`standardize`). The gradient with respect to `x` is
    batch norm's closed form (Ioffe & Szegedy, 2015),

        dx = s·dy - s·mean(dy) - centred · s·inv_std²·mean(dy·centred),
        s = gamma·inv_std,

    which takes two reductions (`Σdy`, `Σdy·centred`, shared with the
    gradients of gamma and beta) and four activation-sized operations, where
    TensorFlow's own derivative of the forward ops broadcasts and accumulates
    more activation-sized tensors. The expression is written in
    differentiable ops of this function's inputs, which an outer tape has
    recorded as functions of `x`, so an outer tape differentiates it exactly:
    the second-order meta-gradient is unchanged (float64 checks in
    tests/test_layers.py and tests/test_meta_gradients.py). No gradient flows
    through the `centred` and `inv_std` arguments themselves: the `x`
    gradient already accounts for the moments.

    Args:
        centred: `x - mean(x)` over `axes`.
        inv_std: `rsqrt(var(x) + ε)`, the reduced axes kept.
        gamma: Scale, broadcastable to `x` (e.g. `[C]`).
        beta: Shift, broadcastable to `x`.
        x: Activations `[..., C]` whose moments these are.
        axes: The axes the moments reduce.

    Returns:
        The normalised, scaled and shifted `x`.
    """
    axes = tuple(axes)
    count = moment_count(x, axes, None)
    gamma_axes = tuple(range(x.shape.rank - gamma.shape.rank))
    beta_axes = tuple(range(x.shape.rank - beta.shape.rank))

    @tf.custom_gradient
    def scale_and_shift(centred, inv_std, gamma, beta, x):
        del x  # An input only so that its gradient is defined here.

        def gradient(dy):
            n = tf.cast(count, dy.dtype)
            scale = inv_std * gamma
            sum_dy = tf.reduce_sum(dy, axis=axes, keepdims=True)
            sum_dy_centred = tf.reduce_sum(dy * centred, axis=axes, keepdims=True)
            dx = (dy * scale - scale * sum_dy / n -
                  centred * (scale * tf.square(inv_std) * sum_dy_centred / n))
            dgamma = tf.reduce_sum(sum_dy_centred * inv_std, axis=gamma_axes)
            dbeta = tf.reduce_sum(sum_dy, axis=beta_axes)
            return None, None, dgamma, dbeta, dx

        # Scale and gamma meet at the statistics' size before touching `x`.
        return centred * (inv_std * gamma) + beta, gradient

    return scale_and_shift(centred, inv_std, gamma, beta, x)


# Dtypes whose batch-statistics passes may run TensorFlow's fused batch-norm kernels.
FUSED_DTYPES = (tf.float32,)
_TWICE_DIFFERENTIATED = threading.local()


@contextlib.contextmanager
def differentiated_twice(enabled: bool = True) -> Iterator[None]:
    """Marks the passes traced inside as ones whose gradient is differentiated again.

    An inner-loop support pass under second-order MAML is such a pass: the
    outer tape differentiates its gradient. Batch norm then uses its
    hand-derived gradients (`standardize`, `normalize_with_batch_statistics`)
    instead of the fused kernels (`normalize_by_own_statistics`), whose own derivative
    (`nn_grad._FusedBatchNormGradGradV3`) recomputes the backward pass under
    a tape and raised peak memory above the unfused graph's (the figures are
    in benchmarks/README.md). Every other pass (query passes, first-order
    support passes, evaluation) is differentiated at most once and may run
    fused. The setting is read when a pass is traced, in this thread.

    Args:
        enabled: Whether the passes inside are differentiated twice.

    Yields:
        Nothing; the previous setting is restored on exit.
    """
    previous = getattr(_TWICE_DIFFERENTIATED, "value", False)
    _TWICE_DIFFERENTIATED.value = enabled
    try:
        yield
    finally:
        _TWICE_DIFFERENTIATED.value = previous


def _fused_kernels_fit(x: tf.Tensor, gamma: tf.Tensor, axes: Sequence[int]) -> bool:
    """Whether a pass by its own statistics may take the fused kernels (layout, dtype, order)."""
    return (not getattr(_TWICE_DIFFERENTIATED, "value", False) and x.dtype in FUSED_DTYPES and
            gamma.shape.rank == 1 and x.shape.rank == 4 and tuple(axes) == (0, 1, 2))


def fused_batch_norm(x: tf.Tensor, gamma: tf.Tensor, beta: tf.Tensor, epsilon: float
                     ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Batch norm of `[N, H, W, C]` by its own statistics, in TensorFlow's fused kernels.

    Args:
        x: Activations `[N, H, W, C]`, not empty.
        gamma: Scale `[C]`.
        beta: Shift `[C]`.
        epsilon: Added to the variance before the square root.

    Returns:
        `(normalised, mean [C], biased variance [C])`.
    """
    empty = tf.zeros([0], x.dtype)  # No population statistics in training mode.
    normalised, mean, unbiased, *_ = tf.raw_ops.FusedBatchNormV3(
        x=x, scale=gamma, offset=beta, mean=empty, variance=empty, epsilon=epsilon,
        exponential_avg_factor=1.0, data_format="NHWC", is_training=True)
    count = tf.cast(moment_count(x, (0, 1, 2), None), unbiased.dtype)
    # The kernel reports the unbiased variance; the moments here are biased.
    return normalised, mean, unbiased * ((count - 1.0) / count)


def normalize_by_own_statistics(x: tf.Tensor, gamma: tf.Tensor, beta: tf.Tensor,
                                axes: Sequence[int], epsilon: float
                                ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Batch norm of `x` by its own statistics over `axes`, in fused kernels where they pay.

    `FusedBatchNormV3` normalises, and `FusedBatchNormGradV3` differentiates,
    each in one kernel (oneDNN's on CPU, cuDNN's on GPU) instead of a chain of
    activation-sized elementwise ops and reductions. TensorFlow's gradient of
    `FusedBatchNormGradV3` is exact, the mean's dependence on `x` included,
    so even a twice-differentiated pass agrees with the float64 path to
    float32 rounding (tests/test_layers.py); such passes still take the
    hand-derived gradients (`standardize`, `normalize_with_batch_statistics`)
    for memory (`differentiated_twice`). The kernels exist for float32 but
    not float64 on CPU, and take `[N, H, W, C]` with statistics over N, H, W.
    A task-batched pass (`[T, B, H, W, C]`, axes (1, 2, 3)) would need one
    kernel per task: that traced slower and gained nothing measurable, so it
    stays unfused. The batch of a pass whose shape is known only when run
    (a serving signature's) must not be empty: oneDNN's kernel fails on an
    empty one there, so the exported meta-model refuses an empty support or
    query set before it computes (a `tf.cond` on the size doubled the
    exported model's first-request and warm-up time).

    Args:
        x: Activations `[..., C]`.
        gamma: Scale `[C]`.
        beta: Shift `[C]`.
        axes: The axes the statistics reduce.
        epsilon: Added to the variance before the square root.

    Returns:
        `(normalised, mean, biased variance)`, the moments with `axes`
        removed (e.g. `[C]`, or `[T, C]` for `axes=(1, 2, 3)`).
    """
    def unfused():
        mean, variance, centred, inv_std = standardize(x, axes, epsilon)
        normalised = normalize_with_batch_statistics(centred, inv_std, gamma, beta, x, axes)
        return normalised, tf.squeeze(mean, axes), tf.squeeze(variance, axes)

    if not _fused_kernels_fit(x, gamma, axes) or x.shape.num_elements() == 0:
        return unfused()
    return fused_batch_norm(x, gamma, beta, epsilon)


def moment_count(x: tf.Tensor, axes: Sequence[int],
                 context: int | tf.Tensor | None) -> int | tf.Tensor:
    """Elements per channel that batch statistics over `axes` reduce (static when known).

    With a `context`, only the first `context` entries along `axes[0]` count.
    """
    sizes = [_size(x, axis) for axis in axes]
    if context is not None:
        sizes[0] = context
    return math.prod(sizes)


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
        stored = not training and (self.bn_stats == "running" or self.context_size is not None)
        if context is None and not stored and self.bn_stats != "tasknorm":
            # Every image of the pass by the pass's own statistics.
            return normalize_by_own_statistics(x, gamma, beta, axes, self.epsilon)
        sample = x if context is None else leading_rows(x, axes[0], context)
        mean, variance, _ = batch_moments(sample, axes)
        moments = tf.squeeze(mean, axes), tf.squeeze(variance, axes)
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
        # Scale and gamma meet at the statistics' size before touching `x`.
        normalised = (x - mean) * (tf.math.rsqrt(variance + self.epsilon) * gamma) + beta
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
            pixels = moment_count(x, spatial_axes, None)
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
