"""Shared fixtures: quiet TF logs, deterministic seeds, tiny learners and batches."""

import json
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# README's test command runs one pytest worker per core: on a GPU machine each
# worker takes GPU memory as it needs it instead of all of it at start.
os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")

import keras  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

from mamlpp_tf import LearnerConfig, nets  # pylint: disable=g-import-not-at-top

# Real data for the real-data tests: $MAMLPP_TF_TEST_DATA, else ../shared/data beside the
# clone. It holds tfds/omniglot/3.0.0 (a prepared TFDS data dir) and omniglot/ (the original
# zips and mamlpp_official_class_split.json); a test that needs an absent part skips, naming it.
TEST_DATA_ENV = "MAMLPP_TF_TEST_DATA"
REAL_DATA = os.path.abspath(os.environ.get(TEST_DATA_ENV) or os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "data"))


def tiny_config(**overrides) -> LearnerConfig:
    """A float64 learner small enough for finite differences."""
    values = dict(n_way=2, image_shape=(6, 6, 1), num_filters=2, num_stages=2,
                  inner_steps=2, eval_inner_steps=2, inner_lr=0.3, msl_epochs=2,
                  task_impl="loop", dtype="float64")
    values.update(overrides)
    return LearnerConfig(**values)


@nets.register_backbone("tiny_keras")
def tiny_keras_backbone(config, *, n_way, image_shape, dtype, **batch_norm) -> nets.KerasBackbone:
    """A user's small Keras model as a backbone: conv, stock batch norm, ReLU, pool, dense.

    Registered as `backbone="tiny_keras"` so that every test that builds a learner from a
    config (the conformance suite, the mirrored helper) can run it like a built-in network.
    """
    del config
    layers = keras.layers
    model = keras.Sequential([
        keras.Input(image_shape, dtype=keras.DTypePolicy(dtype).variable_dtype),
        layers.Conv2D(3, 3, padding="same", dtype=dtype), layers.BatchNormalization(dtype=dtype),
        layers.ReLU(dtype=dtype), layers.MaxPooling2D(dtype=dtype), layers.Flatten(dtype=dtype),
        layers.Dense(n_way, dtype=dtype)])
    return nets.KerasBackbone(model, **batch_norm)


def random_batch(config: LearnerConfig, tasks: int = 2, k_shot: int = 2, n_query: int = 2,
                 seed: int = 0):
    """A meta-batch of random images with class-major labels."""
    rng = np.random.RandomState(seed)
    n, shape = config.n_way, config.image_shape
    support_y = np.tile(np.repeat(np.arange(n), k_shot), (tasks, 1)).astype(np.int32)
    query_y = np.tile(np.repeat(np.arange(n), n_query), (tasks, 1)).astype(np.int32)
    return (rng.randn(tasks, n * k_shot, *shape).astype(config.dtype), support_y,
            rng.randn(tasks, n * n_query, *shape).astype(config.dtype), query_y)


def meta_gradient(learner, batch, epoch: int = 0):
    """`(meta-loss, [meta-gradient per trainable variable])` as numpy, zeros where unconnected."""
    with tf.GradientTape() as tape:
        loss = learner.meta_loss(batch, epoch)
    grads = tape.gradient(loss, learner.trainable_variables,
                          unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return loss.numpy(), [g.numpy() for g in grads]


def directional_fd(learner, batch, epoch, direction, h=1e-5):
    """Central difference of the meta-loss along `direction` (one array per variable)."""
    variables = learner.trainable_variables
    original = [v.numpy() for v in variables]

    def loss_at(scale):
        for v, x, d in zip(variables, original, direction):
            v.assign(x + scale * d)
        return learner.meta_loss(batch, epoch).numpy()

    value = (loss_at(h) - loss_at(-h)) / (2 * h)
    for v, x in zip(variables, original):
        v.assign(x)
    return value


def relative_error(a, b):
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def assert_random_directions_match_fd(learner, batch, epoch, grads, trials, seed):
    """The meta-gradient `grads` along `trials` random directions vs finite differences."""
    rng = np.random.RandomState(seed)
    for trial in range(trials):
        direction = [rng.randn(*g.shape) for g in grads]
        analytic = sum(np.sum(g * d) for g, d in zip(grads, direction))
        numeric = directional_fd(learner, batch, epoch, direction)
        assert relative_error(analytic, numeric) < 1e-5, (trial, analytic, numeric)
    return rng


def hand_unrolled_meta_loss(net, weights, rates, batch, msl_weights):
    """MAML++'s meta-loss written out with raw TF ops around a hand-written `net`.

    Args:
      net: `net(x, w, step, support)`: logits of images `x` under weights `w`
        at batch-norm row `step`; `support` is the task's support set on query
        passes (for statistics taken from it) and None on support passes.
      weights: Initial fast weights by name.
      rates: Inner learning rates `[steps]` by name.
      batch: A meta-batch of tensors.
      msl_weights: Per-step query-loss weights (one per inner step).

    Returns:
      The mean over tasks of `Σ_i msl_weights[i] · L_query(θ_{i+1})`.
    """

    def ce(y, logits):
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))

    losses = []
    for t in range(batch[0].shape[0]):
        w = dict(weights)
        total = 0.0
        for step, weight in enumerate(msl_weights):
            with tf.GradientTape() as tape:
                tape.watch(list(w.values()))
                support_loss = ce(batch[1][t], net(batch[0][t], w, step, None))
            g = tape.gradient(support_loss, w)
            w = {k: w[k] - rates[k][step] * g[k] for k in w}
            total += weight * ce(batch[3][t], net(batch[2][t], w, step, batch[0][t]))
        losses.append(total)
    return tf.add_n(losses) / len(losses)


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A two-epoch synthetic run that trains, validates, checkpoints and tests in seconds.
TINY = [
    "--dataset=synthetic", "--n_way=3", "--k_shot=1", "--n_query=2", "--meta_batch_size=2",
    "--num_filters=4", "--num_stages=2", "--inner_steps=2", "--eval_inner_steps=2",
    "--msl_epochs=1", "--epochs=2", "--iterations_per_epoch=8", "--val_tasks=4",
    "--test_tasks=6", "--ensemble_top_k=2", "--checkpoint_every=3", "--task_impl=loop",
    "--meta_lr=0.003", "--min_meta_lr=0.001", "--log_every=2",
]


def run_job(model_dir, *extra, module="mamlpp_tf.train", wait=True, env=None, fault=()):
    """Runs an entry point on the TINY synthetic config; returns (code, stdout, stderr).

    `fault`: the arguments of tests/fault_injection.py (e.g. `("nan", "5")`),
    which runs the training job with that fault injected.
    """
    if fault:
        command = [sys.executable, os.path.join(ROOT, "tests", "fault_injection.py"), *fault]
    else:
        command = [sys.executable, "-m", module]
    command.append(f"--model_dir={model_dir}")
    command += ([] if module != "mamlpp_tf.train" else TINY) + list(extra)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    if not wait:
        return process
    stdout, stderr = process.communicate(timeout=600)
    return process.returncode, stdout, stderr


def comparable_results(model_dir):
    """A run's results.json without what legitimately differs between runs.

    Wall time differs, and so does the run directory recorded in the config.
    """
    with open(os.path.join(model_dir, "results.json")) as f:
        results = json.load(f)
    results["config"]["model_dir"] = None
    return {k: v for k, v in results.items() if k != "wall_time_s"}


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """One uninterrupted TINY run, the reference for resume and fault tests."""
    model_dir = str(tmp_path_factory.mktemp("run"))
    code, stdout, stderr = run_job(model_dir)
    assert code == 0, stderr[-3000:]
    return model_dir, stdout


@pytest.fixture(scope="session")
def tasknorm_run(tmp_path_factory):
    """The TINY run with TaskNorm-I batch norm (non-transductive), task-batched."""
    model_dir = str(tmp_path_factory.mktemp("tasknorm"))
    code, stdout, stderr = run_job(model_dir, "--bn_stats=tasknorm", "--task_impl=batched")
    assert code == 0, stderr[-3000:]
    return model_dir, stdout
