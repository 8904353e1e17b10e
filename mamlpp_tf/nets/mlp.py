"""The original MAML's Omniglot MLP as a MAML++ backbone, with fast weights as explicit arguments.

MAML (Finn et al., ICML 2017) reports Omniglot results for a fully connected
network besides the conv net: the image flattened, four hidden layers of 256,
128, 64 and 64 units, each dense → batch norm → ReLU, and a dense head to the
`n_way` logits (`construct_fc_weights` / `forward_fc` in cbfinn/maml,
`maml.py`). The official MAML++ code has conv nets only, and its issue #39
(AntreasAntoniou/HowToTrainYourMAMLPytorch) asks how to train a fully
connected network with MAML++: this module is that network, with MAML++'s
per-step batch norm (`PerStepBatchNorm`) in place of MAML's, so LSLR, BNWB+BNRS
and every `bn_stats` mode apply to it unchanged.

Two forward passes compute the same function:
  * `forward`: one task, `x [B, H, W, C]`, `params[name]` without a task axis;
  * `forward_tasks`: a stack of tasks, `x [T, B, H, W, C]`, every
    `params[name]` with a leading task axis: each layer is one batched matmul
    over all tasks, and batch norm keeps per-task statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
import math

import keras
import tensorflow as tf

from mamlpp_tf.nets.base import BatchMoments, FastWeightNetwork
from mamlpp_tf.nets.registry import register_backbone

# cbfinn/maml's `construct_fc_weights`: `tf.truncated_normal(..., stddev=0.01)`.
KERNEL_STDDEV = 0.01


@keras.saving.register_keras_serializable(package="mamlpp_tf")
class MLPBackbone(FastWeightNetwork):
    """Flatten; (dense → per-step BN → ReLU) per hidden layer; dense head to `n_way` logits.

    As the original MAML's `forward_fc`. Its initialisation too: every kernel
    is drawn from a normal with standard deviation 0.01 truncated at two
    standard deviations (`keras.initializers.TruncatedNormal(stddev=0.01)`,
    the semantics of `tf.truncated_normal` there: the deviation is the one
    before truncation, so the drawn values have about 0.0088), every bias is
    zero. Unlike MAML's batch norm (`tf.contrib.layers.batch_norm` with a
    shift only, epsilon 1e-3), `PerStepBatchNorm` has gamma and beta per inner
    step and epsilon 1e-5.

    A hidden layer's activations are `[B, units]`, so batch norm reduces the
    batch axis alone; under the context modes the first `context` rows are the
    context. Under `"tasknorm"` an image's instance moments over no spatial
    axes are its own activations with variance 0.

    Args:
      n_way: Output classes.
      image_shape: `(H, W, C)` of the inputs.
      hidden: Units of each hidden layer, input side first.
      num_steps: Inner steps `S`, i.e. rows of the per-step batch norm.
      per_step_bn: Per-step gamma/beta/statistics (MAML++) or shared (MAML).
      bn_stats: One of `layers.BN_STATS_MODES`; see `PerStepBatchNorm`.
      context_size: For an exported task model under `"tasknorm"` or `"rn"`:
        the support size its stored context moments come from (see
        `PerStepBatchNorm`).
      **kwargs: TaskNorm's options (`tasknorm_alpha`, `tasknorm_unbiased`; see
        `FastWeightNetwork`) and standard layer arguments (`name`, `dtype`). A mixed dtype
        policy (`"mixed_bfloat16"`) runs the matmuls in its compute dtype;
        variables, biases, batch norm, activations and everything the inner
        loop updates stay in the variable dtype.

    Raises:
      ValueError: naming the argument: `n_way` below 2, an `image_shape` that
        is not three positive sizes, an empty `hidden` or a width below 1, or
        batch-norm settings `PerStepBatchNorm` rejects.
    """

    def __init__(self,
                 n_way: int,
                 image_shape: Sequence[int],
                 hidden: Sequence[int] = (256, 128, 64, 64),
                 num_steps: int = 5,
                 per_step_bn: bool = True,
                 bn_stats: str = "batch",
                 context_size: int | None = None,
                 **kwargs):
        super().__init__(num_steps=num_steps, per_step_bn=per_step_bn, bn_stats=bn_stats,
                         context_size=context_size, **kwargs)
        image_shape = tuple(int(d) for d in image_shape)
        hidden = tuple(int(units) for units in hidden)
        if n_way < 2:
            raise ValueError(f"n_way must be >= 2, got {n_way}.")
        if len(image_shape) != 3 or min(image_shape) < 1:
            raise ValueError(f"image_shape must be (H, W, C) with positive sizes, got "
                             f"{image_shape}.")
        if not hidden or min(hidden) < 1:
            raise ValueError(f"hidden must be one or more layer widths >= 1, got {hidden}.")
        self.n_way = int(n_way)
        self.image_shape = image_shape
        self.hidden = hidden
        self.input_features = math.prod(image_shape)
        for i in range(len(hidden)):
            self.add_norm(f"norm{i}")
        self.build((None,) + image_shape)

    @property
    def param_names(self) -> list[str]:
        """Names of the adaptable tensors in network order (the inner learning rates' keys)."""
        names = []
        for i in range(len(self.hidden)):
            names += [f"dense{i}/kernel", f"dense{i}/bias"]
        return names + self.head_param_names

    @property
    def head_param_names(self) -> list[str]:
        """The classifier head's fast weights: the last dense layer's kernel and bias."""
        return ["head/kernel", "head/bias"]

    def build(self, input_shape: Sequence[int | None]) -> None:
        """Creates the kernels, biases and batch-norm layers (input shape from `image_shape`)."""
        if self.built:
            return
        features = self.input_features
        for i, units in enumerate(self.hidden):
            self._add_dense(f"dense{i}", features, units)
            self.norms[i].build((None, units))
            features = units
        self._add_dense("head", features, self.n_way)
        self.built = True

    def _add_dense(self, name: str, features: int, units: int) -> None:
        """A `[features, units]` kernel and a `[units]` bias, initialised as MAML's."""
        # An initializer per kernel: one instance holds one seed, so reusing it
        # would give equal-shaped kernels equal values.
        self.add_fast_weight(f"{name}/kernel", (features, units),
                             keras.initializers.TruncatedNormal(stddev=KERNEL_STDDEV))
        self.add_fast_weight(f"{name}/bias", (units,), "zeros")

    def forward(self,
                x: tf.Tensor,
                params: dict[str, tf.Tensor],
                step: int,
                training: bool,
                context: int | tf.Tensor | None = None
                ) -> tuple[tf.Tensor, list[BatchMoments]]:
        """Logits of one task's images under fast weights `params`.

        As `mamlpp_tf.nets.Backbone.forward` (arguments and returns as there): the
        moments are those of each batch norm in `norms` order.
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
        """The hidden layers of `forward`: features `[B, hidden[-1]]` and the moments.

        Args and moments as `forward`; reads only the hidden layers' weights of `params`.
        """
        x = tf.reshape(x, [-1, self.input_features])
        moments: list[BatchMoments] = []
        for i, norm in enumerate(self.norms):
            x = (self.low_precision(tf.linalg.matmul, x, params[f"dense{i}/kernel"]) +
                 params[f"dense{i}/bias"])
            x = self.normalize(norm, x, moments, step=step, training=training,
                               context=context)
            x = tf.nn.relu(x)
        return x, moments

    def forward_head(self, features: tf.Tensor, params: dict[str, tf.Tensor]) -> tf.Tensor:
        """The head of `forward`: logits `[B, n_way]` of features `[B, hidden[-1]]`."""
        logits = self.low_precision(tf.linalg.matmul, features, params["head/kernel"])
        return logits + params["head/bias"]

    def forward_tasks(self,
                      x: tf.Tensor,
                      params: dict[str, tf.Tensor],
                      step: int,
                      training: bool,
                      context: int | tf.Tensor | None = None
                      ) -> tuple[tf.Tensor, list[BatchMoments]]:
        """`forward` for a stack of tasks at once; each task has its own weights.

        Every layer is one batched matmul `[T, B, in] @ [T, in, out]`; batch
        norm normalises each task with its own statistics (axis 1 of
        `[T, B, units]`).

        Args:
          x: Images `[T, B, H, W, C]`.
          params: Fast weights by name, each with a leading task axis `T`.
          step: Inner step selecting the per-step batch-norm row.
          training: Meta-training pass.
          context: As in `forward`, per task.

        Returns:
          `(logits [T, B, n_way], moments)` with per-task moments `[T, units]`.
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
        """The hidden layers of `forward_tasks`: features `[T, B, hidden[-1]]`, moments.

        Args and moments as `forward_tasks`; reads only the hidden layers' weights.
        """
        tasks = x.shape[0] if x.shape[0] is not None else tf.shape(x)[0]
        x = tf.reshape(x, [tasks, -1, self.input_features])
        moments: list[BatchMoments] = []
        for i, norm in enumerate(self.norms):
            x = (self.low_precision(tf.linalg.matmul, x, params[f"dense{i}/kernel"]) +
                 params[f"dense{i}/bias"][:, None, :])
            x = self.normalize(norm, x, moments, step=step, training=training,
                               context=context, axes=(1,))
            x = tf.nn.relu(x)
        return x, moments

    def forward_head_tasks(self, features: tf.Tensor,
                           params: dict[str, tf.Tensor]) -> tf.Tensor:
        """The head of `forward_tasks`: logits `[T, B, n_way]` of features `[T, B, hidden[-1]]`."""
        logits = self.low_precision(tf.linalg.matmul, features, params["head/kernel"])
        return logits + params["head/bias"][:, None, :]

    def get_config(self) -> dict:
        """The constructor arguments, for Keras serialization."""
        config = super().get_config()
        config.update(n_way=self.n_way, image_shape=self.image_shape, hidden=self.hidden)
        return config


@register_backbone("mlp")
def _build_mlp(config, **common) -> MLPBackbone:
    """The original MAML's Omniglot MLP with the hidden widths `mlp_hidden`."""
    return MLPBackbone(hidden=config.mlp_hidden, **common)
