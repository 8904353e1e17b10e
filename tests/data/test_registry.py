"""The dataset registry: each fact declared once, and true of the loaders it describes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from mamlpp_tf import config, data
from mamlpp_tf.data import mini_imagenet, omniglot, registry, synthetic

LEVELS = np.arange(256, dtype=np.uint8)


def test_datasets_are_defined_once():
    assert data.DATASETS is registry.DATASETS and config.DATASETS is registry.DATASETS
    assert registry.DATASETS == ("omniglot", "mini_imagenet", "synthetic")
    assert [data.dataset_info(name).name for name in data.DATASETS] == list(data.DATASETS)


def test_omniglot_facts_are_those_of_its_loader():
    info = data.dataset_info("omniglot")
    # The paper's split of the 1623 characters: 1150 / 50 / 423.
    split = omniglot.paper_split([f"alphabet/character{i:04d}" for i in range(1623)])
    assert [len(split[part]) for part in ("train", "val", "test")] == [1150, 50, 423]
    assert info.val_classes == len(split["val"]) == omniglot.VAL_CLASSES
    assert info.images_per_class == 20
    drawings = np.random.RandomState(0).randint(0, 256, (2, 105, 105), dtype=np.uint8)
    assert omniglot.preprocess(drawings).shape[1:] == info.image_shape == (28, 28, 1)


def test_mini_imagenet_facts():
    info = data.dataset_info("mini_imagenet")
    # Ravi & Larochelle's split: 64/16/20 classes of 600 images, 84x84 RGB.
    assert (info.image_shape, info.images_per_class, info.val_classes) == ((84, 84, 3), 600, 16)
    assert mini_imagenet.FolderImages([[]]).image_shape == info.image_shape
    assert info.source == "folder"


def test_synthetic_runs_use_the_loaders_default_shape():
    info = data.dataset_info("synthetic")
    sets = synthetic.load(num_classes=(1, 1, 1), images_per_class=1)
    assert sets["train"].image_shape == info.image_shape
    assert info.images_per_class is None and info.val_classes is None


def test_preprocess_maps_levels_as_training_did():
    np.testing.assert_array_equal(data.dataset_info("omniglot").preprocess(LEVELS),
                                  np.repeat(np.float32([0, 1]), 128))
    rgb = np.repeat(LEVELS[:, None], 3, axis=1)
    expected = (rgb / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array(
        [0.229, 0.224, 0.225])
    values = data.dataset_info("mini_imagenet").preprocess(rgb)
    assert values.dtype == np.float32
    np.testing.assert_allclose(values, expected, rtol=1e-6, atol=1e-6)
    values = data.dataset_info("synthetic").preprocess(LEVELS)
    assert values.dtype == np.float32 and values[0] == 0 and values[255] == 1
    np.testing.assert_allclose(values, LEVELS / 255.0, rtol=1e-7)


def test_each_serving_kind_names_one_dataset():
    assert len(set(registry.SERVING_KINDS)) == len(registry.DATASETS)
    for name in registry.DATASETS:
        info = data.dataset_info(name)
        assert registry.serving_info(info.serving_kind) is info


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match=r"dataset name='cifar' must be one of \('omniglot'"):
        data.dataset_info("cifar")
    with pytest.raises(ValueError, match=r"preprocessing kind 'png' must be one of"):
        registry.serving_info("png")


def test_an_entry_must_be_consistent():
    info = data.dataset_info("omniglot")
    with pytest.raises(ValueError, match=r"image_shape \(28, 28, 3\) has a channel count"):
        dataclasses.replace(info, image_shape=(28, 28, 3))
    with pytest.raises(ValueError, match=r"source='s3' must be one of"):
        dataclasses.replace(info, source="s3")
