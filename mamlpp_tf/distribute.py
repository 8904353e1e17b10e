"""Resolves `--strategy` into a `tf.distribute.Strategy` (Model Garden style).

`default` runs on one device; `mirrored` splits the tasks of every meta-batch
across the local GPUs (or across logical CPU devices with `cpu_replicas`);
`multi_worker` does the same across machines described by `TF_CONFIG`. The
learner keeps every task's batch-norm statistics on its own replica and
reduces gradients once, so the learning dynamics do not depend on the number
of replicas.
"""

from __future__ import annotations

import json
import os

import tensorflow as tf


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
      The strategy; build the learner under its `scope()`.

    Raises:
      ValueError: on an unknown name, a missing/invalid `TF_CONFIG` for
        `multi_worker`, or a meta-batch not divisible by the replicas.
    """
    if cpu_replicas:
        split_cpu(cpu_replicas)
    if name == "default":
        strategy = tf.distribute.get_strategy()
    elif name == "mirrored":
        devices = None
        if cpu_replicas:
            devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(devices=devices)
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


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this worker writes checkpoints, summaries and results."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type in (None, "chief") or (task_type == "worker" and task_id == 0 and
                                            "chief" not in resolver.cluster_spec().jobs)


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
