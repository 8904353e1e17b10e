"""`compute_dtype="bfloat16"`: products in bfloat16, everything else as in float32."""

import numpy as np
import pytest
import tensorflow as tf

from mamlpp_tf import LearnerConfig, MamlPlusPlus, Trainer

from conftest import meta_gradient, random_batch, tiny_config

CONVOLUTIONS = {"Conv2D", "Conv2DBackpropInput", "Conv2DBackpropFilter"}


def _train_graph(config: LearnerConfig) -> tf.Graph:
    trainer = Trainer(MamlPlusPlus(config))
    batch = tuple(tf.constant(v) for v in random_batch(config, tasks=2))
    function = trainer.train_step_function(msl=True, second_order=True)
    weights = tf.fill([config.inner_steps], tf.constant(1.0 / config.inner_steps))
    return function.get_concrete_function(batch, weights).graph


def _op_dtypes(graph: tf.Graph) -> dict[str, set[tf.DType]]:
    """Output dtypes of every op type in the graph."""
    dtypes = {}
    for op in graph.get_operations():
        dtypes.setdefault(op.type, set()).update(t.dtype for t in op.outputs)
    return dtypes


@pytest.mark.parametrize("task_impl", ["loop", "batched"])
def test_float32_step_has_no_bfloat16_tensor(task_impl):
    config = tiny_config(dtype="float32", task_impl=task_impl)
    dtypes = _op_dtypes(_train_graph(config))
    assert not [op for op, types in dtypes.items() if tf.bfloat16 in types]


@pytest.mark.parametrize("task_impl", ["loop", "batched"])
def test_bfloat16_step_runs_only_the_products_in_bfloat16(task_impl):
    config = tiny_config(dtype="float32", compute_dtype="bfloat16", task_impl=task_impl)
    dtypes = _op_dtypes(_train_graph(config))
    for op in CONVOLUTIONS:
        assert dtypes[op] == {tf.bfloat16}, op
    # The head: a MatMul per task (loop) or one batched product (batched). The loss's
    # second derivative is a float32 BatchMatMulV2 in both layouts.
    if task_impl == "loop":
        assert dtypes["MatMul"] == {tf.bfloat16}
    else:
        assert "MatMul" not in dtypes and dtypes["BatchMatMulV2"] == {tf.bfloat16, tf.float32}
    # Batch norm, activations, pooling, the loss and the inner update stay float32.
    # (Gradients reaching a bfloat16 tensor from two products, e.g. a kernel used by
    # a convolution and by its input gradient, are summed in bfloat16 by the tape.)
    for op in ("Mean", "Rsqrt", "Square", "LeakyRelu", "MaxPool",
               "SparseSoftmaxCrossEntropyWithLogits", "Sub", "Mul"):
        if op in dtypes:
            assert tf.bfloat16 not in dtypes[op], op
    learner = MamlPlusPlus(config)
    assert {v.dtype for v in learner.trainable_variables} == {"float32"}


def test_bfloat16_meta_gradient_is_close_to_float64():
    """The second-order meta-gradient against float64, with weights and images shared.

    bfloat16 keeps 8 significant bits, so each product is off by about 0.4 %;
    through two inner steps and the second-order outer gradient that gives
    10-25 % of the gradient's norm (measured: 21-25 % over three seeds, cosine
    0.97). The network is the strided-convolution variant: max-pooling's
    gradient jumps between near-tied window maxima, and with it a 1e-4
    relative change of the images alone moves the float64 meta-gradient by up
    to 40 % on random data, which says nothing about precision.
    """
    shape = dict(n_way=5, image_shape=(28, 28, 1), num_filters=16, num_stages=4,
                 max_pooling=False, inner_steps=2, eval_inner_steps=2, inner_lr=0.1,
                 task_impl="batched")
    exact = MamlPlusPlus(tiny_config(**shape))
    mixed = MamlPlusPlus(tiny_config(**shape, dtype="float32", compute_dtype="bfloat16"))
    for target, source in zip(mixed.trainable_variables, exact.trainable_variables):
        target.assign(tf.cast(source, target.dtype))
    batch = random_batch(exact.config, tasks=2, k_shot=1, n_query=2)
    mixed_batch = tuple(v.astype(np.float32) if v.dtype == np.float64 else v for v in batch)
    loss, grads = meta_gradient(exact, batch)
    mixed_loss, mixed_grads = meta_gradient(mixed, mixed_batch)
    g = np.concatenate([x.ravel() for x in grads])
    h = np.concatenate([x.ravel() for x in mixed_grads]).astype(np.float64)
    assert mixed_loss == pytest.approx(loss, rel=2e-2)
    assert np.linalg.norm(h - g) < 0.4 * np.linalg.norm(g)
    assert h @ g > 0.9 * np.linalg.norm(h) * np.linalg.norm(g)


@pytest.mark.parametrize("overrides,field", [
    (dict(compute_dtype="float16"), "compute_dtype"),
    (dict(compute_dtype="bfloat16", dtype="float64"), "compute_dtype"),
])
def test_invalid_compute_dtype_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        LearnerConfig(**overrides)
