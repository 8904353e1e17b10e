"""Subprocess side of test_distribute.py (devices and workers need fresh processes).

python tests/distributed_helper.py equivalence OUT.npz BN_STATS [NETWORKS_JSON]
Splits the CPU into 2 logical devices, then runs the same 3 SGD
meta-steps (4 tasks, --grad_clip active) on one device and under
MirroredStrategy, and saves losses, parameters, running statistics and
whether every replica holds identical copies of every variable. With
NETWORKS_JSON (`{"id": {config overrides}}`), once per network, its keys
prefixed with `id/`.

python tests/distributed_helper.py train REPORT.json TRAIN_FLAGS...
Runs `python -m mamlpp_tf.train TRAIN_FLAGS...` in this process while
recording every checkpoint, JSON and TensorBoard write (with its path)
into REPORT.json; exits with the job's status.
"""

import json
import os
import runpy
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# pylint: disable=g-import-not-at-top
import keras
import numpy as np
import tensorflow as tf

from mamlpp_tf import files
from mamlpp_tf.learner import MamlPlusPlus
from mamlpp_tf.training import distribute
from mamlpp_tf.training.trainer import Trainer

from conftest import random_batch, tiny_config

# pylint: enable=g-import-not-at-top

REPLICAS = 2
TASKS = 4
STEPS = 3
SGD_RATE = 0.5
GRAD_CLIP = 0.02


def _meta_steps(strategy: tf.distribute.Strategy, config, batches) -> dict:
    """Three SGD meta-steps of a freshly seeded learner under `strategy`."""
    keras.utils.set_random_seed(3)
    with strategy.scope():
        learner = MamlPlusPlus(config)
        trainer = Trainer(learner, optimizer=keras.optimizers.SGD(SGD_RATE))
    dataset = tf.data.Dataset.from_tensor_slices(
        tuple(np.stack(p) for p in zip(*batches)))
    losses = [
        float(trainer.train_step(batch)["loss"])
        for batch in distribute.distribute_dataset(strategy, dataset)
    ]
    copies = [
        strategy.experimental_local_results(v.value)
        for v in learner.trainable_variables + learner.running_stat_variables +
        trainer.optimizer.variables
    ]
    return dict(losses=np.array(losses),
                params=[np.asarray(v) for v in learner.trainable_variables],
                stats=[np.asarray(v) for v in learner.running_stat_variables],
                replicas=len(copies[0]),
                copies_identical=all(
                    all(
                        np.array_equal(np.asarray(c[0]), np.asarray(other))
                        for other in c[1:])
                    for c in copies))


def _clipped_fraction(config, batch) -> float:
    """Fraction of the network's first meta-gradient entries that the clip changes."""
    keras.utils.set_random_seed(3)
    learner = MamlPlusPlus(config)
    with tf.GradientTape() as tape:
        loss = learner.meta_loss(batch, epoch=0)
    grads = tape.gradient(loss, learner.network_variables)
    flat = np.concatenate([np.abs(np.asarray(g)).ravel() for g in grads])
    return float(np.mean(flat > GRAD_CLIP))


def equivalence(out_path: str, bn_stats: str, networks: dict[str, dict] | None) -> None:
    """The same meta-steps on one device and on two mirrored CPU replicas."""
    mirrored = distribute.resolve("mirrored", TASKS, cpu_replicas=REPLICAS)
    arrays = {}
    for prefix, overrides in (networks or {"": {}}).items():
        config = tiny_config(**{"dtype": "float32", "grad_clip": GRAD_CLIP,
                                "bn_stats": bn_stats, **overrides})
        batches = [random_batch(config, tasks=TASKS, seed=seed) for seed in range(STEPS)]
        results = {
            "one": _meta_steps(tf.distribute.get_strategy(), config, batches),
            "mirrored": _meta_steps(mirrored, config, batches)
        }
        prefix = f"{prefix}/" if prefix else ""
        arrays[f"{prefix}clipped_fraction"] = _clipped_fraction(config, batches[0])
        for name, result in results.items():
            arrays[f"{prefix}{name}/losses"] = result["losses"]
            arrays[f"{prefix}{name}/replicas"] = result["replicas"]
            arrays[f"{prefix}{name}/copies_identical"] = result["copies_identical"]
            for kind in ("params", "stats"):
                for index, value in enumerate(result[kind]):
                    arrays[f"{prefix}{name}/{kind}/{index}"] = value
    np.savez(out_path, **arrays)


def train_with_write_log(report_path: str, argv: list[str]) -> None:
    """`python -m mamlpp_tf.train argv...`, logging its file writes to `report_path`."""
    writes: list[dict] = []
    checkpoint_write = tf.train.Checkpoint._write  # pylint: disable=protected-access
    write_json = files.write_json
    create_file_writer = tf.summary.create_file_writer

    def logged_checkpoint_write(self, file_prefix, *args, **kwargs):
        writes.append(dict(kind="checkpoint", path=os.path.abspath(file_prefix)))
        return checkpoint_write(self, file_prefix, *args, **kwargs)

    def logged_json(path, value):
        writes.append(dict(kind="json", path=os.path.abspath(path)))
        return write_json(path, value)

    def logged_file_writer(logdir, *args, **kwargs):
        writes.append(dict(kind="summary", path=os.path.abspath(logdir)))
        return create_file_writer(logdir, *args, **kwargs)

    # pylint: disable-next=protected-access
    tf.train.Checkpoint._write = logged_checkpoint_write
    files.write_json = logged_json
    tf.summary.create_file_writer = logged_file_writer
    sys.argv = ["mamlpp_tf.train"] + argv
    code = 0
    try:
        runpy.run_module("mamlpp_tf.train", run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code or 0
    with open(report_path, "w") as stream:
        json.dump(writes, stream)
    sys.exit(code)


if __name__ == "__main__":
    if sys.argv[1] == "equivalence":
        equivalence(sys.argv[2], sys.argv[3],
                    json.loads(sys.argv[4]) if len(sys.argv) > 4 else None)
    elif sys.argv[1] == "train":
        train_with_write_log(sys.argv[2], sys.argv[3:])
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")
