"""VGGBackbone: architecture, parameter counts, initialisation and the strided variant."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from mamlpp_tf.nets import VGGBackbone


def count_params(backbone):
    """Trainable parameters, as the official code counts them (no running stats)."""
    return sum(int(np.prod(v.shape)) for v in backbone.trainable_variables)


@pytest.mark.parametrize("n_way,image_shape,filters,want", [
    (5, (28, 28, 1), 64, 114_309),   # Official net: Omniglot 5-way, per-step BN, 5 steps.
    (20, (28, 28, 1), 64, 115_284),  # Omniglot 20-way.
    (5, (84, 84, 3), 48, 71_621),    # mini-ImageNet.
])
def test_parameter_counts_match_the_official_network(n_way, image_shape, filters, want):
    backbone = VGGBackbone(n_way, image_shape, num_filters=filters, num_steps=5)
    assert count_params(backbone) == want
    assert backbone.param_names == [f"conv{i}/{p}" for i in range(4)
                                    for p in ("kernel", "bias")] + ["dense/kernel", "dense/bias"]


def test_glorot_uniform_kernels_and_zero_biases():
    backbone = VGGBackbone(5, (28, 28, 1), num_filters=64)
    weights = backbone.weights_by_name
    first, later = np.sqrt(6 / (9 * 1 + 9 * 64)), np.sqrt(6 / (9 * 64 + 9 * 64))
    assert np.abs(weights["conv0/kernel"].numpy()).max() <= first
    assert np.abs(weights["conv0/kernel"].numpy()).max() > 0.9 * first
    assert np.abs(weights["conv2/kernel"].numpy()).max() <= later
    for name in ("conv0/bias", "conv3/bias", "dense/bias"):
        np.testing.assert_array_equal(weights[name].numpy(), 0.0)


def test_forward_shapes_and_leaky_slope():
    backbone = VGGBackbone(5, (84, 84, 3), num_filters=8, num_steps=2)
    assert backbone.feature_shape == (5, 5, 8)
    x = tf.random.normal([3, 84, 84, 3])
    logits, moments = backbone.forward(x, backbone.initial_params(), step=1, training=True)
    assert logits.shape == (3, 5) and len(moments) == 4
    assert moments[0].mean.shape == (8,) and moments[0].count == 3 * 84 * 84
    # One stage on a constant negative map isolates the activation: BN of a
    # constant is beta, so the output is leaky_relu(beta) = 0.01 * beta.
    one = VGGBackbone(2, (4, 4, 1), num_filters=1, num_stages=1, num_steps=1,
                      dtype="float64")
    one.weights_by_name["conv0/kernel"].assign(np.zeros((3, 3, 1, 1)))
    one.norms[0].beta.assign([[-3.0]])
    one.weights_by_name["dense/kernel"].assign([[1.0, 0.0]] * 4)
    logits, _ = one.forward(tf.ones([2, 4, 4, 1], tf.float64), one.initial_params(), 0, True)
    np.testing.assert_allclose(logits.numpy()[:, 0], 4 * 0.01 * -3.0, atol=1e-6)


def test_strided_variant_matches_pytorch_padding():
    backbone = VGGBackbone(5, (28, 28, 1), num_filters=4, max_pooling=False, num_steps=1,
                           dtype="float64")
    assert backbone.feature_shape == (1, 1, 4)  # Global average pool before the head.
    x = np.random.RandomState(0).randn(2, 28, 28, 1)
    kernel = backbone.weights_by_name["conv0/kernel"].numpy()
    # PyTorch Conv2d(stride=2, padding=1) on 28x28 reads rows -1, 1, ..., 25 (pad on both sides).
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    want = np.zeros((2, 14, 14, 4))
    for i in range(14):
        for j in range(14):
            patch = padded[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3, :]
            want[:, i, j] = np.einsum("bhwc,hwco->bo", patch, kernel)
    got = backbone._conv(tf.constant(x), kernel).numpy()
    np.testing.assert_allclose(got, want, atol=1e-10)
    logits, _ = backbone.forward(x, backbone.initial_params(), 0, True)
    assert logits.shape == (2, 5)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="num_stages=4"):
        VGGBackbone(5, (8, 8, 1), num_stages=4)
    with pytest.raises(ValueError, match="image_shape"):
        VGGBackbone(5, (28, 28))


def test_get_config_round_trips():
    backbone = VGGBackbone(20, (28, 28, 1), num_filters=8, num_steps=3, per_step_bn=False)
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(backbone))
    assert clone.get_config() == backbone.get_config()
    assert count_params(clone) == count_params(backbone)
