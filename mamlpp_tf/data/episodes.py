"""N-way K-shot episodes, drawn exactly as the official MAML++ `get_set` (`data.py`).

Every task comes from its own `np.random.RandomState(task_seed)`, consumed in the
official order: the N classes (`choice` without replacement, then `shuffle`), N
rotations `k` in {0..3} (always drawn, applied only when augmenting), then for
each class in episode order `K + Q` distinct image indices (first K support,
last Q query). Episode label `j` is the class drawn at position `j`.

Seeds: a run seed `s` becomes `derive_seed(s) = RandomState(s).randint(1, 999999)`
and task `t` of the stream uses `derive_seed(s) + t`. Training uses the train
seed and the global task index (iteration * meta_batch_size + position), so a
resumed run continues the same stream from `start_task`; validation and test
use the validation seed (0 in every official config, derived 985773) and task
indices 0..num_tasks-1, i.e. the same fixed tasks at every evaluation.

Tasks are built in numpy (the RNG must be numpy's legacy generator to match the
official tasks) and wrapped in a prefetched, parallel `tf.data` pipeline.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import tensorflow as tf

from mamlpp_tf.data.class_set import ClassSet

SPLIT_KINDS = ("train", "val", "test")
_SEED_HIGH = 999999  # official: RandomState(seed).randint(1, 999999)


class TaskDraw(NamedTuple):
    """The random choices of one task (indices only, no images).

    Attributes:
      classes: int `[N]`, class indices into the class set; episode label `j` is
        `classes[j]`.
      rotations: int `[N]`, the drawn `k` of `np.rot90` per episode class (used
        only when augmenting).
      image_indices: int `[N, K + Q]`, image indices within each class; the
        first K are support, the last Q query.
    """

    classes: np.ndarray
    rotations: np.ndarray
    image_indices: np.ndarray


class Task(NamedTuple):
    """One task, class-major (labels 0..0, 1..1, ...).

    Attributes:
      support_x: float32 `[N*K, H, W, C]`.
      support_y: int32 `[N*K]`.
      query_x: float32 `[N*Q, H, W, C]`.
      query_y: int32 `[N*Q]`.
    """

    support_x: np.ndarray
    support_y: np.ndarray
    query_x: np.ndarray
    query_y: np.ndarray


def derive_seed(seed: int) -> int:
    """Returns the official derived seed `RandomState(seed).randint(1, 999999)`.

    Seeds 0, 1, 2 give 985773, 128038, 875689.
    """
    return int(np.random.RandomState(seed).randint(1, _SEED_HIGH))


def task_seed(seed: int, task_index: int) -> int:
    """Returns the `RandomState` seed of task `task_index` of the stream of `seed`."""
    return derive_seed(seed) + task_index


def check_episode_shape(class_set: ClassSet, n_way: int, k_shot: int,
                        n_query: int) -> None:
    """Checks that `n_way`-way tasks with `k_shot + n_query` images per class fit.

    Args:
      class_set: The classes tasks are drawn from.
      n_way: Classes per task.
      k_shot: Support images per class.
      n_query: Query images per class.

    Raises:
      ValueError: A size is not a positive integer, `n_way` exceeds the classes
        of the split, or `k_shot + n_query` exceeds the images of some class.
    """
    for flag, value in (("n_way", n_way), ("k_shot", k_shot), ("n_query", n_query)):
        if isinstance(value, bool) or not isinstance(value,
                                                     (int, np.integer)) or value < 1:
            raise ValueError(f"{flag}={value!r} must be a positive integer")
    where = f"split '{class_set.split}' of {class_set.dataset}"
    if n_way > class_set.num_classes:
        raise ValueError(
            f"n_way={n_way} exceeds the {class_set.num_classes} classes of {where}")
    counts = np.asarray(class_set.counts)
    smallest = int(counts.argmin())
    if k_shot + n_query > counts[smallest]:
        if (counts == counts[smallest]).all():
            raise ValueError(f"k_shot+n_query={k_shot + n_query} exceeds the "
                             f"{counts[smallest]} images per class of {where}")
        raise ValueError(
            f"k_shot+n_query={k_shot + n_query} exceeds the {counts[smallest]} images "
            f"of class '{class_set.class_names[smallest]}' in {where}")


def draw_task(counts: tuple[int, ...] | np.ndarray, n_way: int, k_shot: int,
              n_query: int, seed: int) -> TaskDraw:
    """Draws the classes, rotations and image indices of one task.

    Replicates the official RNG sequence; choosing from `np.arange(len(counts))`
    gives the same draw as the official choice from the list of class keys.

    Args:
      counts: Images per class of the class set, in stored class order.
      n_way: Classes per task.
      k_shot: Support images per class.
      n_query: Query images per class.
      seed: The task's `RandomState` seed (see `task_seed`).

    Returns:
      The task's `TaskDraw`.
    """
    rng = np.random.RandomState(seed)
    classes = rng.choice(len(counts), size=n_way, replace=False)
    rng.shuffle(classes)
    rotations = rng.randint(0, 4, size=n_way)
    image_indices = np.stack(
        [rng.choice(counts[c], size=k_shot + n_query, replace=False) for c in classes])
    return TaskDraw(classes, rotations, image_indices)


def make_task(class_set: ClassSet,
              n_way: int,
              k_shot: int,
              n_query: int,
              seed: int,
              *,
              rotate: bool = False) -> Task:
    """Builds one task from its seed, as plain numpy arrays.

    Args:
      class_set: The classes to draw from.
      n_way: Classes per task.
      k_shot: Support images per class.
      n_query: Query images per class.
      seed: The task's `RandomState` seed (see `task_seed`).
      rotate: Rotate all images of episode class `j` by `rotations[j]` * 90
        degrees (`np.rot90` over H, W), support and query alike; the official
        code does this for Omniglot meta-training only.

    Returns:
      The `Task`.

    Raises:
      ValueError: The shape does not fit the class set (`check_episode_shape`),
        or `rotate` is set for non-square images.
    """
    check_episode_shape(class_set, n_way, k_shot, n_query)
    height, width, _ = class_set.image_shape
    if rotate and height != width:
        raise ValueError(
            f"rotate=True needs square images, got {class_set.image_shape}")
    return _build_task(class_set, n_way, k_shot, n_query, seed, rotate)


def _build_task(class_set: ClassSet, n_way: int, k_shot: int, n_query: int, seed: int,
                rotate: bool) -> Task:
    """`make_task` without the checks (they run once per stream)."""
    draw = draw_task(class_set.counts, n_way, k_shot, n_query, seed)
    if isinstance(class_set.images, np.ndarray):
        images = class_set.images[draw.classes[:, None], draw.image_indices]
    else:
        images = np.stack([
            class_set.take(c, idx) for c, idx in zip(draw.classes, draw.image_indices)
        ])
    if rotate:
        images = np.stack(
            [np.rot90(x, k, axes=(1, 2)) for x, k in zip(images, draw.rotations)])
    labels = np.arange(n_way, dtype=np.int32)[:, None]
    image_shape = images.shape[2:]
    return Task(
        support_x=images[:, :k_shot].reshape((n_way * k_shot,) + image_shape),
        support_y=np.repeat(labels, k_shot, axis=1).reshape(-1),
        query_x=images[:, k_shot:].reshape((n_way * n_query,) + image_shape),
        query_y=np.repeat(labels, n_query, axis=1).reshape(-1),
    )


def episodes(class_set: ClassSet,
             n_way: int,
             k_shot: int,
             n_query: int,
             meta_batch_size: int,
             *,
             seed: int,
             split_kind: str,
             start_task: int = 0,
             num_tasks: int | None = None) -> tf.data.Dataset:
    """Meta-batches of tasks as a prefetched `tf.data.Dataset`.

    Meta-batch `b` holds tasks `start_task + b*T ... start_task + b*T + T - 1` of
    the stream of `seed`. With `num_tasks=None` the stream is infinite; otherwise
    it holds exactly `num_tasks` tasks, and when `num_tasks % T != 0` the last
    meta-batch is smaller (the leading dimension is then unknown statically).

    Args:
      class_set: The classes to draw from.
      n_way: Classes per task (N).
      k_shot: Support images per class (K).
      n_query: Query images per class (Q; official: 1 Omniglot, 15 mini-ImageNet).
      meta_batch_size: Tasks per meta-batch (T).
      seed: Run seed: the train seed for `"train"`, the validation seed (0 in the
        official configs) for `"val"` and `"test"`; the per-task seeds derive
        from it as in the official code.
      split_kind: `"train"` (rotations when `class_set.augment`; infinite unless
        `num_tasks`), `"val"` or `"test"` (never rotated; `num_tasks` required).
      start_task: Index of the first task; a run resumed at iteration `i`
        passes `i * meta_batch_size` to continue its training stream.
      num_tasks: Total tasks, or None for an infinite stream (train only).

    Returns:
      A dataset of `(support_x, support_y, query_x, query_y)`: float32
      `[T, N*K, H, W, C]`, int32 `[T, N*K]`, float32 `[T, N*Q, H, W, C]`, int32
      `[T, N*Q]`, class-major within each task.

    Raises:
      ValueError: On a bad argument; the message names it.
    """
    check_episode_shape(class_set, n_way, k_shot, n_query)
    _check_stream(split_kind, meta_batch_size, start_task, num_tasks)
    rotate = split_kind == "train" and class_set.augment
    first_seed = derive_seed(seed) + start_task
    tasks_per_batch = meta_batch_size

    def build_meta_batch(batch_index: np.int64) -> tuple[np.ndarray, ...]:
        first = int(batch_index) * tasks_per_batch
        count = tasks_per_batch if num_tasks is None else min(
            tasks_per_batch, num_tasks - first)
        tasks = [
            _build_task(class_set, n_way, k_shot, n_query, first_seed + first + i,
                        rotate) for i in range(count)
        ]
        return tuple(np.stack(parts) for parts in zip(*tasks))

    batch_indices, static_t = _batch_indices(num_tasks, tasks_per_batch)
    image_shape = tuple(class_set.image_shape)
    shapes = ([static_t, n_way * k_shot, *image_shape], [static_t, n_way * k_shot],
              [static_t, n_way * n_query, *image_shape], [static_t, n_way * n_query])

    def to_tensors(batch_index: tf.Tensor) -> tuple[tf.Tensor, ...]:
        parts = tf.numpy_function(build_meta_batch, [batch_index],
                                  [tf.float32, tf.int32, tf.float32, tf.int32],
                                  stateful=False)
        return tuple(tf.ensure_shape(part, shape) for part, shape in zip(parts, shapes))

    dataset = batch_indices.map(to_tensors,
                                num_parallel_calls=tf.data.AUTOTUNE,
                                deterministic=True)
    return dataset.prefetch(tf.data.AUTOTUNE)


def _check_stream(split_kind: str, meta_batch_size: int, start_task: int,
                  num_tasks: int | None) -> None:
    """Raises a ValueError naming the first bad argument of a task stream."""
    if split_kind not in SPLIT_KINDS:
        raise ValueError(f"split_kind={split_kind!r} must be one of {SPLIT_KINDS}")
    if meta_batch_size < 1:
        raise ValueError(f"meta_batch_size={meta_batch_size} must be >= 1")
    if start_task < 0:
        raise ValueError(f"start_task={start_task} must be >= 0")
    if num_tasks is None and split_kind != "train":
        raise ValueError(f"num_tasks is required for split_kind={split_kind!r} "
                         "(evaluation uses a fixed, finite set of tasks)")
    if num_tasks is not None and num_tasks < 1:
        raise ValueError(f"num_tasks={num_tasks} must be >= 1")


def _batch_indices(num_tasks: int | None,
                   tasks_per_batch: int) -> tuple[tf.data.Dataset, int | None]:
    """Meta-batch indices of a stream, and the static task count of its batches.

    The count is None when a finite stream ends with a smaller meta-batch.
    """
    if num_tasks is None:
        return tf.data.Dataset.counter(), tasks_per_batch
    static_t = tasks_per_batch if num_tasks % tasks_per_batch == 0 else None
    return tf.data.Dataset.range(-(-num_tasks // tasks_per_batch)), static_t
