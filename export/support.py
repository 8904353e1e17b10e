"""The support set a task model is adapted to: a folder of class folders or an `.npz`.

Folder layout: `SUPPORT/<class name>/<image>.png|.jpg|.jpeg`, one sub-folder per
class. Classes are the sub-folders in sorted order (label `i` is the `i`-th
name); hidden folders, files beside the class folders, and files with other
extensions, hidden files and deeper folders inside them are skipped, with one
warning naming them (e.g. `README.txt`, `.DS_Store`). Classes may hold
different numbers of images.

`.npz` layout: `x` float `[n, H, W, C]` (already preprocessed, as the network
sees them), `y` integer `[n]` in `[0, N)`, optional `names` `[N]`.

Every problem (an unreadable image, an empty class, a class count other than
the model's N-way, images of the wrong shape) raises `ValueError` naming the
file, class or shape, before anything is written.
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np

from mamlpp_tf_export.preprocessing import Preprocessing

# Folder reading lives with the light client, which must not import TensorFlow.
from mamlpp_tf_export.serving_requests import class_folders

# TensorFlow wraps an eager op's error as "{{function_node __wrapped__Op_device_…}}
# <reason> [Op:Op] name: "; only <reason> helps whoever supplied the file.
_TF_OP_WRAPPING = re.compile(r"\{\{function_node [^}]*\}\}\s*|\s*\[Op:[^\]]*\](\s*name:.*)?$")


@dataclasses.dataclass(frozen=True)
class SupportSet:
    """A labelled support set, preprocessed.

    Attributes:
      images: float32 `[n, H, W, C]`.
      labels: int32 `[n]` in `[0, len(class_names))`.
      class_names: The name of each label.
    """
    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]


def load_support(path: str, preprocessing: Preprocessing, n_way: int) -> SupportSet:
    """Reads and checks the support set at `path` (a folder or an `.npz`).

    Args:
      path: Support folder or `.npz` file (see the module docstring).
      preprocessing: How the network's images are made from files.
      n_way: Classes the model tells apart; the support set must have as many.

    Raises:
      ValueError: naming the file, class or shape at fault.
    """
    if path.endswith(".npz") and os.path.isfile(path):
        support = _load_npz(path, preprocessing.image_shape)
        _check_class_count(support.class_names, n_way, path)
        return support
    classes = class_folders(path)
    _check_class_count([name for name, _ in classes], n_way, path)
    images, labels = [], []
    for label, (_, files) in enumerate(classes):
        images += [load_image(preprocessing, file) for file in files]
        labels += [label] * len(files)
    return SupportSet(
        np.stack(images).astype(np.float32), np.asarray(labels, np.int32),
        tuple(name for name, _ in classes))


def load_image(preprocessing: Preprocessing, path: str) -> np.ndarray:
    """`preprocessing.load_file(path)`, its error stripped of TensorFlow's op wrapping.

    Raises:
      ValueError: naming the file and why it cannot be read as an image.
    """
    try:
        return preprocessing.load_file(path)
    except ValueError as error:
        raise ValueError(_TF_OP_WRAPPING.sub("", str(error))) from None


def _check_class_count(names: tuple[str, ...] | list[str], n_way: int,
                       path: str) -> None:
    if len(names) != n_way:
        raise ValueError(f"support set {path} has {len(names)} classes "
                         f"({', '.join(names)}) but the model is {n_way}-way")


def _load_npz(path: str, image_shape: tuple[int, int, int]) -> SupportSet:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            values = {key: arrays[key] for key in arrays.files}
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read support file {path}: {error}") from None
    missing = {"x", "y"} - set(values)
    if missing:
        raise ValueError(
            f"support file {path} lacks array(s) {', '.join(sorted(missing))}")
    x, y = values["x"], values["y"]
    if x.ndim != 4 or x.shape[1:] != image_shape or not len(x):
        raise ValueError(f"support file {path}: x has shape {x.shape}, the model takes "
                         f"images [n, {', '.join(map(str, image_shape))}] with n >= 1")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"support file {path}: x must hold preprocessed float images, "
                         f"got {x.dtype}")
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"support file {path}: y must be integer labels of shape "
                         f"({len(x)},), got {y.dtype} {y.shape}")
    num_classes = int(y.max()) + 1
    names = values.get("names")
    names = (tuple(str(n) for n in names) if names is not None else tuple(
        f"class_{i}" for i in range(num_classes)))
    present = np.bincount(y[y >= 0], minlength=len(names))
    if y.min() < 0 or len(present) > len(names) or not present.all():
        raise ValueError(
            f"support file {path}: y must hold every label 0..{len(names) - 1} "
            f"of the {len(names)} classes at least once, got "
            f"{sorted(set(y.tolist()))}")
    return SupportSet(x.astype(np.float32), y.astype(np.int32), names)
