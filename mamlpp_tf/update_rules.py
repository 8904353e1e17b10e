"""Inner-loop update rules: how one inner step turns gradients into new fast weights.

`PerStepLearningRates` is MAML++'s LSLR: one learned rate per adaptable tensor
and inner step (with `trainable=False`, plain MAML's fixed rate). It is
stateless with respect to the inner loop: the learner passes the fast weights,
their gradients and the step index (a Python int, because the inner loop is
unrolled); the layer contributes only its rates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="mamlpp_tf")
class PerStepLearningRates(keras.layers.Layer):
    """LSLR: one learned inner learning rate per adaptable tensor and inner step.

    Holds a vector of length `num_steps` for every name in `param_names` and
    owns MAML++'s inner update rule `θ_{i+1}[p] = θ_i[p] − α[p][i] · g_i[p]`.
    Rates are unconstrained (they may turn negative, as the paper observes).
    With `trainable=False` the layer is plain MAML's fixed scalar rate.

    Args:
        param_names: Names of the adaptable tensors, in network order.
        num_steps: Number of inner steps `S`.
        initial_rate: Initial value of every rate.
        trainable: Whether the outer optimiser learns the rates (MAML++) or
            keeps them fixed (MAML).
        **kwargs: Standard `keras.layers.Layer` arguments.

    Raises:
        ValueError: on an empty or duplicated `param_names` or `num_steps < 1`.
    """

    def __init__(self,
                 param_names: Sequence[str],
                 num_steps: int,
                 initial_rate: float = 0.1,
                 trainable: bool = True,
                 **kwargs):
        super().__init__(trainable=trainable, **kwargs)
        param_names = list(param_names)
        if not param_names or len(set(param_names)) != len(param_names):
            raise ValueError(f"param_names must be non-empty and unique, got "
                             f"{param_names}.")
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
        self.param_names = param_names
        self.num_steps = int(num_steps)
        self.initial_rate = float(initial_rate)
        self.rates: dict[str, keras.Variable] = {}
        # The layer's variables exist from construction: their shapes do not
        # depend on any input, and the learner needs them before the first trace.
        for name in self.param_names:
            self.rates[name] = self.add_weight(name=name.replace("/", "_"),
                                               shape=(self.num_steps,),
                                               initializer=keras.initializers.Constant(
                                                   self.initial_rate),
                                               trainable=trainable)
            # Plain attributes are what tf.train.Checkpoint tracks (not dict items).
            setattr(self, "rate_" + name.replace("/", "_"), self.rates[name])
        self.built = True

    def update(self, params: Mapping[str, tf.Tensor], grads: Mapping[str, tf.Tensor],
             step: int) -> dict[str, tf.Tensor]:
        """Returns the fast weights after one inner step.

        Args:
            params: Fast weights `θ_i` by name; every name must have a rate.
            grads: Gradients `g_i` by the same names.
            step: Inner step `i` (Python int).

        Returns:
            `θ_{i+1}` as a new dict with the same keys.

        Raises:
            ValueError: if `step` is outside `[0, num_steps)`.
        """
        if not 0 <= step < self.num_steps:
            raise ValueError(f"step {step} outside the {self.num_steps} learned "
                             "inner learning rates.")
        return {
            name:
                value -
                tf.cast(tf.convert_to_tensor(self.rates[name])[step], value.dtype) *
                grads[name] for name, value in params.items()
        }

    def get_config(self) -> dict:
        """The constructor arguments, for Keras serialization."""
        config = super().get_config()
        config.update(param_names=self.param_names,
                      num_steps=self.num_steps,
                      initial_rate=self.initial_rate)
        return config
