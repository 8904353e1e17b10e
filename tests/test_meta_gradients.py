"""The meta-gradient against independent computations.

* central finite differences of the float64 meta-loss (second order exact);
* a closed-form second-order gradient of a linear softmax model (numpy);
* a hand-unrolled MAML++ reference written here with raw TF ops.
"""

import numpy as np
import pytest
import tensorflow as tf

from mamlpp_tf import MamlPlusPlus
from mamlpp_tf.nets import FastWeightNetwork

from conftest import (
    assert_random_directions_match_fd,
    directional_fd,
    hand_unrolled_meta_loss,
    meta_gradient,
    random_batch,
    relative_error,
    tiny_config,
)


def test_second_order_meta_gradient_equals_finite_differences():
    config = tiny_config(inner_steps=3, eval_inner_steps=3, msl_epochs=3)
    learner = MamlPlusPlus(config)
    batch = random_batch(config, tasks=2)
    _, grads = meta_gradient(learner, batch, epoch=1)  # MSL on: [1/3 - 1/9, ..., ].
    rng = assert_random_directions_match_fd(learner, batch, 1, grads, trials=3, seed=0)
    # Each group of variables on its own (network, BN gamma/beta, LSLR).
    for index, variable in enumerate(learner.trainable_variables):
        direction = [np.zeros(g.shape) for g in grads]
        direction[index] = rng.randn(*grads[index].shape)
        analytic = np.sum(grads[index] * direction[index])
        if abs(analytic) < 1e-9:
            continue  # Conv biases in front of batch norm have no effect.
        numeric = directional_fd(learner, batch, 1, direction)
        assert relative_error(analytic, numeric) < 1e-5, (variable.path, analytic, numeric)


def test_first_order_differs_and_coincides_when_inner_rates_are_zero():
    config = tiny_config()
    second = MamlPlusPlus(config)
    first = MamlPlusPlus(tiny_config(second_order=False))
    first.set_weights(second.get_weights())
    batch = random_batch(config)
    _, g2 = meta_gradient(second, batch, 0)
    _, g1 = meta_gradient(first, batch, 0)
    flat1, flat2 = np.concatenate([g.ravel() for g in g1]), np.concatenate([g.ravel() for g in g2])
    assert np.linalg.norm(flat1 - flat2) > 1e-3 * np.linalg.norm(flat2)
    # The second-order term is α·Hessian: with all rates 0 it vanishes.
    for learner in (first, second):
        weights = learner.get_weights()
        learner.set_weights({name: np.zeros_like(value) if name.startswith("lslr/") else value
                             for name, value in weights.items()})
    _, g2 = meta_gradient(second, batch, 0)
    _, g1 = meta_gradient(first, batch, 0)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, atol=1e-12)


def test_rates_and_per_step_bn_get_gradients_in_both_orders():
    for second_order in (True, False):
        learner = MamlPlusPlus(tiny_config(second_order=second_order))
        _, grads = meta_gradient(learner, random_batch(learner.config), 0)
        by_path = dict(zip([v.path for v in learner.trainable_variables], grads))
        for name, rate in learner.lslr.rates.items():
            if "conv" in name and "bias" in name:
                continue  # Biases before BN: their true gradient is zero.
            assert np.all(np.abs(by_path[rate.path]) > 1e-8), (second_order, name)
        for norm in learner.backbone.norms:
            assert np.all(np.abs(by_path[norm.gamma.path]).sum(axis=1) > 1e-8)
            assert np.all(np.abs(by_path[norm.beta.path]).sum(axis=1) > 1e-8)


class LinearBackbone(FastWeightNetwork):
    """logits = flatten(x) @ W + b: the one-layer model of the closed-form test."""

    def __init__(self, features, n_way, **kwargs):
        super().__init__(**kwargs)
        self.features, self.n_way = features, n_way
        self.param_names = ["dense/kernel", "dense/bias"]
        self.add_fast_weight("dense/kernel", (features, n_way), "glorot_uniform")
        self.add_fast_weight("dense/bias", (n_way,), "random_normal")

    def forward(self, x, params, step, training, context=None):
        del step, training, context
        x = tf.reshape(x, [tf.shape(x)[0], -1])
        return x @ params["dense/kernel"] + params["dense/bias"], []


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def closed_form_one_step(x_s, y_s, x_q, y_q, w, b, alpha_w, alpha_b):
    """Second-order MAML gradient of one task with one inner step, in numpy.

    θ1 = θ0 − α ⊙ g_S(θ0); dL_Q(θ1)/dθ0 = G − H_S(θ0)(α ⊙ G) with G = ∇L_Q(θ1),
    and dL_Q/dα = −<g_S(θ0), G> per tensor.
    """
    n = w.shape[1]
    onehot_s, onehot_q = np.eye(n)[y_s], np.eye(n)[y_q]
    p_s = softmax(x_s @ w + b)
    g_w, g_b = x_s.T @ (p_s - onehot_s) / len(x_s), (p_s - onehot_s).mean(0)
    w1, b1 = w - alpha_w * g_w, b - alpha_b * g_b
    p_q = softmax(x_q @ w1 + b1)
    big_g_w, big_g_b = x_q.T @ (p_q - onehot_q) / len(x_q), (p_q - onehot_q).mean(0)
    # Hessian-vector product of the support loss with V = α ⊙ G.
    dz = x_s @ (alpha_w * big_g_w) + alpha_b * big_g_b
    dp = p_s * dz - p_s * np.sum(p_s * dz, axis=1, keepdims=True)
    hv_w, hv_b = x_s.T @ dp / len(x_s), dp.mean(0)
    return dict(w=big_g_w - hv_w, b=big_g_b - hv_b,
                alpha_w=-np.sum(g_w * big_g_w), alpha_b=-np.sum(g_b * big_g_b))


def test_second_order_gradient_of_a_linear_model_in_closed_form():
    config = tiny_config(n_way=3, inner_steps=1, eval_inner_steps=1, msl_epochs=0,
                         image_shape=(2, 2, 1))
    backbone = LinearBackbone(4, 3, dtype="float64")
    learner = MamlPlusPlus(config, backbone=backbone)
    learner.set_weights(dict(learner.get_weights(), **{"lslr/dense/kernel": [0.7],
                                                       "lslr/dense/bias": [-0.4]}))
    batch = random_batch(config, tasks=3, k_shot=2, n_query=3)
    _, grads = meta_gradient(learner, batch, 0)
    got = dict(zip([v.path for v in learner.trainable_variables], grads))
    want = [closed_form_one_step(batch[0][t].reshape(6, 4), batch[1][t],
                                 batch[2][t].reshape(9, 4), batch[3][t],
                                 backbone.dense_kernel.numpy(), backbone.dense_bias.numpy(),
                                 0.7, -0.4)
            for t in range(3)]
    mean = {k: np.mean([w[k] for w in want], axis=0) for k in want[0]}
    np.testing.assert_allclose(got[backbone.dense_kernel.path], mean["w"], rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(got[backbone.dense_bias.path], mean["b"], rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(got[learner.lslr.rates["dense/kernel"].path], [mean["alpha_w"]],
                               rtol=1e-10)
    np.testing.assert_allclose(got[learner.lslr.rates["dense/bias"].path], [mean["alpha_b"]],
                               rtol=1e-10)


def reference_meta_loss(weights, gammas, betas, rates, batch, msl_weights, n_stages):
    """MAML++ written out by hand for the tiny VGG net: conv, BN, leaky ReLU, pool, dense."""

    def net(x, w, step, support):
        del support  # Batch statistics of `x` itself.
        for i in range(n_stages):
            x = tf.nn.conv2d(x, w[f"conv{i}/kernel"], 1, "SAME") + w[f"conv{i}/bias"]
            mean = tf.reduce_mean(x, axis=[0, 1, 2])
            var = tf.reduce_mean((x - mean)**2, axis=[0, 1, 2])
            x = (x - mean) / tf.sqrt(var + 1e-5) * gammas[i][step] + betas[i][step]
            x = tf.maximum(x, 0.01 * x)
            x = tf.nn.max_pool2d(x, 2, 2, "VALID")
        x = tf.reshape(x, [x.shape[0], -1])
        return x @ w["dense/kernel"] + w["dense/bias"]

    return hand_unrolled_meta_loss(net, weights, rates, batch, msl_weights)


def test_meta_gradient_equals_hand_unrolled_reference():
    config = tiny_config(inner_steps=2, eval_inner_steps=2, msl_epochs=3)
    learner = MamlPlusPlus(config)
    batch = random_batch(config, tasks=2)
    epoch = 1
    # The official MSL weights with N=2, E=3, e=1; the official weights are float32.
    msl = np.float32([1 / 2 - 1 / 6, 1 / 2 + 1 / 6]).astype(np.float64)
    _, grads = meta_gradient(learner, batch, epoch)
    got = dict(zip([v.path for v in learner.trainable_variables], grads))

    values = learner.get_weights()
    names = learner.backbone.param_names
    weights = {k: tf.Variable(values[f"backbone/{k}"]) for k in names}
    gammas = [tf.Variable(values[f"backbone/norm{i}/gamma"]) for i in range(2)]
    betas = [tf.Variable(values[f"backbone/norm{i}/beta"]) for i in range(2)]
    rates = {k: tf.Variable(values[f"lslr/{k}"]) for k in names}
    with tf.GradientTape() as tape:
        loss = reference_meta_loss(weights, gammas, betas, rates,
                                   [tf.constant(x) for x in batch], msl, 2)
    ref = tape.gradient(loss, [weights, gammas, betas, rates])
    np.testing.assert_allclose(learner.meta_loss(batch, epoch).numpy(), loss.numpy(),
                               rtol=1e-10)
    for name, variable in learner.backbone.weights_by_name.items():
        np.testing.assert_allclose(got[variable.path], ref[0][name].numpy(), rtol=1e-7,
                                   atol=1e-13, err_msg=name)
    for i, norm in enumerate(learner.backbone.norms):
        np.testing.assert_allclose(got[norm.gamma.path], ref[1][i].numpy(), rtol=1e-7,
                                   atol=1e-13)
        np.testing.assert_allclose(got[norm.beta.path], ref[2][i].numpy(), rtol=1e-7,
                                   atol=1e-13)
    for name, rate in learner.lslr.rates.items():
        np.testing.assert_allclose(got[rate.path], ref[3][name].numpy(), rtol=1e-7,
                                   atol=1e-13, err_msg=name)


@pytest.mark.parametrize("epoch", [0, 1])
def test_msl_loss_is_the_weighted_sum_of_per_step_query_losses(epoch):
    config = tiny_config(inner_steps=3, eval_inner_steps=3, msl_epochs=1)
    learner = MamlPlusPlus(config)
    batch = random_batch(config)
    per_step = []
    for step in range(3):
        onehot = tf.one_hot(step, 3, dtype=tf.float64)
        losses, _, _ = learner.run_tasks(batch, num_steps=3, training=True, second_order=True,
                                         msl_weights=onehot)
        per_step.append(losses.numpy().mean())
    want = np.dot([np.float32(1 / 3)] * 3, per_step) if epoch == 0 else per_step[-1]
    np.testing.assert_allclose(learner.meta_loss(batch, epoch).numpy(), want, rtol=1e-12)
