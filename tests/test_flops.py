"""FLOP counts of the meta-step: single ops by hand, whole steps two independent ways."""

import numpy as np
import pytest
import tensorflow as tf

from mamlpp_tf import LearnerConfig, MamlPlusPlus, Trainer, flops

from conftest import random_batch


def _ops(function, *args, op_type):
    graph = tf.function(function).get_concrete_function(*args).graph
    return [op for op in graph.get_operations() if op.type == op_type]


def test_convolution_and_both_gradients_cost_the_forward_convolution():
    x = tf.zeros([3, 7, 5, 4])
    kernel = tf.zeros([3, 3, 4, 6])

    def conv_and_grads(x, kernel):
        with tf.GradientTape() as tape:
            tape.watch([x, kernel])
            y = tf.nn.conv2d(x, kernel, strides=1, padding="SAME")
        return tape.gradient(y, [x, kernel])

    # Output pixels 3·7·5, each a 3·3·4-long dot product per output channel (6).
    expected = 2 * (3 * 7 * 5 * 6) * (3 * 3 * 4)
    for op_type in ("Conv2D", "Conv2DBackpropInput", "Conv2DBackpropFilter"):
        (op,) = _ops(conv_and_grads, x, kernel, op_type=op_type)
        assert flops.op_flops(op) == expected, op_type


@pytest.mark.parametrize("transpose_a", [False, True])
def test_matmul_counts_the_contracted_length(transpose_a):
    a = tf.zeros([4, 3] if transpose_a else [3, 4])
    (op,) = _ops(lambda a, b: tf.linalg.matmul(a, b, transpose_a=transpose_a), a,
                 tf.zeros([4, 5]), op_type="MatMul")
    assert flops.op_flops(op) == 2 * 3 * 5 * 4
    (op,) = _ops(lambda a, b: tf.linalg.matmul(a, b, adjoint_a=transpose_a),
                 tf.zeros([2] + a.shape.as_list()), tf.zeros([2, 4, 5]), op_type="BatchMatMulV2")
    assert flops.op_flops(op) == 2 * 2 * 3 * 5 * 4


def test_pruned_ops_are_not_counted():
    def only_filter_gradient(x, kernel):
        with tf.GradientTape() as tape:
            tape.watch(kernel)
            loss = tf.reduce_sum(tf.square(tf.nn.conv2d(x, kernel, strides=1, padding="SAME")))
        # Conv2D's gradient function builds the input gradient too; nothing reads it.
        return tape.gradient(loss, kernel)

    function = tf.function(only_filter_gradient).get_concrete_function(
        tf.zeros([1, 4, 4, 2]), tf.zeros([3, 3, 2, 2]))
    # The forward convolution and the filter gradient.
    assert flops.graph_flops(function) == 2 * 2 * (16 * 2) * (3 * 3 * 2)


def _step_cases():
    """Every layout, order, MSL and pooling; half of them (alternating) only in the slow run."""
    for i, task_impl in enumerate(("loop", "batched")):
        for j, (second_order, msl) in enumerate(((True, True), (False, True), (True, False))):
            for k, max_pooling in enumerate((True, False)):
                marks = [pytest.mark.slow] if (i + j + k) % 2 else []
                yield pytest.param(task_impl, second_order, msl, max_pooling, marks=marks,
                                   id=f"{max_pooling}-{msl}-{second_order}-{task_impl}")


@pytest.mark.parametrize("task_impl,second_order,msl,max_pooling", _step_cases())
def test_analytic_count_equals_the_traced_steps(task_impl, second_order, msl, max_pooling):
    config = LearnerConfig(n_way=3, image_shape=(12, 10, 2), num_filters=4, num_stages=3,
                           inner_steps=3, eval_inner_steps=3, max_pooling=max_pooling,
                           second_order=second_order, task_impl=task_impl)
    trainer = Trainer(MamlPlusPlus(config))
    batch = tuple(tf.constant(v) for v in random_batch(config, tasks=2, k_shot=2, n_query=3))
    shapes = dict(n_way=3, k_shot=2, n_query=3, tasks=2, image_shape=(12, 10, 2),
                  filters=4, stages=3, steps=3, max_pooling=max_pooling)
    train = trainer.train_step_function(msl=msl, second_order=second_order)
    traced = train.get_concrete_function(batch, tf.constant(np.ones(3) / 3, tf.float32))
    assert flops.graph_flops(traced) == flops.analytic_flops(
        training=True, multi_step_loss=msl, second_order=second_order, **shapes)
    evaluation = trainer.eval_step_function().get_concrete_function(batch)
    assert flops.graph_flops(evaluation) == flops.analytic_flops(training=False, **shapes)

