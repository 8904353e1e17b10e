"""MAML++'s annealing schedules: multi-step loss weights, derivative order, meta-LR.

All three are functions of the integer epoch `e = iteration // iterations_per_epoch`,
exactly as in the official code (`few_shot_learning_system.py`), so they are constant within an
epoch and a resumed run picks them up from the iteration counter alone.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

# The official code hard-codes the MSL floor as 0.03 / num_steps.
_MSL_FLOOR_NUMERATOR = 0.03


def msl_active(epoch: int, msl_epochs: int) -> bool:
    """Whether the multi-step loss is used at `epoch` (MSL off when `msl_epochs == 0`)."""
    return msl_epochs > 0 and epoch < msl_epochs


def msl_weights(epoch: int, num_steps: int, msl_epochs: int) -> np.ndarray:
    """Per-step query-loss weights (MSL; the official `get_per_step_loss_importance_vector`).

    Non-final steps start at `1/N` and lose `1/(N·E)` per epoch down to a floor of
    `0.03/N`; the final step gains what they lose, so the weights always sum to 1.
    Once MSL is switched off (`epoch >= msl_epochs` or `msl_epochs == 0`) the
    vector is one-hot on the final step, i.e. the plain MAML loss.

    Args:
      epoch: Integer epoch `e >= 0`.
      num_steps: Inner steps `N`.
      msl_epochs: Epochs `E` over which MSL anneals; 0 disables MSL.

    Returns:
      float32 array of shape `[num_steps]`.

    Raises:
      ValueError: on a negative epoch, `num_steps < 1` or `msl_epochs < 0`.
    """
    if epoch < 0 or num_steps < 1 or msl_epochs < 0:
        raise ValueError(f"msl_weights needs epoch >= 0, num_steps >= 1 and "
                         f"msl_epochs >= 0; got {epoch}, {num_steps}, {msl_epochs}.")
    if not msl_active(epoch, msl_epochs):
        return np.eye(num_steps, dtype=np.float32)[-1]
    decay = 1.0 / (num_steps * msl_epochs)
    floor = _MSL_FLOOR_NUMERATOR / num_steps
    weights = np.full(num_steps, max(1.0 / num_steps - epoch * decay, floor))
    weights[-1] = min(1.0 / num_steps + epoch * (num_steps - 1) * decay,
                      1.0 - (num_steps - 1) * floor)
    return weights.astype(np.float32)


def use_second_order(epoch: int, second_order: bool, first_order_epochs: int) -> bool:
    """Derivative-order annealing (paper §4, DA): second order iff `epoch > first_order_epochs`.

    Args:
      epoch: Integer epoch.
      second_order: Whether second order is wanted at all.
      first_order_epochs: Last first-order epoch `k`; -1 means second order
        from the start (DA off).

    Returns:
      Whether this epoch's meta-gradient keeps the inner gradients in the graph.
    """
    return bool(second_order) and epoch > first_order_epochs


def cosine_meta_lr(epoch: int | float, meta_lr: float, min_meta_lr: float,
                   total_epochs: int) -> float:
    """Cosine-annealed meta learning rate of epoch `epoch` (paper §4, CA).

    The official code steps PyTorch's `CosineAnnealingLR` once per epoch.
    `lr(e) = min + (max - min) · (1 + cos(π e / T)) / 2`, PyTorch's
    `CosineAnnealingLR` in closed form with `T_max = total_epochs`.
    """
    return min_meta_lr + (meta_lr - min_meta_lr) * (
        1.0 + math.cos(math.pi * epoch / total_epochs)) / 2.0


@keras.saving.register_keras_serializable(package="mamlpp_tf")
class CosineMetaLearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """Piecewise-constant cosine schedule keyed by the meta-iteration count.

    The official code steps PyTorch's scheduler with the integer epoch, so the
    rate changes only at epoch boundaries: iteration `t` uses
    `cosine_meta_lr(t // iterations_per_epoch)`. `Trainer` drives it from its
    checkpointed `step`, the counter MSL and derivative-order annealing follow
    too, so a restored checkpoint resumes the schedule.

    Args:
      meta_lr: Initial (maximum) rate.
      min_meta_lr: Final rate `η_min`; equal to `meta_lr` turns annealing off.
      total_epochs: `T_max` of the cosine.
      iterations_per_epoch: Meta-iterations per epoch.
    """

    def __init__(self, meta_lr: float, min_meta_lr: float, total_epochs: int,
                 iterations_per_epoch: int):
        if total_epochs < 1 or iterations_per_epoch < 1:
            raise ValueError("total_epochs and iterations_per_epoch must be >= 1, got "
                             f"{total_epochs} and {iterations_per_epoch}.")
        self.meta_lr = float(meta_lr)
        self.min_meta_lr = float(min_meta_lr)
        self.total_epochs = int(total_epochs)
        self.iterations_per_epoch = int(iterations_per_epoch)

    def __call__(self, step):
        """The learning rate at meta-iteration `step` (0-based), constant within an epoch."""
        epoch = tf.math.floordiv(tf.cast(step, tf.int64), self.iterations_per_epoch)
        cosine = tf.cos(math.pi * tf.cast(epoch, tf.float32) / self.total_epochs)
        return self.min_meta_lr + (self.meta_lr - self.min_meta_lr) * (1.0 +
                                                                       cosine) / 2.0

    def get_config(self) -> dict:
        """The constructor arguments, for Keras serialization."""
        return dict(meta_lr=self.meta_lr, min_meta_lr=self.min_meta_lr,
                    total_epochs=self.total_epochs,
                    iterations_per_epoch=self.iterations_per_epoch)
