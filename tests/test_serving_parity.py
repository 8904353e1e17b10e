"""Non-transductive batch norm (`--bn_stats=support|rn|tasknorm`): trained as it is served.

* the second-order meta-gradient against float64 finite differences and a
  hand-written reference that normalises queries with the support set's
  statistics (MetaBN), the support set's plus the image's (RN) or TaskNorm-I's
  blend (each of its options);
* a query's evaluation logits do not depend on the other queries: permuted,
  alone, or padded with unrelated images (and under `batch` they do);
* the task model (what `export/` serves and the final test scores as served)
  answers each image alone exactly as `eval_step` does, and so does the
  meta-model SavedModel for any grouping of the queries into requests.
"""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from mamlpp_tf import MamlPlusPlus, Trainer, task_model
from mamlpp_tf_export import saved_models
from mamlpp_tf_export.preprocessing import Preprocessing

from conftest import (
    assert_random_directions_match_fd,
    directional_fd,
    hand_unrolled_meta_loss,
    meta_gradient,
    random_batch,
    relative_error,
    tiny_config,
)

# Each non-transductive mode, TaskNorm with each of its options.
CONTEXT_MODES = {
    "support": dict(bn_stats="support"),
    "rn": dict(bn_stats="rn"),
    "tasknorm": dict(bn_stats="tasknorm"),
    "tasknorm-layer-unbiased": dict(bn_stats="tasknorm", tasknorm_alpha="layer",
                                    tasknorm_unbiased=True),
    "tasknorm-channel": dict(bn_stats="tasknorm", tasknorm_alpha="channel"),
}
# TaskNorm's options only change how its blend is formed; the slow, whole-path tests
# (finite differences, SavedModels) run them with the slow tests.
SLOW_TASKNORM_OPTIONS = [
    pytest.param(mode, marks=[pytest.mark.slow] if mode.startswith("tasknorm-") else [])
    for mode in CONTEXT_MODES
]


def randomise_tasknorm(learner: MamlPlusPlus, seed: int = 0) -> None:
    """Gives TaskNorm's a, b values away from their symmetric zero initialisation."""
    rng = np.random.RandomState(seed)
    weights = learner.get_weights()
    for name, value in weights.items():
        if name.endswith(("/alpha_scale", "/alpha_offset")):
            weights[name] = 0.5 * rng.randn(*value.shape)
    learner.set_weights(weights)


def make_learner(mode: str, **overrides) -> MamlPlusPlus:
    """A tiny learner of a `CONTEXT_MODES` entry (or another `bn_stats` mode)."""
    learner = MamlPlusPlus(tiny_config(**CONTEXT_MODES.get(mode, dict(bn_stats=mode)),
                                       **overrides))
    if learner.config.bn_stats == "tasknorm":
        randomise_tasknorm(learner)
    return learner


@pytest.mark.parametrize("per_step_bn", [True, False], ids=["per_step_bn", "shared_bn"])
@pytest.mark.parametrize("mode", SLOW_TASKNORM_OPTIONS)
def test_second_order_meta_gradient_equals_finite_differences(mode, per_step_bn):
    learner = make_learner(mode, inner_steps=3, eval_inner_steps=3, msl_epochs=3,
                           per_step_bn=per_step_bn)
    batch = random_batch(learner.config, tasks=2)
    _, grads = meta_gradient(learner, batch, epoch=1)
    assert_random_directions_match_fd(learner, batch, 1, grads, trials=2, seed=1)
    # TaskNorm's a and b on their own: their gradient is not lost in the sum.
    for index, (variable, grad) in enumerate(zip(learner.trainable_variables, grads)):
        if "alpha" not in variable.path:
            continue
        assert np.all(np.abs(grad) > 1e-8), variable.path
        direction = [np.zeros(g.shape) for g in grads]
        direction[index] = np.ones(grad.shape)
        numeric = directional_fd(learner, batch, 1, direction)
        assert relative_error(np.sum(grad), numeric) < 1e-5, variable.path


def reference_meta_loss(learner: MamlPlusPlus, batch, msl_weights) -> tf.Tensor:
    """MAML++ with context statistics, written out with raw TF ops from the variables.

    Every query pass runs the support set through the same weights and batch-norm
    row alongside, layer by layer, and normalises the queries with the support
    activations' moments (MetaBN), with the moments of the support activations
    plus the query's own (RN; the support keeps its own), or with TaskNorm-I's
    pooled moments (the support's too).
    """
    backbone, config = learner.backbone, learner.config
    mode = config.bn_stats

    def row(variable, step):
        value = tf.convert_to_tensor(variable)
        if config.per_step_bn and not (mode == "tasknorm" and config.tasknorm_alpha == "layer"
                                       and "alpha" in variable.path):
            return value[step]
        return value

    def normalise(x, context_mean, context_var, norm, step, n_context, blend):
        if blend:
            if mode == "rn":
                alpha = n_context / (n_context + 1)
            else:
                alpha = tf.sigmoid(row(norm.alpha_scale, step) * n_context +
                                   row(norm.alpha_offset, step))
            image_mean = tf.reduce_mean(x, axis=[1, 2], keepdims=True)
            image_var = tf.reduce_mean((x - image_mean)**2, axis=[1, 2], keepdims=True)
            if config.tasknorm_unbiased:
                pixels = x.shape[1] * x.shape[2]
                context_var = context_var * n_context * pixels / (n_context * pixels - 1)
                image_var = image_var * pixels / (pixels - 1)
            mean = alpha * context_mean + (1 - alpha) * image_mean
            var = (alpha * (context_var + (context_mean - mean)**2) +
                   (1 - alpha) * (image_var + (image_mean - mean)**2))
        else:
            mean, var = context_mean, context_var
        return (x - mean) / tf.sqrt(var + 1e-5) * row(norm.gamma, step) + row(norm.beta, step)

    def net(x, w, step, support):
        """Logits of `x`; with `support`, statistics come from it (else from `x`)."""
        context = x if support is None else support
        for i, norm in enumerate(backbone.norms):
            kernel, bias = w[f"conv{i}/kernel"], w[f"conv{i}/bias"]
            x = tf.nn.conv2d(x, kernel, 1, "SAME") + bias
            context = tf.nn.conv2d(context, kernel, 1, "SAME") + bias
            mean = tf.reduce_mean(context, axis=[0, 1, 2])
            var = tf.reduce_mean((context - mean)**2, axis=[0, 1, 2])
            n = float(context.shape[0])
            x = normalise(x, mean, var, norm, step, n,
                          mode == "tasknorm" or (mode == "rn" and support is not None))
            context = normalise(context, mean, var, norm, step, n, mode == "tasknorm")
            x, context = (tf.nn.max_pool2d(tf.maximum(h, 0.01 * h), 2, 2, "VALID")
                          for h in (x, context))
        x = tf.reshape(x, [x.shape[0], -1])
        return x @ w["dense/kernel"] + w["dense/bias"]

    return hand_unrolled_meta_loss(net, backbone.initial_params(),
                                   {k: tf.convert_to_tensor(v) for k, v in
                                    learner.lslr.rates.items()}, batch, msl_weights)


@pytest.mark.parametrize("mode", list(CONTEXT_MODES))
def test_meta_loss_and_gradient_equal_a_hand_written_reference(mode):
    learner = make_learner(mode, msl_epochs=3)
    batch = [tf.constant(x) for x in random_batch(learner.config, tasks=2, k_shot=2,
                                                    n_query=3)]
    msl = np.float32([1 / 2 - 1 / 6, 1 / 2 + 1 / 6]).astype(np.float64)  # Epoch 1 of 3.
    loss, grads = meta_gradient(learner, batch, epoch=1)
    with tf.GradientTape() as tape:
        reference = reference_meta_loss(learner, batch, msl)
    expected = tape.gradient(reference, learner.trainable_variables,
                             unconnected_gradients=tf.UnconnectedGradients.ZERO)
    np.testing.assert_allclose(loss, reference.numpy(), rtol=1e-10)
    for variable, got, want in zip(learner.trainable_variables, grads, expected):
        # atol: entries that nearly cancel (e.g. 4e-5 out of terms ~1e-1) keep
        # float64 rounding of ~1e-11.
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-7, atol=1e-10,
                                   err_msg=variable.path)


@pytest.mark.parametrize("mode", list(CONTEXT_MODES))
def test_first_order_equals_second_order_when_inner_rates_are_zero(mode):
    second = make_learner(mode)
    first = MamlPlusPlus(dataclasses.replace(second.config, second_order=False))
    first.set_weights(second.get_weights())
    batch = random_batch(second.config)
    _, g2 = meta_gradient(second, batch)
    _, g1 = meta_gradient(first, batch)
    assert max(np.abs(a - b).max() for a, b in zip(g1, g2)) > 1e-4
    for learner in (first, second):
        learner.set_weights({name: np.zeros_like(value) if name.startswith("lslr/") else value
                             for name, value in learner.get_weights().items()})
    _, g2 = meta_gradient(second, batch)
    _, g1 = meta_gradient(first, batch)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, atol=1e-12)


def eval_logits(trainer: Trainer, support_x, support_y, query_x) -> np.ndarray:
    """`eval_step`'s query logits of one task."""
    labels = np.zeros((1, len(query_x)), np.int32)
    batch = (support_x[None], support_y[None], query_x[None], labels)
    return trainer.eval_step(batch)["logits"].numpy()[0]


@pytest.fixture(scope="module", params=["loop", "batched"])
def task_impl(request):
    return request.param


@pytest.mark.parametrize("mode", list(CONTEXT_MODES))
def test_a_query_answer_does_not_depend_on_the_other_queries(mode, task_impl):
    learner = make_learner(mode, task_impl=task_impl, dtype="float32",
                           image_shape=(12, 12, 1), num_filters=4)
    support_x, support_y, query_x, _ = (x[0] for x in random_batch(learner.config, tasks=1,
                                                                  k_shot=2, n_query=3))
    unrelated = np.random.RandomState(9).randn(4, *learner.config.image_shape) * 3 + 1
    trainer = Trainer(learner)
    logits = eval_logits(trainer, support_x, support_y, query_x)
    permutation = np.random.RandomState(3).permutation(len(query_x))
    permuted = eval_logits(trainer, support_x, support_y, query_x[permutation])
    np.testing.assert_allclose(permuted, logits[permutation], atol=1e-6)
    for q in range(len(query_x)):
        alone = eval_logits(trainer, support_x, support_y, query_x[q:q + 1])
        np.testing.assert_allclose(alone[0], logits[q], atol=1e-6)
    padded = eval_logits(trainer, support_x, support_y,
                         np.concatenate([query_x, unrelated.astype(np.float32)]))
    np.testing.assert_allclose(padded[:len(query_x)], logits, atol=1e-6)


def test_batch_statistics_make_answers_depend_on_the_other_queries():
    """The transductive official protocol fails the invariance above (the test can fail)."""
    learner = make_learner("batch", dtype="float32")
    support_x, support_y, query_x, _ = (x[0] for x in random_batch(learner.config, tasks=1,
                                                                  k_shot=2, n_query=3))
    trainer = Trainer(learner)
    logits = eval_logits(trainer, support_x, support_y, query_x)
    alone = eval_logits(trainer, support_x, support_y, query_x[:1])
    assert np.abs(alone[0] - logits[0]).max() > 1e-3


@pytest.mark.parametrize("mode", list(CONTEXT_MODES))
def test_task_model_answers_each_image_alone_as_eval_step(mode, task_impl):
    learner = make_learner(mode, task_impl=task_impl, dtype="float32")
    support_x, support_y, query_x, _ = (x[0] for x in random_batch(learner.config, tasks=1,
                                                                  k_shot=2, n_query=3))
    expected = eval_logits(Trainer(learner), support_x, support_y, query_x)
    served = task_model.served_logits_fn(learner, task_model.default_bn_stats(learner.config),
                                         len(support_x))
    for q in range(len(query_x)):
        alone = served(support_x, support_y, query_x[q:q + 1]).numpy()
        np.testing.assert_allclose(alone[0], expected[q], atol=1e-5)
    together = served(support_x, support_y, query_x).numpy()
    np.testing.assert_allclose(together, expected, atol=1e-5)


def test_rn_task_model_of_a_batch_run_answers_as_an_rn_run(task_impl):
    """The serving-only swap computes what a --bn_stats=rn run with these weights would."""
    learner = make_learner("batch", task_impl=task_impl, dtype="float32")
    rn = make_learner("rn", task_impl=task_impl, dtype="float32")
    rn.set_weights(learner.get_weights())
    support_x, support_y, query_x, _ = (x[0] for x in random_batch(learner.config, tasks=1,
                                                                  k_shot=2, n_query=3))
    expected = eval_logits(Trainer(rn), support_x, support_y, query_x)
    served = task_model.served_logits_fn(learner, "rn", len(support_x))
    for q in range(len(query_x)):
        np.testing.assert_allclose(served(support_x, support_y, query_x[q:q + 1]).numpy()[0],
                                   expected[q], atol=1e-5)
    assert np.abs(eval_logits(Trainer(learner), support_x, support_y, query_x) -
                  expected).max() > 1e-3


def test_task_model_of_a_batch_run_uses_the_support_statistics():
    """Served ≠ protocol under `batch`: the gap `served_accuracy` reports is real."""
    learner = make_learner("batch", dtype="float32")
    support_x, support_y, query_x, _ = (x[0] for x in random_batch(learner.config, tasks=1,
                                                                  k_shot=2, n_query=3))
    expected = eval_logits(Trainer(learner), support_x, support_y, query_x)
    served = task_model.served_logits_fn(learner, "support", len(support_x))
    assert np.abs(served(support_x, support_y, query_x).numpy() - expected).max() > 1e-3
    # On the support set itself the statistics are the protocol's: equal there.
    params = learner.adapt(support_x, support_y)
    np.testing.assert_allclose(
        served(support_x, support_y, support_x).numpy(),
        learner.predict(support_x, params).numpy(), atol=1e-5)


def test_bn_stats_of_the_task_model_must_fit_the_run():
    with pytest.raises(ValueError, match="tasknorm"):
        task_model.check_bn_stats(tiny_config(bn_stats="support"), "tasknorm")
    with pytest.raises(ValueError, match="tasknorm"):
        task_model.check_bn_stats(tiny_config(bn_stats="tasknorm"), "support")
    with pytest.raises(ValueError, match=r"--bn_stats='running' must be one of"):
        task_model.check_bn_stats(tiny_config(), "running")
    with pytest.raises(ValueError, match="support_x"):
        make_learner("tasknorm").predict(np.zeros((1, 6, 6, 1)), {})
    assert task_model.default_bn_stats(tiny_config(bn_stats="batch")) == "support"
    assert task_model.default_bn_stats(tiny_config(bn_stats="tasknorm")) == "tasknorm"
    assert task_model.default_bn_stats(tiny_config(bn_stats="rn")) == "rn"


def _preprocessing(learner: MamlPlusPlus) -> Preprocessing:
    return Preprocessing(image_shape=learner.config.image_shape, kind="omniglot")


@pytest.mark.parametrize("mode", SLOW_TASKNORM_OPTIONS)
def test_saved_models_answer_any_grouping_of_queries_as_eval_step(mode, tmp_path):
    learner = make_learner(mode, dtype="float32", task_impl="batched")
    bn_stats = learner.config.bn_stats
    support_x, support_y, query_x, _ = (x[0] for x in random_batch(learner.config, tasks=1,
                                                                  k_shot=2, n_query=3))
    expected = eval_logits(Trainer(learner), support_x, support_y, query_x)
    preprocessing = _preprocessing(learner)
    network = task_model.task_network(learner, bn_stats, len(support_x))
    task_model.bake_task(learner, network, support_x, support_y, bn_stats)
    saved_models.task_archive(network, ("a", "b"), preprocessing).write_out(
        str(tmp_path / "task"), verbose=False)
    saved_models.meta_archive(learner, preprocessing).write_out(str(tmp_path / "meta"),
                                                                verbose=False)
    task = tf.saved_model.load(str(tmp_path / "task")).signatures["serving_default"]
    meta = tf.saved_model.load(str(tmp_path / "meta")).signatures["serving_default"]
    for q in range(len(query_x)):
        probabilities = task(images=tf.constant(query_x[q:q + 1]))["probabilities"]
        np.testing.assert_allclose(probabilities.numpy()[0],
                                   tf.nn.softmax(expected[q]).numpy(), atol=1e-5)
    for groups in ([[0, 1, 2]], [[0], [1], [2]], [[2, 0], [1]]):
        for group in groups:  # One task per request (the signatures' leading task axis).
            logits = meta(support_images=tf.constant(support_x[None]),
                          support_labels=tf.constant(support_y[None]),
                          query_images=tf.constant(query_x[group][None]))["logits"]
            np.testing.assert_allclose(logits.numpy()[0], expected[group], atol=1e-5)


def test_tasknorm_alpha_variables_are_checkpointed(tmp_path):
    learner = make_learner("tasknorm")
    path = tf.train.Checkpoint(**Trainer(learner).checkpoint_items()).save(
        str(tmp_path / "ckpt"))
    names = [name for name, _ in tf.train.list_variables(path)]
    for i in range(learner.config.num_stages):
        assert any(f"norm{i}/alpha_scale" in n for n in names), names
        assert any(f"norm{i}/alpha_offset" in n for n in names), names
    fresh = MamlPlusPlus(learner.config)
    tf.train.Checkpoint(**Trainer(fresh).checkpoint_items()).restore(path)
    for norm, restored in zip(learner.backbone.norms, fresh.backbone.norms):
        np.testing.assert_array_equal(norm.alpha_scale.numpy(), restored.alpha_scale.numpy())
    keras.utils.set_random_seed(0)
