"""MamlPlusPlus and its Trainer: steps, schedules, clipping, evaluation purity, learning."""

import os
import tempfile

import keras
import numpy as np
import pytest
import tensorflow as tf

from mamlpp_tf import LearnerConfig, MamlPlusPlus, Trainer, schedules

from conftest import random_batch, tiny_config


def snapshot(trainer):
    learner = trainer.learner
    variables = (learner.trainable_variables + learner.running_stat_variables +
                 list(learner.lslr.variables) + list(trainer.optimizer.variables))
    return {id(v): np.array(v.numpy(), copy=True) for v in variables}


def test_train_step_does_not_retrace_across_iterations():
    trainer = Trainer(MamlPlusPlus(tiny_config(msl_epochs=5)))
    batches = [random_batch(trainer.learner.config, seed=s) for s in range(3)]
    trainer.train_step(batches[0])
    traces = trainer.trace_count
    # New data and new MSL weights (epochs 1, 2) reuse the same trace.
    for epoch, batch in enumerate(batches):
        trainer.step.assign(epoch * trainer.learner.config.iterations_per_epoch)
        trainer.train_step(batch)
    assert trainer.trace_count == traces
    trainer.eval_step(batches[0])
    traces = trainer.trace_count
    trainer.eval_step(batches[1])
    trainer.eval_step(batches[2])
    assert trainer.trace_count == traces


def test_evaluation_leaves_every_variable_bit_identical():
    for bn_stats in ("batch", "rn"):
        learner = MamlPlusPlus(tiny_config(bn_stats=bn_stats))
        trainer = Trainer(learner)
        trainer.train_step(random_batch(learner.config))
        before = snapshot(trainer)
        batch = random_batch(learner.config, seed=7)
        trainer.eval_step(batch)
        learner.adapt(batch[0][0], batch[1][0])
        after = snapshot(trainer)
        for key, value in before.items():
            np.testing.assert_array_equal(value, after[key])


def test_train_step_applies_the_meta_gradient_with_sgd():
    config = tiny_config()
    learner = MamlPlusPlus(config)
    trainer = Trainer(learner, optimizer=keras.optimizers.SGD(learning_rate=0.5))
    batch = random_batch(config)
    with tf.GradientTape() as tape:
        loss = learner.meta_loss(batch, 0)
    grads = tape.gradient(loss, learner.trainable_variables)
    before = [v.numpy() for v in learner.trainable_variables]
    result = trainer.train_step(batch)
    np.testing.assert_allclose(result["loss"].numpy(), loss.numpy(), rtol=1e-12)
    for variable, old, grad in zip(learner.trainable_variables, before, grads):
        np.testing.assert_allclose(variable.numpy(), old - 0.5 * grad.numpy(), atol=1e-12)


def test_running_statistics_follow_the_support_then_query_pass():
    # One step, no MSL: row 0 sees the support pass (θ0) then the query pass (θ1).
    config = tiny_config(inner_steps=1, eval_inner_steps=1, msl_epochs=0)
    learner = MamlPlusPlus(config)
    batch = random_batch(config, tasks=2)
    backbone = learner.backbone

    def conv0_moments(x, params):
        y = (tf.nn.conv2d(x, params["conv0/kernel"], 1, "SAME") + params["conv0/bias"]).numpy()
        return y.mean(axis=(0, 1, 2)), y.var(axis=(0, 1, 2), ddof=1)

    support = [conv0_moments(batch[0][t], backbone.initial_params()) for t in range(2)]
    query = [conv0_moments(batch[2][t], learner.adapt(batch[0][t], batch[1][t]))
             for t in range(2)]
    Trainer(learner).train_step(batch)
    mean, var = 0.0, 1.0
    for moments in (support, query):
        mean = 0.9 * mean + 0.1 * np.mean([m for m, _ in moments], axis=0)
        var = 0.9 * var + 0.1 * np.mean([v for _, v in moments], axis=0)
    np.testing.assert_allclose(backbone.norms[0].running_mean.numpy()[0], mean, atol=1e-12)
    np.testing.assert_allclose(backbone.norms[0].running_var.numpy()[0], var, atol=1e-12)


def test_grad_clip_clips_network_gradients_but_not_rates():
    config = tiny_config(grad_clip=1e-6)
    learner = MamlPlusPlus(config)
    trainer = Trainer(learner, optimizer=keras.optimizers.SGD(learning_rate=1.0))
    before = [v.numpy() for v in learner.trainable_variables]
    trainer.train_step(random_batch(config))
    n_network = len(learner.network_variables)
    deltas = [np.abs(v.numpy() - b).max() for v, b in zip(learner.trainable_variables, before)]
    assert max(deltas[:n_network]) <= 1e-6 + 1e-15
    assert max(deltas[n_network:]) > 1e-4


def test_adam_uses_the_cosine_schedule_by_iteration():
    config = tiny_config(meta_lr=1e-3, min_meta_lr=1e-5, epochs=4, iterations_per_epoch=2)
    trainer = Trainer(MamlPlusPlus(config))
    assert trainer.optimizer.epsilon == 1e-8
    lrs = []
    for _ in range(5):
        lrs.append(float(trainer.optimizer.learning_rate))
        trainer.train_step(random_batch(config))
    want = [schedules.cosine_meta_lr(i // 2, 1e-3, 1e-5, 4) for i in range(5)]
    np.testing.assert_allclose(lrs, want, rtol=1e-6)


def test_a_withheld_update_still_advances_the_one_step_counter():
    """Learning rate, MSL weights and derivative order all follow `step`, not Adam's count."""
    config = tiny_config(meta_lr=1e-3, min_meta_lr=1e-5, epochs=4, iterations_per_epoch=2,
                         msl_epochs=3, first_order_epochs=0)
    trainer = Trainer(MamlPlusPlus(config))
    poisoned = random_batch(config)
    poisoned = (tf.fill(tf.shape(poisoned[0]), tf.constant(np.nan, poisoned[0].dtype)),
                ) + tuple(poisoned[1:])
    applied = [bool(trainer.train_step(batch)["applied"])
               for batch in (random_batch(config, seed=1), poisoned, random_batch(config, seed=2))]
    assert applied == [True, False, True]
    assert int(trainer.step.numpy()) == 3 and int(trainer.skipped_updates.numpy()) == 1
    assert int(trainer.optimizer.iterations.numpy()) == 2  # Adam saw two updates.
    # Iteration 4 (step 3) is in epoch 1 by every schedule.
    assert trainer.epoch == 1
    np.testing.assert_allclose(float(trainer.optimizer.learning_rate),
                               schedules.cosine_meta_lr(1, 1e-3, 1e-5, 4), rtol=1e-6)
    msl, second_order, weights = trainer.learner.epoch_modes(trainer.epoch)
    assert (msl, second_order) == (True, True)
    np.testing.assert_allclose(weights, schedules.msl_weights(1, config.inner_steps, 3))


def test_derivative_order_switches_after_first_order_epochs():
    config = tiny_config(first_order_epochs=1, msl_epochs=0)
    learner = MamlPlusPlus(config)
    batch = random_batch(config)

    def grads(epoch):
        with tf.GradientTape() as tape:
            loss = learner.meta_loss(batch, epoch)
        return np.concatenate([g.numpy().ravel() for g in
                               tape.gradient(loss, learner.trainable_variables)])

    g0, g1, g2 = grads(0), grads(1), grads(2)
    np.testing.assert_allclose(g0, g1, atol=1e-14)
    assert np.linalg.norm(g2 - g1) > 1e-3 * np.linalg.norm(g2)


@pytest.mark.parametrize("bn_stats", ["batch", "rn"])
def test_adapt_and_predict_match_eval_step(bn_stats):
    config = tiny_config(bn_stats=bn_stats)
    learner = MamlPlusPlus(config)
    trainer = Trainer(learner)
    trainer.train_step(random_batch(config))
    batch = random_batch(config, seed=3)
    result = trainer.eval_step(batch)
    for t in range(2):
        params = learner.adapt(batch[0][t], batch[1][t])
        logits = learner.predict(batch[2][t], params, support_x=batch[0][t])
        np.testing.assert_allclose(logits.numpy(), result["logits"][t].numpy(), atol=1e-10)


def prototype_tasks(rng, prototypes, n_way, k_shot, n_query, tasks):
    """Tasks over classes defined by a prototype image plus noise and a random shift."""
    support_x, query_x = [], []
    for _ in range(tasks):
        classes = rng.choice(len(prototypes), n_way, replace=False)
        for shots, out in ((k_shot, support_x), (n_query, query_x)):
            images = []
            for c in classes:
                for _ in range(shots):
                    image = np.roll(prototypes[c], rng.randint(-1, 2), axis=0)
                    images.append(image + 0.3 * rng.randn(*image.shape))
            out.append(images)

    def labels(shots):
        return np.tile(np.repeat(np.arange(n_way), shots), (tasks, 1))

    return (np.float32(support_x), labels(k_shot).astype(np.int32), np.float32(query_x),
            labels(n_query).astype(np.int32))


def test_short_meta_training_learns_a_synthetic_task_family():
    config = LearnerConfig(n_way=5, image_shape=(12, 12, 1), num_filters=16, num_stages=2,
                           inner_steps=1, eval_inner_steps=1, inner_lr=0.4, msl_epochs=0,
                           meta_lr=1e-2, min_meta_lr=1e-2, task_impl="loop")
    trainer = Trainer(MamlPlusPlus(config))
    rng = np.random.RandomState(0)
    prototypes = (rng.rand(60, 12, 12, 1) > 0.6).astype(np.float32)
    val = prototype_tasks(np.random.RandomState(99), prototypes[40:], 5, 1, 3, 8)
    before = trainer.eval_step(val)
    losses = []
    for _ in range(300):
        batch = prototype_tasks(rng, prototypes[:40], 5, 1, 3, 4)
        losses.append(float(trainer.train_step(batch)["loss"]))
    after = trainer.eval_step(val)
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])
    assert float(np.mean(after["accuracy"])) > 0.55  # Chance is 0.2.
    assert float(np.mean(after["loss"])) < float(np.mean(before["loss"]))


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="eval_inner_steps"):
        LearnerConfig(inner_steps=3, eval_inner_steps=0)
    with pytest.raises(ValueError, match="learn_inner_lr"):
        LearnerConfig(learn_inner_lr=False, inner_update="meta_sgd")
    with pytest.raises(ValueError, match="bn_stats"):
        LearnerConfig(per_step_bn=False, bn_stats="running")
    with pytest.raises(ValueError, match="task_impl"):
        LearnerConfig(task_impl="vectorised")


def test_checkpoint_round_trip_restores_every_variable_and_the_next_step():
    config = tiny_config()
    trainer = Trainer(MamlPlusPlus(config))
    batches = [random_batch(config, seed=s) for s in range(2)]
    trainer.train_step(batches[0])
    path = tf.train.Checkpoint(**trainer.checkpoint_items()).write(
        os.path.join(tempfile.mkdtemp(), "ckpt"))
    keras.utils.set_random_seed(99)  # Different initial weights for the clone.
    clone = Trainer(MamlPlusPlus(config))
    tf.train.Checkpoint(**clone.checkpoint_items()).read(path).assert_consumed()
    originals, restored = snapshot(trainer), snapshot(clone)
    assert len(originals) == len(restored) > 30
    for a, b in zip(originals.values(), restored.values()):
        np.testing.assert_array_equal(a, b)
    want = trainer.train_step(batches[1])["loss"].numpy()
    np.testing.assert_array_equal(clone.train_step(batches[1])["loss"].numpy(), want)


def numpy_vgg_logits(weights, images, row, stages):
    """The VGG net in numpy from `get_weights()` names: HWIO kernels, BN row `row`."""
    x = images
    for i in range(stages):
        kernel = weights[f"backbone/conv{i}/kernel"]
        padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        height, width = x.shape[1:3]
        x = sum(padded[:, dy:dy + height, dx:dx + width] @ kernel[dy, dx]
                for dy in range(3) for dx in range(3)) + weights[f"backbone/conv{i}/bias"]
        mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
        x = ((x - mean) / np.sqrt(var + 1e-5) * weights[f"backbone/norm{i}/gamma"][row] +
             weights[f"backbone/norm{i}/beta"][row])
        x = np.where(x > 0, x, 0.01 * x)
        n, height, width, channels = x.shape
        x = x[:, :height // 2 * 2, :width // 2 * 2].reshape(
            n, height // 2, 2, width // 2, 2, channels).max(axis=(2, 4))
    return x.reshape(len(x), -1) @ weights["backbone/dense/kernel"] + weights[
        "backbone/dense/bias"]


def test_get_weights_names_every_variable_and_set_weights_round_trips():
    source = MamlPlusPlus(tiny_config(bn_stats="tasknorm"))
    keras.utils.set_random_seed(7)  # Other initial weights.
    target = MamlPlusPlus(tiny_config(bn_stats="tasknorm"))
    weights = source.get_weights()
    assert len(weights) == len(source.backbone.weights + source.lslr.weights) == 24
    assert {"backbone/conv1/kernel", "backbone/norm0/gamma", "backbone/norm1/running_var",
            "backbone/norm0/alpha_scale", "lslr/dense/bias"} <= set(weights)
    assert not np.array_equal(target.get_weights()["backbone/conv0/kernel"],
                              weights["backbone/conv0/kernel"])
    target.set_weights(weights)
    for name, value in target.get_weights().items():
        np.testing.assert_array_equal(value, weights[name], err_msg=name)
    weights["backbone/dense/bias"] += 1.0  # A copy: the variable is untouched.
    np.testing.assert_array_equal(source.backbone.weights_by_name["dense/bias"].numpy(),
                                  target.get_weights()["backbone/dense/bias"])


def test_set_weights_layout_matches_a_numpy_network_and_the_variables():
    config = tiny_config()
    learner = MamlPlusPlus(config)
    rng = np.random.RandomState(0)
    weights = {name: rng.randn(*value.shape) for name, value in learner.get_weights().items()}
    learner.set_weights(weights)
    np.testing.assert_array_equal(learner.lslr.rates["conv1/bias"].numpy(),
                                  weights["lslr/conv1/bias"])
    np.testing.assert_array_equal(learner.backbone.norms[1].running_mean.numpy(),
                                  weights["backbone/norm1/running_mean"])
    images = rng.randn(5, *config.image_shape)
    for steps in (1, 2):  # The last step's batch-norm row: 0, then 1.
        logits = learner.predict(images, learner.backbone.initial_params(), num_steps=steps)
        np.testing.assert_allclose(logits.numpy(), numpy_vgg_logits(weights, images, steps - 1,
                                                                    config.num_stages),
                                   rtol=1e-9, atol=1e-12)


def test_set_weights_names_the_offending_key_and_changes_nothing():
    learner = MamlPlusPlus(tiny_config())
    before = learner.get_weights()
    missing = dict(before)
    del missing["backbone/norm1/beta"]
    unknown = dict(before, **{"backbone/conv9/kernel": np.zeros(3)})
    wrong = dict(before, **{"lslr/conv0/kernel": np.zeros(3)})
    wrong["backbone/conv0/kernel"] = before["backbone/conv0/kernel"] + 1.0
    for weights, message in ((missing, "missing key 'backbone/norm1/beta'"),
                             (unknown, "unknown key 'backbone/conv9/kernel'"),
                             (wrong, r"'lslr/conv0/kernel' has shape \(3,\), the learner's "
                                     r"variable \(2,\)")):
        with pytest.raises(ValueError, match=message):
            learner.set_weights(weights)
    for name, value in learner.get_weights().items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)
