"""The task-batched layout computes exactly what the per-task loop computes."""

import numpy as np
import pytest
import tensorflow as tf

from conftest import random_batch, tiny_config
from mamlpp_tf import MamlPlusPlus


def pair(**overrides):
    loop = MamlPlusPlus(tiny_config(task_impl="loop", **overrides))
    batched = MamlPlusPlus(tiny_config(task_impl="batched", **overrides))
    for a, b in zip(batched.trainable_variables + batched.running_stat_variables,
                    loop.trainable_variables + loop.running_stat_variables):
        a.assign(b)
    return loop, batched


def loss_and_grads(learner, batch, epoch):
    with tf.GradientTape() as tape:
        loss = learner.meta_loss(batch, epoch)
    return loss.numpy(), [g.numpy() for g in tape.gradient(loss, learner.trainable_variables)]


@pytest.mark.parametrize("second_order", [True, False])
@pytest.mark.parametrize("per_step_bn,msl_epochs", [(True, 2), (False, 0)])
def test_meta_loss_and_gradients_agree(second_order, per_step_bn, msl_epochs):
    loop, batched = pair(second_order=second_order, per_step_bn=per_step_bn,
                         msl_epochs=msl_epochs)
    batch = random_batch(loop.config, tasks=3)
    loss_a, grads_a = loss_and_grads(loop, batch, 0)
    loss_b, grads_b = loss_and_grads(batched, batch, 0)
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-10)
    for a, b in zip(grads_a, grads_b):
        np.testing.assert_allclose(b, a, rtol=1e-8, atol=1e-12)


def test_train_and_eval_steps_agree_including_running_statistics():
    loop, batched = pair(bn_stats="running")
    batch = random_batch(loop.config, tasks=3)
    for learner in (loop, batched):
        learner.train_step(batch, epoch=0)
    for a, b in zip(loop.trainable_variables + loop.running_stat_variables,
                    batched.trainable_variables + batched.running_stat_variables):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-8, atol=1e-12)
    eval_a, eval_b = loop.eval_step(batch), batched.eval_step(batch)
    np.testing.assert_allclose(eval_b["logits"].numpy(), eval_a["logits"].numpy(), atol=1e-9)
