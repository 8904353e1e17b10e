"""`ResNet12Backbone`: ALFA's / MeTAL's ResNet-12, against numpy and finite differences.

The architecture (parameter counts, names, the pooled sizes 28 → 14 → 7 → 4
and 84 → 42 → 21 → 11); the forward pass against an independent numpy
reference with PyTorch's -inf-padded max pooling; the context set of the
non-transductive statistics; the second-order meta-gradient of every
variable group against float64 finite differences; variants, the registry,
mixed precision and argument checks.
"""

import inspect
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from mamlpp_tf import MamlPlusPlus
from mamlpp_tf.nets import backbone_names, build_backbone
from mamlpp_tf.nets.resnet12 import ResNet12Backbone

from conftest import (
    assert_random_directions_match_fd,
    directional_fd,
    meta_gradient,
    random_batch,
    relative_error,
    tiny_config,
)

WIDTHS = (2, 3, 2, 3)
EPSILON = 1e-5  # PerStepBatchNorm's.
OMNIGLOT_SIZES = [(28, 28), (14, 14), (7, 7), (4, 4)]
MINI_IMAGENET_SIZES = [(84, 84), (42, 42), (21, 21), (11, 11)]


def small_backbone(**overrides) -> ResNet12Backbone:
    values = dict(n_way=3, image_shape=(28, 28, 1), widths=WIDTHS, num_steps=2,
                  dtype="float64")
    return ResNet12Backbone(**{**values, **overrides})


def resnet12_param_count(channels: int, widths, n_way: int) -> int:
    """Fast weights: per block 3×3 convs C→w, w→w, w→w and a 1×1 shortcut C→w; the head."""
    count = 0
    for width in widths:
        count += 9 * channels * width + 2 * 9 * width * width + channels * width
        channels = width
    return count + channels * n_way + n_way


def random_params(backbone: ResNet12Backbone, rng: np.random.RandomState):
    """Generic fast weights: kernels with variance 1/fan-in, a non-zero head bias."""
    params = {}
    for name in backbone.param_names:
        shape = tuple(backbone.weights_by_name[name].shape)
        scale = 1 / math.sqrt(math.prod(shape[:-1])) if len(shape) > 1 else 0.3
        params[name] = scale * rng.randn(*shape)
    return params


def randomise_norms(backbone: ResNet12Backbone, rng: np.random.RandomState) -> None:
    for norm in backbone.norms:
        norm.gamma.assign(1 + 0.5 * rng.randn(*norm.gamma.shape))
        norm.beta.assign(0.5 * rng.randn(*norm.beta.shape))


def numpy_conv(x, kernel):
    """Stride-1 convolution, zero padding (k - 1) / 2 on each side (PyTorch's padding 1 for 3×3)."""
    size = kernel.shape[0]
    pad = size // 2
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    height, width = x.shape[1:3]
    out = np.zeros(x.shape[:3] + kernel.shape[-1:])
    for dy in range(size):
        for dx in range(size):
            out += padded[:, dy:dy + height, dx:dx + width, :] @ kernel[dy, dx]
    return out


def numpy_max_pool(x, padding):
    """PyTorch's `MaxPool2d(2, 2, padding)`: -inf padding, floor((H + 2p - 2) / 2) + 1 rows."""
    padded = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)),
                    constant_values=-np.inf)
    height, width = (padded.shape[1] - 2) // 2 + 1, (padded.shape[2] - 2) // 2 + 1
    padded = padded[:, :2 * height, :2 * width, :]
    return padded.reshape(len(x), height, 2, width, 2, -1).max(axis=(2, 4))


def numpy_conv_bn(x, kernel, gamma, beta, context, moments):
    """Convolution, then batch norm with the (context images') biased batch statistics."""
    z = numpy_conv(x, kernel)
    sample = z if context is None else z[:context]
    mean = sample.mean(axis=(0, 1, 2))
    variance = ((sample - mean)**2).mean(axis=(0, 1, 2))
    moments.append((mean, variance, math.prod(sample.shape[:3])))
    return (z - mean) / np.sqrt(variance + EPSILON) * gamma + beta


def numpy_forward(x, params, gammas, betas, step, context=None):
    """ALFA's ResNet12 in numpy; returns `(logits, moments, spatial size at each block)`."""
    moments, sizes = [], []
    for block in range(4):
        sizes.append(x.shape[1:3])
        kernel = {conv: params[f"block{block}/{conv}/kernel"]
                  for conv in ("conv0", "conv1", "conv2", "shortcut")}
        norm = [(gammas[4 * block + i][step], betas[4 * block + i][step]) for i in range(4)]
        h = np.maximum(numpy_conv_bn(x, kernel["conv0"], *norm[0], context, moments), 0)
        h = np.maximum(numpy_conv_bn(h, kernel["conv1"], *norm[1], context, moments), 0)
        h = numpy_conv_bn(h, kernel["conv2"], *norm[2], context, moments)
        x = np.maximum(h + numpy_conv_bn(x, kernel["shortcut"], *norm[3], context, moments), 0)
        if block < 3:
            x = numpy_max_pool(x, (0, 0, 1)[block])
    return x.mean(axis=(1, 2)) @ params["head/kernel"] + params["head/bias"], moments, sizes


def test_registered_and_built_from_the_config():
    assert "resnet12" in backbone_names()
    config = tiny_config(backbone="resnet12", resnet12_widths=(2, 3, 4, 5), image_shape=(8, 8, 1))
    backbone = build_backbone(config)
    assert isinstance(backbone, ResNet12Backbone)
    assert (backbone.widths, backbone.n_way, backbone.image_shape) == ((2, 3, 4, 5), 2, (8, 8, 1))
    assert backbone.num_steps == config.inner_steps and backbone.name == "backbone"
    assert backbone.pool_impl == "max_pool"
    assert {v.dtype for v in backbone.weights} == {"float64"}
    jit = build_backbone(tiny_config(backbone="resnet12", resnet12_widths=(2, 3, 4, 5),
                                     image_shape=(8, 8, 1), jit_compile=True))
    assert jit.pool_impl == "reshape"
    assert keras.saving.get_registered_object("mamlpp_tf>ResNet12Backbone") is ResNet12Backbone


def test_parameter_count_follows_the_block_widths():
    assert resnet12_param_count(1, (2, 3, 4, 5), 3) == 92 + 222 + 408 + 650 + 18
    backbone = ResNet12Backbone(n_way=3, image_shape=(28, 28, 1), widths=(2, 3, 4, 5),
                                num_steps=4)

    def count(variables):
        return sum(math.prod(v.shape) for v in variables)

    fast = resnet12_param_count(1, (2, 3, 4, 5), 3)
    assert count(backbone.weights_by_name.values()) == fast
    # Four batch norms per block; per-step gamma, beta (trainable), running mean, variance.
    bn = 2 * 4 * 4 * sum((2, 3, 4, 5))
    assert count(backbone.trainable_variables) == fast + bn
    assert count(backbone.non_trainable_variables) == bn
    # ALFA's mini-ImageNet 5-way network: 64-128-256-512, bias-free convolutions.
    widths = inspect.signature(ResNet12Backbone).parameters["widths"].default
    assert widths == (64, 128, 256, 512)
    assert resnet12_param_count(3, widths, 5) == 7_991_685


def test_param_names_norms_and_shapes_are_in_network_order():
    backbone = small_backbone()
    convs = ("conv0", "conv1", "conv2", "shortcut")
    assert backbone.param_names == [f"block{b}/{c}/kernel" for b in range(4)
                                    for c in convs] + ["head/kernel", "head/bias"]
    assert list(backbone.weights_by_name) == backbone.param_names
    shapes = [tuple(backbone.weights_by_name[n].shape) for n in backbone.param_names]
    assert shapes[:8] == [(3, 3, 1, 2), (3, 3, 2, 2), (3, 3, 2, 2), (1, 1, 1, 2),
                          (3, 3, 2, 3), (3, 3, 3, 3), (3, 3, 3, 3), (1, 1, 2, 3)]
    assert shapes[-2:] == [(3, 3), (3,)]
    norms = ("norm0", "norm1", "norm2", "shortcut_norm")
    assert [n.name for n in backbone.norms] == [f"block{b}_{n}" for b in range(4) for n in norms]
    assert [tuple(n.gamma.shape) for n in backbone.norms] == [
        (2, w) for w in WIDTHS for _ in norms]


def test_glorot_uniform_kernels_and_zero_head_bias():
    backbone = ResNet12Backbone(n_way=5, image_shape=(28, 28, 1), widths=(16, 16, 16, 16))
    weights = {name: v.numpy() for name, v in backbone.weights_by_name.items()}
    bound = np.sqrt(6 / (9 * 16 + 9 * 16))
    kernel = weights["block1/conv1/kernel"]
    assert bound >= np.abs(kernel).max() > 0.9 * bound
    np.testing.assert_array_equal(weights["head/bias"], 0.0)
    # Equal shapes, independent draws.
    assert not np.array_equal(weights["block1/conv1/kernel"], weights["block1/conv2/kernel"])


@pytest.mark.parametrize("image_shape,sizes", [((28, 28, 1), OMNIGLOT_SIZES),
                                               ((84, 84, 3), MINI_IMAGENET_SIZES)],
                         ids=["omniglot", "mini_imagenet"])
def test_output_shapes_and_pooled_sizes(image_shape, sizes):
    backbone = small_backbone(image_shape=image_shape, n_way=5)
    assert list(backbone.block_sizes) == sizes
    x = tf.random.normal([3, *image_shape], dtype=tf.float64)
    logits, moments = backbone.forward(x, backbone.initial_params(), 1, training=True)
    assert logits.shape == (3, 5) and len(moments) == 16
    for i, got in enumerate(moments):
        block = i // 4
        assert got.mean.shape == got.variance.shape == (WIDTHS[block],)
        assert got.count == 3 * math.prod(sizes[block])


@pytest.mark.parametrize("image_shape,sizes,step,context", [
    ((28, 28, 1), OMNIGLOT_SIZES, 0, None),
    ((28, 28, 1), OMNIGLOT_SIZES, 1, None),
    ((84, 84, 3), MINI_IMAGENET_SIZES, 0, None),
    ((84, 84, 3), MINI_IMAGENET_SIZES, 1, None),
    ((28, 28, 1), OMNIGLOT_SIZES, 1, 3),
], ids=["omniglot_step0", "omniglot_step1", "mini_imagenet_step0", "mini_imagenet_step1",
        "omniglot_step1_context"])
def test_forward_matches_a_numpy_reference(image_shape, sizes, step, context):
    backbone = small_backbone(image_shape=image_shape,
                              bn_stats="batch" if context is None else "support")
    rng = np.random.RandomState(step)
    randomise_norms(backbone, rng)
    params = random_params(backbone, rng)
    x = rng.randn(5, *image_shape)
    gammas = [n.gamma.numpy() for n in backbone.norms]
    betas = [n.beta.numpy() for n in backbone.norms]
    logits, moments = backbone.forward(tf.constant(x), {k: tf.constant(v) for k, v in
                                                        params.items()},
                                       step, training=True, context=context)
    want, want_moments, want_sizes = numpy_forward(x, params, gammas, betas, step, context)
    assert want_sizes == sizes  # The reference's own -inf-padded pools.
    assert logits.shape == (5, 3)
    np.testing.assert_allclose(logits.numpy(), want, rtol=1e-10, atol=1e-12)
    assert len(moments) == len(want_moments) == 16
    for got, (mean, variance, count) in zip(moments, want_moments):
        np.testing.assert_allclose(got.mean.numpy(), mean, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(got.variance.numpy(), variance, rtol=1e-10, atol=1e-12)
        assert got.count == count
    # The other step's gamma/beta rows give other logits.
    other, _, _ = numpy_forward(x, params, gammas, betas, 1 - step, context)
    assert not np.allclose(other, want, rtol=1e-3)


def test_pool_impls_compute_the_same_network():
    rng = np.random.RandomState(0)
    nets = [small_backbone(image_shape=(21, 21, 2), pool_impl=impl)
            for impl in ("max_pool", "reshape")]
    nets[1].set_weights(nets[0].get_weights())
    x = tf.constant(rng.randn(4, 21, 21, 2))
    got = [net.forward(x, net.initial_params(), 0, True)[0].numpy() for net in nets]
    np.testing.assert_allclose(got[1], got[0], rtol=1e-12, atol=1e-13)


def test_support_context_makes_each_query_independent_of_the_others():
    """Under `support`, a query's logits are the same alone and among other queries."""
    rng = np.random.RandomState(0)
    support, queries = rng.randn(4, 8, 8, 1), rng.randn(3, 8, 8, 1)
    logits = {}
    for bn_stats in ("support", "batch"):
        backbone = small_backbone(image_shape=(8, 8, 1), bn_stats=bn_stats)
        randomise_norms(backbone, np.random.RandomState(1))
        params = {k: tf.constant(v) for k, v in random_params(backbone, rng).items()}
        context = 4 if bn_stats == "support" else None

        def query_logits(x, backbone=backbone, params=params, context=context):
            x = tf.constant(np.concatenate([support, x]))
            return backbone.forward(x, params, 1, training=False, context=context)

        alone = np.concatenate([query_logits(queries[q:q + 1])[0].numpy()[4:]
                                for q in range(3)])
        together, moments = query_logits(queries)
        logits[bn_stats] = alone, together.numpy()[4:]
        if bn_stats == "support":  # Every norm's statistics are the support set's alone.
            _, support_moments = backbone.forward(tf.constant(support), params, 1, False)
            for got, want in zip(moments, support_moments, strict=True):
                np.testing.assert_allclose(got.mean.numpy(), want.mean.numpy(), rtol=1e-12)
                assert got.count == want.count
    np.testing.assert_allclose(*logits["support"], rtol=1e-12, atol=1e-13)
    assert not np.allclose(*logits["batch"], rtol=1e-3)  # Transductive: queries interact.


def test_second_order_meta_gradient_of_every_variable_group_equals_finite_differences():
    config = tiny_config(backbone="resnet12", resnet12_widths=(2, 2, 2, 2),
                         image_shape=(8, 8, 1), inner_steps=2, eval_inner_steps=2,
                         msl_epochs=2)
    learner = MamlPlusPlus(config)
    # A generic point: fan-in-scaled kernels, a non-zero head bias, gamma/beta and
    # rates that differ from step to step.
    rng = np.random.RandomState(0)
    weights = learner.get_weights()
    for name, value in weights.items():
        if name.endswith("kernel") and name.startswith("backbone/"):
            weights[name] = rng.randn(*value.shape) / math.sqrt(math.prod(value.shape[:-1]))
        elif name.endswith(("/head/bias", "/beta")):
            weights[name] = 0.3 * rng.randn(*value.shape)
        elif name.endswith("/gamma"):
            weights[name] = 1 + 0.3 * rng.randn(*value.shape)
        elif name.startswith("lslr/"):
            weights[name] = 0.3 + 0.05 * rng.randn(*value.shape)
    learner.set_weights(weights)
    batch = random_batch(config, tasks=1)
    _, grads = meta_gradient(learner, batch, epoch=0)  # MSL on: both steps' query losses.
    rng = assert_random_directions_match_fd(learner, batch, 0, grads, trials=1, seed=0)

    def group(variable):
        if variable.path.startswith("lslr/"):
            return "lslr"
        return {"gamma": "gamma", "beta": "beta"}.get(variable.path.split("/")[-1], "fast")

    groups = [group(v) for v in learner.trainable_variables]
    assert groups.count("fast") == 18 and groups.count("lslr") == 18
    assert groups.count("gamma") == groups.count("beta") == 16
    for name in ("fast", "gamma", "beta", "lslr"):
        direction = [rng.randn(*g.shape) if kind == name else np.zeros(g.shape)
                     for g, kind in zip(grads, groups)]
        analytic = sum(np.sum(g * d) for g, d in zip(grads, direction))
        numeric = directional_fd(learner, batch, 0, direction)
        assert abs(analytic) > 1e-6, name
        assert relative_error(analytic, numeric) < 1e-5, (name, analytic, numeric)


def test_variant_keeps_the_architecture_with_fresh_variables():
    backbone = small_backbone(num_steps=3, pool_impl="reshape")
    variant = backbone.variant(num_steps=1, bn_stats="running", name="served")
    assert type(variant) is ResNet12Backbone and variant.name == "served"
    assert (variant.n_way, variant.image_shape, variant.widths, variant.pool_impl) == (
        3, (28, 28, 1), WIDTHS, "reshape")
    assert variant.param_names == backbone.param_names
    for name in backbone.param_names:
        mine, theirs = variant.weights_by_name[name], backbone.weights_by_name[name]
        assert mine is not theirs and mine.shape == theirs.shape and mine.dtype == "float64"
    assert [(n.name, n.num_steps, n.bn_stats, tuple(n.gamma.shape)) for n in variant.norms] == [
        (n.name, 1, "running", (1, n.gamma.shape[-1])) for n in backbone.norms]
    tasknorm = small_backbone(bn_stats="tasknorm").variant(num_steps=1, context_size=4)
    assert {n.context_size for n in tasknorm.norms} == {4}
    config = backbone.get_config()
    assert ResNet12Backbone.from_config(config).get_config() == config
    arguments = set(inspect.signature(ResNet12Backbone.__init__).parameters) - {"self", "kwargs"}
    assert arguments <= set(config)


@pytest.mark.parametrize("overrides,argument", [
    (dict(n_way=1), "n_way"),
    (dict(image_shape=(28, 28)), "image_shape"),
    (dict(image_shape=(0, 28, 1)), "image_shape"),
    (dict(image_shape=(3, 28, 1)), "image_shape"),  # Too small for the pools.
    (dict(widths=(2, 2, 2)), "widths"),
    (dict(widths=(2, 0, 2, 2)), "widths"),
    (dict(widths=(2, 2.5, 2, 2)), "widths"),
    (dict(pool_impl="avg_pool"), "pool_impl"),
    (dict(num_steps=0), "num_steps"),
    (dict(bn_stats="bogus"), "bn_stats"),
    (dict(context_size=3), "context_size"),
])
def test_bad_arguments_raise_value_errors_naming_them(overrides, argument):
    with pytest.raises(ValueError, match=argument):
        small_backbone(**overrides)


def test_mixed_bfloat16_runs_only_the_convolutions_and_the_head_in_bfloat16():
    backbone = small_backbone(image_shape=(8, 8, 1), dtype="mixed_bfloat16")
    assert {v.dtype for v in backbone.weights} == {"float32"}
    params = backbone.initial_params()
    graph = tf.function(lambda x: backbone.forward(x, params, 0, True)[0]).get_concrete_function(
        tf.TensorSpec([4, 8, 8, 1], tf.float32)).graph
    dtypes = {}
    for op in graph.get_operations():
        dtypes.setdefault(op.type, set()).update(t.dtype for t in op.outputs)
    assert dtypes["Conv2D"] == {tf.bfloat16} and dtypes["MatMul"] == {tf.bfloat16}
    for op in ("FusedBatchNormV3", "Relu", "Pad", "MaxPool", "AddV2"):
        assert dtypes[op] == {tf.float32}, op
    x = tf.random.normal([4, 8, 8, 1])
    assert backbone.forward(x, params, 0, True)[0].dtype == tf.float32
