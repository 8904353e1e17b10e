"""Resolves `--strategy` into a `tf.distribute.Strategy` (Model Garden style).

`default` runs on one device; `mirrored` splits the tasks of every meta-batch
across the local GPUs (or across logical CPU devices with `cpu_replicas`);
`multi_worker` does the same across machines described by `TF_CONFIG`, one
replica per GPU of every worker (one per worker without GPUs). Every task's
batch-norm statistics stay on its own replica and the trainer reduces the
gradients once, so the learning dynamics do not depend on the number of
replicas.

Also the pieces a training loop needs around the strategy: distributing the
meta-batches (`distribute_dataset`), how the workers other than the chief
(`strategy.extended.should_checkpoint`, the one that writes) take part in a
save (`write_as_non_chief`), and an agreement that is also a barrier
(`max_over_workers`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from absl import logging
import tensorflow as tf

# `max_over_workers` agrees on values below this (signal numbers are below 65).
_AGREEMENT_RANGE = 65


# What a collective raises when a peer worker is gone (connection refused, health
# check failed, collective aborted or timed out).
PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
               tf.errors.CancelledError, tf.errors.AbortedError)


class WorkerLost(RuntimeError):
    """Another worker of a multi-worker job is gone; this one cannot go on alone."""


def worker_lost(error: tf.errors.OpError, where: str, resume: str) -> WorkerLost:
    """A `WorkerLost` for `error`, raised by a collective during `where`.

    Args:
      error: One of `PEER_ERRORS`.
      where: The phase of the job, e.g. "meta-iteration 7 (epoch 0)".
      resume: What the run directory holds for a resume.
    """
    cause = error.message.split("}} ", 1)[-1].split(" [Op:", 1)[0].splitlines()[0]
    return WorkerLost(f"lost another worker during {where} ({cause[:200]}); stop every "
                      f"worker and re-run the same command on all of them: {resume}")


def split_cpu(replicas: int) -> None:
    """Splits the first CPU into `replicas` logical devices (before TF initialises).

    Raises:
      RuntimeError: if TensorFlow's devices are already initialised with a
        different layout.
    """
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current is not None and len(current) == replicas:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(replicas)])
    except RuntimeError as error:
        raise RuntimeError(f"--cpu_replicas={replicas} must be set before TensorFlow "
                           f"initialises its devices: {error}") from error


def resolve(name: str, meta_batch_size: int, cpu_replicas: int = 0) -> tf.distribute.Strategy:
    """Builds the strategy `name` and checks that the meta-batch splits evenly.

    Args:
      name: `default`, `mirrored` or `multi_worker`.
      meta_batch_size: Global tasks per meta-iteration.
      cpu_replicas: If > 0, replicate over this many logical CPU devices
        instead of GPUs (testing the distributed path without GPUs).

    Returns:
      The strategy; build the learner and its trainer under its `scope()`.

    Raises:
      ValueError: on an unknown name, a missing/invalid `TF_CONFIG` for
        `multi_worker`, `cpu_replicas` with another strategy than `mirrored`,
        or a meta-batch not divisible by the replicas.
    """
    if cpu_replicas and name != "mirrored":
        raise ValueError(f"--cpu_replicas={cpu_replicas} applies to "
                         f"--strategy=mirrored only (got --strategy={name})")
    if cpu_replicas:
        split_cpu(cpu_replicas)
    if name == "default":
        strategy = tf.distribute.get_strategy()
    elif name == "mirrored":
        devices = None
        if cpu_replicas:
            devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(devices=devices)
        if strategy.num_replicas_in_sync == 1:
            logging.warning("--strategy=mirrored found one device (no GPU visible?); "
                            "training on a single replica")
    elif name == "multi_worker":
        _check_tf_config()
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        raise ValueError(f"--strategy={name!r} must be default, mirrored or multi_worker")
    replicas = strategy.num_replicas_in_sync
    if meta_batch_size % replicas:
        raise ValueError(f"--meta_batch_size={meta_batch_size} must be divisible by the "
                         f"{replicas} replicas of --strategy={name}")
    return strategy


def distribute_dataset(
        strategy: tf.distribute.Strategy,
        dataset: tf.data.Dataset) -> tf.data.Dataset | tf.distribute.DistributedDataset:
    """Splits every global meta-batch of `dataset` among the replicas.

    `dataset` yields global meta-batches (leading dimension: all tasks of one
    meta-iteration). Each replica receives an equal, static share of every
    one of them; with several workers each worker builds every meta-batch and
    keeps its replicas' share (`AutoShardPolicy.DATA`), so the global
    meta-batch, and with it the learning dynamics, is the same for any number
    of replicas and workers.

    Args:
      strategy: The strategy of the learner.
      dataset: Global meta-batches with a static leading dimension divisible
        by `strategy.num_replicas_in_sync`.

    Returns:
      `dataset` itself for one replica, else the distributed dataset.
    """
    if strategy.num_replicas_in_sync == 1:
        return dataset
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA)
    return strategy.experimental_distribute_dataset(dataset.with_options(options))


def num_workers(strategy: tf.distribute.Strategy) -> int:
    """Processes taking part in `strategy` (1 unless multi-worker)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        return 1
    spec = resolver.cluster_spec().as_dict()
    return max(1, sum(len(spec.get(job, ())) for job in ("chief", "worker")))


def max_over_workers(strategy: tf.distribute.Strategy, value: int) -> int:
    """The largest of every worker's `value` (`value` itself with one worker).

    A one-number all-reduce that every worker must call at the same point,
    so also a barrier. The training loop agrees with it on whether any worker
    got a stop signal, so that all of them checkpoint the same iteration and
    stop together.
    """
    if num_workers(strategy) == 1:
        return value
    if not 0 <= value < _AGREEMENT_RANGE:
        raise ValueError(f"max_over_workers takes values in [0, {_AGREEMENT_RANGE}), "
                         f"got {value}")
    # ReduceOp has no MAX: sum one-hot vectors and take the largest value present.
    one_hot = tf.one_hot(value, _AGREEMENT_RANGE)
    counts = strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: one_hot),
                             axis=None).numpy()
    return int(counts.nonzero()[0].max())


def write_as_non_chief(checkpoint: tf.train.Checkpoint) -> None:
    """Takes part in a save without leaving files (a worker other than the chief).

    TensorFlow's documented multi-worker pattern: saving distributed variables
    may run collective ops, so every worker saves whenever the chief does; the
    others write to a private temporary directory and delete it at once.
    """
    directory = tempfile.mkdtemp(prefix="mamlpp_worker_")
    try:
        checkpoint.write(os.path.join(directory, "ckpt"))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _check_tf_config() -> None:
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise ValueError("--strategy=multi_worker needs the TF_CONFIG environment variable "
                         "(cluster and task); see README 'Multi-GPU and multi-machine'")
    try:
        config = json.loads(raw)
        config["cluster"], config["task"]["type"], config["task"]["index"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"TF_CONFIG is not valid JSON with cluster and task "
                         f"type/index: {error}") from error
