"""ANIL, BOIL, Meta-SGD and longer test-time adaptation against independent computations.

* float64 central finite differences of each variant's second-order meta-gradient;
* hand-unrolled references written with raw TF ops: ANIL (the body frozen in
  the inner loop, reaching the meta-gradient only through the outer loop) and
  Meta-SGD (a rate per weight element, per step or shared);
* BOIL leaves the head as it was; only adapted weights get rates; the named
  variable groups partition the learner and drive clipping;
* ANIL's reused body features give the numbers of the whole pass, computed
  once per task (once per batch-norm row with per-step batch norm);
* evaluation steps beyond the trained ones equal a loop that repeats the last
  batch-norm row and rate;
* each variant's served task model answers as `eval_step` does under
  `bn_stats=support`, and so do `adapt` + `predict` (the meta-model's computation).
"""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from mamlpp_tf import MamlPlusPlus, Trainer, inner_loop, task_model
from mamlpp_tf.nets import FastWeightNetwork

from conftest import (
    assert_random_directions_match_fd,
    hand_unrolled_meta_loss,
    meta_gradient,
    random_batch,
    tiny_config,
)

# Each variant's config fields.
VARIANTS = {
    "anil": dict(adapt="head"),
    "boil": dict(adapt="body"),
    "meta_sgd": dict(inner_update="meta_sgd"),
    "meta_sgd_shared": dict(inner_update="meta_sgd", meta_sgd_per_step=False),
    "maml_fixed": dict(inner_update="fixed"),
}
HEAD = ("dense/kernel", "dense/bias")
# The official MSL weights of epoch 1 of 3 with 2 steps (float32 in the official code).
MSL = np.float32([1 / 2 - 1 / 6, 1 / 2 + 1 / 6]).astype(np.float64)


def make_learner(variant: str, seed: int = 0, **overrides) -> MamlPlusPlus:
    """A tiny learner of `variant` whose rates and per-step BN rows differ element by element."""
    learner = MamlPlusPlus(tiny_config(**{**VARIANTS[variant], **overrides}))
    rng = np.random.RandomState(seed)
    weights = learner.get_weights()
    for name, value in weights.items():
        if name.startswith(("lslr/", "meta_sgd/")):
            weights[name] = value * rng.uniform(0.5, 1.5, value.shape)
        elif name.endswith(("/gamma", "/beta")):
            weights[name] = value + 0.2 * rng.randn(*value.shape)
    learner.set_weights(weights)
    return learner


@pytest.mark.parametrize("variant", ["anil", "boil", "meta_sgd", "meta_sgd_shared"])
@pytest.mark.parametrize("per_step_bn", [True, False], ids=["per_step_bn", "shared_bn"])
def test_second_order_meta_gradient_equals_finite_differences(variant, per_step_bn):
    learner = make_learner(variant, msl_epochs=3, per_step_bn=per_step_bn)
    batch = random_batch(learner.config, tasks=2)
    _, grads = meta_gradient(learner, batch, epoch=1)
    assert_random_directions_match_fd(learner, batch, 1, grads, trials=2, seed=3)


def vgg_net(learner: MamlPlusPlus, frozen: dict[str, tf.Tensor], gammas, betas):
    """The tiny VGG in raw TF ops: `net(x, w, step, support)` with `frozen` weights besides `w`."""
    stages = learner.config.num_stages

    def net(x, w, step, support):
        del support  # Batch statistics of `x` itself (bn_stats="batch").
        w = {**frozen, **w}
        for i in range(stages):
            x = tf.nn.conv2d(x, w[f"conv{i}/kernel"], 1, "SAME") + w[f"conv{i}/bias"]
            mean = tf.reduce_mean(x, axis=[0, 1, 2])
            var = tf.reduce_mean((x - mean)**2, axis=[0, 1, 2])
            x = (x - mean) / tf.sqrt(var + 1e-5) * gammas[i][step] + betas[i][step]
            x = tf.nn.max_pool2d(tf.maximum(x, 0.01 * x), 2, 2, "VALID")
        x = tf.reshape(x, [x.shape[0], -1])
        return x @ w["dense/kernel"] + w["dense/bias"]

    return net


def reference_gradients(learner: MamlPlusPlus, batch, adapted, rates):
    """`(meta-loss, {variable path: gradient})` of MAML++ with only `adapted` in the inner loop.

    Every other fast weight enters the hand-written network as a constant of the
    inner loop (a closure), so its gradient comes from the outer loop alone.
    """
    values = learner.get_weights()
    weights = {k: tf.Variable(values[f"backbone/{k}"]) for k in learner.backbone.param_names}
    norms = learner.backbone.norms
    gammas = [tf.Variable(values[f"backbone/{n.name}/gamma"]) for n in norms]
    betas = [tf.Variable(values[f"backbone/{n.name}/beta"]) for n in norms]
    frozen = {k: v for k, v in weights.items() if k not in adapted}
    net = vgg_net(learner, frozen, gammas, betas)
    with tf.GradientTape() as tape:
        loss = hand_unrolled_meta_loss(net, {k: weights[k] for k in adapted}, rates,
                                       [tf.constant(x) for x in batch], MSL)
    sources = {learner.backbone.weights_by_name[k].path: v for k, v in weights.items()}
    sources.update({n.gamma.path: g for n, g in zip(norms, gammas)})
    sources.update({n.beta.path: b for n, b in zip(norms, betas)})
    sources.update({learner.update_rule.rates[k].path: v for k, v in rates.items()
                    if isinstance(v, tf.Variable)})
    grads = tape.gradient(loss, sources)
    return loss.numpy(), {path: g.numpy() for path, g in grads.items()}


def assert_matches_reference(learner, batch, rates):
    loss, grads = meta_gradient(learner, batch, epoch=1)
    want_loss, want = reference_gradients(learner, batch, learner.adapted, rates)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-10)
    got = dict(zip([v.path for v in learner.trainable_variables], grads))
    assert set(want) == set(got)
    for path, value in want.items():
        # atol: entries that nearly cancel (e.g. 3e-5 out of terms ~1e-1) keep float64
        # rounding of ~1e-11.
        np.testing.assert_allclose(got[path], value, rtol=1e-7, atol=1e-10, err_msg=path)
    return got


def test_anil_equals_a_reference_with_the_body_frozen_in_the_inner_loop():
    learner = make_learner("anil", msl_epochs=3)
    batch = random_batch(learner.config, tasks=2)
    assert learner.adapted == HEAD and list(learner.update_rule.rates) == list(HEAD)
    rates = {k: tf.Variable(v.numpy()) for k, v in learner.update_rule.rates.items()}
    got = assert_matches_reference(learner, batch, rates)
    # The body learns, from the outer loop only.
    kernel = learner.backbone.weights_by_name["conv0/kernel"]
    assert np.abs(got[kernel.path]).max() > 1e-6


@pytest.mark.parametrize("per_step", [True, False], ids=["per_step", "shared"])
def test_meta_sgd_equals_a_reference_with_a_rate_per_element(per_step):
    learner = make_learner("meta_sgd" if per_step else "meta_sgd_shared", msl_epochs=3)
    batch = random_batch(learner.config, tasks=2)
    rates = {k: tf.Variable(v.numpy()) for k, v in learner.update_rule.rates.items()}
    for name, rate in rates.items():
        shape = learner.backbone.weights_by_name[name].shape
        assert tuple(rate.shape) == ((2,) if per_step else ()) + tuple(shape)
    if per_step:
        assert_matches_reference(learner, batch, rates)
        return
    # Shared: the same per-element tensor at both steps; its gradient is the sum of both.
    stepped = {k: [v, v] for k, v in rates.items()}
    with tf.GradientTape() as tape:
        reference = reference_gradients_loss(learner, batch, stepped)
    want = tape.gradient(reference, rates)
    _, grads = meta_gradient(learner, batch, epoch=1)
    got = dict(zip([v.path for v in learner.trainable_variables], grads))
    for name, rate in learner.update_rule.rates.items():
        np.testing.assert_allclose(got[rate.path], want[name].numpy(), rtol=1e-7, atol=1e-10)


def reference_gradients_loss(learner, batch, rates):
    """The hand-unrolled meta-loss of every fast weight adapting with `rates[name][step]`."""
    values = learner.get_weights()
    weights = {k: tf.constant(values[f"backbone/{k}"]) for k in learner.backbone.param_names}
    gammas = [values[f"backbone/{n.name}/gamma"] for n in learner.backbone.norms]
    betas = [values[f"backbone/{n.name}/beta"] for n in learner.backbone.norms]
    net = vgg_net(learner, {}, gammas, betas)
    return hand_unrolled_meta_loss(net, weights, rates, [tf.constant(x) for x in batch], MSL)


def test_boil_leaves_the_head_unchanged_and_learns_it_in_the_outer_loop():
    learner = make_learner("boil")
    assert set(learner.adapted) == set(learner.backbone.param_names) - set(HEAD)
    assert set(learner.update_rule.rates) == set(learner.adapted)
    support_x, support_y, _, _ = (x[0] for x in random_batch(learner.config, tasks=1))
    initial = learner.backbone.initial_params()
    adapted = learner.adapt(support_x, support_y, num_steps=3)
    for name in learner.backbone.param_names:
        changed = np.abs(adapted[name].numpy() - initial[name].numpy()).max()
        if name in HEAD:
            assert changed == 0, name
        elif "kernel" in name:
            assert changed > 1e-6, name
    _, grads = meta_gradient(learner, random_batch(learner.config), epoch=0)
    got = dict(zip([v.path for v in learner.trainable_variables], grads))
    assert np.abs(got[learner.backbone.weights_by_name["dense/kernel"].path]).max() > 1e-6


@pytest.mark.parametrize("per_step_bn,expected", [(True, 4), (False, 2)],
                         ids=["per_step_bn", "shared_bn"])
def test_anil_reuses_body_features_and_gets_the_whole_pass_numbers(per_step_bn, expected,
                                                                    monkeypatch):
    learner = make_learner("anil", per_step_bn=per_step_bn, msl_epochs=3)
    batch = random_batch(learner.config, tasks=2)
    body = learner.backbone.forward_body
    calls = []
    monkeypatch.setattr(learner.backbone, "forward_body",
                        lambda *args, **kwargs: calls.append(1) or body(*args, **kwargs))
    loss, grads = meta_gradient(learner, batch, epoch=1)  # MSL: a query pass per step.
    # Per task: support and query passes, once per batch-norm row (2 steps).
    assert len(calls) == 2 * expected
    monkeypatch.setattr(inner_loop, "has_body_head_split", lambda *args: False)
    before = len(calls)
    whole_loss, whole_grads = meta_gradient(learner, batch, epoch=1)
    assert len(calls) - before == 2 * 4  # The whole `forward` at every pass instead.
    np.testing.assert_allclose(loss, whole_loss, rtol=1e-12)
    for got, want in zip(grads, whole_grads):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("variant", ["anil", "meta_sgd"])
def test_batched_layout_equals_the_loop(variant):
    loop = make_learner(variant, task_impl="loop")
    batched = MamlPlusPlus(dataclasses.replace(loop.config, task_impl="batched"))
    batched.set_weights(loop.get_weights())
    batch = random_batch(loop.config, tasks=3)
    loop_loss, loop_grads = meta_gradient(loop, batch)
    batched_loss, batched_grads = meta_gradient(batched, batch)
    np.testing.assert_allclose(batched_loss, loop_loss, rtol=1e-10)
    for got, want in zip(batched_grads, loop_grads):
        np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-12)


def reference_eval_logits(learner: MamlPlusPlus, support_x, support_y, query_x, steps):
    """Query logits after `steps` inner steps, step `i` at row `min(i, S - 1)`, written out."""
    backbone, last = learner.backbone, learner.config.inner_steps - 1
    rule = learner.update_rule
    w = backbone.initial_params()
    for step in range(steps):
        row = min(step, last)
        with tf.GradientTape() as tape:
            tape.watch(list(w.values()))
            logits, _ = backbone.forward(support_x, w, row, False)
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(support_y, logits))
        grads = tape.gradient(loss, w)
        for name, rate in rule.rates.items():
            alpha = rate.numpy()[row] if rule.per_step else rate.numpy()
            w[name] = w[name] - alpha * grads[name]
    return backbone.forward(query_x, w, last, False)[0].numpy()


@pytest.mark.parametrize("variant", ["meta_sgd", "anil", "maml_fixed"])
def test_steps_beyond_training_repeat_the_last_row(variant):
    learner = make_learner(variant, eval_inner_steps=4)  # Its BN rows differ by step.
    batch = random_batch(learner.config, tasks=2)
    results = learner.eval_results(batch)
    for t in range(2):
        want = reference_eval_logits(learner, batch[0][t], batch[1][t], batch[2][t], 4)
        np.testing.assert_allclose(results["logits"][t].numpy(), want, rtol=1e-10, atol=1e-12)
        params = learner.adapt(batch[0][t], batch[1][t])  # eval_inner_steps = 4.
        np.testing.assert_allclose(learner.predict(batch[2][t], params).numpy(), want,
                                   rtol=1e-10, atol=1e-12)
    # Four steps differ from the two trained ones.
    two = reference_eval_logits(learner, batch[0][0], batch[1][0], batch[2][0], 2)
    assert np.abs(two - results["logits"][0].numpy()).max() > 1e-6


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_served_task_model_answers_as_eval_step_under_support_statistics(variant):
    # Beyond the trained steps, task-batched (ANIL: cached batched body passes).
    learner = make_learner(variant, bn_stats="support", dtype="float32", eval_inner_steps=3,
                           task_impl="batched")
    support_x, support_y, query_x, query_y = (x[:1] for x in random_batch(
        learner.config, tasks=1, k_shot=2, n_query=3))
    expected = Trainer(learner).eval_step((support_x, support_y, query_x, query_y))
    expected = expected["logits"].numpy()[0]
    served = task_model.served_logits_fn(learner, "support", support_x.shape[1])
    for q in range(query_x.shape[1]):
        alone = served(support_x[0], support_y[0], query_x[0, q:q + 1]).numpy()
        np.testing.assert_allclose(alone[0], expected[q], atol=1e-5)
    # The meta-model's computation: adapt + predict.
    params = learner.adapt(support_x[0], support_y[0])
    np.testing.assert_allclose(learner.predict(query_x[0], params, support_x=support_x[0]),
                               expected, atol=1e-5)


def test_meta_sgd_weights_are_named_and_round_trip(tmp_path):
    learner = make_learner("meta_sgd")
    weights = learner.get_weights()
    rates = {name for name in weights if not name.startswith("backbone/")}
    assert rates == {f"meta_sgd/{name}" for name in learner.backbone.param_names}
    for name in learner.backbone.param_names:
        shape = learner.backbone.weights_by_name[name].shape
        assert weights[f"meta_sgd/{name}"].shape == (2, *shape)
    keras.utils.set_random_seed(5)
    other = make_learner("meta_sgd", seed=1)
    other.set_weights(weights)
    for name, value in other.get_weights().items():
        np.testing.assert_array_equal(value, weights[name], err_msg=name)
    wrong = dict(weights, **{"meta_sgd/dense/bias": np.zeros(2)})
    with pytest.raises(ValueError, match=r"'meta_sgd/dense/bias' has shape \(2,\)"):
        other.set_weights(wrong)
    # Checkpointed under the update rule's key `lslr`, restored into a fresh learner.
    path = tf.train.Checkpoint(**learner.checkpoint_items()).write(str(tmp_path / "model"))
    fresh = make_learner("meta_sgd", seed=2)
    tf.train.Checkpoint(**fresh.checkpoint_items()).read(path).assert_existing_objects_matched()
    for name, value in fresh.get_weights().items():
        np.testing.assert_array_equal(value, weights[name], err_msg=name)


@pytest.mark.parametrize("variant", ["anil", "meta_sgd"])
def test_variable_groups_partition_the_learner_and_only_network_groups_are_clipped(variant):
    learner = make_learner(variant, bn_stats="tasknorm", grad_clip=0.5)
    groups = learner.variable_groups()
    every = [v for group in groups.values() for v in group.values()]
    assert len({id(v) for v in every}) == len(every) == len(learner.get_weights())
    assert set(groups["update_rule"]) == set(learner.adapted)
    assert set(groups["normalisation"]) == {f"norm{i}/alpha_{kind}" for i in range(2)
                                            for kind in ("scale", "offset")}
    assert ([id(v) for v in learner.trainable_variables] ==
            [id(v) for v in learner.backbone.trainable_variables + list(
                groups["update_rule"].values())])
    trainer = Trainer(learner)
    clipped = trainer._clip(  # pylint: disable=protected-access
        [tf.fill(v.shape, tf.constant(3.0, v.dtype)) for v in learner.trainable_variables])
    rates = {id(v) for v in groups["update_rule"].values()}
    for variable, grad in zip(learner.trainable_variables, clipped):
        assert np.all(grad.numpy() == (3.0 if id(variable) in rates else 0.5)), variable.path


class HeadlessNetwork(FastWeightNetwork):
    """A one-layer network without `head_param_names`."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.param_names = ["dense/kernel", "dense/bias"]
        self.add_fast_weight("dense/kernel", (36, 2), "glorot_uniform")
        self.add_fast_weight("dense/bias", (2,), "zeros")

    def forward(self, x, params, step, training, context=None):
        del step, training, context
        return tf.reshape(x, [-1, 36]) @ params["dense/kernel"] + params["dense/bias"], []


def test_head_and_body_need_head_param_names_that_split_the_network():
    config = tiny_config(adapt="head", msl_epochs=0)
    with pytest.raises(TypeError, match="HeadlessNetwork has no `head_param_names`"):
        MamlPlusPlus(config, backbone=HeadlessNetwork(dtype="float64"))
    MamlPlusPlus(dataclasses.replace(config, adapt="all"),
                 backbone=HeadlessNetwork(dtype="float64"))
    whole = HeadlessNetwork(dtype="float64")
    whole.head_param_names = ["dense/kernel", "dense/bias"]
    with pytest.raises(ValueError, match="some but not all of param_names"):
        MamlPlusPlus(dataclasses.replace(config, adapt="body"), backbone=whole)
    outside = HeadlessNetwork(dtype="float64")
    outside.head_param_names = ["head/kernel"]
    with pytest.raises(ValueError, match="'head/kernel' is not a fast weight"):
        MamlPlusPlus(config, backbone=outside)
