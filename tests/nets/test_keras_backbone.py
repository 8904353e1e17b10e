"""KerasBackbone: a user's Keras model (stock layers, batch norm converted) as a MAML++ backbone."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from mamlpp_tf import MamlPlusPlus, Trainer, task_model
from mamlpp_tf.nets import PerStepBatchNorm, check_backbone
from mamlpp_tf.nets.keras_model import STOCK_BATCH_NORM_MESSAGE, KerasBackbone

from conftest import directional_fd, meta_gradient, random_batch, relative_error, tiny_config

F64 = "float64"
EPSILON = 1e-5


def sequential_model(*middle: keras.layers.Layer) -> keras.Sequential:
    """Conv2D → BatchNormalization → ReLU → MaxPooling2D → Flatten → Dense on 6×6×1, float64.

    `middle` layers go between the ReLU and the pooling.
    """
    return keras.Sequential([
        keras.Input((6, 6, 1), dtype=F64),
        keras.layers.Conv2D(2, 3, padding="same", dtype=F64),
        keras.layers.BatchNormalization(epsilon=EPSILON, dtype=F64),
        keras.layers.ReLU(dtype=F64),
        *middle,
        keras.layers.MaxPooling2D(dtype=F64),
        keras.layers.Flatten(dtype=F64),
        keras.layers.Dense(2, dtype=F64),
    ])


def functional_model() -> keras.Model:
    """A functional model with a nested block and a `PerStepBatchNorm` of the user's, float64.

    A nested Sequential block (Conv2D, BatchNormalization), ReLU, a 1×1 side
    branch with a shared (`per_step=False`) `PerStepBatchNorm` added back,
    pooling and a dense head.
    """
    images = keras.Input((6, 6, 1), dtype=F64)
    block = keras.Sequential([
        keras.Input((6, 6, 1), dtype=F64),
        keras.layers.Conv2D(2, 3, padding="same", dtype=F64),
        keras.layers.BatchNormalization(epsilon=EPSILON, dtype=F64),
    ])
    h = keras.layers.ReLU(dtype=F64)(block(images))
    side = keras.layers.Conv2D(2, 1, dtype=F64)(h)
    side = PerStepBatchNorm(1, per_step=False, epsilon=EPSILON, dtype=F64)(side)
    h = keras.layers.Add(dtype=F64)([h, side])
    h = keras.layers.Flatten(dtype=F64)(keras.layers.MaxPooling2D(dtype=F64)(h))
    return keras.Model(images, keras.layers.Dense(2, dtype=F64)(h))


MODELS = {"sequential": sequential_model, "functional": functional_model}


def randomize(model: keras.Model, seed: int = 0) -> keras.Model:
    """`model` with every weight random (variances positive): nothing left at an initialiser."""
    rng = np.random.RandomState(seed)
    for variable in model.weights:
        value = rng.randn(*variable.shape)
        if variable.name in ("moving_variance", "running_var"):
            value = np.abs(value) + 0.5
        elif variable.name == "gamma":
            value = 1.0 + 0.3 * value
        variable.assign(0.5 * value if variable.name.endswith("kernel") else value)
    return model


# ------------------------------------------------------ independent numpy reference


def np_conv(x, kernel, bias):
    """`SAME` convolution with stride 1 (odd kernel sizes)."""
    k = kernel.shape[0]
    pad = k // 2
    x = np.pad(x, [(0, 0), (pad, pad), (pad, pad), (0, 0)])
    height, width = x.shape[1] - 2 * pad, x.shape[2] - 2 * pad
    out = np.zeros(x.shape[:1] + (height, width, kernel.shape[-1]))
    for i in range(k):
        for j in range(k):
            out += np.einsum("bhwc,cf->bhwf", x[:, i:i + height, j:j + width], kernel[i, j])
    return out + bias


def np_batch_norm(x, gamma, beta):
    mean = x.mean(axis=(0, 1, 2))
    variance = ((x - mean) ** 2).mean(axis=(0, 1, 2))  # Biased.
    return (x - mean) / np.sqrt(variance + EPSILON) * gamma + beta


def np_head(x, kernel, bias):
    """2×2/2 max pooling, row-major flatten, dense."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
    return x.reshape(b, -1) @ kernel + bias


def np_sequential(model, x):
    conv, norm, dense = (model.layers[i].get_weights() for i in (0, 1, 5))
    h = np.maximum(np_batch_norm(np_conv(x, *conv), *norm[:2]), 0.0)
    return np_head(h, *dense)


def np_functional(model, x):
    block = model.layers[1]
    conv, norm = block.layers[0].get_weights(), block.layers[1].get_weights()
    side_conv, side_norm = model.layers[3].get_weights(), model.layers[4].get_weights()
    h = np.maximum(np_batch_norm(np_conv(x, *conv), *norm[:2]), 0.0)
    h = h + np_batch_norm(np_conv(h, *side_conv), *side_norm[:2])
    return np_head(h, *model.layers[-1].get_weights())


NUMPY_NETS = {"sequential": np_sequential, "functional": np_functional}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_forward_equals_an_independent_numpy_network(kind):
    model = randomize(MODELS[kind]())
    backbone = KerasBackbone(model, num_steps=2)
    check_backbone(backbone)
    x = np.random.RandomState(1).randn(5, 6, 6, 1)
    logits, moments = backbone.forward(tf.constant(x), backbone.initial_params(), 0, True)
    np.testing.assert_allclose(logits.numpy(), NUMPY_NETS[kind](model, x), rtol=1e-10,
                               atol=1e-12)
    assert logits.dtype == tf.float64 and backbone.compute_dtype == F64
    assert [m.count for m in moments] == [5 * 36] * len(backbone.norms)


def test_stable_names_and_variable_groups():
    backbone = KerasBackbone(functional_model(), num_steps=3, name="net")
    assert backbone.param_names == ["0_conv2d/kernel", "0_conv2d/bias", "2_conv2d/kernel",
                                    "2_conv2d/bias", "4_dense/kernel", "4_dense/bias"]
    assert [norm.name for norm in backbone.norms] == ["1_batch_norm", "3_batch_norm"]
    norm_variables = {id(v) for norm in backbone.norms for v in norm.trainable_variables}
    fast = {id(v) for v in backbone.weights_by_name.values()}
    assert {id(v) for v in backbone.trainable_variables} == fast | norm_variables
    assert not fast & norm_variables
    assert {v.name for v in backbone.non_trainable_variables} == {"running_mean",
                                                                  "running_var"}


# ------------------------------------------------------------ meta-gradients


def keras_learner(model, **overrides):
    """A float64 learner on `KerasBackbone(model)` with per-step rows that differ."""
    config = tiny_config(**overrides)
    backbone = KerasBackbone(model, num_steps=config.inner_steps,
                             per_step_bn=config.per_step_bn, bn_stats=config.bn_stats)
    learner = MamlPlusPlus(config, backbone=backbone)
    rng = np.random.RandomState(2)
    for norm in backbone.norms:
        for variable in (norm.gamma, norm.beta):
            variable.assign(variable + 0.2 * rng.randn(*variable.shape))
    return learner


def assert_groups_match_fd(learner, groups, batch, tolerance):
    """The meta-gradient along a random direction in each variable group vs finite differences.

    Returns:
      The largest relative error.
    """
    _, grads = meta_gradient(learner, batch, epoch=0)
    rng = np.random.RandomState(3)
    worst = 0.0
    for name, variables in groups.items():
        ids = {id(v) for v in variables}
        direction = [rng.randn(*g.shape) * (id(v) in ids)
                     for v, g in zip(learner.trainable_variables, grads)]
        analytic = sum(np.sum(g * d) for g, d in zip(grads, direction))
        assert abs(analytic) > 1e-6, f"{name} gets no gradient"
        # h = 1e-6: the truncation error (∝ h²) stays far below the tolerance.
        error = relative_error(analytic,
                               directional_fd(learner, batch, 0, direction, h=1e-6))
        assert error < tolerance, (name, error)
        worst = max(worst, error)
    return worst


@pytest.mark.parametrize("kind,bn_stats", [("sequential", "batch"), ("functional", "support")])
def test_second_order_meta_gradient_equals_finite_differences(kind, bn_stats):
    learner = keras_learner(randomize(MODELS[kind]()), bn_stats=bn_stats)
    backbone = learner.backbone
    groups = dict(fast_weights=list(backbone.weights_by_name.values()),
                  batch_norm=[v for norm in backbone.norms for v in norm.trainable_variables],
                  lslr=list(learner.lslr.trainable_variables))
    assert_groups_match_fd(learner, groups, random_batch(learner.config), 1e-7)


class StockBatchNormBackbone:
    """The unconverted model through `stateless_call`, stock BatchNormalization on batch stats.

    Its fast weights are those of `KerasBackbone`: gamma/beta are meta-parameters only.
    """

    def __init__(self, model):
        self.model = model
        self.norms = []
        self.weights_by_name = {v.path: v for v in model.trainable_variables
                                if v.name not in ("gamma", "beta")}
        self.param_names = list(self.weights_by_name)
        self.trainable_variables = model.trainable_variables
        self.non_trainable_variables = []
        self.compute_dtype = F64

    def initial_params(self):
        return {name: tf.convert_to_tensor(v) for name, v in self.weights_by_name.items()}

    def forward(self, x, params, step, training, context=None):
        del step, training, context
        values = [params.get(v.path, v) for v in self.model.trainable_variables]
        logits, _ = self.model.stateless_call(
            [tf.convert_to_tensor(v) for v in values],
            [tf.convert_to_tensor(v) for v in self.model.non_trainable_variables],
            x, training=True)
        return logits, []

    def variant(self, **overrides):
        raise NotImplementedError


def test_stock_batch_norm_gives_wrong_second_order_meta_gradients():
    """Why BatchNormalization is replaced: the same meta-loss, different meta-gradients.

    The batch norm cancels the bias of the convolution before it, so the
    meta-loss does not depend on that bias: its meta-gradient is zero. Through
    stock BatchNormalization it is not.
    """
    config = tiny_config(per_step_bn=False)
    batch = random_batch(config)
    stock = MamlPlusPlus(config, backbone=StockBatchNormBackbone(randomize(sequential_model())))
    converted = MamlPlusPlus(config, backbone=KerasBackbone(
        stock.backbone.model, num_steps=config.inner_steps, per_step_bn=False))
    assert ([v.shape for v in stock.trainable_variables] ==
            [v.shape for v in converted.trainable_variables])
    stock_loss, stock_grads = meta_gradient(stock, batch)
    loss, grads = meta_gradient(converted, batch)
    assert stock_loss == pytest.approx(loss, rel=1e-13)
    conv_bias = 1
    assert np.abs(grads[conv_bias]).max() < 1e-13
    assert np.abs(stock_grads[conv_bias]).max() > 1e-4
    flat, stock_flat = (np.concatenate([g.ravel() for g in gs]) for gs in (grads, stock_grads))
    assert np.linalg.norm(stock_flat - flat) > 1e-3 * np.linalg.norm(flat)


# ------------------------------------------------------------------- conversion


@pytest.mark.parametrize("per_step", [True, False])
def test_stock_batch_norm_is_carried_into_every_step_row(per_step):
    model = sequential_model()
    stock = model.layers[1]
    stock.momentum = 0.9
    values = dict(gamma=[1.5, -0.7], beta=[0.2, 0.3], moving_mean=[0.4, -1.0],
                  moving_variance=[2.0, 0.5])
    for name, value in values.items():
        getattr(stock, name).assign(value)
    norm = KerasBackbone(model, num_steps=3, per_step_bn=per_step).norms[0]
    rows = (3,) if per_step else ()
    for name, stock_name in (("gamma", "gamma"), ("beta", "beta"),
                             ("running_mean", "moving_mean"),
                             ("running_var", "moving_variance")):
        if per_step or name in ("gamma", "beta"):
            np.testing.assert_array_equal(getattr(norm, name).numpy(),
                                          np.broadcast_to(values[stock_name], rows + (2,)))
    assert norm.per_step == per_step and norm.num_steps == 3
    assert norm.momentum == pytest.approx(0.1) and norm.epsilon == EPSILON
    assert norm.gamma.dtype == F64
    # The user's model is left as it was.
    assert isinstance(model.layers[1], keras.layers.BatchNormalization)


def test_per_step_batch_norm_rows_that_do_not_fit_are_refused():
    model = keras.Sequential([keras.Input((4,), dtype=F64),
                              keras.layers.Dense(3, dtype=F64),
                              PerStepBatchNorm(2, dtype=F64, name="psbn"),
                              keras.layers.Dense(2, dtype=F64)])
    assert KerasBackbone(model, num_steps=2).norms[0].gamma.shape == (2, 3)
    with pytest.raises(ValueError, match="'psbn'.*num_steps"):
        KerasBackbone(model, num_steps=3)


@pytest.mark.parametrize("layer,match", [
    (keras.layers.Dropout(0.5, name="my_dropout"), "'my_dropout' \\(Dropout\\)"),
    (keras.layers.GaussianNoise(0.1, name="my_noise"), "'my_noise' \\(GaussianNoise\\)"),
    (keras.layers.SpatialDropout2D(0.1, name="drop2d"), "'drop2d'.*seed_generator"),
], ids=["dropout", "gaussian_noise", "spatial_dropout"])
def test_layers_with_state_are_refused_by_name(layer, match):
    with pytest.raises(ValueError, match=match + ".*inner loop would freeze"):
        KerasBackbone(sequential_model(layer), num_steps=2)


def test_frozen_layers_are_refused():
    model = sequential_model()
    model.layers[-1].trainable = False
    with pytest.raises(ValueError, match="non-trainable state.*kernel"):
        KerasBackbone(model, num_steps=2)


def test_stock_batch_norm_without_replacement_is_refused():
    with pytest.raises(ValueError) as error:
        KerasBackbone(sequential_model(), num_steps=2, replace_batch_norm=False)
    assert STOCK_BATCH_NORM_MESSAGE in str(error.value)
    assert STOCK_BATCH_NORM_MESSAGE == (
        "keras.layers.BatchNormalization gives wrong second-order MAML gradients "
        "(tf.nn.moments stops the gradient through the mean); use "
        "mamlpp_tf.nets.PerStepBatchNorm or replace_batch_norm=True")


@pytest.mark.parametrize("arguments,match", [
    (dict(axis=1), "axis 1 of rank-4.*axis=-1"),
    (dict(center=False), "center=False.*center=True"),
], ids=["axis", "center"])
def test_batch_norms_that_do_not_convert_are_refused(arguments, match):
    model = keras.Sequential([keras.Input((6, 6, 1), dtype=F64),
                              keras.layers.Conv2D(2, 3, dtype=F64),
                              keras.layers.BatchNormalization(dtype=F64, **arguments),
                              keras.layers.Flatten(dtype=F64),
                              keras.layers.Dense(2, dtype=F64)])
    with pytest.raises(ValueError, match=match):
        KerasBackbone(model, num_steps=2)


def test_a_batch_norm_used_twice_is_refused_when_run():
    images = keras.Input((4,), dtype=F64)
    dense, norm = keras.layers.Dense(4, dtype=F64), PerStepBatchNorm(1, dtype=F64)
    h = norm(dense(norm(dense(images))))
    backbone = KerasBackbone(keras.Model(images, keras.layers.Dense(2, dtype=F64)(h)),
                             num_steps=1)
    with pytest.raises(ValueError, match="once each"):
        backbone.forward(tf.ones([2, 4], tf.float64), backbone.initial_params(), 0, True)


# -------------------------------------------------------- the rest of the library


def test_variant_keeps_names_and_bakes_a_support_task_model():
    learner = keras_learner(randomize(sequential_model()))
    backbone = learner.backbone
    variant = backbone.variant(num_steps=1, bn_stats="running", name="task_network")
    assert variant.param_names == backbone.param_names and variant.name == "task_network"
    assert variant.norms[0].gamma.shape == (1, 2) and variant.norms[0].bn_stats == "running"
    assert not {id(v) for v in variant.variables} & {id(v) for v in backbone.variables}
    # On the support set itself its stored statistics are its batch statistics,
    # so the task model answers there as learner.predict does.
    support_x, support_y, _, _ = (x[0] for x in random_batch(learner.config))
    network = task_model.task_network(learner, "support")
    task_model.bake_task(learner, network, support_x, support_y, "support")
    served, _ = network.forward(support_x, network.initial_params(), 0, False)
    want = learner.predict(support_x, learner.adapt(support_x, support_y))
    np.testing.assert_allclose(served.numpy(), want.numpy(), rtol=1e-10, atol=1e-12)


def test_a_trainer_step_moves_the_weights_and_the_running_statistics():
    learner = keras_learner(randomize(sequential_model()))
    before = learner.get_weights()
    result = Trainer(learner).train_step(random_batch(learner.config))
    assert bool(result["applied"])
    after = learner.get_weights()
    for name in ("backbone/0_conv2d/kernel", "backbone/2_dense/bias",
                 "backbone/1_batch_norm/gamma", "backbone/1_batch_norm/running_mean",
                 "backbone/1_batch_norm/running_var", "lslr/0_conv2d/kernel"):
        assert not np.allclose(before[name], after[name]), name


def test_checkpoint_restores_into_a_backbone_built_elsewhere(tmp_path):
    source = KerasBackbone(randomize(functional_model()), num_steps=2)
    path = tf.train.Checkpoint(backbone=source).save(str(tmp_path / "ckpt"))
    keras.layers.Dense(1)  # Moves Keras' automatic layer numbering on.
    target = KerasBackbone(functional_model(), num_steps=2)
    tf.train.Checkpoint(backbone=target).restore(path).assert_consumed()
    for a, b in zip(source.variables, target.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    x = tf.constant(np.random.RandomState(5).randn(3, 6, 6, 1))
    np.testing.assert_array_equal(source.forward(x, source.initial_params(), 1, True)[0],
                                  target.forward(x, target.initial_params(), 1, True)[0])


def test_learner_weights_round_trip_between_independently_built_learners():
    first = keras_learner(randomize(functional_model(), seed=6))
    keras.layers.Conv2D(1, 1)  # Moves Keras' automatic layer numbering on.
    second = keras_learner(functional_model())
    weights = first.get_weights()
    assert "backbone/0_conv2d/kernel" in weights and "backbone/3_batch_norm/gamma" in weights
    second.set_weights(weights)
    for name, value in second.get_weights().items():
        np.testing.assert_array_equal(value, weights[name], err_msg=name)


def test_support_statistics_keep_queries_independent():
    learner = keras_learner(randomize(functional_model()), bn_stats="support")
    support_x, support_y, query_x, _ = (x[0] for x in random_batch(learner.config, n_query=3))
    params = learner.adapt(support_x, support_y)
    together = learner.predict(query_x, params, support_x=support_x)
    alone = learner.predict(query_x[:1], params, support_x=support_x)
    others = learner.predict(query_x[3:], params, support_x=support_x)
    np.testing.assert_allclose(alone.numpy(), together.numpy()[:1], rtol=1e-12)
    np.testing.assert_allclose(others.numpy(), together.numpy()[3:], rtol=1e-12)


def test_traced_forward_and_export_archive(tmp_path):
    backbone = KerasBackbone(randomize(sequential_model()), num_steps=2)
    x = tf.constant(np.random.RandomState(7).randn(3, 6, 6, 1))
    archive = keras.export.ExportArchive()
    archive.track(backbone)
    archive.add_endpoint(
        "serve", lambda images: backbone.forward(images, backbone.initial_params(), 1,
                                                 False)[0],
        input_signature=[tf.TensorSpec([None, 6, 6, 1], tf.float64)])
    archive.write_out(str(tmp_path / "model"), verbose=False)
    reloaded = tf.saved_model.load(str(tmp_path / "model"))
    np.testing.assert_allclose(reloaded.serve(x).numpy(),
                               backbone.forward(x, backbone.initial_params(), 1, False)[0],
                               rtol=1e-12)
