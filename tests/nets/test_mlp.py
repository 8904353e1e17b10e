"""`MLPBackbone`: the original MAML's Omniglot MLP, against numpy and finite differences.

The architecture and initialisation of cbfinn/maml's `construct_fc_weights`
and `forward_fc`; the forward pass against an independent numpy reference;
the task-batched pass and the learner's `batched` layout against the per-task
loop; the non-transductive statistics; and the second-order meta-gradient of
every variable group against float64 finite differences.
"""

import dataclasses
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from mamlpp_tf import MamlPlusPlus
from mamlpp_tf.nets import backbone_names, build_backbone
from mamlpp_tf.nets.mlp import KERNEL_STDDEV, MLPBackbone

from conftest import (
    assert_random_directions_match_fd,
    directional_fd,
    meta_gradient,
    random_batch,
    relative_error,
    tiny_config,
)

# Small shapes: a 3×4×2 image (24 features), two hidden layers, 3 classes.
SMALL = dict(n_way=3, image_shape=(3, 4, 2), hidden=(6, 5))
EPSILON = 1e-5  # PerStepBatchNorm's.


def small_backbone(**overrides) -> MLPBackbone:
    return MLPBackbone(**{**SMALL, "num_steps": 2, "dtype": "float64", **overrides})


def random_params(backbone: MLPBackbone, rng: np.random.RandomState,
                  tasks: int | None = None) -> dict[str, np.ndarray]:
    """Generic fast weights (kernels scaled by fan-in, non-zero biases), optionally per task."""
    lead = () if tasks is None else (tasks,)
    params = {}
    for name in backbone.param_names:
        shape = tuple(backbone.weights_by_name[name].shape)
        scale = 1 / math.sqrt(shape[0]) if name.endswith("kernel") else 0.3
        params[name] = scale * rng.randn(*lead, *shape)
    return params


def randomise_norms(backbone: MLPBackbone, rng: np.random.RandomState) -> None:
    for norm in backbone.norms:
        norm.gamma.assign(1 + 0.5 * rng.randn(*norm.gamma.shape))
        norm.beta.assign(0.5 * rng.randn(*norm.beta.shape))


def numpy_forward(x, params, gammas, betas, step, context=None):
    """The MLP in numpy: dense → batch norm (biased variance, eps 1e-5) → ReLU; dense."""
    h = x.reshape(len(x), -1)
    layers = len(gammas)
    moments = []
    for i in range(layers):
        z = h @ params[f"dense{i}/kernel"] + params[f"dense{i}/bias"]
        sample = z if context is None else z[:context]
        mean = sample.mean(axis=0)
        variance = ((sample - mean)**2).mean(axis=0)
        moments.append((mean, variance))
        z = (z - mean) / np.sqrt(variance + EPSILON) * gammas[i][step] + betas[i][step]
        h = np.maximum(z, 0)
    return h @ params["head/kernel"] + params["head/bias"], moments


def test_registered_and_built_from_the_config():
    assert "mlp" in backbone_names()
    config = tiny_config(backbone="mlp", mlp_hidden=(7, 3), image_shape=(4, 4, 1))
    backbone = build_backbone(config)
    assert isinstance(backbone, MLPBackbone)
    assert (backbone.hidden, backbone.n_way, backbone.image_shape) == ((7, 3), 2, (4, 4, 1))
    assert backbone.num_steps == config.inner_steps and backbone.name == "backbone"
    assert {v.dtype for v in backbone.weights} == {"float64"}
    assert keras.saving.get_registered_object("mamlpp_tf>MLPBackbone") is MLPBackbone


def test_parameter_count_follows_the_layer_widths():
    backbone = MLPBackbone(n_way=5, image_shape=(28, 28, 1))  # The paper's Omniglot MLP.
    assert backbone.hidden == (256, 128, 64, 64)
    widths = [28 * 28, 256, 128, 64, 64, 5]
    fast = sum(a * b + b for a, b in zip(widths, widths[1:]))
    assert fast == 246_597

    def count(variables):
        return sum(math.prod(v.shape) for v in variables)

    assert count(backbone.weights_by_name.values()) == fast
    # Per-step gamma, beta (trainable) and running mean, variance: 5 rows per hidden unit.
    bn = 2 * 5 * sum(widths[1:-1])
    assert count(backbone.trainable_variables) == fast + bn
    assert count(backbone.non_trainable_variables) == bn


def test_param_names_are_in_network_order():
    backbone = small_backbone()
    assert backbone.param_names == ["dense0/kernel", "dense0/bias", "dense1/kernel",
                                    "dense1/bias", "head/kernel", "head/bias"]
    assert list(backbone.weights_by_name) == backbone.param_names
    shapes = [tuple(backbone.weights_by_name[n].shape) for n in backbone.param_names]
    assert shapes == [(24, 6), (6,), (6, 5), (5,), (5, 3), (3,)]
    assert [norm.name for norm in backbone.norms] == ["norm0", "norm1"]
    assert [tuple(norm.gamma.shape) for norm in backbone.norms] == [(2, 6), (2, 5)]


def test_initial_weights_follow_the_original_maml_initialisation():
    """cbfinn/maml: `tf.truncated_normal(stddev=0.01)` kernels, zero biases.

    TF's (and Keras's) truncated normal redraws values beyond two standard
    deviations of the normal *before* truncation, so the values drawn have
    `0.01 · sqrt(1 − 4φ(2) / (Φ(2) − Φ(−2)))` ≈ 0.0088.
    """
    backbone = MLPBackbone(n_way=5, image_shape=(28, 28, 1), dtype="float64")
    density = math.exp(-2) / math.sqrt(2 * math.pi)
    truncated_std = KERNEL_STDDEV * math.sqrt(1 - 4 * density / math.erf(2 / math.sqrt(2)))
    assert KERNEL_STDDEV == 0.01 and truncated_std == pytest.approx(0.0088, abs=1e-4)
    for name, variable in backbone.weights_by_name.items():
        value = variable.numpy()
        if name.endswith("bias"):
            assert not value.any(), name
        else:
            assert np.abs(value).max() <= 2 * KERNEL_STDDEV, name
    big = backbone.weights_by_name["dense0/kernel"].numpy()  # 784 × 256 entries.
    assert big.std() == pytest.approx(truncated_std, rel=0.01)
    assert abs(big.mean()) < 1e-4
    # Equal shapes, independent draws.
    assert not np.array_equal(backbone.weights_by_name["dense2/kernel"].numpy(),
                              backbone.weights_by_name["dense3/kernel"].numpy())


@pytest.mark.parametrize("step,context", [(0, None), (1, None), (1, 3)],
                         ids=["step0", "step1", "step1_context"])
def test_forward_matches_a_numpy_reference(step, context):
    backbone = small_backbone(bn_stats="batch" if context is None else "support")
    rng = np.random.RandomState(step)
    randomise_norms(backbone, rng)
    params = random_params(backbone, rng)
    x = rng.randn(7, *SMALL["image_shape"])
    logits, moments = backbone.forward(tf.constant(x), {k: tf.constant(v) for k, v in
                                                        params.items()},
                                       step, training=True, context=context)
    want, want_moments = numpy_forward(x, params, [n.gamma.numpy() for n in backbone.norms],
                                       [n.beta.numpy() for n in backbone.norms], step, context)
    assert logits.shape == (7, 3)
    np.testing.assert_allclose(logits.numpy(), want, rtol=1e-10, atol=1e-12)
    assert len(moments) == 2
    for got, (mean, variance) in zip(moments, want_moments):
        np.testing.assert_allclose(got.mean.numpy(), mean, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(got.variance.numpy(), variance, rtol=1e-10, atol=1e-12)
        assert got.count == (7 if context is None else context)


@pytest.mark.parametrize("bn_stats,context", [("batch", None), ("support", 3),
                                              ("tasknorm", 3)])
def test_forward_tasks_equals_forward_per_task(bn_stats, context):
    backbone = small_backbone(bn_stats=bn_stats)
    rng = np.random.RandomState(0)
    randomise_norms(backbone, rng)
    if bn_stats == "tasknorm":
        for norm in backbone.norms:
            norm.alpha_scale.assign(rng.randn(2))
            norm.alpha_offset.assign(rng.randn(2))
    tasks = 3
    params = {k: tf.constant(v) for k, v in random_params(backbone, rng, tasks).items()}
    x = tf.constant(rng.randn(tasks, 5, *SMALL["image_shape"]))
    logits, moments = backbone.forward_tasks(x, params, 1, training=True, context=context)
    per_task = [backbone.forward(x[t], {k: v[t] for k, v in params.items()}, 1,
                                 training=True, context=context) for t in range(tasks)]
    assert logits.shape == (tasks, 5, 3)
    np.testing.assert_allclose(logits.numpy(), np.stack([p[0] for p in per_task]),
                               rtol=1e-12, atol=1e-13)
    for i, got in enumerate(moments):
        assert got.mean.shape == (tasks, SMALL["hidden"][i])
        np.testing.assert_allclose(got.mean.numpy(), np.stack([p[1][i].mean for p in per_task]),
                                   rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(got.variance.numpy(),
                                   np.stack([p[1][i].variance for p in per_task]),
                                   rtol=1e-12, atol=1e-13)
        assert got.count == per_task[0][1][i].count == (5 if context is None else context)


def mlp_config(**overrides):
    values = dict(backbone="mlp", mlp_hidden=(6, 5), image_shape=(4, 4, 1), n_way=3)
    return tiny_config(**{**values, **overrides})


@pytest.mark.parametrize("bn_stats", ["batch", "support", "tasknorm"])
def test_loop_and_batched_layouts_agree(bn_stats):
    config = mlp_config(bn_stats=bn_stats)
    loop = MamlPlusPlus(config)
    batched = MamlPlusPlus(dataclasses.replace(config, task_impl="batched"))
    batched.set_weights(loop.get_weights())
    batch = random_batch(config, tasks=3, k_shot=2, n_query=2)
    runs = [learner.run_tasks(tuple(tf.constant(v) for v in batch), num_steps=2,
                              training=True, second_order=True,
                              msl_weights=tf.constant([0.4, 0.6], tf.float64))
            for learner in (loop, batched)]
    for got, want in zip(runs[1][:2], runs[0][:2]):  # Task losses and final logits.
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-10)
    for (step, got), (want_step, want) in zip(runs[1][2], runs[0][2]):
        assert step == want_step
        for g, w in zip(got, want):
            np.testing.assert_allclose(g.mean.numpy(), w.mean.numpy(), rtol=1e-10, atol=1e-13)
            np.testing.assert_allclose(g.variance.numpy(), w.variance.numpy(), rtol=1e-10,
                                       atol=1e-13)
    loop_loss, loop_grads = meta_gradient(loop, batch)
    batched_loss, batched_grads = meta_gradient(batched, batch)
    np.testing.assert_allclose(batched_loss, loop_loss, rtol=1e-10)
    scale = max(np.abs(g).max() for g in loop_grads)
    for got, want in zip(batched_grads, loop_grads):
        # Dense biases in front of batch norm have a zero gradient (rounding noise).
        np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-8 * scale)


@pytest.mark.parametrize("task_impl", ["loop", "batched"])
def test_support_statistics_make_each_query_independent_of_the_others(task_impl):
    """Under `support` a query's logits stay put when another query changes; under `batch` not."""
    batch = random_batch(mlp_config(), tasks=2, k_shot=2, n_query=2)
    changed = [np.copy(v) for v in batch]
    changed[2][0, 0] += 3.0  # Task 0's first query.
    for bn_stats, independent in (("support", True), ("batch", False)):
        learner = MamlPlusPlus(mlp_config(bn_stats=bn_stats, task_impl=task_impl))
        logits = [learner.run_tasks(tuple(tf.constant(v) for v in b), num_steps=2,
                                    training=True, second_order=False,
                                    msl_weights=None)[1].numpy()
                  for b in (batch, changed)]
        assert not np.allclose(logits[0][0, 0], logits[1][0, 0])
        np.testing.assert_allclose(logits[0][1], logits[1][1], rtol=1e-12)  # Another task.
        others_equal = np.allclose(logits[0][0, 1:], logits[1][0, 1:], rtol=1e-12, atol=0)
        assert others_equal == independent, bn_stats


def test_second_order_meta_gradient_of_every_variable_group_equals_finite_differences():
    config = tiny_config(backbone="mlp", mlp_hidden=(5, 4), image_shape=(4, 4, 1),
                         inner_steps=2, eval_inner_steps=2, msl_epochs=2)
    learner = MamlPlusPlus(config)
    # A generic point: fan-in-scaled kernels, non-zero biases, gamma/beta and rates per step.
    rng = np.random.RandomState(0)
    weights = learner.get_weights()
    for name, value in weights.items():
        if name.endswith("kernel") and name.startswith("backbone/"):
            weights[name] = rng.randn(*value.shape) / math.sqrt(value.shape[0])
        elif name.endswith(("/bias", "/beta")):
            weights[name] = 0.3 * rng.randn(*value.shape)
        elif name.endswith("/gamma"):
            weights[name] = 1 + 0.3 * rng.randn(*value.shape)
        elif name.startswith("lslr/"):
            weights[name] = 0.3 + 0.05 * rng.randn(*value.shape)
    learner.set_weights(weights)
    batch = random_batch(config, tasks=2)
    _, grads = meta_gradient(learner, batch, epoch=0)  # MSL on: both steps' query losses.
    rng = assert_random_directions_match_fd(learner, batch, 0, grads, trials=1, seed=0)
    # Batch norm cancels the hidden biases, and with them their inner rates.
    cancelled = {f"{group}/dense{i}_bias" for group in ("backbone", "lslr") for i in range(2)}
    for index, variable in enumerate(learner.trainable_variables):
        direction = [np.zeros(g.shape) for g in grads]
        direction[index] = rng.randn(*grads[index].shape)
        analytic = np.sum(grads[index] * direction[index])
        numeric = directional_fd(learner, batch, 0, direction)
        if variable.path in cancelled:
            assert abs(analytic) < 1e-12 and abs(numeric) < 1e-8, (variable.path, numeric)
        else:
            assert relative_error(analytic, numeric) < 1e-5, (variable.path, analytic, numeric)
    groups = {v.path.split("/")[0] + "/" + v.path.split("/")[-1]
              for v in learner.trainable_variables}
    assert {"backbone/head_kernel", "backbone/gamma", "backbone/beta", "lslr/head_kernel"} <= groups


def test_variant_keeps_the_architecture():
    backbone = small_backbone(num_steps=3)
    variant = backbone.variant(num_steps=1, bn_stats="running", name="served")
    assert type(variant) is MLPBackbone and variant.name == "served"
    assert (variant.n_way, variant.image_shape, variant.hidden) == (3, (3, 4, 2), (6, 5))
    assert variant.param_names == backbone.param_names
    for name in backbone.param_names:
        assert variant.weights_by_name[name].shape == backbone.weights_by_name[name].shape
        assert variant.weights_by_name[name].dtype == "float64"
    assert [(n.num_steps, n.bn_stats, tuple(n.gamma.shape)) for n in variant.norms] == [
        (1, "running", (1, 6)), (1, "running", (1, 5))]
    tasknorm = small_backbone(bn_stats="tasknorm").variant(num_steps=1, context_size=4)
    assert [n.context_size for n in tasknorm.norms] == [4, 4]
    config = backbone.get_config()
    assert MLPBackbone.from_config(config).get_config() == config
    assert {"n_way", "image_shape", "hidden", "num_steps", "per_step_bn", "bn_stats",
            "context_size"} <= set(config)


@pytest.mark.parametrize("overrides,argument", [
    (dict(n_way=1), "n_way"),
    (dict(image_shape=(28, 28)), "image_shape"),
    (dict(image_shape=(0, 28, 1)), "image_shape"),
    (dict(hidden=()), "hidden"),
    (dict(hidden=(64, 0)), "hidden"),
    (dict(num_steps=0), "num_steps"),
    (dict(bn_stats="bogus"), "bn_stats"),
    (dict(bn_stats="running", per_step_bn=False), "bn_stats"),
    (dict(context_size=3), "context_size"),
])
def test_bad_arguments_raise_value_errors_naming_them(overrides, argument):
    with pytest.raises(ValueError, match=argument):
        MLPBackbone(**{**SMALL, **overrides})


def _op_dtypes(function, *specs) -> dict[str, set[tf.DType]]:
    """Output dtypes of every op type in `function`'s graph for inputs `specs`."""
    dtypes = {}
    for op in tf.function(function).get_concrete_function(*specs).graph.get_operations():
        dtypes.setdefault(op.type, set()).update(t.dtype for t in op.outputs)
    return dtypes


def test_mixed_bfloat16_runs_only_the_matmuls_in_bfloat16():
    backbone = MLPBackbone(**SMALL, dtype="mixed_bfloat16")
    assert {v.dtype for v in backbone.weights} == {"float32"}
    params = backbone.initial_params()
    single = _op_dtypes(lambda x: backbone.forward(x, params, 0, True)[0],
                        tf.TensorSpec([4, 3, 4, 2], tf.float32))
    stacked = {k: tf.stack([v, v]) for k, v in params.items()}
    tasks = _op_dtypes(lambda x: backbone.forward_tasks(x, stacked, 0, True)[0],
                       tf.TensorSpec([2, 4, 3, 4, 2], tf.float32))
    assert single["MatMul"] == {tf.bfloat16} and "BatchMatMulV2" not in single
    assert tasks["BatchMatMulV2"] == {tf.bfloat16} and "MatMul" not in tasks
    for dtypes in (single, tasks):
        for op in ("Mean", "Rsqrt", "Relu", "AddV2"):
            assert dtypes[op] == {tf.float32}, op
    x = tf.random.normal([4, 3, 4, 2])
    assert backbone.forward(x, params, 0, True)[0].dtype == tf.float32
