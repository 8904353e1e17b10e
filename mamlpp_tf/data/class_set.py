"""`ClassSet`: the classes of one split, as every loader returns them.

A class set is what the episode sampler draws tasks from: an ordered list of
classes (the order matters, the sampler's `rng.choice` indexes into it), the
images of each class, and whether the split may be augmented. Images are either
one in-memory array `[classes, per_class, H, W, C]` (Omniglot, synthetic) or an
`ImageStore` that decodes on demand and allows classes of different sizes
(mini-ImageNet from a folder).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, runtime_checkable

import numpy as np


class DatasetNotFoundError(FileNotFoundError):
    """The data of a dataset is neither prepared nor obtainable; says how to fix it.

    `str(error)` words the remedies for the Python API (`data_dir=`,
    `download=`); `command_line` words them for the training job's flags.

    Args:
      message: The problem and its remedies, in the Python API's terms.
      command_line: The same in command-line terms (`--data_dir=DIR
        --nodownload`); defaults to `message`.

    Attributes:
      command_line: The message for command-line users.
    """

    def __init__(self, message: str, command_line: str | None = None):
        super().__init__(message)
        self.command_line = command_line or message


@runtime_checkable
class ImageStore(Protocol):
    """Images of classes that may differ in size, read on demand."""

    @property
    def counts(self) -> tuple[int, ...]:
        """Number of images of each class."""

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """`(H, W, C)` of every image returned by `take`."""

    def take(self, class_index: int, image_indices: np.ndarray) -> np.ndarray:
        """Returns float32 images `[len(image_indices), H, W, C]` of one class."""


@dataclasses.dataclass(frozen=True, eq=False)
class ClassSet:
    """The classes of one split of a dataset.

    Attributes:
      images: float32 array `[classes, per_class, H, W, C]`, or an `ImageStore`.
      class_names: One name per class, in stored order (the order the episode
        sampler's class draw indexes).
      split: Split name used in messages (`"train"`, `"val"`, `"test"`).
      dataset: Dataset name used in messages (e.g. `"omniglot"`).
      augment: Whether training episodes may rotate classes by k*90 degrees
        (the official code does so for Omniglot meta-training only).
    """

    images: np.ndarray | ImageStore
    class_names: tuple[str, ...]
    split: str
    dataset: str
    augment: bool = False

    def __post_init__(self):
        object.__setattr__(self, "class_names", tuple(self.class_names))
        if isinstance(self.images, np.ndarray):
            if self.images.ndim != 5 or self.images.dtype != np.float32:
                raise ValueError(
                    f"{self.dataset}/{self.split}: images must be a float32 array "
                    f"[classes, per_class, H, W, C], got {self.images.dtype} "
                    f"{self.images.shape}")
            num_classes = self.images.shape[0]
        elif isinstance(self.images, ImageStore):
            num_classes = len(self.images.counts)
        else:
            raise TypeError(f"{self.dataset}/{self.split}: images must be a numpy "
                            f"array or an ImageStore, got {type(self.images).__name__}")
        if num_classes != len(self.class_names):
            raise ValueError(f"{self.dataset}/{self.split}: {num_classes} classes of "
                             f"images but {len(self.class_names)} class names")
        if self.augment and self.image_shape[0] != self.image_shape[1]:
            raise ValueError(
                f"{self.dataset}/{self.split}: rotation augmentation needs "
                f"square images, got {self.image_shape}")

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    @property
    def counts(self) -> tuple[int, ...]:
        """Number of images of each class."""
        if isinstance(self.images, np.ndarray):
            return (self.images.shape[1],) * self.images.shape[0]
        return tuple(self.images.counts)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """`(H, W, C)` of one image."""
        if isinstance(self.images, np.ndarray):
            return tuple(self.images.shape[2:])
        return tuple(self.images.image_shape)

    def take(self, class_index: int, image_indices: np.ndarray) -> np.ndarray:
        """Returns float32 images `[len(image_indices), H, W, C]` of one class."""
        if isinstance(self.images, np.ndarray):
            return self.images[class_index, image_indices]
        return self.images.take(class_index, image_indices)

    def __repr__(self) -> str:
        """A one-line summary: the dataclass default would print every pixel."""
        counts = self.counts
        per_class = (str(counts[0]) if len(set(counts)) == 1 else
                     f"{min(counts)}-{max(counts)}") if counts else "0"
        storage = ("in memory" if isinstance(self.images, np.ndarray) else
                   f"read on demand by {type(self.images).__name__}")
        return (f"ClassSet(dataset={self.dataset!r}, split={self.split!r}, "
                f"classes={self.num_classes}, images_per_class={per_class}, "
                f"image_shape={self.image_shape}, dtype=float32, augment={self.augment}, "
                f"images {storage})")
