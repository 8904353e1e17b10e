"""Builds the task-model and meta-model SavedModels, written as TF Serving versions.

Both are written with `keras.export.ExportArchive` around the library's own
layers, so the served graphs run exactly the code that trained and evaluated
the model (`VGGBackbone.forward`, `MamlPlusPlus.adapt`/`predict`), and the
TF1-style loader of TF Serving and `saved_model_cli` finds their variables (a
`tf.Module` holding Keras 3 layers reloads in Python only).

* **Task model**: the run's network adapted to one support set, as a plain
  classifier. It is a one-step copy of the network (`task_network`) holding the
  adapted weights, the batch-norm gamma/beta of the last inner step and fixed
  normalisation statistics (`bake_task`), evaluated with the `running`
  policy, so every image is classified on its own: alone or in a batch, the
  answer is the same. The statistics (`bn_stats`):
    - `"support"` (default for `bn_stats=batch` runs): the batch statistics of
      the support set through the adapted weights at the last step's
      batch-norm row. The training-time protocol normalises the query batch
      with its own statistics; the support set is the only sample of the
      task's N classes known at export time, class-balanced like a query
      batch, so its statistics are the export-time estimate of what the query
      batch would give. On the support images the task model reproduces
      `learner.predict(support, learner.adapt(support))` exactly.
    - `"running"` (default for `bn_stats=running` runs): the per-step running
      statistics of the last step, i.e. exactly `learner.predict` of such a run.
* **Meta-model**: `learner.adapt` + `learner.predict` inside the graph for
  every request, i.e. the per-task logits of `learner.eval_step` (for
  `bn_stats=batch` runs that is the transductive training-time protocol: the
  query batch is normalised with its own statistics, so send a task's queries
  together).

Versions: `<export_dir>/<n>/` with `n` one above the largest existing
version. The SavedModel is written to a hidden temporary folder inside
`export_dir` (TF Serving only watches numeric names) and renamed at the end;
an existing version is never overwritten, and a failure leaves no folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid

import keras
import numpy as np
import tensorflow as tf

from export.preprocessing import Preprocessing
from export.support import load_support
from mamlpp_tf import experiment
from mamlpp_tf import runs
from mamlpp_tf.backbone import VGGBackbone
from mamlpp_tf.config import LearnerConfig, RunConfig
from mamlpp_tf.learner import MamlPlusPlus

BN_STATS = ("support", "running")
# Written beside the SavedModel; TF Serving ignores assets.extra/ except warm-up files.
INFO_PATH = os.path.join("assets.extra", "export_info.json")


def restore_learner(model_dir: str,
                    epoch: int | None = None) -> tuple[RunConfig, MamlPlusPlus, int]:
    """The run's learner with the weights of `epoch` (default: best validated one kept).

    Raises:
      FileNotFoundError: `model_dir` holds no run, no validated checkpoint, or
        not the checkpoint of `epoch`.
    """
    run = runs.RunDir(model_dir)
    config = run.read_config()
    if epoch is None:
        kept = set(run.kept_epochs())
        history = [entry for entry in run.read_history() if entry["epoch"] in kept]
        if not history:
            raise FileNotFoundError(f"--model_dir={model_dir} has no validated epoch "
                                    "checkpoint yet; train at least one epoch first")
        epoch = runs.top_epochs(history, 1)[0]
    learner = experiment.build_learner(config)
    run.restore_epoch(learner, epoch)
    return config, learner, epoch


def default_bn_stats(config: LearnerConfig) -> str:
    """The task model's statistics for a run: its own policy's evaluation statistics."""
    return "running" if config.bn_stats == "running" else "support"


def task_network(learner: MamlPlusPlus) -> VGGBackbone:
    """A one-step copy of the learner's network, normalising with stored statistics."""
    config, backbone = learner.config, learner.backbone
    return VGGBackbone(n_way=config.n_way,
                       image_shape=config.image_shape,
                       num_filters=config.num_filters,
                       num_stages=config.num_stages,
                       max_pooling=config.max_pooling,
                       num_steps=1,
                       per_step_bn=True,
                       bn_policy="running",
                       pool_impl=backbone.pool_impl,
                       dtype=config.dtype,
                       name="task_network")


def bake_task(learner: MamlPlusPlus, network: VGGBackbone, support_x: tf.Tensor,
              support_y: tf.Tensor, bn_stats: str) -> None:
    """Adapts to a support set and stores the result in `network` (a `task_network`).

    Works eagerly and inside a `tf.function`. `network.forward(x,
    network.initial_params(), 0, False)` then gives the task model's logits.

    Args:
      learner: The meta-trained learner (left unchanged).
      network: Receives the adapted weights, the last step's gamma/beta and
        the fixed statistics.
      support_x: Support images `[n, H, W, C]` in the learner's dtype.
      support_y: Labels `[n]` in `[0, n_way)`.
      bn_stats: One of `BN_STATS` (see the module docstring).

    Raises:
      ValueError: unknown `bn_stats`, or `"running"` for a network without
        per-step running statistics.
    """
    check_bn_stats(learner.config, bn_stats)
    step = learner.config.eval_inner_steps - 1
    params = learner.adapt(support_x, support_y)
    if bn_stats == "support":
        # training=True: batch statistics in every layer, whatever the policy.
        _, moments = learner.backbone.forward(support_x, params, step, True)
        statistics = [(m.mean, m.variance) for m in moments]
    else:
        statistics = [(tf.convert_to_tensor(norm.running_mean)[step],
                       tf.convert_to_tensor(norm.running_var)[step])
                      for norm in learner.backbone.norms]
    for name, value in params.items():
        network.weights_by_name[name].assign(value)
    for source, target, (mean, variance) in zip(learner.backbone.norms, network.norms,
                                                statistics):
        rows = ((target.gamma, source.gamma), (target.beta, source.beta))
        for variable, value in rows:
            value = tf.convert_to_tensor(value)
            variable.assign((value[step] if source.per_step else value)[None])
        target.running_mean.assign(mean[None])
        target.running_var.assign(variance[None])


def check_bn_stats(config: LearnerConfig, bn_stats: str) -> None:
    """Raises `ValueError` unless `bn_stats` is usable with the run's network."""
    if bn_stats not in BN_STATS:
        raise ValueError(f"--bn_stats={bn_stats!r} must be one of {BN_STATS}")
    if bn_stats == "running" and not config.per_step_bn:
        raise ValueError("--bn_stats=running needs a run with --per_step_bn: shared "
                         "batch norm (plain MAML) keeps no running statistics")


def _checked(tensor: tf.Tensor, shape: list[int | None]) -> tf.Tensor:
    """`tensor` with its shape checked when the request runs.

    TF Serving does not check a request's shapes against the signature, and an
    image of the wrong rank that reaches a oneDNN convolution aborts the whole
    process (a failed CHECK); `EnsureShape` answers InvalidArgument naming both
    shapes instead.
    """
    return tf.ensure_shape(tensor, shape)


def _outputs(logits: tf.Tensor) -> dict[str, tf.Tensor]:
    logits = tf.cast(logits, tf.float32)
    return dict(probabilities=tf.nn.softmax(logits),
                class_ids=tf.argmax(logits, axis=-1, output_type=tf.int32))


def task_archive(network: VGGBackbone, class_names: tuple[str, ...],
                 preprocessing: Preprocessing) -> keras.export.ExportArchive:
    """The task model: `serving_default(images)` and `predict_encoded(image_bytes)`.

    Both return `probabilities` float32 `[B, N]`, `class_ids` int32 `[B]` and
    `class_names` string `[B]`.
    """
    shape = [None, *preprocessing.image_shape]

    def classify(images: tf.Tensor) -> dict[str, tf.Tensor]:
        images = tf.cast(_checked(images, shape), network.compute_dtype)
        logits, _ = network.forward(images, network.initial_params(), 0, False)
        outputs = _outputs(logits)
        outputs["class_names"] = tf.gather(tf.constant(list(class_names)),
                                           outputs["class_ids"])
        return outputs

    def predict_encoded(image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        return classify(preprocessing.decode_batch(_checked(image_bytes, [None])))

    archive = keras.export.ExportArchive()
    archive.track(network)
    archive.add_endpoint(
        "serving_default",
        classify,
        input_signature=[tf.TensorSpec(shape, tf.float32, name="images")])
    archive.add_endpoint(
        "predict_encoded",
        predict_encoded,
        input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    return archive


def meta_archive(learner: MamlPlusPlus,
                 preprocessing: Preprocessing) -> keras.export.ExportArchive:
    """The meta-model: adapts to the request's support set, classifies its queries.

    `serving_default(support_images, support_labels, query_images)` and
    `predict_encoded(support_image_bytes, support_labels, query_image_bytes)`
    return `logits` and `probabilities` float32 `[Q, N]` and `class_ids` int32
    `[Q]`. Any number of support images per class and of queries; labels in
    `[0, N)`.
    """
    config = learner.config
    shape = [None, *preprocessing.image_shape]

    def respond(support_images: tf.Tensor, support_labels: tf.Tensor,
                query_images: tf.Tensor) -> dict[str, tf.Tensor]:
        support_images = _checked(support_images, shape)
        query_images = _checked(query_images, shape)
        support_labels = _checked(support_labels, [None])
        count = tf.shape(support_labels)[0]
        checks = [
            tf.debugging.assert_positive(count, message="support set is empty"),
            tf.debugging.assert_equal(
                count,
                tf.shape(support_images)[0],
                message="support_labels and support_images differ in length"),
            tf.debugging.assert_non_negative(support_labels,
                                             message="support_labels must be >= 0"),
            tf.debugging.assert_less(
                support_labels,
                config.n_way,
                message=f"support_labels must be < n_way = {config.n_way}"),
        ]
        with tf.control_dependencies(checks):
            support_images = tf.cast(support_images, config.dtype)
        params = learner.adapt(support_images, support_labels)
        logits = learner.predict(tf.cast(query_images, config.dtype), params)
        outputs = _outputs(logits)
        outputs["logits"] = tf.cast(logits, tf.float32)
        return outputs

    def predict_encoded(support_image_bytes, support_labels, query_image_bytes):
        return respond(
            preprocessing.decode_batch(_checked(support_image_bytes, [None])),
            support_labels,
            preprocessing.decode_batch(_checked(query_image_bytes, [None])))

    images = [
        tf.TensorSpec(shape, tf.float32, name=f"{role}_images")
        for role in ("support", "query")
    ]
    encoded = [
        tf.TensorSpec([None], tf.string, name=f"{role}_image_bytes")
        for role in ("support", "query")
    ]
    labels = tf.TensorSpec([None], tf.int32, name="support_labels")
    archive = keras.export.ExportArchive()
    archive.track(learner.backbone)
    archive.track(learner.lslr)
    archive.add_endpoint("serving_default",
                         respond,
                         input_signature=[images[0], labels, images[1]])
    archive.add_endpoint("predict_encoded",
                         predict_encoded,
                         input_signature=[encoded[0], labels, encoded[1]])
    return archive


def next_version(export_dir: str) -> int:
    """One above the largest numeric version folder in `export_dir` (1 for none)."""
    names = os.listdir(export_dir) if os.path.isdir(export_dir) else []
    return max((int(n) for n in names if n.isascii() and n.isdigit()), default=0) + 1


def write_version(export_dir: str, archive: keras.export.ExportArchive,
                  info: dict) -> str:
    """Writes `archive` (and `info` as `INFO_PATH`) as the next version of `export_dir`.

    Returns:
      The new version folder.
    """
    created = not os.path.isdir(export_dir)
    os.makedirs(export_dir, exist_ok=True)
    temporary = os.path.join(export_dir, f".tmp-{uuid.uuid4().hex}")
    os.mkdir(temporary)
    try:
        archive.write_out(temporary, verbose=False)
        os.makedirs(os.path.dirname(os.path.join(temporary, INFO_PATH)), exist_ok=True)
        with open(os.path.join(temporary, INFO_PATH), "w") as stream:
            json.dump(info, stream, indent=2, sort_keys=True)
        while True:
            final = os.path.join(export_dir, str(next_version(export_dir)))
            try:
                # Fails on a non-empty folder: a concurrent export took that
                # version, so take the next one.
                os.rename(temporary, final)
                return final
            except OSError:
                if not os.path.exists(final):
                    raise
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(export_dir)
        raise


def _info(kind: str, config: RunConfig, model_dir: str, epoch: int,
          preprocessing: Preprocessing, **extra) -> dict:
    return dict(model=kind,
                model_dir=os.path.abspath(model_dir),
                epoch=epoch,
                n_way=config.learner.n_way,
                image_shape=list(config.learner.image_shape),
                inner_steps=config.learner.eval_inner_steps,
                preprocessing=preprocessing.to_dict(),
                **extra)


def export_task_model(model_dir: str,
                      support: str,
                      export_dir: str,
                      epoch: int | None = None,
                      bn_stats: str | None = None) -> str:
    """Adapts the run's model to `support` and writes the task model.

    Args:
      model_dir: Run directory.
      support: Support folder or `.npz` (see `export.support`).
      export_dir: `BASE/NAME`; the model becomes `BASE/NAME/<version>/`.
      epoch: Checkpoint to adapt from; default the best validation epoch kept.
      bn_stats: One of `BN_STATS`; default `default_bn_stats` of the run.

    Returns:
      The version folder written.

    Raises:
      ValueError, FileNotFoundError: a bad run, support set or option (nothing
        is written then).
    """
    config, learner, epoch = restore_learner(model_dir, epoch)
    bn_stats = bn_stats or default_bn_stats(config.learner)
    preprocessing = Preprocessing.for_run(config)
    support_set = load_support(support, preprocessing, config.learner.n_way)
    network = task_network(learner)
    bake_task(learner, network, tf.constant(support_set.images, config.learner.dtype),
              tf.constant(support_set.labels), bn_stats)
    archive = task_archive(network, support_set.class_names, preprocessing)
    info = _info("task",
                 config,
                 model_dir,
                 epoch,
                 preprocessing,
                 bn_stats=bn_stats,
                 class_names=list(support_set.class_names),
                 support=os.path.abspath(support),
                 support_per_class=np.bincount(support_set.labels).tolist())
    return write_version(export_dir, archive, info)


def export_meta_model(model_dir: str, export_dir: str, epoch: int | None = None) -> str:
    """Writes the run's meta-model (adaptation per request) as the next version.

    Args and raises as `export_task_model`, without the support set.
    """
    config, learner, epoch = restore_learner(model_dir, epoch)
    preprocessing = Preprocessing.for_run(config)
    info = _info("meta",
                 config,
                 model_dir,
                 epoch,
                 preprocessing,
                 bn_stats=config.learner.bn_stats)
    return write_version(export_dir, meta_archive(learner, preprocessing), info)
