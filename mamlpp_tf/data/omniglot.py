"""Omniglot through tensorflow-datasets, split and preprocessed as the official MAML++.

Data: `tfds.load('omniglot')` (version 3.0.0; TFDS splits `train` = the 30
background alphabets, 964 characters, and `test` = the 20 evaluation alphabets,
659 characters; 20 drawings per character). By default TFDS downloads into its
usual data dir; `data_dir` may point at a prepared TFDS data dir (one holding
`omniglot/3.0.0/`; `python -m mamlpp_tf.data.prepare_omniglot` makes one from
the two zips), which then loads offline with `download=False`. Offline
with `download=True`, loading fails within seconds (a connection to the
download host is tried first) rather than after TFDS's minutes of retries.

Preprocessing (as the official `data.py`): one channel, 28x28 nearest-neighbour with source
index floor((x + 0.5) * 105 / 28) (what Pillow does for the official 1-bit
PNGs), values {0, 1} float32 with background 1. The whole dataset is decoded
once per process (a few seconds) and kept as `[classes, 20, 28, 28, 1]`.

Class names are the official labels `"<alphabet>/characterNN"` (TFDS names the
same class `"<alphabet>_<NN-1>"`). Splits:

* `"paper"`: the official 1150/50/423 split of all 1623 characters: class keys
  are the sorted names, permuted by `RandomState(985773).shuffle`, cut at
  int(0.70918052988 * 1623) = 1150 and int((0.70918052988 + 0.03080714725) *
  1623) = 1200. Train/val/test keep the permuted order, as the official code.
* `"background_evaluation"`: meta-train on the background alphabets less a
  seeded validation carve-out of `val_classes` characters (same permutation
  recipe, the last `val_classes` of the permutation), meta-test on the
  evaluation alphabets (sorted names).

Within-class image order: TFDS stores no file names, so by default images keep
the TFDS record order. The official code indexes the order of its own file list
(file-system order on the authors' machine). Passing `file_order=<json>` with a
`per_class_file_order` mapping (class name -> 20 file names, e.g.
`mamlpp_official_class_split.json`) restores it: TFDS writes records sorted by
md5(split name + example key) with keys `<alphabet>_<char id>_<file name>`, so
recomputing those hashes names the file of every record; the recomputed label
sequence must equal the stored one, otherwise loading fails rather than guess.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools
import hashlib
import json
import os
import re

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mamlpp_tf.data.class_set import ClassSet
from mamlpp_tf.data.omniglot_prepare import TFDS_NAME, prepared_builder

SPLITS = ("paper", "background_evaluation")
IMAGES_PER_CLASS = 20
IMAGE_SIZE = 28
# Validation classes of both splits: the paper's 1200 - 1150, the carve-out's default.
VAL_CLASSES = 50
# np.random.RandomState(0).randint(1, 999999): the official val_seed=0 derived seed.
PAPER_SPLIT_SEED = 985773
PAPER_FRACTIONS = (0.70918052988, 0.03080714725, 0.2606284658)
_TFDS_SPLITS = ("train", "test")  # background, evaluation alphabets
_TFDS_LABEL = re.compile(r"^(?P<alphabet>.+)_(?P<index>\d+)$")


def class_name(tfds_label_name: str) -> str:
    """Maps a TFDS label name to the official class name.

    Args:
      tfds_label_name: E.g. `"Arcadian_0"` (alphabet, 0-based character index).

    Returns:
      E.g. `"Arcadian/character01"`.

    Raises:
      ValueError: The name is not `<alphabet>_<index>`.
    """
    match = _TFDS_LABEL.match(tfds_label_name)
    if not match:
        raise ValueError(f"TFDS omniglot label name {tfds_label_name!r} is not "
                         "'<alphabet>_<character index>'")
    return f"{match['alphabet']}/character{int(match['index']) + 1:02d}"


def paper_split(class_names: Sequence[str]) -> dict[str, list[str]]:
    """The official MAML++ class split (the official code's class lists) of the given classes.

    Args:
      class_names: All class names (any order; 1623 for the paper's split).

    Returns:
      `{"train": [...], "val": [...], "test": [...]}` in the official stored
      (permuted) order: 1150/50/423 names for the 1623 Omniglot characters.
    """
    keys = sorted(class_names)
    permutation = np.arange(len(keys), dtype=np.int32)
    np.random.RandomState(PAPER_SPLIT_SEED).shuffle(permutation)
    cut_val = int(PAPER_FRACTIONS[0] * len(keys))
    cut_test = int((PAPER_FRACTIONS[0] + PAPER_FRACTIONS[1]) * len(keys))
    parts = np.split(permutation, [cut_val, cut_test])
    return {
        split: [keys[i] for i in part]
        for split, part in zip(("train", "val", "test"), parts)
    }


def preprocess(images: np.ndarray) -> np.ndarray:
    """Official Omniglot preprocessing: nearest-neighbour 28x28, values {0, 1}.

    Output pixel (y, x) is source pixel floor((y + 0.5) * H / 28), floor((x + 0.5)
    * W / 28), the sampling Pillow uses when resizing the official 1-bit PNGs.
    Pixels above 127 (white paper, 255 in TFDS) become 1.0, ink 0.0.

    Args:
      images: uint8 `[n, H, W]` or `[n, H, W, C]` (channel 0 is used).

    Returns:
      float32 `[n, 28, 28, 1]`.
    """
    if images.ndim == 4:
        images = images[..., 0]
    if images.ndim != 3:
        raise ValueError(
            f"images must be [n, H, W] or [n, H, W, C], got {images.shape}")
    rows = _nearest_indices(images.shape[1], IMAGE_SIZE)
    cols = _nearest_indices(images.shape[2], IMAGE_SIZE)
    return binarize(images[:, rows[:, None], cols[None, :]])[..., None]


def binarize(images: np.ndarray) -> np.ndarray:
    """Official Omniglot pixel values: above 127 (paper) 1.0, ink 0.0, as float32."""
    return (images > 127).astype(np.float32)


def _nearest_indices(source: int, target: int) -> np.ndarray:
    return np.floor((np.arange(target) + 0.5) * source / target).astype(np.int64)


def load(split: str = "paper",
         data_dir: str | os.PathLike | None = None,
         download: bool = False,
         *,
         file_order: str | os.PathLike | None = None,
         val_classes: int = VAL_CLASSES) -> dict[str, ClassSet]:
    """Loads Omniglot as train/val/test class sets.

    Args:
      split: `"paper"` or `"background_evaluation"` (see the module docstring).
      data_dir: TFDS data dir (the one holding `omniglot/3.0.0/`); None uses the
        TFDS default (`$TFDS_DATA_DIR` or `~/tensorflow_datasets`).
      download: Let TFDS download and prepare the data when it is not prepared.
      file_order: Optional JSON with `per_class_file_order` (class name -> file
        names) giving the within-class image order, for bit-exact official
        episodes. None keeps the TFDS record order.
      val_classes: Size of the validation carve-out of `"background_evaluation"`.

    Returns:
      `{"train", "val", "test"}` -> `ClassSet` of float32 `[classes, 20, 28, 28, 1]`;
      only `"train"` allows rotation augmentation.

    Raises:
      DatasetNotFoundError: The data is not prepared and cannot be obtained
        (offline: within `omniglot_prepare.PROBE_TIMEOUT_S` seconds); its `command_line`
        attribute words the remedies in the training job's flags.
      ValueError: Unknown split, bad `val_classes`, or a `file_order` that does
        not fit the data.
    """
    if split not in SPLITS:
        raise ValueError(f"Omniglot split={split!r} must be one of {SPLITS}")
    data_dir = None if data_dir is None else os.fspath(data_dir)
    prepared_builder(data_dir, download)
    data = _decoded(data_dir)
    images = data.images
    if file_order is not None:
        images = _reorder(data, os.fspath(file_order))
    index = {name: i for i, name in enumerate(data.names)}
    if split == "paper":
        parts = paper_split(data.names)
    else:
        background = [n for n, b in zip(data.names, data.background) if b]
        if not 1 <= val_classes < len(background):
            raise ValueError(
                f"val_classes={val_classes} must be in [1, {len(background)})")
        permutation = np.arange(len(background), dtype=np.int32)
        np.random.RandomState(PAPER_SPLIT_SEED).shuffle(permutation)
        cut = len(background) - val_classes
        parts = {
            "train": [background[i] for i in permutation[:cut]],
            "val": [background[i] for i in permutation[cut:]],
            "test": [n for n, b in zip(data.names, data.background) if not b],
        }
    return {
        part:
            ClassSet(images=images[[index[n] for n in names]],
                     class_names=tuple(names),
                     split=part,
                     dataset=f"omniglot/{split}",
                     augment=part == "train") for part, names in parts.items()
    }


@dataclasses.dataclass(frozen=True, eq=False)
class _Decoded:
    """All of Omniglot, decoded once per process.

    Attributes:
      names: Official class names, sorted (the official class key order).
      images: float32 `[classes, 20, 28, 28, 1]`, TFDS record order per class.
      background: bool `[classes]`, True for classes of the TFDS `train` split.
      file_names: str `[classes, 20]`, the source file of every image, or None
        when the record order does not follow TFDS's key hashing.
    """

    names: tuple[str, ...]
    images: np.ndarray
    background: np.ndarray
    file_names: np.ndarray | None


@functools.cache
def _decoded(data_dir: str | None) -> _Decoded:
    """Decodes both TFDS splits into one array of all classes (cached per data dir)."""
    builder = tfds.builder(TFDS_NAME, data_dir=data_dir)
    tfds_names = builder.info.features["label"].names
    names = [class_name(n) for n in tfds_names]
    images, labels, files = [], [], []
    for tfds_split in _TFDS_SPLITS:
        split_images, split_labels = _read_split(builder, tfds_split)
        images.append(split_images)
        labels.append(split_labels)
        files.append(_record_files(tfds_names, split_labels, tfds_split))
    background_labels = np.unique(labels[_TFDS_SPLITS.index("train")])
    images, labels = np.concatenate(images), np.concatenate(labels)
    present = sorted(np.unique(labels), key=lambda label: names[label])
    rank = np.full(len(names), -1)
    rank[present] = np.arange(len(present))
    counts = np.bincount(rank[labels], minlength=len(present))
    if (counts != IMAGES_PER_CLASS).any():
        bad = int(np.flatnonzero(counts != IMAGES_PER_CLASS)[0])
        raise ValueError(
            f"Omniglot class {names[present[bad]]} has {counts[bad]} images in "
            f"{builder.data_dir}, expected {IMAGES_PER_CLASS}")
    order = np.argsort(rank[labels], kind="stable")  # keeps record order within a class
    shape = (len(present), IMAGES_PER_CLASS)
    file_names = None
    if all(f is not None for f in files):
        file_names = np.concatenate(files)[order].reshape(shape)
    return _Decoded(names=tuple(names[label] for label in present),
                    images=images[order].reshape(shape + images.shape[1:]),
                    background=np.isin(present, background_labels),
                    file_names=file_names)


def _read_split(builder: tfds.core.DatasetBuilder,
                tfds_split: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns the preprocessed images `[n, 28, 28, 1]` and labels of one TFDS split."""
    dataset = builder.as_dataset(split=tfds_split,
                                 shuffle_files=False,
                                 decoders={"image": tfds.decode.SkipDecoding()})
    dataset = dataset.map(lambda ex:
                          (tf.io.decode_png(ex["image"], channels=1), ex["label"]),
                          num_parallel_calls=tf.data.AUTOTUNE)
    images, labels = [], []
    batches = dataset.batch(1024).prefetch(2)
    try:
        for batch_images, batch_labels in batches.as_numpy_iterator():
            images.append(preprocess(batch_images))
            labels.append(batch_labels)
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as error:
        raise ValueError(_damage(builder, tfds_split, error)) from None
    return np.concatenate(images), np.concatenate(labels)


def _damage(builder: tfds.core.DatasetBuilder, tfds_split: str,
            error: tf.errors.OpError) -> str:
    """Names the damaged record file of `tfds_split` (a corrupt record or image) and what to do.

    Reads the split's files one by one, on this failure path only, to find
    the one whose records do not read; an image that does not decode is
    inside a readable record, so then the split alone is named.
    """
    damaged = "a record whose image does not decode"
    for path in builder.info.splits[tfds_split].filepaths:
        try:
            for _ in tf.data.TFRecordDataset(str(path)):
                pass
        except tf.errors.DataLossError:
            damaged = f"record file {path}"
            break
    cause = error.message.split("}} ", 1)[-1].splitlines()[0][:200]
    return (f"--data_dir={builder.data_dir}: Omniglot's TFDS split '{tfds_split}' is damaged: "
            f"{damaged} ({cause}); prepare the data again (README, 'Data')")


def _record_files(tfds_names: Sequence[str], labels: np.ndarray,
                  tfds_split: str) -> np.ndarray | None:
    """Names the source file of every record of a TFDS split, from its key hashes.

    The TFDS omniglot builder keys example `<alphabet>/character<c+1>/<p>_<d>.png`
    (label p-1, drawer d in 1..20) as `<alphabet>_<c>_<p>_<d>.png` and writes the
    records sorted by md5(split name + key).

    Returns:
      str `[n]` file names (`<p>_<d>.png`) in record order, or None when the
      hash order does not reproduce the stored label sequence.
    """
    salted = hashlib.md5(tfds_split.encode())
    entries = []
    for label in np.unique(labels):
        match = _TFDS_LABEL.match(tfds_names[label])
        for drawer in range(1, IMAGES_PER_CLASS + 1):
            file_name = f"{label + 1:04d}_{drawer:02d}.png"
            md5 = salted.copy()
            md5.update(f"{match['alphabet']}_{match['index']}_{file_name}".encode())
            entries.append((int(md5.hexdigest(), 16), label, file_name))
    entries.sort()
    if len(entries) != len(labels) or any(e[1] != y for e, y in zip(entries, labels)):
        return None
    return np.array([e[2] for e in entries])


def _reorder(data: _Decoded, file_order: str) -> np.ndarray:
    """Returns the images re-ordered within each class as listed in `file_order`."""
    if data.file_names is None:
        raise ValueError(
            f"file_order={file_order}: the records of this prepared TFDS dir are not "
            "in TFDS's key-hash order, so their file names are unknown; omit "
            "file_order to use the TFDS record order")
    with open(file_order, encoding="utf-8") as f:
        content = json.load(f)
    orders = content.get("per_class_file_order") if isinstance(content, dict) else None
    if not isinstance(orders, dict):
        raise ValueError(
            f"file_order={file_order} has no 'per_class_file_order' mapping")
    positions = np.empty(data.file_names.shape, dtype=np.int64)
    for c, name in enumerate(data.names):
        where = {f: i for i, f in enumerate(data.file_names[c])}
        listed = orders.get(name, [])
        if sorted(listed) != sorted(where):
            raise ValueError(f"file_order={file_order}: class {name} lists {listed}, "
                             f"expected a permutation of {sorted(where)}")
        positions[c] = [where[f] for f in listed]
    return np.take_along_axis(data.images, positions[:, :, None, None, None], axis=1)
