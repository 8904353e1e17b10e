"""`Run`: one run's pieces, built once from its `RunConfig` and handed to every phase.

The training loop, the final test, `evaluate`, the exporters and the report
all take a `Run`: its config, distribution strategy and run directory, and,
built when first used, its classes, task streams, learner and trainer. So
they see exactly the same classes, tasks and network, and a command that
needs only part of a run (an export needs the network, not the data) pays
for nothing else. Building lazily also lets the training job check its flags
against the run directory before it loads any data.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import keras
import tensorflow as tf

from mamlpp_tf import data
from mamlpp_tf.config import RunConfig
from mamlpp_tf.learner import MamlPlusPlus
from mamlpp_tf.training import distribute
from mamlpp_tf.training.run_dir import RunDir
from mamlpp_tf.training.trainer import Trainer


class Run:
    """The pieces of one run that every phase of the job shares.

    Args:
      config: The run.
      strategy: Where it runs; default the current strategy (one device). The
        training job passes the config's (`distribute.resolve`).

    Attributes:
      config: The `RunConfig`.
      strategy: The distribution strategy of the learner and trainer.
      dir: The `RunDir` of `config.model_dir`.
    """

    def __init__(self, config: RunConfig, strategy: tf.distribute.Strategy | None = None):
        self.config = config
        self.strategy = strategy or tf.distribute.get_strategy()
        self.dir = RunDir(config.model_dir)
        self._eval_tasks: dict[tuple[str, int], tf.data.Dataset] = {}

    @classmethod
    def from_dir(cls, model_dir: str, strategy: tf.distribute.Strategy | None = None,
                 **overrides) -> Run:
        """The run recorded in `model_dir`, with `overrides` of its config fields.

        Raises:
          FileNotFoundError: if `model_dir` holds no run.
        """
        config = RunDir(model_dir).read_config()
        return cls(dataclasses.replace(config, model_dir=model_dir, **overrides), strategy)

    @property
    def chief(self) -> bool:
        """Whether this process writes the run directory (one per job)."""
        return self.strategy.extended.should_checkpoint

    @functools.cached_property
    def class_sets(self) -> dict[str, data.ClassSet]:
        """The train/val/test classes, checked against the episode shape.

        Raises:
          data.DatasetNotFoundError: the dataset is missing (message says how to get it).
          ValueError: an episode shape does not fit a split (message names the flags).
        """
        return load_class_sets(self.config)

    @functools.cached_property
    def learner(self) -> MamlPlusPlus:
        """The learner, with initial weights from `--seed`, under `strategy`'s scope."""
        keras.utils.set_random_seed(self.config.seed)
        with self.strategy.scope():
            return MamlPlusPlus(self.config.learner)

    @functools.cached_property
    def trainer(self) -> Trainer:
        """The trainer of `learner` (its optimiser and counters), under `strategy`'s scope."""
        with self.strategy.scope():
            return Trainer(self.learner)

    def build(self) -> Run:
        """Builds every piece now: classes, the validation and test tasks, learner, trainer.

        Returns:
          This run.

        Raises:
          As `class_sets` and `eval_tasks`: bad data or flags fail here, before a
          job writes anything, not after hours of training.
        """
        for split in ("val", "test"):
            self.eval_tasks(split)
        _ = self.trainer  # Built once, with the learner, and cached.
        return self

    def train_tasks(self, start_iteration: int) -> tf.data.Dataset:
        """The infinite training stream, resumed at meta-iteration `start_iteration`."""
        config = self.config
        return data.episodes(self.class_sets["train"], config.learner.n_way, config.k_shot,
                             config.n_query, config.meta_batch_size, seed=config.seed,
                             split_kind="train",
                             start_task=start_iteration * config.meta_batch_size)

    def eval_tasks(self, split: str, num_tasks: int | None = None) -> tf.data.Dataset:
        """The fixed validation or test tasks, in meta-batches of equal size.

        The meta-batch is the largest size that divides the number of tasks (so
        every step has the same static shape and none retraces), is a multiple
        of the replicas and does not exceed the training meta-batch. Built once
        per split and size: `build()`, validation and the final test share it.

        Args:
          split: "val" or "test".
          num_tasks: Default `--val_tasks` or `--test_tasks`.

        Raises:
          ValueError: if the tasks cannot be split evenly over the replicas.
        """
        config = self.config
        if num_tasks is None:
            num_tasks = config.val_tasks if split == "val" else config.test_tasks
        if (split, num_tasks) in self._eval_tasks:
            return self._eval_tasks[split, num_tasks]
        replicas = self.strategy.num_replicas_in_sync
        size = math.gcd(num_tasks, config.meta_batch_size)
        if size % replicas:
            raise ValueError(f"--{split}_tasks={num_tasks} cannot be split evenly over "
                             f"{replicas} replicas with --meta_batch_size="
                             f"{config.meta_batch_size}")
        tasks = data.episodes(self.class_sets[split], config.learner.n_way, config.k_shot,
                              config.n_query, size, seed=config.val_seed, split_kind=split,
                              num_tasks=num_tasks)
        self._eval_tasks[split, num_tasks] = tasks
        return tasks

    def save_epoch(self, epoch: int) -> None:
        """Keeps the learner's current model as the checkpoint of `epoch`.

        Only the chief writes; another worker takes part in the save (its
        collectives) and keeps nothing.
        """
        if self.chief:
            self.dir.save_epoch(self.learner.checkpoint_items(), epoch)
        else:
            distribute.write_as_non_chief(tf.train.Checkpoint(**self.learner.checkpoint_items()))

    def restore_epoch(self, epoch: int) -> None:
        """Loads the kept model of `epoch` into the learner.

        Raises:
          FileNotFoundError: if that epoch's checkpoint was not kept.
        """
        self.dir.restore_epoch(self.learner.checkpoint_items(), epoch)


def load_class_sets(config: RunConfig) -> dict[str, data.ClassSet]:
    """Loads the train/val/test classes of `config` and checks the episodes fit them.

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
