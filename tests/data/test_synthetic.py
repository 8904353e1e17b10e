"""Tests of the synthetic glyph family and of the public `load` entry point."""

from __future__ import annotations

import numpy as np
import pytest

from mamlpp_tf import data
from mamlpp_tf.data import synthetic


def test_deterministic_from_seed():
    a = synthetic.load(num_classes=(6, 3, 3), seed=4)
    b = synthetic.load(num_classes=(6, 3, 3), seed=4)
    c = synthetic.load(num_classes=(6, 3, 3), seed=5)
    for split in synthetic.SPLITS:
        np.testing.assert_array_equal(a[split].images, b[split].images)
        assert not np.array_equal(a[split].images, c[split].images)


def test_splits_are_independent_streams():
    small = synthetic.load(num_classes=(4, 3, 3))
    large = synthetic.load(num_classes=(9, 3, 3))
    np.testing.assert_array_equal(small["val"].images, large["val"].images)
    assert not np.array_equal(small["val"].images, small["test"].images)


@pytest.mark.parametrize("shape", [(28, 28, 1), (84, 84, 3), (20, 32, 2)])
def test_shapes_and_range(shape):
    sets = synthetic.load(num_classes=(5, 2, 3), images_per_class=7, image_shape=shape)
    assert [s.images.shape for s in sets.values()] == [(5, 7, *shape), (2, 7, *shape),
                                                       (3, 7, *shape)]
    images = sets["train"].images
    assert images.dtype == np.float32 and images.min() >= 0.0 and images.max() <= 1.0
    assert 0.6 < images.mean() < 0.97  # light background, dark strokes
    assert len(set(sets["train"].class_names)) == 5
    assert not any(s.augment for s in sets.values())


def test_default_family_supports_20_way_episodes():
    sets = synthetic.load()
    for class_set in sets.values():
        data.check_episode_shape(class_set, 20, 5, 15)


@pytest.mark.parametrize("shape", [(28, 28, 1), (84, 84, 3)])
def test_classes_are_distinguishable(shape):
    """Nearest-centroid 5-way 1-shot on raw pixels is far above the 20% chance."""
    class_set = synthetic.load(num_classes=(2, 2, 40), image_shape=shape)["test"]
    correct = []
    for seed in range(200):
        task = data.make_task(class_set, 5, 1, 1, seed)
        distance = ((task.query_x[:, None] - task.support_x[None])**2).sum(axis=(2, 3,
                                                                                 4))
        correct.append(distance.argmin(axis=1) == task.query_y)
    assert np.mean(correct) > 0.55


def test_images_within_a_class_vary():
    images = synthetic.load(num_classes=(3, 1, 1))["train"].images
    assert np.abs(images[0, 0] - images[0, 1]).mean() > 0.01


@pytest.mark.parametrize("kwargs, message", [
    (dict(image_shape=(4, 28, 1)), r"image_shape=\(4, 28, 1\) must be"),
    (dict(image_shape=(28, 28)), r"image_shape=\(28, 28\) must be"),
    (dict(num_classes=(5, 0, 5)), r"num_classes=\(5, 0, 5\) must be"),
    (dict(images_per_class=0), "images_per_class=0 must be >= 1"),
])
def test_bad_sizes_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        synthetic.load(**kwargs)


def test_public_load_dispatches_and_checks_arguments(tmp_path):
    sets = data.load("synthetic", num_classes=(5, 5, 5), images_per_class=4)
    assert set(sets) == {"train", "val", "test"}
    assert isinstance(sets["train"], data.ClassSet)
    with pytest.raises(ValueError, match="name='imagenet' must be one of"):
        data.load("imagenet")
    with pytest.raises(ValueError, match="split='paper' applies to omniglot only"):
        data.load("synthetic", split="paper")
    with pytest.raises(ValueError, match="does not apply to the generated synthetic"):
        data.load("synthetic", data_dir=tmp_path)
    with pytest.raises(ValueError, match="mini_imagenet needs data_dir"):
        data.load("mini_imagenet")
    with pytest.raises(ValueError, match="download=True applies to omniglot only"):
        data.load("mini_imagenet", data_dir=tmp_path, download=True)
    with pytest.raises(ValueError, match="Omniglot split='vinyals' must be one of"):
        data.load("omniglot", split="vinyals", data_dir=tmp_path)
