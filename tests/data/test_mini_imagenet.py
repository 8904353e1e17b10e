"""Tests of the mini-ImageNet folder loader on small generated JPEG folders."""

from __future__ import annotations

import pathlib
import re

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from mamlpp_tf import data
from mamlpp_tf.data import mini_imagenet

_WNIDS = {"train": ["n03", "n01", "n02"], "val": ["n05", "n04"], "test": ["n07", "n06"]}


def _image(wnid: str, index: int) -> Image.Image:
    rng = np.random.RandomState(int(wnid[1:]) * 100 + index)
    return Image.fromarray(rng.randint(0, 256, size=(12, 10, 3), dtype=np.uint8))


def make_folder(root: pathlib.Path, per_class: int = 6) -> pathlib.Path:
    """`root/{train,val,test}/<wnid>/<wnid>_<i>.jpg` with small random JPEGs."""
    for split, wnids in _WNIDS.items():
        for wnid in wnids:
            (root / split / wnid).mkdir(parents=True)
            for i in range(per_class):
                _image(wnid, i).save(root / split / wnid / f"{wnid}_{i:02d}.jpg")
    return root


def make_csv_layout(root: pathlib.Path, per_class: int = 6) -> pathlib.Path:
    """`root/images/*.jpg` plus `root/{train,val,test}.csv` (rows shuffled)."""
    (root / "images").mkdir(parents=True)
    for split, wnids in _WNIDS.items():
        rows = []
        for wnid in wnids:
            for i in range(per_class):
                _image(wnid, i).save(root / "images" / f"{wnid}_{i:02d}.jpg")
                rows.append(f"{wnid}_{i:02d}.jpg,{wnid}")
        rows = [rows[i] for i in np.random.RandomState(0).permutation(len(rows))]
        (root / f"{split}.csv").write_text("filename,label\n" + "\n".join(rows) + "\n")
    return root


def _reference(path: pathlib.Path, size: int = 84) -> np.ndarray:
    """The official pipeline: PIL resize, RGB, /255, ImageNet mean/std."""
    image = np.array(Image.open(path).resize(
        (size, size)).convert("RGB"), np.float32) / 255.0
    return (image - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])


def test_folder_layout_classes_shapes_and_values(tmp_path):
    root = make_folder(tmp_path)
    sets = data.load("mini_imagenet", data_dir=root)
    assert {
        split: list(s.class_names) for split, s in sets.items()
    } == {
        split: sorted(wnids) for split, wnids in _WNIDS.items()
    }
    train = sets["train"]
    assert train.counts == (6, 6, 6) and train.image_shape == (84, 84, 3)
    assert not any(s.augment for s in sets.values())
    images = train.take(0, np.array([4, 1]))  # class n01, sorted file names
    assert images.dtype == np.float32 and images.shape == (2, 84, 84, 3)
    np.testing.assert_allclose(images[0],
                               _reference(root / "train" / "n01" / "n01_04.jpg"),
                               atol=1e-5)
    np.testing.assert_allclose(images[1],
                               _reference(root / "train" / "n01" / "n01_01.jpg"),
                               atol=1e-5)


def test_normalisation_constants():
    white_black = np.array([[[255, 255, 255], [0, 0, 0]]], np.uint8)
    out = mini_imagenet.normalize(white_black)
    np.testing.assert_allclose(out[0, 0], [2.2489, 2.4286, 2.64], atol=1e-4)
    np.testing.assert_allclose(out[0, 1], [-2.1179, -2.0357, -1.8044], atol=1e-4)


def test_in_memory_equals_lazy(tmp_path):
    root = make_folder(tmp_path)
    lazy = mini_imagenet.load(root, image_size=20)["val"]
    cached = mini_imagenet.load(root, in_memory=True, image_size=20)["val"]
    for c in range(2):
        np.testing.assert_array_equal(lazy.take(c, np.arange(6)),
                                      cached.take(c, np.arange(6)))


def test_csv_layout_equals_folder_layout(tmp_path):
    folder = mini_imagenet.load(make_folder(tmp_path / "folder"), image_size=16)
    csv = mini_imagenet.load(make_csv_layout(tmp_path / "csv"), image_size=16)
    for split in mini_imagenet.SPLITS:
        assert csv[split].class_names == folder[split].class_names
        for c in range(csv[split].num_classes):
            np.testing.assert_array_equal(csv[split].take(c, np.arange(6)),
                                          folder[split].take(c, np.arange(6)))


def test_episodes_at_paper_shapes(tmp_path):
    sets = mini_imagenet.load(make_folder(tmp_path, per_class=20))
    dataset = data.episodes(sets["train"], 3, 5, 15, 2, seed=0, split_kind="train")
    support_x, support_y, query_x, query_y = next(iter(dataset))
    assert support_x.shape == (2, 15, 84, 84, 3) and query_x.shape == (2, 45, 84, 84, 3)
    assert support_y.dtype == tf.int32
    task = data.make_task(sets["train"], 3, 5, 15, data.task_seed(0, 1))
    np.testing.assert_array_equal(query_x[1], task.query_x)
    assert -2.2 < float(tf.reduce_min(support_x)) and float(
        tf.reduce_max(support_x)) < 2.7


def test_missing_data_dir_is_named(tmp_path):
    with pytest.raises(data.DatasetNotFoundError,
                       match=re.escape(f"data_dir={tmp_path / 'nope'} is not")):
        mini_imagenet.load(tmp_path / "nope")


def test_missing_split_is_named(tmp_path):
    root = make_folder(tmp_path)
    for path in (root / "val").rglob("*.jpg"):
        path.unlink()
    for path in sorted((root / "val").iterdir()):
        path.rmdir()
    (root / "val").rmdir()
    with pytest.raises(
            data.DatasetNotFoundError,
            match=re.escape(
                f"split 'val' not found: {root / 'val'} is not a directory")):
        mini_imagenet.load(root)


def test_class_with_too_few_images_fails_when_episodes_are_built(tmp_path):
    root = make_folder(tmp_path, per_class=20)
    for path in sorted((root / "test" / "n06").glob("*.jpg"))[5:]:
        path.unlink()
    sets = mini_imagenet.load(root)  # loading alone is fine
    with pytest.raises(ValueError,
                       match="k_shot\\+n_query=20 exceeds the 5 images of class "
                       "'n06' in split 'test' of mini_imagenet"):
        data.episodes(sets["test"], 2, 5, 15, 2, seed=0, split_kind="test", num_tasks=4)


def test_unreadable_image_is_named(tmp_path):
    root = make_folder(tmp_path)
    broken = root / "train" / "n02" / "n02_03.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=re.escape(f"cannot read image {broken}")):
        mini_imagenet.load(root, in_memory=True)
    lazy = mini_imagenet.load(root)["train"]
    with pytest.raises(ValueError, match=re.escape(f"cannot read image {broken}")):
        lazy.take(1, np.arange(6))
    # Inside the tf.data pipeline the message survives too.
    dataset = data.episodes(lazy, 3, 5, 1, 1, seed=0, split_kind="train")
    with pytest.raises(tf.errors.OpError,
                       match=re.escape(f"cannot read image {broken}")):
        next(iter(dataset))


def test_csv_errors_name_the_file(tmp_path):
    root = make_csv_layout(tmp_path)
    (root / "test.csv").unlink()
    with pytest.raises(data.DatasetNotFoundError,
                       match=re.escape(f"{root / 'test.csv'} does not exist")):
        mini_imagenet.load(root)
    (root / "test.csv").write_text("file,wnid\nx.jpg,n06\n")
    with pytest.raises(ValueError,
                       match=re.escape(f"{root / 'test.csv'}: the first row must be")):
        mini_imagenet.load(root)
    (root / "test.csv").write_text("filename,label\nmissing.jpg,n06\n")
    with pytest.raises(
            ValueError,
            match=re.escape(f"cannot read image {root / 'images' / 'missing.jpg'}")):
        mini_imagenet.load(root)
