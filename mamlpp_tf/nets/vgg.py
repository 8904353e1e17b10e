"""The VGG-style few-shot backbone of MAML++, with fast weights as explicit arguments.

The layer owns the meta-parameters (conv and dense kernels/biases as Keras
variables, per-step batch norm as `PerStepBatchNorm` sub-layers) but its
forward passes take the adaptable weights as a `params` dict keyed by stable
names (`conv0/kernel`, …, `dense/bias`). The inner loop therefore never
mutates a layer, which is what keeps second-order gradients connected in TF2.

Two forward passes compute the same function:
  * `forward`: one task, `x [B, H, W, C]`, `params[name]` without a task axis
    (the straightforward reference);
  * `forward_tasks`: a stack of tasks, `x [T, B, H, W, C]`, every
    `params[name]` with a leading task axis. Each task convolves with its own
    kernels; batch norm (per-task statistics), activation, pooling and the
    head run once for all tasks, so the graph does not grow with `T` except
    for the convolutions.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf

from mamlpp_tf.nets.base import POOL_IMPLS, BatchMoments, FastWeightNetwork, pool
from mamlpp_tf.nets.registry import register_backbone

LEAKY_RELU_SLOPE = 0.01  # PyTorch's F.leaky_relu default, used by the official net.


def _leaky_relu(x: tf.Tensor) -> tf.Tensor:
    return tf.nn.leaky_relu(x, alpha=LEAKY_RELU_SLOPE)


def _matmul(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """`a @ b`, whose op is named `matmul` (`tf.linalg.matmul`'s is `MatMul`).

    Op names steer the order of Grappler's graph rewrites, and with it float
    rounding: keeping the name keeps float32 runs bit-identical to before the
    mixed-precision option existed.
    """
    return a @ b


@keras.saving.register_keras_serializable(package="mamlpp_tf")
class VGGBackbone(FastWeightNetwork):
    """Conv(3×3, bias) → per-step BN → LeakyReLU(0.01) → max-pool, repeated; then dense.

    As the official `VGGReLUNormNetwork`: `num_stages` stages of `num_filters`
    3×3 convolutions (stride 1, padding 1, with bias), batch norm, leaky ReLU
    with slope 0.01 and 2×2/2 max pooling; flatten; a dense layer to `n_way` logits. Kernels are
    Glorot-uniform, biases zero. With `max_pooling=False` it is the
    strided-convolution variant of the paper's stability figure: stride-2
    convolutions, no pooling, and a global average pool before the head.

    Args:
      n_way: Output classes.
      image_shape: `(H, W, C)` of the inputs.
      num_filters: Channels of every convolution.
      num_stages: Number of conv stages.
      max_pooling: Max-pool after each stage (True) or strided convolutions.
      num_steps: Inner steps `S`, i.e. rows of the per-step batch norm.
      per_step_bn: Per-step gamma/beta/statistics (MAML++) or shared (MAML).
      bn_stats: One of `layers.BN_STATS_MODES`; see `PerStepBatchNorm`.
      pool_impl: `"max_pool"` or `"reshape"` (XLA-safe second derivative).
      context_size: For an exported task model under `"tasknorm"` or `"rn"`:
        the support size its stored context moments come from (see
        `PerStepBatchNorm`).
      **kwargs: TaskNorm's options (`tasknorm_alpha`, `tasknorm_unbiased`; see
        `FastWeightNetwork`) and standard layer arguments (`name`, `dtype`). A mixed dtype
        policy (`"mixed_bfloat16"`) runs the convolutions and the head's
        matmul in its compute dtype; variables, batch norm, activations
        between layers and everything the inner loop updates stay in the
        variable dtype.

    Raises:
      ValueError: if the image is too small for the number of stages, or an
        argument is out of range.
    """

    def __init__(self,
                 n_way: int,
                 image_shape: Sequence[int],
                 num_filters: int = 64,
                 num_stages: int = 4,
                 max_pooling: bool = True,
                 num_steps: int = 5,
                 per_step_bn: bool = True,
                 bn_stats: str = "batch",
                 pool_impl: str = "max_pool",
                 context_size: int | None = None,
                 **kwargs):
        super().__init__(num_steps=num_steps, per_step_bn=per_step_bn, bn_stats=bn_stats,
                         context_size=context_size, **kwargs)
        image_shape = tuple(int(d) for d in image_shape)
        if len(image_shape) != 3 or min(image_shape) < 1:
            raise ValueError(f"image_shape must be (H, W, C), got {image_shape}.")
        if n_way < 2 or num_filters < 1 or num_stages < 1:
            raise ValueError("n_way must be >= 2 and num_filters, num_stages >= 1; "
                             f"got {n_way}, {num_filters}, {num_stages}.")
        if pool_impl not in POOL_IMPLS:
            raise ValueError(f"pool_impl must be one of {POOL_IMPLS}, got {pool_impl!r}.")
        self.n_way = int(n_way)
        self.image_shape = image_shape
        self.num_filters = int(num_filters)
        self.num_stages = int(num_stages)
        self.max_pooling = bool(max_pooling)
        self.pool_impl = pool_impl
        self.feature_shape = self._feature_shape()
        for i in range(self.num_stages):
            self.add_norm(f"norm{i}")
        self.build((None,) + image_shape)

    def _feature_shape(self) -> tuple[int, int, int]:
        height, width, _ = self.image_shape
        for stage in range(self.num_stages):
            # Stride-2 conv with padding 1: floor((H - 1) / 2) + 1; max-pool: floor(H / 2).
            height, width = ((height // 2, width // 2) if self.max_pooling else
                             ((height - 1) // 2 + 1, (width - 1) // 2 + 1))
            if height < 1 or width < 1:
                raise ValueError(f"image_shape {self.image_shape} is too small for "
                                 f"num_stages={self.num_stages}: no pixels left after "
                                 f"stage {stage}.")
        if not self.max_pooling:
            return (1, 1, self.num_filters)  # Global average pool.
        return (height, width, self.num_filters)

    @property
    def param_names(self) -> list[str]:
        """Names of the adaptable tensors in network order (the inner learning rates' keys)."""
        names = []
        for i in range(self.num_stages):
            names += [f"conv{i}/kernel", f"conv{i}/bias"]
        return names + self.head_param_names

    @property
    def head_param_names(self) -> list[str]:
        """The classifier head's fast weights: the dense layer's kernel and bias."""
        return ["dense/kernel", "dense/bias"]

    def build(self, input_shape: Sequence[int | None]) -> None:
        """Creates the kernels, biases and batch-norm layers (input shape from `image_shape`)."""
        if self.built:
            return
        channels = self.image_shape[-1]
        for i in range(self.num_stages):
            self.add_fast_weight(f"conv{i}/kernel", (3, 3, channels, self.num_filters),
                                 "glorot_uniform")
            self.add_fast_weight(f"conv{i}/bias", (self.num_filters,), "zeros")
            self.norms[i].build((None, None, None, self.num_filters))
            channels = self.num_filters
        features = 1
        for d in self.feature_shape:
            features *= d
        self.add_fast_weight("dense/kernel", (features, self.n_way), "glorot_uniform")
        self.add_fast_weight("dense/bias", (self.n_way,), "zeros")
        self.built = True

    def _conv(self, x: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
        """3×3 convolution with padding 1 on both sides, as PyTorch's padding=1.

        With stride 1 that padding is TF's `SAME`, whose gradients run on
        oneDNN on CPU instead of the Eigen kernels that explicit padding
        selects: faster per meta-iteration (timings in benchmarks/README.md). Stride 2
        needs explicit padding (`SAME` would pad only after).
        """
        if self.max_pooling:
            return tf.nn.conv2d(x, kernel, strides=1, padding="SAME")
        return tf.nn.conv2d(x, kernel, strides=2,
                            padding=[[0, 0], [1, 1], [1, 1], [0, 0]])

    def forward(self,
                x: tf.Tensor,
                params: dict[str, tf.Tensor],
                step: int,
                training: bool,
                context: int | tf.Tensor | None = None
                ) -> tuple[tf.Tensor, list[BatchMoments]]:
        """Logits of one task's images under fast weights `params`.

        Args:
          x: Images `[B, H, W, C]`.
          params: Fast weights by name (see `param_names`).
          step: Inner step selecting the per-step batch-norm row.
          training: Meta-training pass (matters for `bn_stats="running"`).
          context: The first `context` images are the context set: every batch
            norm takes its statistics from them alone (see `PerStepBatchNorm`).
            None: from all images.

        Returns:
          `(logits [B, n_way], moments)`: the batch moments of each batch-norm
          layer, for the caller's running-statistics update.
        """
        features, moments = self.forward_body(x, params, step, training, context)
        return self.forward_head(features, params), moments

    def forward_body(self,
                     x: tf.Tensor,
                     params: dict[str, tf.Tensor],
                     step: int,
                     training: bool,
                     context: int | tf.Tensor | None = None
                     ) -> tuple[tf.Tensor, list[BatchMoments]]:
        """The conv stages of `forward`: flattened features `[B, features]` and the moments.

        Args and moments as `forward`; reads only the conv weights of `params`.
        """
        moments: list[BatchMoments] = []
        for i, norm in enumerate(self.norms):
            x = (self.low_precision(self._conv, x, params[f"conv{i}/kernel"]) +
                 params[f"conv{i}/bias"])
            x = self.normalize(norm, x, moments, step=step, training=training,
                               context=context)
            x = _leaky_relu(x)
            if self.max_pooling:
                x = pool(x, self.pool_impl)
        if self.max_pooling:
            x = tf.reshape(x, [tf.shape(x)[0], -1])
        else:
            x = tf.reduce_mean(x, axis=[1, 2])
        return x, moments

    def forward_head(self, features: tf.Tensor, params: dict[str, tf.Tensor]) -> tf.Tensor:
        """The dense head of `forward`: logits `[B, n_way]` of features `[B, features]`."""
        logits = self.low_precision(_matmul, features, params["dense/kernel"])
        return logits + params["dense/bias"]

    def forward_tasks(self,
                      x: tf.Tensor,
                      params: dict[str, tf.Tensor],
                      step: int,
                      training: bool,
                      context: int | tf.Tensor | None = None
                      ) -> tuple[tf.Tensor, list[BatchMoments]]:
        """`forward` for a stack of tasks at once; each task has its own weights.

        Tasks keep a leading axis through the network. Each task convolves
        with its own kernel (`_task_conv`); the bias add, batch norm (each
        task normalised with its own statistics, axes 1–3), activation and
        pooling (tasks folded into the batch) run once for all tasks, and the
        head is one batched matmul. The traced graph therefore grows with `T`
        only by the convolutions, and traces faster than a loop over
        `forward` (timings in benchmarks/README.md).

        Pooling comes before the activation here: leaky ReLU is increasing, so
        max-pooling commutes with it exactly (values and gradients), and the
        activation and its derivatives then touch a quarter of the elements.

        Args:
          x: Images `[T, B, H, W, C]`.
          params: Fast weights by name, each with a leading task axis `T`.
          step: Inner step selecting the per-step batch-norm row.
          training: Meta-training pass.
          context: As in `forward`, per task.

        Returns:
          `(logits [T, B, n_way], moments)` with per-task moments `[T, C]`.
        """
        features, moments = self.forward_body_tasks(x, params, step, training, context)
        return self.forward_head_tasks(features, params), moments

    def forward_body_tasks(self,
                           x: tf.Tensor,
                           params: dict[str, tf.Tensor],
                           step: int,
                           training: bool,
                           context: int | tf.Tensor | None = None
                           ) -> tuple[tf.Tensor, list[BatchMoments]]:
        """The conv stages of `forward_tasks`: features `[T, B, features]` and the moments.

        Args and moments as `forward_tasks`; reads only the conv weights of `params`.
        """
        tasks = x.shape[0]
        batch = x.shape[1] if x.shape[1] is not None else tf.shape(x)[1]
        moments: list[BatchMoments] = []
        for i, norm in enumerate(self.norms):
            # `+`, not `tf.nn.bias_add`: oneDNN's graph rewrite fuses
            # BiasAddGrad into the filter gradient, and in these second-order
            # graphs that fusion makes a cycle ("nodes in a cycle").
            x = (self.low_precision(self._task_conv, x, params[f"conv{i}/kernel"]) +
                 params[f"conv{i}/bias"][:, None, None, None, :])
            x = self.normalize(norm, x, moments, step=step, training=training,
                               context=context, axes=(1, 2, 3))
            if self.max_pooling:
                x = pool(tf.reshape(x, [-1] + x.shape[2:].as_list()), self.pool_impl)
                x = tf.reshape(x, [tasks, batch] + x.shape[1:].as_list())
            x = _leaky_relu(x)
        if self.max_pooling:
            x = tf.reshape(x, [tasks, batch, -1])  # Flattened as in `forward`.
        else:
            x = tf.reduce_mean(x, axis=[2, 3])
        return x, moments

    def forward_head_tasks(self, features: tf.Tensor,
                           params: dict[str, tf.Tensor]) -> tf.Tensor:
        """The head of `forward_tasks`: logits `[T, B, n_way]` of features `[T, B, features]`."""
        logits = self.low_precision(tf.linalg.matmul, features, params["dense/kernel"])
        return logits + params["dense/bias"][:, None, :]

    def _task_conv(self, x: tf.Tensor, kernels: tf.Tensor) -> tf.Tensor:
        """Each task's activations convolved with its own kernel, one `conv2d` per task.

        The fastest exact layout measured on CPU (timings of every candidate in
        benchmarks/README.md). A grouped convolution (tasks stacked on
        channels) has no CPU gradient kernel with explicit padding or in
        float64, and was slower than this on oneDNN in float32; im2col with one
        batched matmul, shifted batched matmuls and XLA's grouped convolution
        were slower still. `unstack`, not `x[t]`: the
        gradient of `x[t]` is a zero-padded copy of the whole of `x` per task.

        Args:
          x: Activations `[T, B, H, W, Cin]`.
          kernels: `[T, 3, 3, Cin, Cout]`.

        Returns:
          `[T, B, H', W', Cout]`.
        """
        return tf.stack(
            [self._conv(*task) for task in zip(tf.unstack(x), tf.unstack(kernels))])

    def get_config(self) -> dict:
        """The constructor arguments, for Keras serialization."""
        config = super().get_config()
        config.update(n_way=self.n_way, image_shape=self.image_shape,
                      num_filters=self.num_filters, num_stages=self.num_stages,
                      max_pooling=self.max_pooling, pool_impl=self.pool_impl)
        return config



@register_backbone("vgg")
def _build_vgg(config, **common) -> VGGBackbone:
    """The paper's network from `num_filters`, `num_stages` and `max_pooling`.

    Under `jit_compile` it pools with `reduce_max` over a reshape, whose second
    derivative XLA computes exactly.
    """
    return VGGBackbone(num_filters=config.num_filters, num_stages=config.num_stages,
                       max_pooling=config.max_pooling,
                       pool_impl="reshape" if config.jit_compile else "max_pool", **common)
