"""mini-ImageNet (Ravi & Larochelle split) from a folder, preprocessed as officially.

Two layouts, as users download them:

* pre-split folders: `<data_dir>/{train,val,test}/<wnid>/*.jpg|jpeg|png`
  (the official `mini_imagenet_full_size`);
* one image folder plus split CSVs: `<data_dir>/images/*.jpg` and
  `<data_dir>/{train,val,test}.csv` with a `filename,label` header (label = wnid).

Classes of a split are sorted by wnid (the official order); images of a class are
sorted by file name. Preprocessing (as the official `data.py`): PIL resize to 84x84 (a no-op for
the usual 84x84 files), RGB, /255, then per-channel ImageNet normalisation
`(x - mean) / std`. Images are decoded lazily, per episode, or all at load time
and kept in memory as uint8 (about 1.3 GB for the 60,000 images).
"""

from __future__ import annotations

from collections.abc import Sequence
import concurrent.futures
import csv
import os

import numpy as np
from PIL import Image

from mamlpp_tf.data.class_set import ClassSet, DatasetNotFoundError

SPLITS = ("train", "val", "test")
IMAGE_SIZE = 84
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_LAYOUT_HELP = (
    "expected <data_dir>/{train,val,test}/<wnid>/*.jpg, or <data_dir>/images/ "
    "plus <data_dir>/{train,val,test}.csv with a 'filename,label' header")


def normalize(images: np.ndarray) -> np.ndarray:
    """Maps uint8 RGB images to float32 `(x / 255 - MEAN) / STD` (about -2.1 to 2.6)."""
    out = images.astype(np.float32)  # in place from here: this runs on every episode
    out /= np.float32(255.0)
    out -= np.float32(MEAN)
    out /= np.float32(STD)
    return out


def decode_image(path: str, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Reads one image as uint8 RGB `[image_size, image_size, 3]`.

    As the official code: PIL `resize((size, size))` (Pillow's default filter,
    skipped when the size already matches), then `convert("RGB")`.

    Raises:
      ValueError: The file cannot be read as an image; the message names it.
    """
    try:
        with Image.open(path) as image:
            if image.size != (image_size, image_size):
                image = image.resize((image_size, image_size))
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


class FolderImages:
    """The images of one split, as an `ImageStore` (decoded lazily or cached).

    Args:
      paths: Per class, the image files in stored order.
      image_size: Side of the square output images.
      in_memory: Decode everything now (in parallel) and keep uint8 arrays;
        otherwise decode the requested images on every `take`.
    """

    def __init__(self,
                 paths: Sequence[Sequence[str]],
                 image_size: int = IMAGE_SIZE,
                 in_memory: bool = False):
        self._paths = [list(p) for p in paths]
        self._image_size = image_size
        self._cache = None
        if in_memory:
            with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
                self._cache = [self._decode_all(pool, p) for p in self._paths]

    def _decode(self, path: str) -> np.ndarray:
        return decode_image(path, self._image_size)

    def _decode_all(self, pool: concurrent.futures.Executor,
                    paths: Sequence[str]) -> np.ndarray:
        """uint8 `[len(paths), H, W, 3]`, decoded in parallel (Pillow frees the GIL)."""
        decoded = list(pool.map(self._decode, paths))
        return np.stack(decoded) if decoded else np.empty(
            (0,) + self.image_shape, np.uint8)

    @property
    def counts(self) -> tuple[int, ...]:
        """Number of images of each class."""
        return tuple(len(p) for p in self._paths)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """`(H, W, 3)` of every image."""
        return (self._image_size, self._image_size, 3)

    def take(self, class_index: int, image_indices: np.ndarray) -> np.ndarray:
        """Returns normalised float32 images `[len(image_indices), H, W, 3]`."""
        if self._cache is not None:
            return normalize(self._cache[class_index][image_indices])
        paths = self._paths[class_index]
        return normalize(np.stack([self._decode(paths[i]) for i in image_indices]))


def load(data_dir: str | os.PathLike,
         *,
         in_memory: bool = False,
         image_size: int = IMAGE_SIZE,
         images_dir: str | os.PathLike | None = None) -> dict[str, ClassSet]:
    """Loads mini-ImageNet as train/val/test class sets.

    Args:
      data_dir: Folder in one of the two layouts of the module docstring; the
        CSV layout is used when `<data_dir>/train.csv` exists.
      in_memory: Decode all images now and keep them (uint8) in memory;
        otherwise decode per episode.
      image_size: Side of the square images (84 in the paper).
      images_dir: Image folder of the CSV layout (default `<data_dir>/images`).

    Returns:
      `{"train", "val", "test"}` -> `ClassSet` of `FolderImages`, classes sorted
      by wnid; no augmentation.

    Raises:
      DatasetNotFoundError: `data_dir`, a split folder or a split CSV is missing.
      ValueError: A CSV is malformed or names a missing image, or (with
        `in_memory`) an image cannot be read; the message names the file.
    """
    if image_size < 1:
        raise ValueError(f"image_size={image_size} must be >= 1")
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise DatasetNotFoundError(
            f"mini-ImageNet data_dir={data_dir} is not a directory; "
            f"{_LAYOUT_HELP}")
    if os.path.exists(os.path.join(data_dir, "train.csv")):
        images_dir = os.fspath(images_dir or os.path.join(data_dir, "images"))
        if not os.path.isdir(images_dir):
            raise DatasetNotFoundError(
                f"mini-ImageNet images_dir={images_dir} (for the split CSVs of "
                f"{data_dir}) is not a directory; {_LAYOUT_HELP}")
        classes = {split: _csv_classes(data_dir, split, images_dir) for split in SPLITS}
    else:
        classes = {split: _folder_classes(data_dir, split) for split in SPLITS}
    sets = {}
    for split, paths_by_wnid in classes.items():
        wnids = sorted(paths_by_wnid)
        images = FolderImages([paths_by_wnid[w] for w in wnids], image_size, in_memory)
        sets[split] = ClassSet(images=images,
                               class_names=tuple(wnids),
                               split=split,
                               dataset="mini_imagenet")
    return sets


def _folder_classes(data_dir: str, split: str) -> dict[str, list[str]]:
    """`{wnid: sorted image paths}` of `<data_dir>/<split>/<wnid>/`."""
    split_dir = os.path.join(data_dir, split)
    if not os.path.isdir(split_dir):
        raise DatasetNotFoundError(
            f"mini-ImageNet split '{split}' not found: {split_dir} is not a directory; "
            f"{_LAYOUT_HELP}")
    classes = {}
    for wnid in os.listdir(split_dir):
        class_dir = os.path.join(split_dir, wnid)
        if os.path.isdir(class_dir):
            classes[wnid] = [
                os.path.join(class_dir, f)
                for f in sorted(os.listdir(class_dir))
                if f.lower().endswith(IMAGE_EXTENSIONS)
            ]
    if not classes:
        raise DatasetNotFoundError(f"mini-ImageNet split '{split}': {split_dir} has no "
                                   f"class folders; {_LAYOUT_HELP}")
    return classes


def _csv_classes(data_dir: str, split: str, images_dir: str) -> dict[str, list[str]]:
    """`{wnid: sorted image paths}` listed by `<data_dir>/<split>.csv`."""
    csv_path = os.path.join(data_dir, f"{split}.csv")
    if not os.path.exists(csv_path):
        raise DatasetNotFoundError(
            f"mini-ImageNet split '{split}' not found: {csv_path} does not exist; "
            f"{_LAYOUT_HELP}")
    classes: dict[str, list[str]] = {}
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != ["filename", "label"]:
            raise ValueError(f"{csv_path}: the first row must be 'filename,label', "
                             f"got {header}")
        for line, row in enumerate(reader, start=2):
            if len(row) != 2:
                raise ValueError(
                    f"{csv_path}:{line}: expected 'filename,label', got {row}")
            path = os.path.join(images_dir, row[0].strip())
            if not os.path.isfile(path):
                raise ValueError(
                    f"cannot read image {path} (listed in {csv_path}:{line}): "
                    "no such file")
            classes.setdefault(row[1].strip(), []).append(path)
    if not classes:
        raise DatasetNotFoundError(
            f"mini-ImageNet split '{split}': {csv_path} lists no images")
    return {wnid: sorted(paths) for wnid, paths in classes.items()}
