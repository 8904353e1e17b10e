"""Task batching (`VGGBackbone.forward_tasks`) against the per-task loop, and XLA.

`batched` runs every task of a meta-batch through the network together;
`loop` (`forward`, one task at a time) is the reference. Both must give the
same meta-loss, meta-gradients, updates and running statistics, in first and
second order, with and without per-step batch norm and the multi-step loss.
XLA (`jit_compile`, which pools with `reduce_max` over a reshape) must give
the same second-order meta-gradient as graph mode.
"""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from mamlpp_tf import LearnerConfig, MamlPlusPlus, Trainer, inner_loop

from conftest import meta_gradient, random_batch, tiny_config


def small_config(**overrides) -> LearnerConfig:
    """A float64 net (8 filters, 3 stages, 3 steps) that runs in well under a second."""
    values = dict(n_way=3,
                  image_shape=(12, 12, 2),
                  num_filters=8,
                  num_stages=3,
                  inner_steps=3,
                  eval_inner_steps=3)
    values.update(overrides)
    return tiny_config(**values)


def learner_pair(config: LearnerConfig) -> tuple[MamlPlusPlus, MamlPlusPlus]:
    """A `loop` and a `batched` learner holding identical variables.

    Args:
      config: The learners' configuration (`task_impl` is overridden).
    """
    loop = MamlPlusPlus(dataclasses.replace(config, task_impl="loop"))
    batched = MamlPlusPlus(dataclasses.replace(config, task_impl="batched"))
    batched.set_weights(loop.get_weights())
    return loop, batched


def assert_gradients_close(actual, expected, rtol: float) -> None:
    """Per tensor within `rtol`, with an absolute floor of `rtol` × the largest entry.

    Some true gradients are exactly zero (a conv bias in front of batch norm)
    and come out as rounding noise, which no relative bound can hold.
    """
    scale = max(np.max(np.abs(g)) for g in expected)
    assert scale > 0
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * scale)


def assert_layouts_agree(config: LearnerConfig, batch, loss_rtol: float,
                         grad_rtol: float) -> None:
    loop, batched = learner_pair(config)
    loop_loss, loop_grads = meta_gradient(loop, batch)
    batched_loss, batched_grads = meta_gradient(batched, batch)
    np.testing.assert_allclose(batched_loss, loop_loss, rtol=loss_rtol)
    assert_gradients_close(batched_grads, loop_grads, rtol=grad_rtol)


@pytest.mark.parametrize("second_order", [True, False], ids=["second", "first"])
@pytest.mark.parametrize("per_step_bn", [True, False], ids=["per_step_bn", "shared_bn"])
@pytest.mark.parametrize("msl_epochs", [2, 0], ids=["msl", "no_msl"])
def test_meta_loss_and_gradients_agree_in_float64(second_order, per_step_bn,
                                                  msl_epochs):
    config = small_config(second_order=second_order,
                          per_step_bn=per_step_bn,
                          msl_epochs=msl_epochs)
    batch = random_batch(config, tasks=3, k_shot=2, n_query=2)
    assert_layouts_agree(config, batch, loss_rtol=1e-10, grad_rtol=1e-8)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(max_pooling=False),
        dict(jit_compile=True),  # pool_impl="reshape"; meta_loss itself runs eagerly.
        dict(n_way=2, image_shape=(13, 11, 1)),  # Pooling floors odd sizes.
    ],
    ids=["strided", "reshape_pool", "odd_sizes"])
def test_meta_loss_and_gradients_agree_for_other_architectures(overrides):
    config = small_config(**overrides)
    batch = random_batch(config, tasks=2, k_shot=1, n_query=3)
    assert_layouts_agree(config, batch, loss_rtol=1e-10, grad_rtol=1e-8)


def omniglot_float32(num_filters: int, inner_steps: int) -> LearnerConfig:
    """Omniglot 5-way shapes (28×28×1, 4 stages) in float32."""
    return small_config(n_way=5,
                        image_shape=(28, 28, 1),
                        num_filters=num_filters,
                        num_stages=4,
                        inner_steps=inner_steps,
                        eval_inner_steps=inner_steps,
                        dtype="float32")


@pytest.mark.parametrize("second_order", [True, False], ids=["second", "first"])
def test_meta_gradients_agree_in_float32_at_omniglot_shapes(second_order):
    config = dataclasses.replace(omniglot_float32(num_filters=16, inner_steps=2),
                                 second_order=second_order)
    batch = random_batch(config, tasks=2, k_shot=1, n_query=1)
    assert_layouts_agree(config, batch, loss_rtol=1e-4, grad_rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_float32_meta_gradient_at_paper_shapes_is_as_accurate_as_the_loop(seed):
    """The official Omniglot net: 64 filters, 5 inner steps, inner rate 0.1; 4 tasks.

    Here float32 itself is the limit: against the float64 meta-gradient, the
    loop's float32 one is off by 1e-6 to 1e-1 of the largest entry depending
    on the seed (five second-order steps amplify rounding, and near-ties flip
    max-pool routes, which moves a few entries a lot). So the layouts are
    compared by their typical entry: the batched layout's median error must
    be no worse than twice the loop's (measured over seeds 0-5: 0.5-1.05×) or,
    where the loop happens to land closer, stay within float32's 1e-4 of the
    largest entry (a CPU without AVX-512, 2026-12-02: seed 2 batched 2.6e-5,
    loop 5e-7; the kernels oneDNN picks, and their rounding, depend on the CPU).
    """
    keras.utils.set_random_seed(seed)
    config = dataclasses.replace(omniglot_float32(num_filters=64, inner_steps=5),
                                 inner_lr=0.1)
    batch = random_batch(config, tasks=4, k_shot=1, n_query=1, seed=seed)
    loop, batched = learner_pair(config)
    reference = MamlPlusPlus(
        dataclasses.replace(config, dtype="float64", task_impl="loop"))
    reference.set_weights(loop.get_weights())  # Converted to float64.
    _, exact = meta_gradient(
        reference,
        tuple(x.astype(np.float64) if x.dtype.kind == "f" else x for x in batch))
    scale = max(np.max(np.abs(g)) for g in exact)

    def median_error(grads):
        return np.median(
            np.concatenate([np.abs(g - e).ravel() for g, e in zip(grads, exact)])) / scale

    loop_error = median_error(meta_gradient(loop, batch)[1])
    assert loop_error < 1e-2  # The reference itself is sound.
    assert median_error(meta_gradient(batched, batch)[1]) <= max(2 * loop_error, 1e-4)


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 1e-5)])
def test_train_step_updates_variables_and_running_statistics_alike(dtype, rtol):
    """Through the traced step (in float32 on oneDNN's kernels and graph rewrites).

    SGD, not Adam: Adam turns the rounding noise of gradients that are
    mathematically zero (conv biases before batch norm) into full steps.
    """
    config = small_config(dtype=dtype, num_stages=2, inner_steps=2, eval_inner_steps=2)
    loop, batched = learner_pair(config)
    batch = random_batch(config, tasks=2, k_shot=1, n_query=2)
    loop_metrics = Trainer(loop, keras.optimizers.SGD(0.1)).train_step(batch)
    batched_metrics = Trainer(batched, keras.optimizers.SGD(0.1)).train_step(batch)
    np.testing.assert_allclose(batched_metrics["loss"], loop_metrics["loss"], rtol=rtol)
    np.testing.assert_allclose(batched_metrics["accuracy"], loop_metrics["accuracy"])
    running = loop.running_stat_variables
    assert np.abs(running[0].numpy()[0]).max() > 0  # Row 0 moved off its zeros.
    for a, b in zip(running, batched.running_stat_variables):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=rtol, atol=rtol)
    for a, b in zip(loop.trainable_variables, batched.trainable_variables):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=rtol, atol=rtol)


def _context_cases():
    """Each mode at both derivative orders; half of them (alternating) only in the slow run."""
    modes = [("support", {}), ("rn", {}), ("tasknorm", {}),
             ("tasknorm-channel-unbiased", dict(tasknorm_alpha="channel",
                                                tasknorm_unbiased=True))]
    for index, (name, tasknorm) in enumerate(modes):
        for order, second_order in enumerate((True, False)):
            marks = [pytest.mark.slow] if (index + order) % 2 else []
            yield pytest.param(name.split("-")[0], tasknorm, second_order, marks=marks,
                               id=f"{name}-{'second' if second_order else 'first'}")


@pytest.mark.parametrize("bn_stats,tasknorm,second_order", _context_cases())
def test_context_statistics_agree_across_layouts(bn_stats, tasknorm, second_order):
    """Support-set statistics (RN's and TaskNorm's blends) per task in the batched layout."""
    config = small_config(bn_stats=bn_stats, second_order=second_order, **tasknorm)
    loop, batched = learner_pair(config)
    if bn_stats == "tasknorm":
        rng = np.random.RandomState(0)
        weights = loop.get_weights()
        for name in weights:
            if name.endswith(("/alpha_scale", "/alpha_offset")):
                weights[name] = rng.randn(*weights[name].shape)
        loop.set_weights(weights)
        batched.set_weights(weights)
    batch = random_batch(config, tasks=3, k_shot=2, n_query=3)
    loop_loss, loop_grads = meta_gradient(loop, batch)
    batched_loss, batched_grads = meta_gradient(batched, batch)
    np.testing.assert_allclose(batched_loss, loop_loss, rtol=1e-10)
    assert_gradients_close(batched_grads, loop_grads, rtol=1e-8)
    expected, actual = Trainer(loop).eval_step(batch), Trainer(batched).eval_step(batch)
    for key in ("loss", "accuracy", "logits"):
        np.testing.assert_allclose(actual[key], expected[key], rtol=1e-10)


def test_auto_batches_tasks_up_to_the_query_threshold():
    learner = MamlPlusPlus(small_config(task_impl="auto"))
    # pylint: disable=protected-access
    threshold = inner_loop._AUTO_BATCHED_MAX_QUERY
    assert learner._task_impl(query_per_task=threshold) == "batched"
    assert learner._task_impl(query_per_task=threshold + 1) == "loop"


@pytest.mark.parametrize(
    "task_impl", ["batched", pytest.param("loop", marks=pytest.mark.slow)])
def test_xla_second_order_meta_gradient_agrees_with_graph_mode(task_impl):
    config = small_config(dtype="float32",
                          num_stages=2,
                          inner_steps=2,
                          eval_inner_steps=2,
                          task_impl=task_impl)
    graph_learner = MamlPlusPlus(config)
    xla_learner = MamlPlusPlus(dataclasses.replace(config, jit_compile=True))
    xla_learner.set_weights(graph_learner.get_weights())
    batch = random_batch(config, tasks=2)

    def gradient_fn(learner):

        def gradient(batch):
            with tf.GradientTape() as tape:
                loss = learner.meta_loss(batch, 0)
            return loss, tape.gradient(
                loss,
                learner.trainable_variables,
                unconnected_gradients=tf.UnconnectedGradients.ZERO)

        return gradient

    graph_loss, graph_grads = tf.function(gradient_fn(graph_learner))(batch)
    xla_loss, xla_grads = tf.function(gradient_fn(xla_learner), jit_compile=True)(batch)
    np.testing.assert_allclose(xla_loss.numpy(), graph_loss.numpy(), rtol=1e-5)
    assert_gradients_close([g.numpy() for g in xla_grads],
                           [g.numpy() for g in graph_grads],
                           rtol=1e-4)
