"""Builds the task-model and meta-model SavedModels, written as TF Serving versions.

Both are written with `keras.export.ExportArchive` around the library's own
layers, so the served graphs run exactly the code that trained and evaluated
the model (the backbone's `forward`, `MamlPlusPlus.adapt`/`predict`), and the
TF1-style loader of TF Serving and `saved_model_cli` finds their variables (a
`tf.Module` holding Keras 3 layers reloads in Python only).

* **Task model**: the run's network adapted to one support set, as a plain
  classifier (`mamlpp_tf.task_model`): adapted weights, the last inner step's
  batch-norm variables and fixed normalisation statistics, so every image is
  classified on its own: alone or in a batch, the answer is the same. For
  `--bn_stats=support|tasknorm|rn` runs that is exactly the computation
  the run was scored with; for `--bn_stats=batch` runs the support set's
  statistics stand in for the query batch's (the run's `served_accuracy`
  measures the difference).
* **Meta-model**: `learner.adapt` + `learner.predict` inside the graph for
  every request, i.e. the per-task logits of `Trainer.eval_step`. Under
  `--bn_stats=support|tasknorm|rn` a query's answer does not depend on the
  other queries of the request; under `batch` (the transductive official
  protocol) the queries of a request are normalised together, so send a
  task's queries in one request. Its inputs have a leading task axis, so TF
  Serving's request batching can merge concurrent requests; every task is
  adapted on its own.

Every version holds TF Serving's warm-up file (`mamlpp_tf_export.warmup`): requests of
the model's real shapes for each signature, which the server replays when it
loads the version, so that no client request pays a signature's first run.
Writing it needs the protos of tensorflow-serving-api (a dependency of the
package); without them an export fails with an ImportError naming the install
command and writes nothing.

Versions: `<export_dir>/<n>/` with `n` one above the largest existing
version. The SavedModel is written to a hidden temporary folder inside
`export_dir` (TF Serving only watches numeric names) and published at the
end with `mamlpp_tf.files.publish_dir`: one rename on local disk; on GCS
(`export_dir` may be any `tf.io.gfile` path) file by file, `saved_model.pb`
last. An existing version is never overwritten, and a failure leaves no
folder.
"""

from __future__ import annotations

from collections.abc import Sequence
import contextlib
import os
import uuid

import keras
import numpy as np
import tensorflow as tf

from mamlpp_tf import files, task_model
from mamlpp_tf.config import RunConfig
from mamlpp_tf.learner import MamlPlusPlus
from mamlpp_tf.nets import Backbone
from mamlpp_tf.training.run import Run
from mamlpp_tf_export.preprocessing import Preprocessing
from mamlpp_tf_export.support import load_support
from mamlpp_tf_export.warmup import (
    TASK_WARMUP_BATCH_SIZES,
    WARMUP_PATH,
    WarmupRequest,
    meta_warmup,
    task_warmup,
    write_warmup,
)

# Written beside the SavedModel; TF Serving ignores assets.extra/ except warm-up files.
INFO_PATH = os.path.join("assets.extra", "export_info.json")


def read_info(version_dir: str) -> dict:
    """The export information (`INFO_PATH`) of a version folder.

    Raises:
      ValueError: `version_dir` holds none: it is no version folder of an export.
    """
    try:
        return files.read_json(os.path.join(version_dir, INFO_PATH))
    except (tf.errors.NotFoundError, ValueError):
        raise ValueError(f"{version_dir} is no version folder of an export (no readable "
                         f"{INFO_PATH})") from None


def restore_learner(model_dir: str,
                    epoch: int | None = None) -> tuple[RunConfig, MamlPlusPlus, int]:
    """The run's learner with the weights of `epoch` (default: best validated one kept).

    Raises:
      FileNotFoundError: `model_dir` holds no run, no validated checkpoint, or
        not the checkpoint of `epoch`.
    """
    run = Run.from_dir(model_dir)
    if epoch is None:
        best = run.dir.best_epochs(1)
        if not best:
            raise FileNotFoundError(f"--model_dir={model_dir} has no validated epoch "
                                    "checkpoint yet; train at least one epoch first")
        epoch = best[0]
    run.restore_epoch(epoch)
    return run.config, run.learner, epoch


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


def task_archive(network: Backbone, class_names: tuple[str, ...],
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
    """The meta-model: adapts to each task's support set, classifies its queries.

    Every input has a leading task axis `T`: TF Serving's request batching
    concatenates concurrent requests along dimension 0 and needs every input
    of a signature to share it. Each task is adapted on its own, exactly
    `learner.predict(query, learner.adapt(support_x, support_y),
    support_x=support_x)`, whatever the other tasks of the batch:

    * `serving_default(support_images [T, N·K, H, W, C], support_labels
      [T, N·K], query_images [T, Q, H, W, C])`;
    * `predict_encoded(support_image_bytes [T, N·K], support_labels [T, N·K],
      query_image_bytes [T, Q])`: PNG/JPEG bytes of any size, preprocessed in
      the graph as training did.

    Both return `logits` and `probabilities` float32 `[T, Q, N]` and
    `class_ids` int32 `[T, Q]`. Any number of support images per class and of
    queries, the same in every task of a request; labels in `[0, N)`. Requests
    that break this are refused with InvalidArgument naming the input at
    fault. There is no signature without the task axis: with batching on, TF
    Serving would refuse it (support and queries differ in length) or, when
    they happen to match, concatenate two requests' support sets into one task.
    """
    config = learner.config
    image_shape = list(preprocessing.image_shape)

    def adapt_and_predict(task: tuple[tf.Tensor, tf.Tensor, tf.Tensor]) -> tf.Tensor:
        support_x, support_y, query_x = task
        params = learner.adapt(support_x, support_y)
        return learner.predict(query_x, params, support_x=support_x)

    def respond(support_images: tf.Tensor, support_labels: tf.Tensor,
                query_images: tf.Tensor) -> dict[str, tf.Tensor]:
        support_images = _checked(support_images, [None, None, *image_shape])
        query_images = _checked(query_images, [None, None, *image_shape])
        support_labels = _checked(support_labels, [None, None])
        checks = _task_checks(support_images, support_labels, query_images, config.n_way)
        with tf.control_dependencies(checks):
            # `identity` after the cast: a cast to the same dtype creates no op,
            # and the computation must not start before the checks have passed.
            tasks = (tf.identity(tf.cast(support_images, config.dtype)),
                     tf.identity(support_labels),
                     tf.identity(tf.cast(query_images, config.dtype)))
        # Tasks one after another (a while loop): each one's computation is the
        # library's single-task one, unchanged by what else the batch holds.
        logits = tf.map_fn(adapt_and_predict,
                           tasks,
                           fn_output_signature=tf.TensorSpec([None, config.n_way],
                                                             config.dtype))
        outputs = _outputs(logits)
        outputs["logits"] = tf.cast(logits, tf.float32)
        return outputs

    def predict_encoded(support_image_bytes: tf.Tensor, support_labels: tf.Tensor,
                        query_image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        return respond(_decode_tasks(preprocessing, support_image_bytes), support_labels,
                       _decode_tasks(preprocessing, query_image_bytes))

    archive = keras.export.ExportArchive()
    archive.track(learner.backbone)
    archive.track(learner.update_rule)
    signatures = _meta_signatures(image_shape)
    archive.add_endpoint("serving_default", respond, input_signature=signatures["images"])
    archive.add_endpoint("predict_encoded", predict_encoded,
                         input_signature=signatures["encoded"])
    return archive


def _meta_signatures(image_shape: list[int]) -> dict[str, list[tf.TensorSpec]]:
    """Input signatures of the meta-model: float images or encoded bytes, with labels."""
    labels = tf.TensorSpec([None, None], tf.int32, name="support_labels")
    images = [tf.TensorSpec([None, None, *image_shape], tf.float32, name=f"{role}_images")
              for role in ("support", "query")]
    encoded = [tf.TensorSpec([None, None], tf.string, name=f"{role}_image_bytes")
               for role in ("support", "query")]
    return dict(images=[images[0], labels, images[1]], encoded=[encoded[0], labels, encoded[1]])



def _task_checks(support_images: tf.Tensor, support_labels: tf.Tensor,
                 query_images: tf.Tensor, n_way: int) -> list[tf.Operation]:
    """Assertions that a meta-model request holds well-formed tasks.

    Each fails the request with InvalidArgument and a message naming the
    input at fault: lengths, task counts, an empty support or query set,
    labels outside `[0, n_way)`.
    """
    labels_shape = tf.shape(support_labels)
    return [
        tf.debugging.assert_equal(
            tf.shape(support_images)[:2],
            labels_shape,
            message="support_labels [T, N·K] and support_images "
            "[T, N·K, H, W, C] differ in length"),
        tf.debugging.assert_equal(
            tf.shape(query_images)[0],
            labels_shape[0],
            message="query_images and support_images differ in their number of "
            "tasks T"),
        tf.debugging.assert_positive(labels_shape[1], message="support set is empty"),
        tf.debugging.assert_positive(tf.shape(query_images)[1], message="query set is empty"),
        tf.debugging.assert_non_negative(support_labels,
                                         message="support_labels must be >= 0"),
        tf.debugging.assert_less(support_labels,
                                 n_way,
                                 message=f"support_labels must be < n_way = {n_way}"),
    ]


def _decode_tasks(preprocessing: Preprocessing, image_bytes: tf.Tensor) -> tf.Tensor:
    """Encoded images `[T, M]` (strings) as float32 images `[T, M, H, W, C]`."""
    image_bytes = _checked(image_bytes, [None, None])
    images = preprocessing.decode_batch(tf.reshape(image_bytes, [-1]))
    return tf.reshape(images, tf.concat([tf.shape(image_bytes),
                                         list(preprocessing.image_shape)], 0))

def next_version(export_dir: str) -> int:
    """One above the largest numeric version folder in `export_dir` (1 for none)."""
    names = tf.io.gfile.listdir(export_dir) if tf.io.gfile.isdir(export_dir) else []
    # GCS lists sub-directories with a trailing slash.
    versions = (n.rstrip("/") for n in names)
    return max((int(n) for n in versions if n.isascii() and n.isdigit()), default=0) + 1


def write_version(export_dir: str,
                  archive: keras.export.ExportArchive,
                  info: dict,
                  warmup: Sequence[WarmupRequest] = ()) -> str:
    """Writes `archive` as the next version of `export_dir`, with its extra files.

    `info` goes to `INFO_PATH`, and `warmup` (if any) to TF Serving's warm-up
    file `WARMUP_PATH` (see `write_warmup`), all in the hidden temporary
    folder that is published at the end, so a served version always has them.

    Args:
      export_dir: `BASE/NAME`; its base name is the warm-up requests' model name.
      archive: The SavedModel.
      info: JSON-serialisable description of the export.
      warmup: `(signature name, inputs)` pairs to replay when TF Serving loads
        the version; none writes no warm-up file.

    Returns:
      The new version folder.

    Raises:
      ValueError, ImportError: as `write_warmup` (nothing is written then).
      files.WriteError: the filesystem refused a write, naming `export_dir`
        (nothing is left).
    """
    with files.writing(export_dir):
        created = not tf.io.gfile.isdir(export_dir)
        tf.io.gfile.makedirs(export_dir)
        temporary = os.path.join(export_dir, f".tmp-{uuid.uuid4().hex}")
        try:
            tf.io.gfile.makedirs(os.path.join(temporary, "assets.extra"))
            if warmup:
                # First: a missing tensorflow-serving-api fails before the long write.
                write_warmup(os.path.join(temporary, WARMUP_PATH),
                             os.path.basename(os.path.normpath(export_dir)), warmup)
            archive.write_out(temporary, verbose=False)
            files.write_json(os.path.join(temporary, INFO_PATH), info)
            while True:
                final = os.path.join(export_dir, str(next_version(export_dir)))
                try:
                    # Fails if the folder exists: a concurrent export took that
                    # version, so take the next one. TF Serving loads a version
                    # once its saved_model.pb is there, so that file moves last.
                    files.publish_dir(temporary, final, "saved_model.pb")
                    return final
                except tf.errors.OpError:
                    if not tf.io.gfile.exists(final):
                        raise
        except BaseException:
            with contextlib.suppress(tf.errors.OpError):
                if tf.io.gfile.exists(temporary):
                    tf.io.gfile.rmtree(temporary)
                if created and not tf.io.gfile.listdir(export_dir):
                    tf.io.gfile.rmtree(export_dir)
            raise


def _info(kind: str, config: RunConfig, model_dir: str, epoch: int,
          preprocessing: Preprocessing, **extra) -> dict:
    return dict(model=kind,
                model_dir=os.path.abspath(model_dir),
                epoch=epoch,
                n_way=config.learner.n_way,
                image_shape=list(config.learner.image_shape),
                inner_steps=config.learner.eval_inner_steps,
                update_rule=config.learner.update_rule,
                adapt=config.learner.adapt,
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
      support: Support folder or `.npz` (see `mamlpp_tf_export.support`).
      export_dir: `BASE/NAME`; the model becomes `BASE/NAME/<version>/`.
      epoch: Checkpoint to adapt from; default the best validation epoch kept.
      bn_stats: One of `task_model.BN_STATS`; default
        `task_model.default_bn_stats` of the run.

    Returns:
      The version folder written.

    Raises:
      ValueError, FileNotFoundError: a bad run, support set or option (nothing
        is written then).
      ImportError: tensorflow-serving-api (for the warm-up records) is not
        installed; nothing is written.
    """
    config, learner, epoch = restore_learner(model_dir, epoch)
    bn_stats = bn_stats or task_model.default_bn_stats(config.learner)
    task_model.check_bn_stats(config.learner, bn_stats)
    preprocessing = Preprocessing.for_run(config)
    support_set = load_support(support, preprocessing, config.learner.n_way)
    network = task_model.task_network(learner, bn_stats, len(support_set.labels))
    task_model.bake_task(learner, network, tf.constant(support_set.images, config.learner.dtype),
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
    warmup = task_warmup(preprocessing, TASK_WARMUP_BATCH_SIZES)
    return write_version(export_dir, archive, info, warmup)


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
    warmup = meta_warmup(preprocessing, config.learner.n_way, config.k_shot,
                         config.n_query)
    return write_version(export_dir, meta_archive(learner, preprocessing), info, warmup)
