"""Omniglot through tensorflow-datasets, split and preprocessed as the official MAML++.

Data: `tfds.load('omniglot')` (version 3.0.0; TFDS splits `train` = the 30
background alphabets, 964 characters, and `test` = the 20 evaluation alphabets,
659 characters; 20 drawings per character). By default TFDS downloads into its
usual data dir; `data_dir` may point at a prepared TFDS data dir (one holding
`omniglot/3.0.0/`), which then loads offline with `download=False`. Offline
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

import dataclasses
import functools
import hashlib
import json
import os
import re
import socket
import urllib.parse
import urllib.request
from collections.abc import Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download.download_manager import NonMatchingChecksumError

from mamlpp_tf.data.class_set import ClassSet, DatasetNotFoundError

TFDS_NAME = "omniglot"
SPLITS = ("paper", "background_evaluation")
IMAGES_PER_CLASS = 20
IMAGE_SIZE = 28
# Validation classes of both splits: the paper's 1200 - 1150, the carve-out's default.
VAL_CLASSES = 50
# np.random.RandomState(0).randint(1, 999999): the official val_seed=0 derived seed.
PAPER_SPLIT_SEED = 985773
PAPER_FRACTIONS = (0.70918052988, 0.03080714725, 0.2606284658)
ORIGINAL_ZIPS = ("images_background.zip", "images_evaluation.zip",
                 "images_background_small1.zip", "images_background_small2.zip")
_ZIPS_URL = "https://github.com/brendenlake/omniglot/tree/master/python"
# Where tensorflow-datasets downloads the zips from, and how long a connection
# to it may take before the download is judged impossible (offline).
DOWNLOAD_HOST = ("github.com", 443)
PROBE_TIMEOUT_S = 5.0
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
        (offline: within `PROBE_TIMEOUT_S` seconds); its `command_line`
        attribute words the remedies in the training job's flags.
      ValueError: Unknown split, bad `val_classes`, or a `file_order` that does
        not fit the data.
    """
    if split not in SPLITS:
        raise ValueError(f"Omniglot split={split!r} must be one of {SPLITS}")
    data_dir = None if data_dir is None else os.fspath(data_dir)
    _prepared_builder(data_dir, download)
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


def _prepared_builder(data_dir: str | None, download: bool) -> tfds.core.DatasetBuilder:
    """Returns the TFDS builder once its data is prepared, or says how to get it.

    Before downloading, a connection to the download host (or the HTTPS proxy)
    is tried for a few seconds: offline, TFDS would otherwise retry for minutes.

    Raises:
      DatasetNotFoundError: naming the data dir, the cause and the remedies, in
        the Python API's terms and (`command_line`) in the job's flags.
    """
    builder = tfds.builder(TFDS_NAME, data_dir=data_dir)
    if builder.is_prepared():
        return builder
    missing = _Missing(root=os.path.dirname(os.path.dirname(os.fspath(builder.data_dir))),
                       prepared_dir=os.fspath(builder.data_dir),
                       version=str(builder.version), default_dir=data_dir is None)
    if not download:
        raise missing.error("download=False", "--nodownload is set")
    present = [z for z in ORIGINAL_ZIPS if os.path.exists(os.path.join(missing.manual_dir, z))]
    if present and len(present) < len(ORIGINAL_ZIPS):
        absent = ", ".join(sorted(set(ORIGINAL_ZIPS) - set(present)))
        cause = f"{missing.manual_dir} holds only some of the original zips: {absent} missing"
        raise missing.error(cause)
    if not present:
        unreachable = _unreachable(DOWNLOAD_HOST)
        if unreachable:
            raise missing.error(f"the download cannot start: {unreachable}")
    try:
        builder.download_and_prepare()
    except NonMatchingChecksumError as e:
        cause = ("a zip differs from the original that tensorflow-datasets registered "
                 "(checksum mismatch; re-zipped copies do not pass)")
        raise missing.error(cause, details=str(e)) from e
    except (OSError, tfds.download.DownloadError) as e:
        raise missing.error(f"downloading it failed: {e}") from e
    return builder


@dataclasses.dataclass(frozen=True)
class _Missing:
    """Where Omniglot should be, to word the errors of `_prepared_builder`.

    Attributes:
      root: The TFDS data dir.
      prepared_dir: Where the prepared dataset would be (`root/omniglot/VERSION`).
      version: The TFDS dataset version.
      default_dir: Whether `root` is TFDS's default (no data dir was given).
    """

    root: str
    prepared_dir: str
    version: str
    default_dir: bool

    @property
    def manual_dir(self) -> str:
        """Where TFDS takes the original zips from instead of downloading them."""
        return os.path.join(self.root, "downloads", "manual")

    def error(self, cause: str, command_line_cause: str | None = None,
              details: str | None = None) -> DatasetNotFoundError:
        """The error for `cause`; `command_line_cause` words it in flags if it differs."""
        zips = f"the original {', '.join(ORIGINAL_ZIPS)} (from {_ZIPS_URL})"
        prepared = f"the directory that contains {TFDS_NAME}/{self.version}/"
        default = " (TFDS's default)" if self.default_dir else ""
        api = (
            f"Omniglot is not prepared in data_dir={self.root}{default} (no "
            f"{self.prepared_dir}), and {cause}.\n"
            "To provide it, either\n"
            "  * with network access and download=True, let tensorflow-datasets "
            "download and prepare it there; or\n"
            f"  * without network: put {zips} in {self.manual_dir}/ and pass "
            "download=True; or\n"
            f"  * pass data_dir=<a prepared TFDS data dir>, {prepared}.")
        command_line = (
            f"Omniglot is not prepared in --data_dir={self.root}{default} (no "
            f"{self.prepared_dir}), and {command_line_cause or cause}.\n"
            "To provide it, either\n"
            "  * offline, with a prepared TFDS data dir DIR (" + prepared + "): add "
            "--data_dir=DIR --nodownload (mamlpp_tf.evaluate: --data_dir=DIR); or\n"
            f"  * offline: put {zips} in {self.manual_dir}/ and run without "
            "--nodownload (tensorflow-datasets prepares them there); or\n"
            "  * with network access: run without --nodownload to let "
            "tensorflow-datasets download and prepare it in --data_dir.")
        if details:
            api, command_line = (f"{text}\nDetails: {details}" for text in (api, command_line))
        return DatasetNotFoundError(api, command_line=command_line)


def _unreachable(address: tuple[str, int]) -> str | None:
    """Why a download from `address` cannot start, or None if it can connect.

    Connects to `address` (`(host, port)`), or to the HTTPS proxy that the
    environment configures for it, within `PROBE_TIMEOUT_S` seconds.
    """
    host, port = address
    target, via = address, ""
    proxy = urllib.request.getproxies().get("https")
    if proxy and not urllib.request.proxy_bypass(host):
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        target = (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
        via = f" through the HTTPS proxy {target[0]}:{target[1]}"
    try:
        socket.create_connection(target, timeout=PROBE_TIMEOUT_S).close()
    except OSError as error:
        return (f"no connection to {host}:{port}{via} within {PROBE_TIMEOUT_S:g} s "
                f"({str(error) or type(error).__name__})")
    return None


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
    for batch_images, batch_labels in batches.as_numpy_iterator():
        images.append(preprocess(batch_images))
        labels.append(batch_labels)
    return np.concatenate(images), np.concatenate(labels)


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
