"""Checks of a learner's inputs against its `LearnerConfig`, before anything is traced.

A wrong shape, dtype or label found here is reported in terms of the
argument at fault and of the config (image shape, `n_way`, dtype); found
later, inside a traced step, it would surface as an opaque shape error from
deep in the network, or not at all (an out-of-range label gives a NaN loss
on CPU).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

from mamlpp_tf.config import LearnerConfig


def check_batch(config: LearnerConfig, batch,
                local_parts: Callable[[object], Sequence] = lambda value: (value,)) -> None:
    """Checks a meta-batch `(support_x, support_y, query_x, query_y)`.

    Static shapes and dtypes are checked always; label values whenever they
    are known (arrays, eager tensors), not for symbolic tensors inside a
    `tf.function`.

    Args:
      config: The learner's config.
      batch: The meta-batch.
      local_parts: Splits one element of `batch` into the parts to check
        one by one (each local replica's part of a distributed value); by
        default the element itself.

    Raises:
      ValueError: naming the tensor at fault, its shape, dtype or label, and
        what the learner expects (rank, image shape, lengths per task,
        labels in `[0, n_way)`).
    """
    if not isinstance(batch, (tuple, list)) or len(batch) != 4:
        raise ValueError("a meta-batch is a tuple (support_x, support_y, query_x, "
                         f"query_y); got {type(batch).__name__}"
                         + (f" of {len(batch)}" if isinstance(batch, (tuple, list))
                            else ""))
    for support_x, support_y, query_x, query_y in zip(*map(local_parts, batch)):
        support = check_images(config, "support_x", support_x, "T, N·K")
        query = check_images(config, "query_x", query_x, "T, N·Q")
        if not support[:1].is_compatible_with(query[:1]):
            raise ValueError(f"support_x has {support[0]} tasks but query_x has "
                             f"{query[0]}; a meta-batch has one of each per task")
        check_labels(config, "support_y", support_y, "support_x", support[:2])
        check_labels(config, "query_y", query_y, "query_x", query[:2])


def check_images(config: LearnerConfig, name: str, images, leading: str) -> tf.TensorShape:
    """Checks images `[*leading, H, W, C]` of the config's image shape and dtype.

    Args:
      config: The learner's config.
      name: The argument's name, for the message.
      images: A tensor, array or nested list.
      leading: The leading axes' names, e.g. "T, N·K".

    Returns:
      The static shape of `images`.

    Raises:
      ValueError: wrong rank, image shape, dtype, or an empty leading axis.
    """
    shape = _static_shape(images)
    image_shape = config.image_shape
    rank = len(leading.split(",")) + len(image_shape)
    if shape.rank is not None and (shape.rank != rank or not shape[-3:].is_compatible_with(
            image_shape) or 0 in shape[:-3].as_list()):
        raise ValueError(
            f"{name} must be non-empty images [{leading}, "
            f"{', '.join(map(str, image_shape))}] for this learner (image_shape="
            f"{image_shape}); got shape {_describe(shape)}")
    dtype = getattr(images, "dtype", None)
    if dtype is not None and tf.as_dtype(dtype) != tf.as_dtype(config.dtype):
        raise ValueError(f"{name} must be {config.dtype} (the learner's dtype); "
                         f"got {tf.as_dtype(dtype).name}")
    return shape


def check_labels(config: LearnerConfig, name: str, labels, images_name: str,
                 expected: tf.TensorShape) -> None:
    """Checks integer labels of shape `expected` with values in `[0, n_way)`.

    Raises:
      ValueError: wrong shape (one label per image of `images_name`), a
        non-integer dtype, or a label outside `[0, n_way)`.
    """
    shape = _static_shape(labels)
    if shape.rank is not None and not shape.is_compatible_with(expected):
        raise ValueError(f"{name} must hold one label per image of {images_name}, "
                         f"shape {_describe(expected)}; got {_describe(shape)}")
    dtype = getattr(labels, "dtype", None)
    if dtype is not None and not tf.as_dtype(dtype).is_integer:
        raise ValueError(f"{name} must be integer class labels; got "
                         f"{tf.as_dtype(dtype).name}")
    values = _known_values(labels)
    n_way = config.n_way
    if values is not None and values.size and (values.min() < 0 or values.max() >= n_way):
        raise ValueError(f"{name} holds labels {values.min()}..{values.max()}, but this "
                         f"learner is {n_way}-way: labels must be in [0, {n_way})")


def checked_steps(config: LearnerConfig, num_steps: int | None) -> int:
    """`num_steps`, defaulting to `eval_inner_steps`, at least 1.

    Steps beyond `inner_steps` reuse the last trained step's batch-norm row
    and rates (`InnerLoop.trained_step`).

    Raises:
      ValueError: if it is below 1.
    """
    if num_steps is None:
        return config.eval_inner_steps
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be at least 1 (steps beyond "
                         f"inner_steps={config.inner_steps} reuse the last trained step's "
                         "batch-norm row and inner learning rates)")
    return num_steps


def static_tasks(batch) -> int:
    """Tasks in this replica's share of a meta-batch; the inner loop needs it static.

    Raises:
      ValueError: if the leading dimension is unknown when tracing.
    """
    tasks = batch[0].shape[0]
    if tasks is None:
        raise ValueError("a meta-batch needs a static number of tasks per replica "
                         f"(got shape {batch[0].shape}); give the dataset a fixed "
                         "meta-batch size divisible by the replicas")
    return tasks


def _static_shape(value) -> tf.TensorShape:
    """Static shape of a tensor, array or nested list (unknown sizes as None)."""
    shape = getattr(value, "shape", None)
    return tf.TensorShape(np.shape(value) if shape is None else shape)


def _describe(shape: tf.TensorShape) -> str:
    """`shape` as `[2, 10, 28, 28, 1]` (`?` for an unknown size)."""
    if shape.rank is None:
        return "of unknown rank"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape.as_list()) + "]"


def _known_values(value) -> np.ndarray | None:
    """The values of an array, list or eager tensor; None for a symbolic tensor."""
    if tf.is_tensor(value):
        return None if tf.is_symbolic_tensor(value) else value.numpy()
    return np.asarray(value)
