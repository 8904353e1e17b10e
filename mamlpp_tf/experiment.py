"""Builds a run's data, task streams and learner from its `RunConfig`.

Shared by `train`, `evaluate` and the exporters so that they see exactly the
same classes, tasks and network.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from mamlpp_tf import data
from mamlpp_tf.config import RunConfig
from mamlpp_tf.learner import MamlPlusPlus


def load_class_sets(config: RunConfig) -> dict[str, data.ClassSet]:
    """Loads the run's train/val/test classes and checks the episodes fit them.

    Raises:
      data.DatasetNotFoundError: the dataset is missing (message says how to get it).
      ValueError: an episode shape does not fit a split (message names the flags).
    """
    if config.dataset == "omniglot":
        sets = data.load("omniglot", split=config.omniglot_split, data_dir=config.data_dir,
                         download=config.download)
    elif config.dataset == "mini_imagenet":
        sets = data.load("mini_imagenet", data_dir=config.data_dir)
    else:
        sets = data.load("synthetic", image_shape=config.learner.image_shape)
    for class_set in sets.values():
        try:
            data.check_episode_shape(class_set, config.learner.n_way, config.k_shot,
                                     config.n_query)
        except ValueError as error:
            raise ValueError(f"--{error}") from None
        if tuple(class_set.image_shape) != config.learner.image_shape:
            raise ValueError(f"--dataset={config.dataset}: images of split "
                             f"'{class_set.split}' have shape {class_set.image_shape}, the "
                             f"network expects {config.learner.image_shape}")
    return sets


def train_tasks(config: RunConfig, class_set: data.ClassSet,
                start_iteration: int) -> tf.data.Dataset:
    """The infinite training stream, resumed at meta-iteration `start_iteration`."""
    return data.episodes(class_set, config.learner.n_way, config.k_shot, config.n_query,
                         config.meta_batch_size, seed=config.seed, split_kind="train",
                         start_task=start_iteration * config.meta_batch_size)


def eval_tasks(config: RunConfig, class_set: data.ClassSet, split_kind: str,
               num_tasks: int, replicas: int = 1) -> tf.data.Dataset:
    """The fixed validation or test tasks, in meta-batches of equal size.

    The meta-batch is the largest size that divides `num_tasks` (so every step
    has the same static shape and none retraces), is a multiple of `replicas`
    and does not exceed the training meta-batch.
    """
    size = math.gcd(num_tasks, config.meta_batch_size)
    if size % replicas:
        raise ValueError(f"--{split_kind}_tasks={num_tasks} cannot be split evenly over "
                         f"{replicas} replicas with --meta_batch_size="
                         f"{config.meta_batch_size}")
    return data.episodes(class_set, config.learner.n_way, config.k_shot, config.n_query,
                         size, seed=config.val_seed, split_kind=split_kind,
                         num_tasks=num_tasks)


def build_learner(config: RunConfig,
                  strategy: tf.distribute.Strategy | None = None) -> MamlPlusPlus:
    """Creates the learner (initial weights from `--seed`) under `strategy`'s scope."""
    strategy = strategy or tf.distribute.get_strategy()
    keras.utils.set_random_seed(config.seed)
    with strategy.scope():
        return MamlPlusPlus(config.learner)
