"""Shared fixtures: quiet TF logs, deterministic seeds, tiny learners and batches."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

from mamlpp_tf import LearnerConfig  # pylint: disable=g-import-not-at-top

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def tiny_config(**overrides) -> LearnerConfig:
    """A float64 learner small enough for finite differences."""
    values = dict(n_way=2, image_shape=(6, 6, 1), num_filters=2, num_stages=2,
                  inner_steps=2, eval_inner_steps=2, inner_lr=0.3, msl_epochs=2,
                  task_impl="loop", dtype="float64")
    values.update(overrides)
    return LearnerConfig(**values)


def random_batch(config: LearnerConfig, tasks: int = 2, k_shot: int = 2, n_query: int = 2,
                 seed: int = 0):
    """A meta-batch of random images with class-major labels."""
    rng = np.random.RandomState(seed)
    n, shape = config.n_way, config.image_shape
    support_y = np.tile(np.repeat(np.arange(n), k_shot), (tasks, 1)).astype(np.int32)
    query_y = np.tile(np.repeat(np.arange(n), n_query), (tasks, 1)).astype(np.int32)
    return (rng.randn(tasks, n * k_shot, *shape).astype(config.dtype), support_y,
            rng.randn(tasks, n * n_query, *shape).astype(config.dtype), query_y)


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)
