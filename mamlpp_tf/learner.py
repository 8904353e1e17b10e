"""`MamlPlusPlus`: the MAML++ meta-learner (and its variants) on one replica.

On the inner loop and its parts (`mamlpp_tf.inner_loop`, which also describes
a meta-batch: the adapted weights and the update rule) it builds the
meta-loss, the mean over tasks of the task losses, with the multi-step loss
and the derivative order annealed by epoch; one replica's
share of a meta-step (its gradients and batch moments); evaluation; and the
serving API: `adapt` and `predict`; and the variables by group and by stable
name. `mamlpp_tf.training.trainer.Trainer` all-reduces a replica's share, clips, withholds
non-finite updates and applies the outer optimiser.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from mamlpp_tf import batch_checks, inner_loop, schedules
from mamlpp_tf.inner_loop import Batch, InnerLoop, PassRecord
from mamlpp_tf.nets import CONTEXT_BN_STATS

# The learner's variables by role (`MamlPlusPlus.variable_groups`), and those whose
# gradients `--grad_clip` clips: never the inner learning rates' (as the official code).
VARIABLE_GROUPS = ("network", "batch_norm", "normalisation", "update_rule",
                   "running_statistics")
CLIPPED_GROUPS = ("network", "batch_norm", "normalisation")


class ReplicaGradients(NamedTuple):
    """One replica's share of a meta-step, before any reduction across replicas.

    Attributes:
      loss: The replica's task losses summed and divided by the tasks of all
        replicas: summed over replicas, it is the meta-loss.
      accuracy: Its query accuracies, scaled alike.
      grads: The gradient of `loss` for each of `trainable_variables` (zeros
        where unconnected): summed over replicas, the meta-gradient.
      records: Per network pass in order, the inner step and the moments of
        each batch-norm layer, averaged over the replica's tasks.
    """
    loss: tf.Tensor
    accuracy: tf.Tensor
    grads: list[tf.Tensor]
    records: list[PassRecord]


class MamlPlusPlus(InnerLoop):
    """MAML++ and its variants (MAML, ANIL, BOIL, Meta-SGD) for few-shot classification.

    The single-replica algorithm; it changes no variable but in `set_weights`.
    Train it with `mamlpp_tf.training.trainer.Trainer`, both built under
    `strategy.scope()` to train with a distribution strategy. What varies
    between the variants are the inner loop's parts (`InnerLoop`): which fast
    weights adapt (`config.adapt`) and the update rule that steps them
    (`config.update_rule`).

    Args:
      config: The learner's hyper-parameters.
      backbone: The network; defaults to the one `config.backbone` names
        (`mamlpp_tf.nets` registry). Any object with the members of
        `mamlpp_tf.nets.Backbone` works (checked here), e.g. a Keras model
        wrapped in `mamlpp_tf.nets.KerasBackbone`.

    Attributes:
      config: The `LearnerConfig`.
      backbone: The network holding the fast weights' and per-step BN variables.
      adapted: The names of the fast weights the inner loop adapts.
      update_rule: The inner update rule (`mamlpp_tf.update_rules`).

    Raises:
      TypeError: `backbone` lacks a member of `mamlpp_tf.nets.Backbone`, or
        the `head_param_names` that `adapt="head"|"body"` needs.
      ValueError: `task_impl="batched"` for a network without `forward_tasks`.
    """

    # ------------------------------------------------------------------ state

    @property
    def network_variables(self) -> list[keras.Variable]:
        """Trainable network weights: fast weights, BN gamma/beta, TaskNorm's blend."""
        return list(self.backbone.trainable_variables)

    @property
    def trainable_variables(self) -> list[keras.Variable]:
        """Every meta-parameter: the network's, then the update rule's learned rates."""
        return self.network_variables + list(self.update_rule.trainable_variables)

    @property
    def running_stat_variables(self) -> list[keras.Variable]:
        """Per-step batch-norm running statistics (not trained by gradients)."""
        return list(self.backbone.non_trainable_variables)

    def variable_groups(self) -> dict[str, dict[str, keras.Variable]]:
        """Every variable of the learner by group, each by its name within its owner.

        The groups, which together hold every variable once (`VARIABLE_GROUPS`):

        * `network`: the fast weights `θ_0` (`backbone.param_names`), adapted
          or not;
        * `batch_norm`: each batch norm's gamma and beta (`{norm}/gamma`);
        * `normalisation`: TaskNorm's blend `{norm}/alpha_scale`,
          `{norm}/alpha_offset` (`bn_stats="tasknorm"` only, else empty);
        * `update_rule`: the inner learning rates by the fast weight they step
          (trainable unless the rule is `fixed`);
        * `running_statistics`: the per-step running means and variances.

        The trainer clips the gradients of `CLIPPED_GROUPS`; a checkpoint holds
        the network's groups under `backbone` and the rates under `lslr`
        (`checkpoint_items`); the summaries and the report show them by group.
        """
        groups: dict[str, dict[str, keras.Variable]] = {
            group: {} for group in VARIABLE_GROUPS}
        groups["network"].update(self.backbone.weights_by_name)
        groups["update_rule"].update(self.update_rule.rates)
        for norm in self.backbone.norms:
            for variable in norm.variables:
                kind = variable.name
                group = ("batch_norm" if kind in ("gamma", "beta") else
                         "normalisation" if kind in ("alpha_scale", "alpha_offset") else
                         "running_statistics")
                groups[group][f"{norm.name}/{kind}"] = variable
        return groups

    def checkpoint_items(self) -> dict[str, object]:
        """The trackable parts a checkpoint of the model holds, by checkpoint key.

        The update rule keeps the key `lslr` of the checkpoints written when
        LSLR was the only rule, so every earlier run directory restores.
        """
        return dict(backbone=self.backbone, lslr=self.update_rule)

    def get_weights(self) -> dict[str, np.ndarray]:
        """Every variable of the learner as a copy, by a stable name.

        Names and layouts (`S` inner steps), group by group (`variable_groups`):

        * `backbone/{name}` for each fast weight of `backbone.param_names`, in
          the network's layout. The VGG's: `conv{i}/kernel` `[3, 3, C_in, F]`
          (HWIO, TensorFlow's `conv2d` layout: PyTorch's OIHW transposed by
          `(2, 3, 1, 0)`), `conv{i}/bias` `[F]`, `dense/kernel` `[features,
          n_way]` with rows in the row-major order of the flattened `[H, W, F]`
          feature map, `dense/bias` `[n_way]`.
        * `backbone/{norm}/gamma`, `.../beta` for each batch norm of
          `backbone.norms`: `[S, C]` with per-step batch norm (row `s` serves
          inner step `s`), else `[C]`.
        * `backbone/{norm}/alpha_scale`, `.../alpha_offset` `[S]` (per-step)
          or `[]`: `bn_stats="tasknorm"` only.
        * The inner learning rates of the adapted fast weights (`adapted`):
          `lslr/{name}` `[S]` under LSLR and the fixed rule, the rate of
          `backbone/{name}` at each inner step; `meta_sgd/{name}` under
          Meta-SGD, of the weight's shape, with a leading `[S]` (one row per
          inner step) under `meta_sgd_per_step`.
        * `backbone/{norm}/running_mean`, `.../running_var` `[S, C]`: per-step
          batch norm only.

        Returns:
          `{name: array}`, network weights first, in network order.
        """
        return {name: np.array(variable.numpy()) for name, variable in self._named().items()}

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Assigns every variable from `weights`, keyed as `get_weights` names them.

        Values are converted to each variable's dtype. Nothing is assigned
        unless every name and shape is right.

        Args:
          weights: An array (or tensor) for each name of `get_weights`.

        Raises:
          ValueError: naming the first missing or unknown key, or a key whose
            shape differs from its variable's.
        """
        named = self._named()
        for kind, keys in (("missing", named.keys() - weights.keys()),
                           ("unknown", weights.keys() - named.keys())):
            if keys:
                raise ValueError(f"set_weights: {kind} key {sorted(keys)[0]!r}; expected "
                                 "exactly the names of get_weights()")
        for name, variable in named.items():
            shape = tuple(np.shape(weights[name]))
            if shape != tuple(variable.shape):
                raise ValueError(f"set_weights: {name!r} has shape {shape}, the learner's "
                                 f"variable {tuple(variable.shape)}")
        for name, variable in named.items():
            # Through numpy: a Python float list would be made float32 by TF first.
            variable.assign(np.asarray(weights[name]).astype(variable.dtype))

    def _named(self) -> dict[str, keras.Variable]:
        """The variables by the names of `get_weights`."""
        named = {}
        for group, variables in self.variable_groups().items():
            owner = self.update_rule.name if group == "update_rule" else "backbone"
            named.update({f"{owner}/{name}": variable for name, variable in variables.items()})
        return named

    # ----------------------------------------------------------------- steps

    def epoch_modes(self, epoch: int) -> tuple[bool, bool, np.ndarray]:
        """`(msl, second_order, msl_weights)` of `epoch`: MSL on, derivative order, weights."""
        config = self.config
        return (schedules.msl_active(epoch, config.msl_epochs),
                schedules.use_second_order(epoch, config.second_order,
                                           config.first_order_epochs),
                schedules.msl_weights(epoch, config.inner_steps, config.msl_epochs))

    def meta_loss(self, batch: Batch, epoch: int) -> tf.Tensor:
        """The differentiable meta-loss of `batch` at `epoch` (MSL and DA by epoch).

        Changes no variable, so an outer `tf.GradientTape` over it gives the
        meta-gradient that a training step applies (before clipping).

        Args:
          batch: A meta-batch.
          epoch: Integer epoch selecting the MSL weights and derivative order.

        Returns:
          Scalar: mean over tasks of the task losses.

        Raises:
          ValueError: as `batch_checks.check_batch`.
        """
        batch_checks.check_batch(self.config, batch)
        msl, second_order, weights = self.epoch_modes(epoch)
        losses, _, _ = self.run_tasks(
            tuple(tf.convert_to_tensor(x) for x in batch), num_steps=self.config.inner_steps,
            training=True, second_order=second_order,
            msl_weights=tf.constant(weights, self.config.dtype) if msl else None)
        return tf.reduce_mean(losses)

    def replica_gradients(self, batch: Batch, msl_weights: tf.Tensor | None, *,
                          second_order: bool, replicas: int = 1) -> ReplicaGradients:
        """This replica's share of a meta-step on its tasks; changes no variable.

        Args:
          batch: This replica's tasks (a static number of them).
          msl_weights: `[inner_steps]` per-step query-loss weights, or None for
            the final-step loss only.
          second_order: Differentiate through the inner gradients.
          replicas: Replicas in sync, each with as many tasks.

        Returns:
          The loss, accuracy, gradients and batch moments (see `ReplicaGradients`).

        Raises:
          ValueError: if the number of tasks is not static.
        """
        global_tasks = batch_checks.static_tasks(batch) * replicas
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            losses, logits, records = self.run_tasks(
                batch, num_steps=self.config.inner_steps, training=True,
                second_order=second_order, msl_weights=msl_weights)
            loss = tf.reduce_sum(losses) / global_tasks
        grads = tape.gradient(loss, variables,
                              unconnected_gradients=tf.UnconnectedGradients.ZERO)
        accuracy = tf.reduce_sum(inner_loop.accuracy(batch[3], logits)) / global_tasks
        return ReplicaGradients(loss, accuracy, grads, records)

    def eval_results(self, batch: Batch) -> dict[str, tf.Tensor]:
        """Adapts first-order to each task and scores its query set; changes no variable.

        Args:
          batch: A meta-batch (a static number of tasks).

        Returns:
          `{"loss" [T], "accuracy" [T], "logits" [T, N·Q, n_way], "labels"
          [T, N·Q]}`: each task's final-step query loss, accuracy and logits
          (what the top-k ensemble averages), and its query labels.

        Raises:
          ValueError: if the number of tasks is not static.
        """
        batch_checks.static_tasks(batch)
        losses, logits, _ = self.run_tasks(
            batch, num_steps=self.config.eval_inner_steps, training=False,
            second_order=False, msl_weights=None)
        return dict(loss=losses, accuracy=inner_loop.accuracy(batch[3], logits),
                    logits=logits, labels=batch[3])

    def adapt(self, support_x: tf.Tensor, support_y: tf.Tensor,
              num_steps: int | None = None) -> dict[str, tf.Tensor]:
        """Fast weights adapted to one task's support set (first order, as at evaluation).

        Args:
          support_x: Support images `[N·K, H, W, C]`.
          support_y: Support labels `[N·K]` in `[0, n_way)`.
          num_steps: Inner steps; defaults to `eval_inner_steps`.

        Returns:
          The adapted weights by name; use them with `predict`.

        Raises:
          ValueError: images or labels that do not fit the learner (see
            `batch_checks`), or `num_steps` below 1.
        """
        num_steps = batch_checks.checked_steps(self.config, num_steps)
        shape = batch_checks.check_images(self.config, "support_x", support_x, "n")
        batch_checks.check_labels(self.config, "support_y", support_y, "support_x", shape[:1])
        params = self.backbone.initial_params()
        passes = self._passes(batched=False)
        for step in range(num_steps):
            params, _ = self.inner_step(passes, support_x, support_y, params, step,
                                        training=False, second_order=False)
        return params

    def predict(self, images: tf.Tensor, params: dict[str, tf.Tensor],
                num_steps: int | None = None, *,
                support_x: tf.Tensor | None = None) -> tf.Tensor:
        """Logits of `images [B, H, W, C]` under adapted weights `params`.

        Batch norm uses the row of the last inner step (`trained_step`), as
        the final query pass of the inner loop does.

        Args:
          images: Query images.
          params: Weights from `adapt`.
          num_steps: Inner steps `adapt` took; defaults to `eval_inner_steps`.
          support_x: The support images `params` were adapted to. Required
            under `bn_stats` `support`, `tasknorm` and `rn`, whose statistics come
            from them; unused otherwise.

        Returns:
          Logits `[B, n_way]`.

        Raises:
          ValueError: if `bn_stats` needs `support_x` and it is missing, images
            that do not fit the learner, or `num_steps` below 1.
        """
        num_steps = batch_checks.checked_steps(self.config, num_steps)
        batch_checks.check_images(self.config, "images", images, "B")
        if self.config.bn_stats in CONTEXT_BN_STATS:
            if support_x is None:
                raise ValueError(f"bn_stats={self.config.bn_stats!r} normalises with the "
                                 "support set's statistics: pass support_x to predict")
            batch_checks.check_images(self.config, "support_x", support_x, "n")
        else:
            support_x = None
        logits, _ = self._query_pass(self._passes(batched=False), support_x, images, params,
                                     self.trained_step(num_steps - 1), False, batch_axis=0)
        return logits
