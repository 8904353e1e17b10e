"""Tests of the episode sampler against the official `get_set` RNG use (`data.py`)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from mamlpp_tf import data


def labelled_class_set(num_classes: int,
                       per_class: int,
                       size: int = 6,
                       augment: bool = False,
                       split: str = "train") -> data.ClassSet:
    """A class set whose images say who they are and differ under any rotation.

    Pixel (0, 0) of image i of class c is 1000*c + i + 1; every other pixel
    holds a distinct small value.
    """
    images = np.arange(num_classes * per_class * size * size, dtype=np.float32).reshape(
        num_classes, per_class, size, size, 1) / 1e6
    images[:, :, 0, 0, 0] = (1000 * np.arange(num_classes)[:, None] +
                             np.arange(per_class)[None, :] + 1)
    return data.ClassSet(images=images,
                         class_names=tuple(f"c{c:03d}" for c in range(num_classes)),
                         split=split,
                         dataset="labelled",
                         augment=augment)


def official_get_set(class_sizes: dict[str, int], n_way: int, k_shot: int, n_query: int,
                     seed: int, augment: bool, images: dict[str, np.ndarray]):
    """Independent transcription of the official `get_set`: keys, rotations, images."""
    rng = np.random.RandomState(seed)
    selected_classes = rng.choice(list(class_sizes.keys()), size=n_way, replace=False)
    rng.shuffle(selected_classes)
    k_list = rng.randint(0, 4, size=n_way)
    k_dict = {c: k for c, k in zip(selected_classes, k_list)}
    x_images, y_labels, choices = [], [], []
    for label, class_entry in enumerate(selected_classes):
        choose = rng.choice(class_sizes[class_entry],
                            size=k_shot + n_query,
                            replace=False)
        choices.append(choose)
        class_images = []
        for index in choose:
            image = images[class_entry][index]
            if augment:
                image = np.rot90(image, k=k_dict[class_entry]).copy()
            class_images.append(image)
        x_images.append(np.stack(class_images))
        y_labels.append([label] * (k_shot + n_query))
    x_images, y_labels = np.stack(x_images), np.array(y_labels)
    return (list(selected_classes), list(k_list), np.stack(choices),
            x_images[:, :k_shot], y_labels[:, :k_shot], x_images[:, k_shot:],
            y_labels[:, k_shot:])


def test_derived_seeds_match_the_official_values():
    assert [data.derive_seed(s) for s in (0, 1, 2)] == [985773, 128038, 875689]
    assert data.task_seed(0, 0) == 985773
    assert data.task_seed(1, 7) == 128038 + 7


@pytest.mark.parametrize("seed", [985773, 985774, 128038, 12345])
def test_draw_task_equals_the_official_rng_sequence(seed):
    rng = np.random.RandomState(0)
    sizes = {
        f"alphabet{c % 7}/character{c:02d}": int(rng.randint(16, 25)) for c in range(40)
    }
    names = list(sizes)
    draw = data.draw_task(tuple(sizes.values()), 20, 1, 1, seed)
    keys, k_list, choices, *_ = official_get_set(sizes, 20, 1, 1, seed, False, {
        n: np.zeros((s, 1, 1, 1)) for n, s in sizes.items()
    })
    assert [names[c] for c in draw.classes] == keys
    assert draw.rotations.tolist() == k_list
    np.testing.assert_array_equal(draw.image_indices, choices)


@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.parametrize("seed", [985773, 985800, 875689])
def test_make_task_equals_official_images_and_labels(seed, augment):
    class_set = labelled_class_set(12, 9, augment=augment)
    sizes = dict(zip(class_set.class_names, class_set.counts))
    images = dict(zip(class_set.class_names, class_set.images))
    *_, sx, sy, qx, qy = official_get_set(sizes, 5, 3, 2, seed, augment, images)
    task = data.make_task(class_set, 5, 3, 2, seed, rotate=augment)
    np.testing.assert_array_equal(task.support_x, sx.reshape(15, 6, 6, 1))
    np.testing.assert_array_equal(task.query_x, qx.reshape(10, 6, 6, 1))
    np.testing.assert_array_equal(task.support_y, sy.reshape(-1))
    np.testing.assert_array_equal(task.query_y, qy.reshape(-1))
    assert task.support_x.dtype == np.float32 and task.support_y.dtype == np.int32


def test_episode_shapes_dtypes_and_class_major_labels():
    class_set = labelled_class_set(30, 8)
    dataset = data.episodes(class_set, 5, 2, 3, 4, seed=0, split_kind="train")
    spec = dataset.element_spec
    assert [s.shape.as_list() for s in spec] == [[4, 10, 6, 6, 1], [4, 10],
                                                 [4, 15, 6, 6, 1], [4, 15]]
    assert [s.dtype for s in spec] == [tf.float32, tf.int32, tf.float32, tf.int32]
    support_x, support_y, query_x, query_y = next(iter(dataset))
    np.testing.assert_array_equal(support_y[0], [0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    np.testing.assert_array_equal(query_y[1], np.repeat(np.arange(5), 3))
    # Support and query of a task come from the same classes and never share an image.
    ids_s = support_x[0, :, 0, 0, 0].numpy().reshape(5, 2)
    ids_q = query_x[0, :, 0, 0, 0].numpy().reshape(5, 3)
    classes = ids_s[:, :1] // 1000
    assert (ids_s // 1000 == classes).all() and (ids_q // 1000 == classes).all()
    assert len(set(classes.ravel())) == 5
    for s, q in zip(ids_s, ids_q):
        assert not set(s) & set(q)


def test_meta_batch_b_holds_the_official_task_seeds():
    class_set = labelled_class_set(20, 5)
    support_x, *_ = next(
        iter(
            data.episodes(class_set,
                          5,
                          1,
                          1,
                          3,
                          seed=1,
                          split_kind="train",
                          start_task=6).skip(1)))
    for i in range(3):
        expected = data.make_task(class_set, 5, 1, 1, 128038 + 9 + i).support_x
        np.testing.assert_array_equal(support_x[i], expected)


def _unrotated_and_rotations(class_set, seed):
    task = data.make_task(class_set, 5, 1, 1, seed, rotate=False)
    draw = data.draw_task(class_set.counts, 5, 1, 1, seed)
    return task, draw.rotations


def test_rotation_in_training_only_and_same_within_a_class():
    class_set = labelled_class_set(20, 6, augment=True)
    train = next(iter(data.episodes(class_set, 5, 1, 1, 8, seed=0, split_kind="train")))
    val = next(
        iter(data.episodes(class_set, 5, 1, 1, 8, seed=0, split_kind="val",
                           num_tasks=8)))
    rotated_tasks = 0
    for i in range(8):
        plain, rotations = _unrotated_and_rotations(class_set, data.task_seed(0, i))
        # Never rotated outside training: validation equals the plain task.
        np.testing.assert_array_equal(val[0][i], plain.support_x)
        np.testing.assert_array_equal(val[2][i], plain.query_x)
        # Training: each class rotated by its own k, support and query alike.
        for j, k in enumerate(rotations):
            for x, ref in ((train[0][i, j], plain.support_x[j]), (train[2][i, j],
                                                                  plain.query_x[j])):
                np.testing.assert_array_equal(x, np.rot90(ref, k))
                if k:
                    assert not np.array_equal(x, ref)
        np.testing.assert_array_equal(train[1][i], plain.support_y)  # labels unchanged
        rotated_tasks += int(rotations.any())
    assert rotated_tasks > 0


def test_no_rotation_when_the_class_set_does_not_augment():
    class_set = labelled_class_set(20, 6, augment=False)
    train = next(iter(data.episodes(class_set, 5, 1, 1, 4, seed=0, split_kind="train")))
    for i in range(4):
        plain, _ = _unrotated_and_rotations(class_set, data.task_seed(0, i))
        np.testing.assert_array_equal(train[0][i], plain.support_x)


def _concat(dataset):
    parts = list(dataset.as_numpy_iterator())
    return [np.concatenate([p[i] for p in parts]) for i in range(4)]


def test_evaluation_tasks_are_fixed_and_independent_of_batching():
    class_set = labelled_class_set(25, 10, split="val")
    dataset = data.episodes(class_set,
                            5,
                            1,
                            1,
                            4,
                            seed=0,
                            split_kind="val",
                            num_tasks=10)
    first, second = _concat(dataset), _concat(dataset)
    other_batching = _concat(
        data.episodes(class_set, 5, 1, 1, 3, seed=0, split_kind="val", num_tasks=10))
    for a, b, c in zip(first, second, other_batching):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    # Task j is the one seeded 985773 + j (the official val/test seeds).
    np.testing.assert_array_equal(
        first[2][7],
        data.make_task(class_set, 5, 1, 1, 985773 + 7).query_x)


def test_last_evaluation_batch_is_smaller():
    class_set = labelled_class_set(25, 10, split="test")
    dataset = data.episodes(class_set,
                            5,
                            1,
                            1,
                            4,
                            seed=0,
                            split_kind="test",
                            num_tasks=10)
    assert dataset.element_spec[0].shape.as_list() == [None, 5, 6, 6, 1]
    assert [batch[0].shape[0] for batch in dataset] == [4, 4, 2]
    full = data.episodes(class_set, 5, 1, 1, 5, seed=0, split_kind="test", num_tasks=10)
    assert full.element_spec[0].shape[0] == 5


@pytest.mark.parametrize("start_task", [6, 7])
def test_resumed_training_stream_equals_the_tail(start_task):
    class_set = labelled_class_set(30, 6, augment=True)
    whole = _concat(
        data.episodes(class_set, 5, 1, 1, 3, seed=2, split_kind="train").take(6))
    tail = _concat(
        data.episodes(class_set,
                      5,
                      1,
                      1,
                      3,
                      seed=2,
                      split_kind="train",
                      start_task=start_task).take(3))
    for a, b in zip(whole, tail):
        np.testing.assert_array_equal(a[start_task:start_task + 9], b[:18 - start_task])


def test_finite_training_stream():
    class_set = labelled_class_set(20, 6)
    dataset = data.episodes(class_set,
                            5,
                            1,
                            1,
                            4,
                            seed=0,
                            split_kind="train",
                            num_tasks=8)
    assert len(list(dataset)) == 2


@pytest.mark.parametrize("args, message", [
    ((30, 1, 1), "n_way=30 exceeds the 20 classes of split 'val' of labelled"),
    ((5, 10, 11), "k_shot+n_query=21 exceeds the 20 images per class of split 'val'"),
    ((5, 0, 1), "k_shot=0 must be a positive integer"),
    ((5, 1, 1.5), "n_query=1.5 must be a positive integer"),
])
def test_check_episode_shape_names_the_problem(args, message):
    class_set = labelled_class_set(20, 20, split="val")
    with pytest.raises(ValueError, match=message.replace("+", r"\+")):
        data.check_episode_shape(class_set, *args)


class _UnevenStore:
    """An `ImageStore` whose classes have 5, 3 and 6 images."""
    counts = (5, 3, 6)
    image_shape = (2, 2, 1)

    def take(self, class_index, image_indices):
        return np.full((len(image_indices), 2, 2, 1), class_index, np.float32)


def test_check_episode_shape_names_the_smallest_class():
    class_set = data.ClassSet(images=_UnevenStore(),
                              class_names=("a", "b", "c"),
                              split="train",
                              dataset="x")
    data.check_episode_shape(class_set, 3, 2, 1)
    with pytest.raises(ValueError,
                       match="k_shot\\+n_query=4 exceeds the 3 images of class 'b'"):
        data.check_episode_shape(class_set, 3, 2, 2)
    task = data.make_task(class_set, 3, 2, 1, 5)
    np.testing.assert_array_equal(task.support_x[::2, 0, 0, 0],
                                  data.draw_task((5, 3, 6), 3, 2, 1, 5).classes)


@pytest.mark.parametrize("kwargs, message", [
    (dict(split_kind="training"), "split_kind='training' must be one of"),
    (dict(split_kind="val"), "num_tasks is required for split_kind='val'"),
    (dict(split_kind="train", start_task=-1), "start_task=-1 must be >= 0"),
    (dict(split_kind="test", num_tasks=0), "num_tasks=0 must be >= 1"),
])
def test_episodes_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        data.episodes(labelled_class_set(20, 5), 5, 1, 1, 2, seed=0, **kwargs)


def test_rotation_needs_square_images():
    class_set = data.ClassSet(images=np.zeros((5, 3, 4, 6, 1), np.float32),
                              class_names=tuple("abcde"),
                              split="train",
                              dataset="x")
    with pytest.raises(ValueError, match="square"):
        data.make_task(class_set, 5, 1, 1, 0, rotate=True)
