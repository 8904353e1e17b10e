"""Inner-loop update rules: how one inner step turns gradients into new fast weights.

An update rule is a Keras layer holding the inner learning rates of the
adapted fast weights, keyed by their names, and owning the step
`θ_{i+1}[p] = θ_i[p] − α[p](i) ⊙ g_i[p]`:

* `PerStepLearningRates` (`--inner_update=lslr`): MAML++'s LSLR, one learned
  rate per adapted tensor and inner step (Antoniou et al., ICLR 2019). With
  `trainable=False` it is plain MAML's fixed rate (`--inner_update=fixed`,
  Finn et al., ICML 2017).
* `PerElementLearningRates` (`--inner_update=meta_sgd`): Meta-SGD's learned
  rate per weight *element* (Li et al., "Meta-SGD: Learning to Learn Quickly
  for Few-Shot Learning", arXiv:1707.09835, 2017), one set per inner step or
  one shared by all steps.

The rules are stateless with respect to the inner loop: the learner passes the
fast weights to adapt, their gradients and the step index (a Python int,
because the inner loop is unrolled); a rule contributes only its rates. Every
rate variable is a plain attribute `rate_<name>` (slashes as underscores), so
`tf.train.Checkpoint` tracks it under that name whatever the rule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import keras
import tensorflow as tf


@runtime_checkable
class UpdateRule(Protocol):
    """What the inner loop needs of an update rule.

    Attributes:
      name: The prefix of its rates in `MamlPlusPlus.get_weights`.
      rates: The rate variables by the name of the fast weight they step.
      per_step: Whether the rates have a leading axis of one row per inner step.
      num_steps: Rows of per-step rates (the training inner steps).
      trainable_variables: The rates the outer loop learns (none for a fixed rule).
    """

    name: str
    rates: Mapping[str, keras.Variable]
    per_step: bool
    num_steps: int
    trainable_variables: list

    def update(self, params: Mapping[str, tf.Tensor], grads: Mapping[str, tf.Tensor],
               step: int) -> dict[str, tf.Tensor]:
        """`θ_{i+1}` of the fast weights `params` (those of `rates`) after inner step `step`."""


def _check_steps(num_steps: int) -> int:
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    return int(num_steps)


def _attribute(name: str) -> str:
    """The attribute (and checkpoint) name of the rate of fast weight `name`."""
    return "rate_" + name.replace("/", "_")


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

    per_step = True

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
        self.param_names = param_names
        self.num_steps = _check_steps(num_steps)
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
            setattr(self, _attribute(name), self.rates[name])
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


@keras.saving.register_keras_serializable(package="mamlpp_tf")
class PerElementLearningRates(keras.layers.Layer):
    """Meta-SGD: a learned inner learning rate for every element of every adapted tensor.

    `θ_{i+1}[p] = θ_i[p] − α[p](i) ⊙ g_i[p]` with `α[p]` of the shape of
    `θ[p]` (Li et al. 2017, Eq. 2, whose α is one tensor shared by all
    steps), learned by the outer optimiser like LSLR and unconstrained. With
    `per_step` each inner step has its own `α[p][i]` (a `[num_steps,
    *shape]` variable: the per-element form of LSLR); without it one
    `[*shape]` rate serves every step, as in the paper. Every rate starts at
    `initial_rate` (learn2learn's `MetaSGD` likewise starts every element at
    its `lr`).

    Args:
        param_shapes: The shape of each adaptable tensor by name, in network order.
        num_steps: Number of inner steps `S` (rows of per-step rates).
        initial_rate: Initial value of every rate.
        per_step: One rate tensor per inner step, or one for all steps.
        **kwargs: Standard `keras.layers.Layer` arguments.

    Raises:
        ValueError: on an empty `param_shapes` or `num_steps < 1`.
    """

    def __init__(self,
                 param_shapes: Mapping[str, Sequence[int]],
                 num_steps: int,
                 initial_rate: float = 0.1,
                 per_step: bool = True,
                 **kwargs):
        super().__init__(**kwargs)
        if not param_shapes:
            raise ValueError("param_shapes must name at least one tensor.")
        self.param_shapes = {name: tuple(int(d) for d in shape)
                             for name, shape in param_shapes.items()}
        self.num_steps = _check_steps(num_steps)
        self.initial_rate = float(initial_rate)
        self.per_step = bool(per_step)
        self.rates: dict[str, keras.Variable] = {}
        rows = (self.num_steps,) if self.per_step else ()
        for name, shape in self.param_shapes.items():
            self.rates[name] = self.add_weight(name=name.replace("/", "_"), shape=rows + shape,
                                               initializer=keras.initializers.Constant(
                                                   self.initial_rate))
            setattr(self, _attribute(name), self.rates[name])
        self.built = True

    def update(self, params: Mapping[str, tf.Tensor], grads: Mapping[str, tf.Tensor],
               step: int) -> dict[str, tf.Tensor]:
        """Returns the fast weights after one inner step.

        Args:
            params: Fast weights `θ_i` by name, each of its rate's shape or
                with extra leading (task) axes; every name must have a rate.
            grads: Gradients `g_i` by the same names and shapes.
            step: Inner step `i` (Python int); ignored without `per_step`.

        Returns:
            `θ_{i+1}` as a new dict with the same keys.

        Raises:
            ValueError: with `per_step`, if `step` is outside `[0, num_steps)`.
        """
        if self.per_step and not 0 <= step < self.num_steps:
            raise ValueError(f"step {step} outside the {self.num_steps} learned "
                             "inner learning rates.")
        updated = {}
        for name, value in params.items():
            rate = tf.convert_to_tensor(self.rates[name])
            rate = rate[step] if self.per_step else rate
            updated[name] = value - tf.cast(rate, value.dtype) * grads[name]
        return updated

    def get_config(self) -> dict:
        """The constructor arguments, for Keras serialization."""
        config = super().get_config()
        config.update(param_shapes=self.param_shapes,
                      num_steps=self.num_steps,
                      initial_rate=self.initial_rate,
                      per_step=self.per_step)
        return config


def build_update_rule(kind: str, param_shapes: Mapping[str, Sequence[int]], *,
                      num_steps: int, initial_rate: float, per_step: bool,
                      dtype: str) -> UpdateRule:
    """The update rule `kind` for the adapted tensors `param_shapes`.

    Args:
        kind: `"lslr"`, `"meta_sgd"` or `"fixed"`.
        param_shapes: The shape of each adapted tensor by name, in network order.
        num_steps: Training inner steps `S`.
        initial_rate: The initial (LSLR, Meta-SGD) or constant (fixed) rate.
        per_step: Meta-SGD only: one rate tensor per inner step.
        dtype: The rates' dtype.

    Returns:
        `PerStepLearningRates` named `lslr` (trainable for `lslr`, not for
        `fixed`) or `PerElementLearningRates` named `meta_sgd`.

    Raises:
        ValueError: an unknown `kind`.
    """
    if kind in ("lslr", "fixed"):
        return PerStepLearningRates(list(param_shapes), num_steps, initial_rate,
                                    trainable=kind == "lslr", dtype=dtype, name="lslr")
    if kind == "meta_sgd":
        return PerElementLearningRates(param_shapes, num_steps, initial_rate, per_step=per_step,
                                       dtype=dtype, name="meta_sgd")
    raise ValueError(f"unknown inner update rule {kind!r}: use lslr, meta_sgd or fixed")
