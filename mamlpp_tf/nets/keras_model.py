"""A user's Keras model as a backbone: `KerasBackbone`.

A Sequential or functional Keras model (images `[B, H, W, C]` in, logits
`[B, n_way]` out) built from stock Keras layers and `PerStepBatchNorm` becomes
a `mamlpp_tf.nets.Backbone`:

* The model is cloned. Every batch norm of the clone is a per-step batch norm
  with the backbone's settings: a `keras.layers.BatchNormalization` is
  replaced (its gamma/beta, and its moving statistics as running statistics,
  tiled across the steps), a `PerStepBatchNorm` is rebuilt. Every other weight
  is copied from the user's model.
* The fast weights are the clone's other trainable variables. The forward pass
  runs the clone through `Layer.stateless_call` with `params` in their place,
  which keeps second-order gradients exact (float64 finite differences agree
  to ~1e-9 through two inner steps).
* The inner step, the `training` flag and the context set reach the batch
  norms through a pass scope that `forward` opens (a `contextvars.ContextVar`:
  one per thread, so replicas of a distribution strategy each have their own),
  and the batch norms report their moments through it.

Stock `keras.layers.BatchNormalization` itself would give wrong second-order
MAML meta-gradients (0.1 to a few percent off in float64, and a non-zero
meta-gradient for a bias that the batch norm cancels): its variance is computed
by `tf.nn.moments` around a stopped-gradient mean. Layers whose state the inner loop would freeze
(dropout, noise, any layer holding non-trainable variables or a random seed)
are refused.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
import contextlib
import contextvars
import dataclasses
import re
import types
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from mamlpp_tf.nets.base import VARIANT_OVERRIDES, BatchMoments, moment_count
from mamlpp_tf.nets.layers import PerStepBatchNorm

STOCK_BATCH_NORM_MESSAGE = (
    "keras.layers.BatchNormalization gives wrong second-order MAML gradients "
    "(tf.nn.moments stops the gradient through the mean); use "
    "mamlpp_tf.nets.PerStepBatchNorm or replace_batch_norm=True")
# Variables of a per-step batch norm, with the stock batch norm's name for each.
_NORM_VARIABLES = {"gamma": "gamma", "beta": "beta", "alpha_scale": None,
                   "alpha_offset": None, "running_mean": "moving_mean",
                   "running_var": "moving_variance"}


@dataclasses.dataclass
class _PassState:
    """What one forward pass tells its batch norms, and the moments they report back."""
    step: int
    training: bool
    context: int | tf.Tensor | None
    calls: list[tuple[PerStepBatchNorm, BatchMoments]] = dataclasses.field(
        default_factory=list)


_PASS: contextvars.ContextVar[_PassState | None] = contextvars.ContextVar(
    "mamlpp_tf_keras_backbone_pass", default=None)


@contextlib.contextmanager
def _pass_scope(state: _PassState) -> Iterator[_PassState]:
    """Makes `state` the pass state of the batch norms run inside the block."""
    token = _PASS.set(state)
    try:
        yield state
    finally:
        _PASS.reset(token)


class _ScopedBatchNorm(PerStepBatchNorm):
    """A `PerStepBatchNorm` that takes its step, mode and context from the enclosing pass.

    Inside `KerasBackbone.forward` it appends its batch moments to the pass
    state. Called outside one (Keras running the model itself, as the default
    signature that a SavedModel traces for every Keras model it holds), it is
    a plain `PerStepBatchNorm` at step 0.
    """

    def call(self, x: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        """Normalises `x` as the pass's step, `training` and context say.

        Args:
          x: Activations `[..., C]`.
          training: Keras' flag, used only outside a pass.

        Returns:
          The normalised, scaled and shifted tensor.
        """
        state = _PASS.get()
        if state is None:
            return super().call(x, training=training)
        axes = tuple(range(x.shape.rank - 1))
        count = moment_count(x, axes, state.context)
        x, mean, variance = self.normalize(x, step=state.step, training=state.training,
                                           axes=axes, context=state.context)
        state.calls.append((self, BatchMoments(mean, variance, count)))
        return x

    def compute_output_shape(self, input_shape: Sequence[int | None]) -> Sequence[int | None]:
        """The input shape: lets Keras build a model without running `call`."""
        return input_shape


def _snake_case(name: str) -> str:
    """`Conv2D` → `conv2d`, `MultiHeadAttention` → `multi_head_attention` (as Keras names)."""
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def _is_norm(layer: keras.layers.Layer) -> bool:
    return isinstance(layer, (keras.layers.BatchNormalization, PerStepBatchNorm))


def _check_stock_batch_norm(layer: keras.layers.BatchNormalization,
                            replace_batch_norm: bool) -> None:
    """Raises `ValueError` unless `layer` can become a per-step batch norm."""
    if not replace_batch_norm:
        raise ValueError(f"layer {layer.name!r}: {STOCK_BATCH_NORM_MESSAGE}")
    rank = layer.input_spec.ndim
    if layer.axis % rank != rank - 1:
        raise ValueError(f"batch norm {layer.name!r} normalises axis {layer.axis} of rank-{rank} "
                         "inputs; only the last (channels) axis converts: use axis=-1")
    if not (layer.center and layer.scale) or layer.renorm:
        raise ValueError(f"batch norm {layer.name!r} has center={layer.center}, "
                         f"scale={layer.scale}, renorm={layer.renorm}; a per-step batch norm "
                         "always learns gamma and beta: use center=True, scale=True, "
                         "renorm=False")


def _norm_arguments(layer: keras.layers.Layer) -> dict[str, Any]:
    """Momentum (PyTorch's convention) and epsilon of a batch norm of the user's model."""
    if isinstance(layer, PerStepBatchNorm):
        return dict(momentum=layer.momentum, epsilon=layer.epsilon)
    # Keras keeps `moving = m·moving + (1 − m)·batch`; PyTorch's momentum is 1 − m.
    return dict(momentum=1.0 - layer.momentum, epsilon=layer.epsilon)


def _refuse_state(layer: keras.layers.Layer) -> None:
    """Raises `ValueError` if `layer` (not a batch norm) holds state besides trainable weights."""
    state = layer.non_trainable_variables
    if state:
        raise ValueError(
            f"layer {layer.name!r} ({type(layer).__name__}) holds non-trainable state "
            f"({', '.join(v.path for v in state)}), which the inner loop would freeze "
            "(a seed, statistics or frozen weights): remove the layer, or make its weights "
            "trainable")


def _clone(model: keras.Model, settings: Mapping[str, Any], replace_batch_norm: bool
           ) -> tuple[keras.Model, list[tuple[keras.layers.Layer, keras.layers.Layer]]]:
    """`model` cloned with its batch norms made per-step and stable layer names.

    Every layer that owns variables is renamed `{i}_{kind}`: `i` its position
    among such layers in the order the model runs them, `kind` its class in
    snake case (`batch_norm` for every batch norm). The names therefore do not
    depend on Keras' process-wide numbering, and a clone of a clone keeps them.

    Args:
      model: A built Sequential or functional model.
      settings: `num_steps`, `per_step_bn`, `bn_stats`, `context_size`,
        `tasknorm_alpha`, `tasknorm_unbiased` of the per-step batch norms.
      replace_batch_norm: Convert stock batch norms (else refuse them).

    Returns:
      `(clone, pairs)`: the clone (fresh weights) and each `(source layer,
      cloned layer)` of the layers that own variables, in model order.

    Raises:
      ValueError: a batch norm that does not convert, or a layer with state
        (see `_refuse_state`).
    """
    pairs: list[tuple[keras.layers.Layer, keras.layers.Layer]] = []

    def clone_layer(layer: keras.layers.Layer) -> keras.layers.Layer:
        if isinstance(layer, keras.layers.BatchNormalization):
            _check_stock_batch_norm(layer, replace_batch_norm)
        elif not _is_norm(layer):
            _refuse_state(layer)
        if not layer.weights and not _is_norm(layer):
            return layer.__class__.from_config(layer.get_config())
        kind = "batch_norm" if _is_norm(layer) else _snake_case(type(layer).__name__)
        name = f"{len(pairs)}_{kind}"
        if _is_norm(layer):
            clone = _ScopedBatchNorm(
                settings["num_steps"], per_step=settings["per_step_bn"],
                bn_stats=settings["bn_stats"], context_size=settings["context_size"],
                tasknorm_alpha=settings["tasknorm_alpha"],
                tasknorm_unbiased=settings["tasknorm_unbiased"],
                name=name, dtype=layer.dtype_policy.variable_dtype, **_norm_arguments(layer))
        else:
            clone = layer.__class__.from_config({**layer.get_config(), "name": name})
        pairs.append((layer, clone))
        return clone

    clone = keras.models.clone_model(model, clone_function=clone_layer, recursive=True)
    return clone, pairs


def _carried(source: keras.layers.Layer, variable: keras.Variable, value: np.ndarray
             ) -> np.ndarray:
    """`value` of a source batch norm shaped as `variable`: as it is, or tiled across steps.

    Raises:
      ValueError: shapes that neither match nor differ by the step axis.
    """
    shape = tuple(variable.shape)
    if value.shape == shape:
        return value
    if value.shape == shape[1:]:
        return np.broadcast_to(value, shape)
    raise ValueError(f"batch norm {source.name!r}: its {variable.name} {value.shape} does not "
                     f"fit the backbone's {shape} (rows per inner step); build it with the "
                     "backbone's num_steps, or with per_step=False to have it tiled")


def _carry_weights(source: keras.layers.Layer, target: keras.layers.Layer) -> None:
    """Copies `source`'s weights into its clone `target` (batch norms: tiled across steps)."""
    if not isinstance(target, _ScopedBatchNorm):
        target.set_weights(source.get_weights())
        return
    stock = isinstance(source, keras.layers.BatchNormalization)
    for name, stock_name in _NORM_VARIABLES.items():
        source_name = stock_name if stock else name
        variable = getattr(target, name, None)
        origin = getattr(source, source_name, None) if source_name else None
        if variable is not None and origin is not None:
            variable.assign(_carried(source, variable, np.asarray(origin.numpy())))


def _relative_path(layer: keras.layers.Layer, variable: keras.Variable) -> str:
    """`variable`'s path inside `layer` (`kernel`, or `query/kernel` in a composite layer)."""
    prefix = layer.path + "/"
    return variable.path[len(prefix):] if variable.path.startswith(prefix) else variable.name


class KerasBackbone(keras.layers.Layer):
    """A Sequential or functional Keras model as a MAML++ backbone.

    The model maps images `[B, H, W, C]` (its one input; give `keras.Input`
    the learner's dtype, e.g. `dtype="float64"`, or images are converted to
    the input's dtype) to logits `[B, n_way]` (its one output). It is cloned
    (see the module docstring); the user's model is left untouched.

    Fast weights are named `"{i}_{kind}/{variable}"`, e.g. `"0_conv2d/kernel"`,
    `"3_dense/bias"`: `i` is the position of the owning layer among the
    model's layers that own variables (batch norms included, nested models
    flattened) in the order the model runs them, `kind` its class in snake
    case, `variable` the variable's path inside the layer. The batch norms are
    the layers `"{i}_batch_norm"`. Names depend only on the architecture, so
    `variant`s and other processes share them.

    Refused (`ValueError` naming the layer): any layer other than a batch norm
    that holds non-trainable variables or a random seed (`Dropout`,
    `SpatialDropout*`, `GaussianNoise`, `GaussianDropout`, `AlphaDropout`,
    random augmentation, frozen layers): the inner loop would freeze their
    state; a `BatchNormalization` over another axis than the last, without
    center or scale, or with renorm; any `BatchNormalization` with
    `replace_batch_norm=False`; a `PerStepBatchNorm` whose per-step rows do
    not fit `num_steps`; a model that is not built or has several inputs or
    outputs. A batch norm called at two places of the model is refused when
    the backbone first runs.

    Args:
      model: A built Sequential or functional model (nested Sequential and
        functional models are converted too).
      num_steps: Inner steps `S`, i.e. rows of the per-step batch norms.
      per_step_bn: Per-step gamma/beta/statistics (MAML++) or shared (MAML).
      bn_stats: One of `layers.BN_STATS_MODES`; see `PerStepBatchNorm`.
      context_size: For an exported task model under `"tasknorm"` or `"rn"`:
        the support size its stored context moments come from.
      tasknorm_alpha: TaskNorm's α granularity (`layers.TASKNORM_ALPHAS`).
      tasknorm_unbiased: TaskNorm blends unbiased variances.
      replace_batch_norm: Convert `keras.layers.BatchNormalization` layers
        (momentum `m` becomes PyTorch's `1 − m`, epsilon is kept, regularizers
        and constraints are dropped) or refuse them.
      name: The layer's name.

    Attributes:
      model: The converted clone.
      param_names: The fast weights' names, in model order.
      head_param_names: The classifier head's fast weights (for
        `adapt="head"|"body"`): those of the last layer, in model order, that
        owns fast weights (normally the closing `Dense`).
      weights_by_name: The clone's variables holding `θ_0`, by those names.
      norms: The per-step batch norms, in the order the model runs them.

    Raises:
      TypeError: `model` is not a Keras model.
      ValueError: as listed above, or invalid batch-norm settings.
    """

    def __init__(self, model: keras.Model, *, num_steps: int, per_step_bn: bool = True,
                 bn_stats: str = "batch", context_size: int | None = None,
                 tasknorm_alpha: str = "step", tasknorm_unbiased: bool = False,
                 replace_batch_norm: bool = True, name: str = "backbone"):
        if not isinstance(model, keras.Model):
            raise TypeError(f"KerasBackbone needs a keras.Model, got {type(model).__name__}")
        if not model.built:
            raise ValueError(f"model {model.name!r} is not built: start it with keras.Input")
        if len(model.inputs) != 1 or len(model.outputs) != 1:
            raise ValueError(f"model {model.name!r} has {len(model.inputs)} inputs and "
                             f"{len(model.outputs)} outputs; a backbone maps images to logits")
        settings = dict(num_steps=int(num_steps), per_step_bn=bool(per_step_bn),
                        bn_stats=bn_stats, context_size=context_size,
                        tasknorm_alpha=tasknorm_alpha,
                        tasknorm_unbiased=bool(tasknorm_unbiased))
        clone, pairs = _clone(model, settings, replace_batch_norm)
        fast_layers = [target for _, target in pairs if not isinstance(target, _ScopedBatchNorm)]
        super().__init__(name=name,
                         dtype=fast_layers[0].dtype_policy if fast_layers else None)
        self._settings = dict(settings, replace_batch_norm=bool(replace_batch_norm))
        for source, target in pairs:
            _carry_weights(source, target)
        self.model = clone
        self.norms = [target for _, target in pairs if isinstance(target, _ScopedBatchNorm)]
        weights_by_name = {f"{layer.name}/{_relative_path(layer, variable)}": variable
                           for layer in fast_layers for variable in layer.trainable_variables}
        self.param_names = list(weights_by_name)
        head = fast_layers[-1].name + "/" if fast_layers else None
        self.head_param_names = [name for name in self.param_names
                                 if head and name.startswith(head)]
        # A read-only view: Keras and tf.train.Checkpoint track the variables through `model`.
        self.weights_by_name = types.MappingProxyType(weights_by_name)
        names = {id(variable): name for name, variable in weights_by_name.items()}
        self._slots = tuple(names.get(id(v)) for v in clone.trainable_variables)
        self.built = True

    def initial_params(self) -> dict[str, tf.Tensor]:
        """The fast weights `θ_0`, read from `weights_by_name` (differentiably)."""
        return {name: tf.convert_to_tensor(self.weights_by_name[name])
                for name in self.param_names}

    def forward(self, x: tf.Tensor, params: Mapping[str, tf.Tensor], step: int,
                training: bool, context: int | tf.Tensor | None = None
                ) -> tuple[tf.Tensor, list[BatchMoments]]:
        """Logits of one task's images under fast weights `params`.

        Args:
          x: Images `[B, H, W, C]`.
          params: Fast weights by name (see `param_names`).
          step: Inner step selecting the per-step batch-norm row.
          training: Meta-training pass (matters for `bn_stats="running"`).
          context: The first `context` images are the context set: every batch
            norm takes its statistics from them alone. None: from all images.

        Returns:
          `(logits [B, n_way], moments)`: the batch moments of each of `norms`.

        Raises:
          ValueError: the model runs a batch norm more than once per pass.
        """
        trainable = [tf.convert_to_tensor(variable) if name is None else params[name]
                     for variable, name in zip(self.model.trainable_variables, self._slots)]
        non_trainable = [tf.convert_to_tensor(v) for v in self.model.non_trainable_variables]
        with _pass_scope(_PassState(step, training, context)) as state:
            logits, _ = self.model.stateless_call(trainable, non_trainable, x, training=False)
        called = [norm for norm, _ in state.calls]
        if len(called) != len(self.norms) or any(a is not b for a, b in zip(called,
                                                                             self.norms)):
            raise ValueError(f"the model ran its batch norms as {[n.name for n in called]}, "
                             f"not once each as {[n.name for n in self.norms]}: give every "
                             "use of a batch norm its own layer")
        return logits, [moments for _, moments in state.calls]

    def variant(self, **overrides: Any) -> KerasBackbone:
        """The same network with fresh variables and other batch-norm settings.

        Args:
          **overrides: Any of `num_steps`, `per_step_bn`, `bn_stats`,
            `context_size` and `name`.

        Returns:
          A `KerasBackbone` with the same `param_names`, freshly initialised.

        Raises:
          TypeError: an override other than those of `VARIANT_OVERRIDES`.
        """
        unknown = set(overrides) - set(VARIANT_OVERRIDES)
        if unknown:
            raise TypeError(f"variant() takes only {VARIANT_OVERRIDES}, got {sorted(unknown)}")
        settings = {**self._settings, "name": self.name, **overrides}
        fresh, _ = _clone(self.model, settings, replace_batch_norm=False)
        return KerasBackbone(fresh, **settings)
