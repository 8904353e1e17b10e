"""PerStepBatchNorm and PerStepLearningRates against numpy references."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from mamlpp_tf.nets import PerStepBatchNorm, differentiated_twice
from mamlpp_tf.update_rules import PerStepLearningRates


def numpy_batch_norm(x, gamma, beta, eps=1e-5):
    mean = x.mean(axis=(0, 1, 2))
    var = ((x - mean)**2).mean(axis=(0, 1, 2))
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def numpy_tasknorm(x, context_mean, context_var, alpha, gamma, beta, eps=1e-5):
    """TaskNorm-I as the reference code pools moments, with biased variances."""
    image_mean = x.mean(axis=(1, 2), keepdims=True)
    image_var = x.var(axis=(1, 2), keepdims=True)
    mean = alpha * context_mean + (1 - alpha) * image_mean
    var = (alpha * (context_var + (context_mean - mean)**2) +
           (1 - alpha) * (image_var + (image_mean - mean)**2))
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def make_bn(bn_stats="batch", steps=3, channels=4, per_step=True, context_size=None):
    layer = PerStepBatchNorm(steps, per_step=per_step, bn_stats=bn_stats, dtype="float64",
                             context_size=context_size)
    layer.build((None, 5, 5, channels))
    rng = np.random.RandomState(0)
    layer.gamma.assign(rng.rand(*layer.gamma.shape) + 0.5)
    layer.beta.assign(rng.randn(*layer.beta.shape))
    if per_step:
        layer.running_mean.assign(rng.randn(steps, channels))
        layer.running_var.assign(rng.rand(steps, channels) + 0.5)
    if bn_stats == "tasknorm":
        layer.alpha_scale.assign(rng.randn(*layer.alpha_scale.shape))
        layer.alpha_offset.assign(rng.randn(*layer.alpha_offset.shape))
    return layer


def test_per_step_bn_shapes_and_initial_values():
    layer = PerStepBatchNorm(5)
    layer.build((None, 28, 28, 64))
    for variable, value in ((layer.gamma, 1.0), (layer.beta, 0.0),
                            (layer.running_mean, 0.0), (layer.running_var, 1.0)):
        assert tuple(variable.shape) == (5, 64)
        np.testing.assert_array_equal(variable.numpy(), value)
    assert {v.path.split("/")[-1] for v in layer.trainable_variables} == {"gamma", "beta"}
    assert len(layer.non_trainable_variables) == 2


@pytest.mark.parametrize("training", [True, False])
def test_batch_mode_uses_batch_statistics_always(training):
    layer = make_bn("batch")
    x = np.random.RandomState(1).randn(6, 5, 5, 4) * 3 + 2
    for step in range(3):
        got = layer(x, step=step, training=training).numpy()
        want = numpy_batch_norm(x, layer.gamma.numpy()[step], layer.beta.numpy()[step])
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # Running statistics are never read under bn_stats="batch".
    layer.running_mean.assign(layer.running_mean.numpy() + 10.0)
    np.testing.assert_allclose(layer(x, step=2, training=training).numpy(), want, atol=1e-12)


def test_running_mode_reads_running_statistics_at_evaluation_only():
    layer = make_bn("running")
    x = np.random.RandomState(2).randn(6, 5, 5, 4)
    g, b = layer.gamma.numpy()[1], layer.beta.numpy()[1]
    mean, var = layer.running_mean.numpy()[1], layer.running_var.numpy()[1]
    np.testing.assert_allclose(layer(x, step=1, training=False).numpy(),
                               (x - mean) / np.sqrt(var + 1e-5) * g + b, atol=1e-12)
    np.testing.assert_allclose(layer(x, step=1, training=True).numpy(),
                               numpy_batch_norm(x, g, b), atol=1e-12)


def test_perturbing_one_row_changes_only_that_step():
    layer = make_bn("batch")
    x = np.random.RandomState(3).randn(4, 5, 5, 4)
    before = [layer(x, step=s, training=True).numpy() for s in range(3)]
    gamma = layer.gamma.numpy()
    gamma[1] += 0.25
    layer.gamma.assign(gamma)
    after = [layer(x, step=s, training=True).numpy() for s in range(3)]
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[2], after[2])
    assert np.abs(before[1] - after[1]).max() > 1e-3


def test_task_axes_keep_statistics_per_task():
    layer = make_bn("batch")
    x = np.random.RandomState(4).randn(3, 5, 5, 2, 4)  # [B, H, W, T, C]
    got = layer(x, step=0, training=True, axes=(0, 1, 2)).numpy()
    for t in range(2):
        want = numpy_batch_norm(x[:, :, :, t], layer.gamma.numpy()[0], layer.beta.numpy()[0])
        np.testing.assert_allclose(got[:, :, :, t], want, atol=1e-12)


def test_running_stat_update_is_pytorch_momentum_with_unbiased_variance():
    layer = make_bn("batch")
    old_mean, old_var = layer.running_mean.numpy(), layer.running_var.numpy()
    x = np.random.RandomState(5).randn(4, 5, 5, 4)
    n = 4 * 5 * 5
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    layer.update_running_stats(2, mean, var, n)
    want_mean, want_var = old_mean.copy(), old_var.copy()
    want_mean[2] = 0.9 * old_mean[2] + 0.1 * mean
    want_var[2] = 0.9 * old_var[2] + 0.1 * x.var(axis=(0, 1, 2), ddof=1)
    np.testing.assert_allclose(layer.running_mean.numpy(), want_mean, atol=1e-12)
    np.testing.assert_allclose(layer.running_var.numpy(), want_var, atol=1e-12)


@pytest.mark.parametrize("training", [True, False])
def test_support_mode_takes_statistics_from_the_context_images_only(training):
    layer = make_bn("support")
    x = np.random.RandomState(10).randn(7, 5, 5, 4) * 2 + 1
    got = layer(x, step=1, training=training, context=3).numpy()
    context = x[:3]
    mean, var = context.mean(axis=(0, 1, 2)), context.var(axis=(0, 1, 2))
    want = (x - mean) / np.sqrt(var + 1e-5) * layer.gamma.numpy()[1] + layer.beta.numpy()[1]
    np.testing.assert_allclose(got, want, atol=1e-12)
    # Without a context the batch is its own context: the "batch" mode's numbers.
    np.testing.assert_allclose(layer(x, step=1, training=training).numpy(),
                               make_bn("batch")(x, step=1, training=training).numpy(),
                               atol=1e-12)


@pytest.mark.parametrize("per_step", [True, False])
def test_tasknorm_blends_context_and_instance_moments(per_step):
    layer = make_bn("tasknorm", per_step=per_step)
    x = np.random.RandomState(11).randn(6, 5, 5, 4) * 2 + 1
    step = 2 if per_step else 0
    row = (lambda v: v.numpy()[step]) if per_step else (lambda v: v.numpy())
    context = x[:4]
    alpha = 1 / (1 + np.exp(-(row(layer.alpha_scale) * 4 + row(layer.alpha_offset))))
    want = numpy_tasknorm(x, context.mean(axis=(0, 1, 2)), context.var(axis=(0, 1, 2)),
                          alpha, row(layer.gamma), row(layer.beta))
    for training in (True, False):
        got = layer(x, step=step, training=training, context=4).numpy()
        np.testing.assert_allclose(got, want, atol=1e-12)
    assert {v.path.split("/")[-1] for v in layer.trainable_variables} == {
        "gamma", "beta", "alpha_scale", "alpha_offset"}
    fresh = PerStepBatchNorm(3, bn_stats="tasknorm")
    fresh.build((None, 5, 5, 4))
    np.testing.assert_array_equal(fresh.alpha(0, 10).numpy(), 0.5)  # a = b = 0 initially.


def test_stored_context_layer_reads_its_context_moments_at_evaluation():
    """A served task model's layer: stored support moments, blended with each image's."""
    layer = make_bn("tasknorm", steps=1, context_size=5)
    x = np.random.RandomState(12).randn(2, 5, 5, 4)
    alpha = 1 / (1 + np.exp(-(layer.alpha_scale.numpy()[0] * 5 +
                               layer.alpha_offset.numpy()[0])))
    want = numpy_tasknorm(x, layer.running_mean.numpy()[0], layer.running_var.numpy()[0],
                          alpha, layer.gamma.numpy()[0], layer.beta.numpy()[0])
    np.testing.assert_allclose(layer(x, step=0, training=False).numpy(), want, atol=1e-12)
    # One image alone gets its answer in the pair.
    np.testing.assert_allclose(layer(x[1:], step=0, training=False).numpy(), want[1:],
                               atol=1e-12)
    with pytest.raises(ValueError, match="context_size"):
        PerStepBatchNorm(1, bn_stats="support", context_size=5)


def test_shared_bn_for_plain_maml():
    layer = make_bn("batch", per_step=False)
    assert tuple(layer.gamma.shape) == (4,) and not layer.non_trainable_variables
    x = np.random.RandomState(6).randn(4, 5, 5, 4)
    np.testing.assert_allclose(layer(x, step=2, training=False).numpy(),
                               numpy_batch_norm(x, layer.gamma.numpy(), layer.beta.numpy()),
                               atol=1e-12)
    with pytest.raises(ValueError, match="per_step"):
        PerStepBatchNorm(5, per_step=False, bn_stats="running")


def test_second_derivative_through_variance_is_exact():
    # tf.nn.moments would stop the gradient through the mean inside the
    # variance; a float64 finite difference of a gradient catches that.
    layer = make_bn("batch", steps=1, channels=1)
    x0 = np.random.RandomState(7).randn(3, 2, 2, 1)
    direction = np.random.RandomState(8).randn(*x0.shape)

    def grad_norm(x):
        x = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.reduce_sum(tf.sin(layer(x, step=0, training=True)))
        return tf.reduce_sum(tape.gradient(y, x)**2)

    x = tf.constant(x0)
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = grad_norm(x)
    analytic = np.sum(tape.gradient(value, x).numpy() * direction)
    h = 1e-5
    numeric = (grad_norm(x0 + h * direction) - grad_norm(x0 - h * direction)).numpy() / (2 * h)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6)


@pytest.mark.parametrize("cls,kwargs", [
    (PerStepBatchNorm, dict(num_steps=4, per_step=True, bn_stats="running", momentum=0.2)),
    (PerStepBatchNorm, dict(num_steps=1, bn_stats="tasknorm", context_size=10)),
    (PerStepLearningRates, dict(param_names=["a/kernel", "a/bias"], num_steps=3,
                                initial_rate=0.05)),
])
def test_get_config_round_trips(cls, kwargs):
    layer = cls(**kwargs, name="layer")
    config = layer.get_config()
    clone = cls.from_config(config)
    assert clone.get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(restored, cls) and restored.get_config() == config


def test_lslr_shapes_init_and_update_rule():
    names = [f"conv{i}/{p}" for i in range(4) for p in ("kernel", "bias")]
    names += ["dense/kernel", "dense/bias"]
    lslr = PerStepLearningRates(names, num_steps=5, initial_rate=0.1, dtype="float64")
    assert len(lslr.trainable_variables) == 10
    for variable in lslr.rates.values():
        assert tuple(variable.shape) == (5,)
        np.testing.assert_allclose(variable.numpy(), 0.1)
    rates = lslr.rates["conv1/bias"].numpy()
    rates[3] = -0.7  # Rates are unconstrained: negative values are allowed.
    lslr.rates["conv1/bias"].assign(rates)
    rng = np.random.RandomState(0)
    params = {n: rng.randn(3) for n in names}
    grads = {n: rng.randn(3) for n in names}
    new = lslr.update(params, grads, 3)
    np.testing.assert_allclose(new["conv1/bias"], params["conv1/bias"] + 0.7 * grads["conv1/bias"])
    np.testing.assert_allclose(new["dense/kernel"],
                               params["dense/kernel"] - 0.1 * grads["dense/kernel"])
    with pytest.raises(ValueError, match="step 5"):
        lslr.update(params, grads, 5)


def test_frozen_lslr_has_no_trainable_variables():
    lslr = PerStepLearningRates(["w"], num_steps=2, trainable=False)
    assert not lslr.trainable_variables and len(lslr.non_trainable_variables) == 1


def _plain_batch_norm(x, gamma, beta, axes):
    """Batch norm that TensorFlow differentiates itself: the independent reference."""
    mean = tf.reduce_mean(x, axis=axes, keepdims=True)
    variance = tf.reduce_mean(tf.square(x - mean), axis=axes, keepdims=True)
    return (x - mean) * tf.math.rsqrt(variance + 1e-5) * gamma + beta


def _second_order(normalize, x, gamma, beta, weights, axes):
    """Values, first derivatives and a second-order derivative of a batch-norm pass (traced).

    `normalize` is `_plain_batch_norm` (gamma and beta tensors) or a
    `PerStepBatchNorm` with one step, which takes them from its variables.
    """
    layer = normalize if isinstance(normalize, PerStepBatchNorm) else None
    if layer is not None:
        layer.build((None, x.shape[-1]))
        layer.gamma.assign(gamma[None])
        layer.beta.assign(beta[None])
        gamma, beta = layer.gamma.value, layer.beta.value  # The tf.Variables.

    @tf.function
    def run():
        with tf.GradientTape() as outer:
            outer.watch([x, gamma, beta])
            with tf.GradientTape() as inner:
                inner.watch([x, gamma, beta])
                y = (layer.normalize(x, step=0, training=True, axes=axes)[0] if layer else
                     normalize(x, gamma, beta, axes))
                loss = tf.reduce_sum(tf.sin(y) * weights)
            grads = inner.gradient(loss, [x, gamma, beta])
            # Every first derivative feeds the outer objective, as the inner
            # loop's gradients feed the meta-loss.
            objective = (tf.reduce_sum(grads[0]**2 * weights) + tf.reduce_sum(grads[1]**3) +
                         tf.reduce_sum(grads[2]**3))
        return [loss] + grads + outer.gradient(objective, [x, gamma, beta])

    return [np.reshape(value.numpy(), np.shape(want)) for value, want in
            zip(run(), [0.0, x, beta, beta, x, beta, beta])]


@pytest.mark.parametrize("shape,axes", [((6, 5, 5, 4), (0, 1, 2)),
                                        ((3, 4, 5, 5, 4), (1, 2, 3))])
@pytest.mark.parametrize("twice", [False, True])
def test_batch_norm_gradients_equal_autodiff_to_second_order(shape, axes, twice):
    # The layer's hand-derived (and, in float32, fused) gradients against
    # TensorFlow's derivatives of the plain forward ops, in float64, and in
    # float32 against the float64 reference to float32 rounding.
    rng = np.random.RandomState(3)
    arrays = (rng.randn(*shape) * 2 + 1, rng.rand(shape[-1]) + 0.5, rng.randn(shape[-1]),
              rng.randn(*shape))
    reference = _second_order(_plain_batch_norm, *map(tf.constant, arrays), axes)
    with differentiated_twice(twice):
        exact = _second_order(PerStepBatchNorm(1, dtype="float64"),
                              *map(tf.constant, arrays), axes)
        rounded = _second_order(PerStepBatchNorm(1, dtype="float32"),
                                *(tf.constant(a, tf.float32) for a in arrays), axes)
    for want, got64, got32 in zip(reference, exact, rounded):
        scale = np.max(np.abs(want))
        assert np.max(np.abs(got64 - want)) <= 1e-12 * scale
        assert np.max(np.abs(got32 - want)) <= 2e-5 * scale


def _traced_op_types(x):
    """Op types of a traced batch-norm gradient of `x`."""
    layer = PerStepBatchNorm(1, dtype=x.dtype.name)
    layer.build((None, x.shape[-1]))

    @tf.function
    def gradient(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            axes = (1, 2, 3) if x.shape.rank == 5 else None
            loss = tf.reduce_sum(layer(x, step=0, training=True, axes=axes)**2)
        return tape.gradient(loss, x)

    return {op.type for op in gradient.get_concrete_function(x).graph.get_operations()}


def test_fused_kernels_serve_passes_differentiated_once_only():
    x = tf.random.stateless_normal((4, 3, 3, 2), seed=(0, 1))
    assert {"FusedBatchNormV3", "FusedBatchNormGradV3"} <= _traced_op_types(x)
    with differentiated_twice():
        with differentiated_twice(False):
            assert "FusedBatchNormV3" in _traced_op_types(x)
        twice = _traced_op_types(x)  # The outer setting is back.
    assert not any(op.startswith("FusedBatchNorm") for op in twice)
    # No fused kernels in float64 (none on CPU), for a task-batched pass, or
    # for a batch unknown when traced (oneDNN's kernel fails on an empty one).
    for other in (tf.cast(x, tf.float64), x[None]):
        assert not any(op.startswith("FusedBatchNorm") for op in _traced_op_types(other))

def test_a_batch_unknown_when_traced_runs_the_fused_kernels_and_an_empty_one_does_not():
    # A serving signature's batch runs the library's kernels; an empty batch
    # known when traced takes the unfused path (oneDNN's kernel fails on it).
    layer = PerStepBatchNorm(1)
    layer.build((None, 2))
    normalize = tf.function(lambda x: layer.normalize(x, step=0, training=True),
                            input_signature=[tf.TensorSpec([None, 3, 3, 2], tf.float32)])
    x = tf.random.stateless_normal((4, 3, 3, 2), seed=(0, 2))
    for got, want in zip(normalize(x), layer.normalize(x, step=0, training=True)):
        np.testing.assert_array_equal(got.numpy(), want.numpy())  # The same kernel.
    assert "FusedBatchNormV3" in _traced_op_types(x)
    assert not any(op.startswith("FusedBatchNorm") for op in _traced_op_types(x[:0]))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_batch_norm_moments_are_the_biased_batch_moments(dtype):
    x = np.random.RandomState(4).randn(6, 5, 5, 3) * 3 + 2
    layer = PerStepBatchNorm(3, dtype=dtype)
    layer.build((None, 5, 5, 3))
    _, mean, variance = layer.normalize(tf.constant(x, dtype), step=1, training=True)
    np.testing.assert_allclose(mean.numpy(), x.mean(axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(variance.numpy(), x.var(axis=(0, 1, 2)), rtol=1e-5)
