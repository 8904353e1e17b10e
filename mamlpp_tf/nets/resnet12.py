"""The ResNet-12 of MAML++'s follow-ups, ALFA and MeTAL, with fast weights as explicit arguments.

ALFA (Baik et al., "Meta-Learning with Adaptive Hyperparameters", NeurIPS
2020) and MeTAL (Baik et al., "Meta-Learning with Task-Adaptive Loss Function
for Few-Shot Learning", ICCV 2021) build on the MAML++ code base and report
results for a ResNet-12 besides its VGG. This module is that network as their
code defines it (`meta_neural_network_architectures.py::ResNet12` and its
`MetaMaxResLayerReLU` blocks in baiksung/ALFA and baiksung/MeTAL): four
residual blocks of widths 64, 128, 256 and 512, each

    conv3×3 → BN → ReLU → conv3×3 → BN → ReLU → conv3×3 → BN
      + conv1×1 → BN (shortcut on the block's input),  then ReLU,

with stride-1, bias-free convolutions (padding 1 for 3×3); 2×2/2 max pooling
after the first three blocks, the third with padding 1 (ALFA's pooling
paddings 0, 0, 1: 84 → 42 → 21 → 11 on mini-ImageNet, 28 → 14 → 7 → 4 on
Omniglot); a global average pool; and a linear head. Unlike the ResNet-12 of
MetaOptNet and its kin (LeakyReLU 0.1, DropBlock, widths 64-160-320-640), there
is no DropBlock and no dropout, and the activations are plain ReLUs. Every
batch norm is MAML++'s per-step `PerStepBatchNorm`, so LSLR, BNWB+BNRS and
every `bn_stats` mode apply to it unchanged.

Like `nets.vgg`, the layer owns the meta-parameters (kernels as Keras
variables, batch norms as sub-layers) but `forward` takes the adaptable weights
as a `params` dict keyed by stable names (`block0/conv0/kernel`, …,
`block3/shortcut/kernel`, `head/kernel`, `head/bias`), so the inner loop never
mutates a layer. It has no task-batched pass: the learner runs its tasks one
after another (the `loop` layout, which `task_impl="auto"` picks). Its
`forward_body` / `forward_head` split lets ANIL (`adapt="head"`) compute the
blocks' features once per task and reuse them at every inner step.
"""

from __future__ import annotations

from collections.abc import Sequence
import numbers

import keras
import tensorflow as tf

from mamlpp_tf.nets.base import POOL_IMPLS, BatchMoments, FastWeightNetwork, pool
from mamlpp_tf.nets.layers import PerStepBatchNorm
from mamlpp_tf.nets.registry import register_backbone

NUM_BLOCKS = 4
# Padding of the 2×2/2 max pool after each of the first three blocks (none after
# the last), ALFA's `max_padding`.
POOL_PADDINGS = (0, 0, 1)
# A block's batch norms in pass order: the three of the main path, then the shortcut's.
BLOCK_NORMS = ("norm0", "norm1", "norm2", "shortcut_norm")
# A block's kernels in the same order.
BLOCK_CONVS = ("conv0", "conv1", "conv2", "shortcut")


def _conv(x: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
    """Stride-1 convolution with `SAME` padding: PyTorch's padding 1 for 3×3, none for 1×1."""
    return tf.nn.conv2d(x, kernel, strides=1, padding="SAME")


@keras.saving.register_keras_serializable(package="mamlpp_tf")
class ResNet12Backbone(FastWeightNetwork):
    """Four residual blocks (three 3×3 convs and a 1×1 shortcut, per-step BN), pooling, linear head.

    As ALFA's and MeTAL's `ResNet12` (see the module docstring). Kernels are
    Glorot-uniform and bias-free, the head's bias is zero.

    Args:
      n_way: Output classes.
      image_shape: `(H, W, C)` of the inputs; `H` and `W` at least 4, for
        the pools.
      widths: Channels of the four residual blocks.
      num_steps: Inner steps `S`, i.e. rows of the per-step batch norms.
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

    Attributes:
      block_sizes: `(H, W)` at which each of the four blocks runs, e.g.
        `((84, 84), (42, 42), (21, 21), (11, 11))` for mini-ImageNet.

    Raises:
      ValueError: naming the argument: `n_way` below 2, an `image_shape` that
        is not three positive sizes or is too small for the three pools,
        `widths` that are not four positive integers, an unknown `pool_impl`,
        or batch-norm settings `PerStepBatchNorm` rejects.
    """

    def __init__(self,
                 n_way: int,
                 image_shape: Sequence[int],
                 widths: Sequence[int] = (64, 128, 256, 512),
                 num_steps: int = 5,
                 per_step_bn: bool = True,
                 bn_stats: str = "batch",
                 pool_impl: str = "max_pool",
                 context_size: int | None = None,
                 **kwargs):
        super().__init__(num_steps=num_steps, per_step_bn=per_step_bn, bn_stats=bn_stats,
                         context_size=context_size, **kwargs)
        image_shape = tuple(int(d) for d in image_shape)
        widths = tuple(widths)
        if n_way < 2:
            raise ValueError(f"n_way must be >= 2, got {n_way}.")
        if len(image_shape) != 3 or min(image_shape) < 1:
            raise ValueError(f"image_shape must be (H, W, C) with positive sizes, got "
                             f"{image_shape}.")
        if len(widths) != NUM_BLOCKS or not all(
                isinstance(w, numbers.Integral) and not isinstance(w, bool) and w >= 1
                for w in widths):
            raise ValueError(f"widths must be {NUM_BLOCKS} positive integers (the channels of "
                             f"the residual blocks), got {widths}.")
        if pool_impl not in POOL_IMPLS:
            raise ValueError(f"pool_impl must be one of {POOL_IMPLS}, got {pool_impl!r}.")
        self.n_way = int(n_way)
        self.image_shape = image_shape
        self.widths = tuple(int(w) for w in widths)
        self.pool_impl = pool_impl
        self.block_sizes = self._block_sizes()
        for block in range(NUM_BLOCKS):
            for norm in BLOCK_NORMS:
                self.add_norm(f"block{block}_{norm}")
        self.build((None,) + image_shape)

    def _block_sizes(self) -> tuple[tuple[int, int], ...]:
        """`(H, W)` at which each block runs (the last block's output is global pooling's input).

        Raises:
          ValueError: a pool would leave no pixels.
        """
        height, width, _ = self.image_shape
        sizes = [(height, width)]
        for block, padding in enumerate(POOL_PADDINGS):
            # PyTorch's MaxPool2d(2, 2, padding=p): floor((H + 2p - 2) / 2) + 1.
            height, width = (height + 2 * padding) // 2, (width + 2 * padding) // 2
            if height < 1 or width < 1:
                raise ValueError(f"image_shape {self.image_shape} is too small for the pools "
                                 f"of ResNet-12 (H and W >= 4): no pixels left after the "
                                 f"pool of block {block}.")
            sizes.append((height, width))
        return tuple(sizes)

    @property
    def param_names(self) -> list[str]:
        """Names of the adaptable tensors in network order (the LSLR keys)."""
        names = [f"block{block}/{conv}/kernel" for block in range(NUM_BLOCKS)
                 for conv in BLOCK_CONVS]
        return names + self.head_param_names

    @property
    def head_param_names(self) -> list[str]:
        """The classifier head's fast weights: the linear layer's kernel and bias."""
        return ["head/kernel", "head/bias"]

    def build(self, input_shape: Sequence[int | None]) -> None:
        """Creates the kernels, the head and the batch-norm layers (shapes from the arguments)."""
        if self.built:
            return
        channels = self.image_shape[-1]
        for block, width in enumerate(self.widths):
            prefix = f"block{block}"
            self.add_fast_weight(f"{prefix}/conv0/kernel", (3, 3, channels, width),
                                 "glorot_uniform")
            self.add_fast_weight(f"{prefix}/conv1/kernel", (3, 3, width, width),
                                 "glorot_uniform")
            self.add_fast_weight(f"{prefix}/conv2/kernel", (3, 3, width, width),
                                 "glorot_uniform")
            self.add_fast_weight(f"{prefix}/shortcut/kernel", (1, 1, channels, width),
                                 "glorot_uniform")
            for norm in self._block_norms(block):
                norm.build((None, None, None, width))
            channels = width
        self.add_fast_weight("head/kernel", (channels, self.n_way), "glorot_uniform")
        self.add_fast_weight("head/bias", (self.n_way,), "zeros")
        self.built = True

    def _block_norms(self, block: int) -> list[PerStepBatchNorm]:
        """The batch norms of block `block`, in `BLOCK_NORMS` order."""
        return self.norms[len(BLOCK_NORMS) * block:len(BLOCK_NORMS) * (block + 1)]

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
        """The residual blocks and global pooling of `forward`: features `[B, widths[-1]]`.

        Args and moments as `forward`; reads only the blocks' kernels of `params`.
        """
        moments: list[BatchMoments] = []
        for block in range(NUM_BLOCKS):
            x = self._block(block, x, params, moments, step=step, training=training,
                            context=context)
            if block < len(POOL_PADDINGS):
                x = self._pool(x, POOL_PADDINGS[block])
        return tf.reduce_mean(x, axis=[1, 2]), moments

    def forward_head(self, features: tf.Tensor, params: dict[str, tf.Tensor]) -> tf.Tensor:
        """The linear head of `forward`: logits `[B, n_way]` of features `[B, widths[-1]]`."""
        logits = self.low_precision(tf.linalg.matmul, features, params["head/kernel"])
        return logits + params["head/bias"]

    def _block(self, block: int, x: tf.Tensor, params: dict[str, tf.Tensor],
               moments: list[BatchMoments], *, step: int, training: bool,
               context: int | tf.Tensor | None) -> tf.Tensor:
        """Residual block `block` on `x`; its moments appended to `moments` in `norms` order.

        Args:
          block: Block index, 0 to 3.
          x: The block's input `[B, H, W, C]`.
          params: Fast weights by name.
          moments: The pass's moments so far.
          step: Inner step selecting the per-step batch-norm row.
          training: Meta-training pass.
          context: As in `forward`.

        Returns:
          `relu(main path + shortcut)`, `[B, H, W, widths[block]]`.
        """
        norms = self._block_norms(block)
        kernels = [params[f"block{block}/{conv}/kernel"] for conv in BLOCK_CONVS]
        shortcut = x
        for layer in range(3):
            x = self.low_precision(_conv, x, kernels[layer])
            x = self.normalize(norms[layer], x, moments, step=step, training=training,
                               context=context)
            if layer < 2:
                x = tf.nn.relu(x)
        shortcut = self.low_precision(_conv, shortcut, kernels[3])
        shortcut = self.normalize(norms[3], shortcut, moments, step=step, training=training,
                                  context=context)
        return tf.nn.relu(x + shortcut)

    def _pool(self, x: tf.Tensor, padding: int) -> tf.Tensor:
        """PyTorch's `MaxPool2d(2, 2, padding=padding)` of a block's output.

        PyTorch pads max pooling with -inf; zero padding is exact here, in values
        and gradients: `x` is a ReLU's output (>= 0) and every window holds at
        least one image pixel, so a padded zero can only tie with an image zero,
        whose ReLU passes no gradient either way.
        """
        if padding:
            x = tf.pad(x, [[0, 0], [padding, padding], [padding, padding], [0, 0]])
        return pool(x, self.pool_impl)

    def get_config(self) -> dict:
        """The constructor arguments, for Keras serialization."""
        config = super().get_config()
        config.update(n_way=self.n_way, image_shape=self.image_shape, widths=self.widths,
                      pool_impl=self.pool_impl)
        return config


@register_backbone("resnet12")
def _build_resnet12(config, **common) -> ResNet12Backbone:
    """ALFA's ResNet-12 with the block widths `resnet12_widths`.

    Under `jit_compile` it pools with `reduce_max` over a reshape, whose second
    derivative XLA computes exactly.
    """
    return ResNet12Backbone(widths=config.resnet12_widths,
                            pool_impl="reshape" if config.jit_compile else "max_pool", **common)
