"""The facts of each dataset, declared once: shapes, sizes, source and pixel transform.

`RunConfig` checks episodes against these facts, the training flags take the
network's input shape from them, and the exporters pick the served
preprocessing by them; nothing else repeats a dataset's numbers.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses

import numpy as np

from mamlpp_tf.data import mini_imagenet, omniglot, synthetic

SOURCES = ("tfds", "folder", "generated")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """One dataset as a run sees it.

    Attributes:
      name: The `--dataset` value and `data.load` name.
      title: The dataset's name in messages.
      image_shape: `(H, W, C)` of the images a run's network takes.
      images_per_class: Images of every class; None where the loader decides
        (generated data).
      val_classes: Classes of the validation split, the fewest of any split (an
        `n_way` above it cannot be evaluated); None where the loader decides.
      source: `"tfds"` (tensorflow-datasets, downloadable; see `omniglot`),
        `"folder"` (images in a folder at `data_dir`, in a layout of
        `mini_imagenet`) or `"generated"` (see `synthetic`).
      channels: Channel counts its images can have.
      serving_kind: The `mamlpp_tf_export.preprocessing.Preprocessing` kind that serves it.
      preprocess: Maps uint8 pixels `[..., C]` already at the network's size to
        the network's float32 values, as training did.
    """
    name: str
    title: str
    image_shape: tuple[int, int, int]
    images_per_class: int | None
    val_classes: int | None
    source: str
    channels: tuple[int, ...]
    serving_kind: str
    preprocess: Callable[[np.ndarray], np.ndarray]

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"source={self.source!r} must be one of {SOURCES}")
        if self.image_shape[2] not in self.channels:
            raise ValueError(f"{self.name}: image_shape {self.image_shape} has a channel "
                             f"count outside {self.channels}")


_INFOS = (
    DatasetInfo(name="omniglot", title="Omniglot",
                image_shape=(omniglot.IMAGE_SIZE, omniglot.IMAGE_SIZE, 1),
                images_per_class=omniglot.IMAGES_PER_CLASS,
                val_classes=omniglot.VAL_CLASSES, source="tfds", channels=(1,),
                serving_kind="omniglot", preprocess=omniglot.binarize),
    # Ravi & Larochelle's split: 64/16/20 classes of 600 images.
    DatasetInfo(name="mini_imagenet", title="mini-ImageNet",
                image_shape=(mini_imagenet.IMAGE_SIZE, mini_imagenet.IMAGE_SIZE, 3),
                images_per_class=600, val_classes=16, source="folder", channels=(3,),
                serving_kind="imagenet", preprocess=mini_imagenet.normalize),
    # Sizes are `synthetic.load` arguments; runs use its defaults and this shape.
    DatasetInfo(name="synthetic", title="the synthetic glyphs", image_shape=(28, 28, 1),
                images_per_class=None, val_classes=None, source="generated",
                channels=(1, 3), serving_kind="unit", preprocess=synthetic.from_uint8),
)
REGISTRY = {info.name: info for info in _INFOS}
DATASETS = tuple(REGISTRY)
SERVING_KINDS = tuple(info.serving_kind for info in _INFOS)


def dataset_info(name: str) -> DatasetInfo:
    """The facts of dataset `name`.

    Raises:
      ValueError: `name` is not one of `DATASETS`.
    """
    if name not in REGISTRY:
        raise ValueError(f"dataset name={name!r} must be one of {DATASETS}")
    return REGISTRY[name]


def serving_info(kind: str) -> DatasetInfo:
    """The dataset that the served preprocessing `kind` reproduces.

    Raises:
      ValueError: `kind` is not one of `SERVING_KINDS`.
    """
    for info in _INFOS:
        if info.serving_kind == kind:
            return info
    raise ValueError(f"preprocessing kind {kind!r} must be one of {SERVING_KINDS}")
