"""Episodic few-shot data: class splits, preprocessing and the seeded task sampler.

    from mamlpp_tf import data
    sets = data.load("omniglot", split="paper", data_dir="/path/to/tfds")
    train = data.episodes(sets["train"], n_way=5, k_shot=1, n_query=1,
                          meta_batch_size=8, seed=0, split_kind="train")
    val = data.episodes(sets["val"], 5, 1, 1, 8, seed=0, split_kind="val",
                        num_tasks=600)

Datasets: `"omniglot"` (TFDS; splits `"paper"` and `"background_evaluation"`),
`"mini_imagenet"` (a local folder) and `"synthetic"` (generated glyphs, not a
benchmark). Each loads as `{"train", "val", "test"}` -> `ClassSet`. Tasks follow
the official MAML++ sampling and seeds exactly (see `episodes`).
"""

from __future__ import annotations

import os
from typing import Any

from mamlpp_tf.data import mini_imagenet, omniglot, synthetic
from mamlpp_tf.data.class_set import ClassSet, DatasetNotFoundError, ImageStore
from mamlpp_tf.data.episodes import (
    SPLIT_KINDS,
    Task,
    TaskDraw,
    check_episode_shape,
    derive_seed,
    draw_task,
    episodes,
    make_task,
    task_seed,
)
from mamlpp_tf.data.registry import DATASETS, DatasetInfo, dataset_info

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "SPLIT_KINDS",
    "ClassSet",
    "DatasetNotFoundError",
    "ImageStore",
    "Task",
    "TaskDraw",
    "check_episode_shape",
    "dataset_info",
    "derive_seed",
    "draw_task",
    "episodes",
    "load",
    "make_task",
    "task_seed",
]


def load(name: str,
         split: str | None = None,
         data_dir: str | os.PathLike | None = None,
         download: bool = False,
         **kwargs: Any) -> dict[str, ClassSet]:
    """Loads a dataset as `{"train", "val", "test"}` -> `ClassSet`.

    Args:
      name: One of `DATASETS`.
      split: Omniglot only: `"paper"` (default) or `"background_evaluation"`.
      data_dir: Omniglot: the TFDS data dir (None = TFDS default); mini-ImageNet:
        the dataset folder (required); synthetic: must be None.
      download: Omniglot only: let TFDS download and prepare the data.
      **kwargs: Passed to the dataset's loader: `omniglot.load` (`file_order`,
        `val_classes`), `mini_imagenet.load` (`in_memory`, `image_size`,
        `images_dir`), `synthetic.load` (`num_classes`, `images_per_class`,
        `image_shape`, `seed`).

    Returns:
      The three class sets.

    Raises:
      ValueError: Unknown `name`, or an argument that does not apply to it.
      DatasetNotFoundError: The data is missing; the message says how to get it.
    """
    dataset_info(name)  # Refuses an unknown name.
    if name == "omniglot":
        return omniglot.load(split or "paper", data_dir, download, **kwargs)
    if split is not None:
        raise ValueError(
            f"split={split!r} applies to omniglot only; {name} has one split")
    if download:
        raise ValueError(f"download=True applies to omniglot only; {name} is " + (
            "read from data_dir" if name == "mini_imagenet" else "generated"))
    if name == "mini_imagenet":
        if data_dir is None:
            raise ValueError("mini_imagenet needs data_dir (the dataset folder)")
        return mini_imagenet.load(data_dir, **kwargs)
    if data_dir is not None:
        raise ValueError(
            f"data_dir={data_dir!r} does not apply to the generated synthetic "
            "dataset")
    return synthetic.load(**kwargs)
