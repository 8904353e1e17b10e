"""FLOPs of a MAML++ meta-step, two independent ways, and the machine's measured peak.

Only convolutions and matrix products are counted (2 FLOPs per multiply-add):
they are what a CPU's peak refers to, and everything else in the step (batch
norm, activations, pooling, the optimiser) is elementwise and memory-bound.

* `graph_flops` reads a traced step: every convolution, convolution gradient
  and matmul that the step's outputs or side effects depend on (what the
  runtime executes after pruning), sized from its static shapes.
* `analytic_flops` derives the same total from the shapes alone, op by op:
  the inner loop runs a forward, an input gradient (all layers but the first,
  whose input is the images) and a filter gradient per layer and support
  pass; reverse mode then differentiates each of those once more.

`benchmarks/meta_step.py` checks that the two agree, and divides them by the
step's time and by the rate of `peak_matmul`, timed in the same process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
import math

import tensorflow as tf

_CONVOLUTIONS = ("Conv2D", "Conv2DBackpropInput", "Conv2DBackpropFilter")
_MATMULS = ("MatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3")


def _static(shape: tf.TensorShape, op: tf.Operation) -> list[int]:
    if not shape.is_fully_defined():
        raise ValueError(f"{op.type} {op.name!r} has a shape unknown at trace time "
                         f"({shape}); trace the step with static shapes")
    return shape.as_list()


def op_flops(op: tf.Operation) -> int:
    """FLOPs of one convolution or matmul op; 0 for any other op.

    A convolution and both of its gradients cost `2·|output pixels|·kh·kw·Cin·Cout`
    of the forward convolution they belong to; a (batched) matmul
    `2·|output|·K` with `K` the contracted length.
    """
    if op.type in _CONVOLUTIONS:
        if op.type == "Conv2D":
            pixels, kernel = op.outputs[0].shape, op.inputs[1].shape
        elif op.type == "Conv2DBackpropInput":
            pixels, kernel = op.inputs[2].shape, op.inputs[1].shape
        else:  # Conv2DBackpropFilter: the kernel's shape is its output.
            pixels, kernel = op.inputs[2].shape, op.outputs[0].shape
        pixels, kernel = _static(pixels, op), _static(kernel, op)
        return 2 * math.prod(pixels) * math.prod(kernel[:3])
    if op.type in _MATMULS:
        a = _static(op.inputs[0].shape, op)
        adjoint = op.get_attr("transpose_a" if op.type == "MatMul" else "adj_x")
        contracted = a[-2] if adjoint else a[-1]
        return 2 * math.prod(_static(op.outputs[0].shape, op)) * contracted
    return 0


def _needed_ops(graph: tf.Graph) -> Iterable[tf.Operation]:
    """Ops that the graph's outputs or stateful side effects depend on."""
    roots = [t.op for t in graph.outputs] + list(getattr(graph, "control_outputs", []))
    seen, stack = set(), roots
    while stack:
        op = stack.pop()
        if op in seen:
            continue
        seen.add(op)
        stack.extend(t.op for t in op.inputs)
        stack.extend(op.control_inputs)
    return seen


def graph_flops(function: tf.types.experimental.ConcreteFunction) -> int:
    """Convolution and matmul FLOPs of one call of a traced (concrete) function.

    Ops no output depends on (e.g. the gradient with respect to the input
    images, which reverse mode builds but nothing reads) are left out, as the
    runtime prunes them. Functions called from the graph (`tf.cond` branches,
    the optimiser's update) hold no convolutions here and are not entered.
    """
    return sum(op_flops(op) for op in _needed_ops(function.graph))


def _layer_flops(batch: int, image_shape: Sequence[int], filters: int, stages: int,
                 n_way: int, max_pooling: bool) -> list[int]:
    """Forward FLOPs of each layer (the convolutions, then the head) for `batch` images."""
    height, width, channels = image_shape
    flops = []
    for _ in range(stages):
        out_h, out_w = ((height, width) if max_pooling else
                        ((height - 1) // 2 + 1, (width - 1) // 2 + 1))
        flops.append(2 * batch * out_h * out_w * filters * 9 * channels)
        height, width = (out_h // 2, out_w // 2) if max_pooling else (out_h, out_w)
        channels = filters
    features = height * width * filters if max_pooling else filters
    return flops + [2 * batch * features * n_way]


def analytic_flops(*, n_way: int, k_shot: int, n_query: int, tasks: int,
                   image_shape: Sequence[int], filters: int, stages: int, steps: int,
                   training: bool, multi_step_loss: bool = True, second_order: bool = True,
                   max_pooling: bool = True) -> int:
    """Convolution and matmul FLOPs of one meta-step, from the shapes alone.

    With `F(b)` the forward FLOPs of `b` images and `F'(b)` those of the
    layers after the first (the layers whose input gradient is needed):

    * each inner step: support forward `F(s)`, input gradients `F'(s)`,
      filter gradients `F(s)`; each scored query pass: forward `F(q)`;
    * second-order outer gradient: each forward op differentiated once more
      (`F(s) + F'(s)` per support pass, `F(q) + F'(q)` per query pass), each
      inner input gradient twice (`2·F'(s)`), each inner filter gradient
      once or twice (`F(s) + F'(s)`), and the support loss's second
      derivative (TF's gradient of the softmax cross-entropy's gradient is
      a batched product, `2·s·n_way`);
    * first order: only the query passes are differentiated.

    Args:
      n_way: Classes per task.
      k_shot: Support images per class.
      n_query: Query images per class.
      tasks: Tasks per meta-batch.
      image_shape: `(H, W, C)`.
      filters: The backbone's width (filters per convolution).
      stages: The backbone's depth (convolution stages).
      steps: Inner steps.
      training: A meta-training step (outer gradient) or an evaluation step
        (inner loop and the final query pass only).
      multi_step_loss: Query pass after every inner step (training with MSL).
      second_order: Second-order outer gradient (training only).
      max_pooling: Pooling (True) or strided-convolution backbone.

    Returns:
      FLOPs of the whole meta-batch.
    """
    shape = dict(image_shape=image_shape, filters=filters, stages=stages, n_way=n_way,
                 max_pooling=max_pooling)
    support = _layer_flops(n_way * k_shot, **shape)
    query = _layer_flops(n_way * n_query, **shape)
    f_s, f_s_after = sum(support), sum(support[1:])
    f_q, f_q_after = sum(query), sum(query[1:])
    query_passes = steps if training and multi_step_loss else 1
    total = steps * (2 * f_s + f_s_after) + query_passes * f_q
    if training:
        total += query_passes * (f_q + f_q_after)
        if second_order:
            total += steps * (2 * f_s + 4 * f_s_after + 2 * n_way * k_shot * n_way)
    return tasks * total


def peak_matmul(dtype: tf.DType = tf.float32, size: int = 2048) -> tuple[Callable[[], None], int]:
    """A `size`² matmul in `dtype`, traced and warmed up, and its FLOPs.

    Timing it gives the machine's attainable peak for dense products (oneDNN
    on CPU), the yardstick of a step's GFLOP/s; the caller times it (best of
    several calls on a quiet machine).

    Returns:
      `(run, flops)`: `run()` computes one product to completion.
    """
    a = tf.cast(tf.random.stateless_uniform([size, size], seed=[0, 1]), dtype)
    product = tf.function(lambda x: tf.reduce_sum(tf.linalg.matmul(x, x)[:1, :1]))

    def run() -> None:
        product(a).numpy()

    run()
    run()
    return run, 2 * size**3
