"""Serving exports: task model and meta-model SavedModels, loaders, errors, client.

The run exported here is made in-process (random weights with distinct per-step
batch-norm rows and learning rates, no training): what is tested is that the
served graphs compute what the library computes, not that the model is good.
TF Serving itself is not installable here; `saved_model_cli run` and
`tf.compat.v1` sessions (the TF1 SavedModel loader TF Serving uses) and
in-process stand-ins for its REST and gRPC front ends are the loader checks.
"""

import base64
import concurrent.futures
import http.server
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import types

from google.protobuf import (
    descriptor_pb2,
    descriptor_pool,
    message_factory,
    text_format,
    wrappers_pb2,
)
import grpc
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

try:
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2, prediction_service_pb2_grpc
    from tensorflow_serving.config import model_server_config_pb2
except ImportError:  # Optional: the exports' warm-up records and gRPC need it.
    predict_pb2 = prediction_log_pb2 = None
    prediction_service_pb2_grpc = model_server_config_pb2 = None

from mamlpp_tf import task_model
from mamlpp_tf.config import LearnerConfig, RunConfig
from mamlpp_tf.data import mini_imagenet, omniglot, synthetic
from mamlpp_tf.training.run import Run
from mamlpp_tf.training.run_dir import RunDir
from mamlpp_tf.training.trainer import Trainer
from mamlpp_tf_export import preprocessing, saved_models, serving_requests, warmup
from mamlpp_tf_export.inputs import image_files, model_inputs
from mamlpp_tf_export.support import class_folders, load_support

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVING = os.path.join(ROOT, "export", "serving")
FIXTURES = os.path.join(ROOT, "tests", "data", "fixtures")
# Created in this order; labels follow the sorted order.
CLASS_NAMES = ("zeta", "alpha", "mu", "beta", "omega")
SORTED_NAMES = sorted(CLASS_NAMES)
SHAPE = (28, 28, 1)
EPOCH = 3
needs_serving_api = pytest.mark.skipif(predict_pb2 is None,
                                       reason="tensorflow-serving-api is not installed "
                                       "(pip install tensorflow-serving-api)")


def make_run(model_dir: str, bn_stats: str = "batch", seed: int = 0) -> str:
    """A 5-way run directory with one validated checkpoint (epoch 3), random weights."""
    learner_config = LearnerConfig(n_way=5,
                                   image_shape=SHAPE,
                                   num_filters=8,
                                   num_stages=4,
                                   inner_steps=3,
                                   eval_inner_steps=2,
                                   bn_stats=bn_stats,
                                   task_impl="loop")
    config = RunConfig(learner=learner_config,
                       dataset="synthetic",
                       k_shot=1,
                       n_query=2,
                       meta_batch_size=2,
                       val_tasks=2,
                       test_tasks=2,
                       ensemble_top_k=1,
                       model_dir=model_dir)
    run = Run(config)
    run.dir.write_or_check_config(config)
    learner = run.learner
    rng = np.random.RandomState(seed)
    draws = dict(gamma=lambda shape: rng.uniform(0.5, 1.5, shape),
                 beta=lambda shape: rng.normal(0.0, 0.2, shape),
                 running_mean=lambda shape: rng.normal(0.0, 0.2, shape),
                 running_var=lambda shape: rng.uniform(0.5, 2.0, shape),
                 rate=lambda shape: rng.uniform(0.05, 0.3, shape))
    weights = learner.get_weights()
    for name, value in weights.items():
        kind = "rate" if name.startswith("lslr/") else name.rsplit("/", 1)[1]
        if kind in draws:
            weights[name] = draws[kind](value.shape)
    learner.set_weights(weights)
    run.save_epoch(EPOCH)
    run.dir.write_history([{"epoch": EPOCH, "accuracy": 0.5, "loss": 1.0, "ci95": 0.1}])
    return model_dir


def write_png(path: str, image: np.ndarray, size: int | None = None) -> None:
    """Saves a [H, W, 1] image in [0, 1] as an 8-bit PNG, optionally resized."""
    picture = Image.fromarray(np.round(image[..., 0] * 255).astype(np.uint8))
    if size is not None:
        picture = picture.resize((size, size), Image.NEAREST)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    picture.save(path)


def glyph_images(per_class: int, seed: int) -> np.ndarray:
    """Synthetic glyphs `[5, per_class, 28, 28, 1]`."""
    return synthetic.glyphs(5, per_class, SHAPE, np.random.default_rng(seed))


# TensorFlow's start-up lines (C++ log lines, CPU and CUDA notices).
TF_START_UP = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d|absl::InitializeLog|oneDNN|"
                         r"This TensorFlow binary|(?i:cuda)", re.MULTILINE)


def user_env(**variables: str) -> dict[str, str]:
    """A user's environment: no TF_CPP_MIN_LOG_LEVEL (the tests' conftest sets one)."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return dict(env, **variables)


def start(command: list[str], cwd: str = ROOT,
          env: dict[str, str] | None = None) -> subprocess.Popen:
    """Starts a command (several run at once on the 2-core CI machine)."""
    return subprocess.Popen(command,
                            cwd=cwd,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE,
                            text=True,
                            env=env or dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    """Waits for a started command: (exit code, stdout, stderr)."""
    stdout, stderr = process.communicate(timeout=300)
    return process.returncode, stdout, stderr


def run_command(command: list[str], cwd: str = ROOT) -> tuple[int, str, str]:
    return finish(start(command, cwd))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A run, a support folder, query images, and both models exported by their CLIs."""
    if predict_pb2 is None:
        pytest.skip("exports write warm-up records: they need tensorflow-serving-api "
                    "(pip install tensorflow-serving-api)")
    base = tmp_path_factory.mktemp("export")
    model_dir = make_run(str(base / "run"))
    images = glyph_images(4, seed=7)
    support_dir, query_files = str(base / "support"), []
    for c, name in enumerate(CLASS_NAMES):
        # Support images of two sizes: the folder may hold any size.
        write_png(os.path.join(support_dir, name, "a.png"), images[c, 0])
        write_png(os.path.join(support_dir, name, "b.png"), images[c, 1], size=61)
        for i in (2, 3):
            query_files.append(str(base / "query" / f"{name}_{i}.png"))
            write_png(query_files[-1], images[c, i])
    task_dir, meta_dir = str(base / "models" / "task"), str(base / "models" / "meta")
    # As a user runs them: TensorFlow's start-up lines are the exports' to hide.
    task = start([
        sys.executable, "-m", "mamlpp_tf_export.task_model", f"--model_dir={model_dir}",
        f"--support={support_dir}", f"--export_dir={task_dir}"
    ], env=user_env())
    meta = start([
        sys.executable, "-m", "mamlpp_tf_export.meta_model", f"--model_dir={model_dir}",
        f"--export_dir={meta_dir}"
    ], env=user_env())
    outcomes = {"task": finish(task), "meta": finish(meta)}
    for name, (code, _, stderr) in outcomes.items():
        assert code == 0, (name, stderr[-3000:])
    config, learner, epoch = saved_models.restore_learner(model_dir)
    prep = preprocessing.Preprocessing.for_run(config)
    return types.SimpleNamespace(base=base,
                                 model_dir=model_dir,
                                 support_dir=support_dir,
                                 query_files=query_files,
                                 task_dir=outcomes["task"][1].strip(),
                                 meta_dir=outcomes["meta"][1].strip(),
                                 stderr={name: outcome[2]
                                         for name, outcome in outcomes.items()},
                                 learner=learner,
                                 epoch=epoch,
                                 preprocessing=prep,
                                 support=load_support(support_dir, prep, 5),
                                 queries=np.stack(
                                     [prep.load_file(f) for f in query_files]))


def softmax(logits) -> np.ndarray:
    return tf.nn.softmax(logits).numpy()


def library_task_probabilities(learner, support, images) -> np.ndarray:
    """In-library adaptation to `support`, then `predict` on `images`."""
    params = learner.adapt(support.images, support.labels)
    return softmax(learner.predict(images, params))


def library_meta_logits(learner, support_x, support_y, query_x) -> np.ndarray:
    """One task as the library computes it: `predict` under `adapt`'s weights."""
    params = learner.adapt(support_x, support_y)
    return learner.predict(query_x, params, support_x=support_x).numpy()


def session_run(path: str,
                requests: list[tuple[str, dict]]) -> list[dict[str, np.ndarray]]:
    """Runs `(signature, inputs)` requests on a SavedModel as TF Serving does.

    TF Serving loads a version with the TF1 loader and answers with
    `Session.run` on the signature's tensors; so does this, in order.
    """
    graph = tf.Graph()
    with tf.compat.v1.Session(graph=graph) as session:
        with graph.as_default():
            signatures = tf.compat.v1.saved_model.loader.load(session, ["serve"],
                                                              path).signature_def
        answers = []
        for name, inputs in requests:
            fetches = {key: info.name for key, info in signatures[name].outputs.items()}
            feeds = {signatures[name].inputs[key].name: v for key, v in inputs.items()}
            answers.append(session.run(fetches, feeds))
        return answers


# --------------------------------------------------------------- task model


def test_clis_write_version_one_with_export_info(exported):
    for path, kind in ((exported.task_dir, "task"), (exported.meta_dir, "meta")):
        assert os.path.basename(path) == "1" and os.listdir(
            os.path.dirname(path)) == ["1"]
        with open(os.path.join(path, saved_models.INFO_PATH)) as stream:
            info = json.load(stream)
        assert info["model"] == kind and info["epoch"] == EPOCH and info["n_way"] == 5
    with open(os.path.join(exported.task_dir, saved_models.INFO_PATH)) as stream:
        info = json.load(stream)
    assert info["class_names"] == SORTED_NAMES and info["bn_stats"] == "support"
    assert info["support_per_class"] == [2] * 5


def test_exports_print_no_tensorflow_start_up_lines(exported):
    for name, stderr in exported.stderr.items():
        assert not TF_START_UP.search(stderr), (name, stderr[-3000:])


def test_tf_cpp_min_log_level_0_shows_tensorflow_start_up_lines():
    """A user's own TF_CPP_MIN_LOG_LEVEL wins: 0 asks for every line."""
    _, stdout, stderr = finish(start(
        [sys.executable, "-m", "mamlpp_tf_export.meta_model", "--help"],
        env=user_env(TF_CPP_MIN_LOG_LEVEL="0")))
    assert "--export_dir" in stdout and TF_START_UP.search(stderr), stderr[-3000:]


def test_task_model_equals_library_adaptation_and_names_classes(exported):
    model = tf.saved_model.load(exported.task_dir)
    serve = model.signatures["serving_default"]
    # Support statistics are fixed, so on the support images the task model is
    # exactly the library's transductive prediction on the support batch.
    expected = library_task_probabilities(exported.learner, exported.support,
                                          exported.support.images)
    out = serve(images=tf.constant(exported.support.images))
    np.testing.assert_allclose(out["probabilities"].numpy(), expected, atol=1e-5)
    names = [n.decode() for n in out["class_names"].numpy()]
    assert names == [SORTED_NAMES[i] for i in out["class_ids"].numpy()]
    assert (out["class_ids"].numpy() == np.argmax(expected, axis=1)).all()


def test_task_model_answers_an_image_alone_as_in_a_batch(exported):
    serve = tf.saved_model.load(exported.task_dir).signatures["serving_default"]
    batch = serve(images=tf.constant(exported.queries))["probabilities"].numpy()
    for i in (0, 5, 9):
        alone = serve(images=tf.constant(exported.queries[i:i + 1]))["probabilities"]
        np.testing.assert_allclose(alone.numpy()[0], batch[i], atol=1e-6)
    # Under query-batch statistics (the training-time protocol) it would not be.
    params = exported.learner.adapt(exported.support.images, exported.support.labels)
    transductive_alone = softmax(exported.learner.predict(exported.queries[:1], params))
    assert np.abs(transductive_alone[0] - batch[0]).max() > 1e-3


def test_task_model_encoded_signature_equals_float_signature(exported):
    model = tf.saved_model.load(exported.task_dir)
    floats = model.signatures["serving_default"](images=tf.constant(exported.queries))
    encoded = model.signatures["predict_encoded"](
        image_bytes=tf.constant(serving_requests.read_files(exported.query_files)))
    np.testing.assert_allclose(encoded["probabilities"].numpy(),
                               floats["probabilities"].numpy(),
                               atol=1e-6)
    assert (encoded["class_names"].numpy() == floats["class_names"].numpy()).all()


def test_npz_support_gives_the_folder_model_with_its_names(exported, tmp_path):
    names = ["a", "b", "c", "d", "e"]
    npz = str(tmp_path / "support.npz")
    np.savez(npz, x=exported.support.images, y=exported.support.labels, names=names)
    path = saved_models.export_task_model(exported.model_dir, npz,
                                          str(tmp_path / "models" / "task"))
    from_npz = tf.saved_model.load(path).signatures["serving_default"](
        images=tf.constant(exported.queries))
    from_folder = tf.saved_model.load(exported.task_dir).signatures["serving_default"](
        images=tf.constant(exported.queries))
    np.testing.assert_allclose(from_npz["probabilities"],
                               from_folder["probabilities"],
                               atol=1e-6)
    assert [n.decode() for n in from_npz["class_names"].numpy()
           ] == [names[i] for i in from_npz["class_ids"].numpy()]


@pytest.mark.parametrize("bn_stats", ["tasknorm", "rn"])
def test_blended_run_exports_models_that_answer_each_image_as_eval_step(
        tmp_path, exported, bn_stats):
    """Both exporters on a --bn_stats=tasknorm|rn run: one image at a time = the protocol."""
    model_dir = make_run(str(tmp_path / "run"), bn_stats=bn_stats, seed=2)
    config, learner, _ = saved_models.restore_learner(model_dir)
    rng = np.random.RandomState(3)
    weights = learner.get_weights()
    for name, value in weights.items():  # TaskNorm's blend away from α = 0.5.
        if name.endswith(("/alpha_scale", "/alpha_offset")):
            scale = 0.3 if name.endswith("/alpha_scale") else 1.0
            weights[name] = rng.normal(0.0, scale, value.shape)
    learner.set_weights(weights)
    RunDir(model_dir).save_epoch(learner.checkpoint_items(), EPOCH)
    task_path = saved_models.export_task_model(model_dir, exported.support_dir,
                                               str(tmp_path / "task"))
    meta_path = saved_models.export_meta_model(model_dir, str(tmp_path / "meta"))
    with open(os.path.join(task_path, saved_models.INFO_PATH)) as stream:
        assert json.load(stream)["bn_stats"] == bn_stats
    support = exported.support
    queries = exported.queries.astype(np.float32)
    protocol = Trainer(learner).eval_step(
        (support.images[None], support.labels[None], queries[None],
         np.zeros((1, len(queries)), np.int32)))["logits"].numpy()[0]
    task = tf.saved_model.load(task_path).signatures["serving_default"]
    meta = tf.saved_model.load(meta_path).signatures["serving_default"]
    for q in range(len(queries)):
        alone = task(images=tf.constant(queries[q:q + 1]))["probabilities"].numpy()[0]
        np.testing.assert_allclose(alone, softmax(protocol[q]), atol=1e-5)
        logits = meta(support_images=tf.constant(support.images[None]),
                      support_labels=tf.constant(support.labels[None]),
                      query_images=tf.constant(queries[None, q:q + 1]))["logits"]
        logits = logits.numpy()[0, 0]
        np.testing.assert_allclose(logits, protocol[q], atol=1e-5)
    if bn_stats == "tasknorm":
        with pytest.raises(ValueError, match="tasknorm"):
            saved_models.export_task_model(model_dir, exported.support_dir,
                                           str(tmp_path / "other"), bn_stats="support")
        assert not os.path.exists(tmp_path / "other")


def test_rn_swap_of_a_batch_run_is_exported_with_its_statistics(tmp_path, exported):
    model_dir = make_run(str(tmp_path / "run"), seed=1)
    path = saved_models.export_task_model(model_dir, exported.support_dir,
                                          str(tmp_path / "models" / "task"), bn_stats="rn")
    with open(os.path.join(path, saved_models.INFO_PATH)) as stream:
        assert json.load(stream)["bn_stats"] == "rn"
    _, learner, _ = saved_models.restore_learner(model_dir)
    support, queries = exported.support, exported.queries.astype(np.float32)
    served = task_model.served_logits_fn(learner, "rn", len(support.images))
    expected = softmax(served(support.images, support.labels, queries).numpy())
    serve = tf.saved_model.load(path).signatures["serving_default"]
    np.testing.assert_allclose(serve(images=tf.constant(queries[3:4]))["probabilities"],
                               expected[3:4], atol=1e-5)
    with pytest.raises(ValueError, match="running"):
        saved_models.export_task_model(model_dir, exported.support_dir,
                                       str(tmp_path / "other"), bn_stats="running")
    assert not os.path.exists(tmp_path / "other")


# --------------------------------------------------------------- meta-model


@pytest.mark.parametrize("k_shot,queries", [(1, 3), (5, 7), (2, 1)])
def test_meta_model_adapts_any_shot_and_query_count_like_the_library(
        exported, k_shot, queries):
    serve = tf.saved_model.load(exported.meta_dir).signatures["serving_default"]
    images = glyph_images(k_shot + 2, seed=k_shot)
    support_x = images[:, :k_shot].reshape(-1, *SHAPE)
    support_y = np.repeat(np.arange(5), k_shot).astype(np.int32)
    query_x = images[:, k_shot:].reshape(-1, *SHAPE)[:queries]
    out = serve(support_images=tf.constant(support_x[None]),
                support_labels=tf.constant(support_y[None]),
                query_images=tf.constant(query_x[None]))
    assert out["logits"].shape == (1, queries, 5)
    assert out["class_ids"].shape == (1, queries)
    expected = library_meta_logits(exported.learner, support_x, support_y, query_x)
    np.testing.assert_allclose(out["logits"].numpy()[0], expected, atol=1e-5)
    np.testing.assert_allclose(out["probabilities"].numpy()[0],
                               softmax(expected),
                               atol=1e-5)
    assert (out["class_ids"].numpy()[0] == expected.argmax(axis=1)).all()
    # adapt + predict is the per-task logits of eval_step (the evaluation protocol).
    batch = (support_x[None], support_y[None], query_x[None],
             np.zeros((1, queries), np.int32))
    np.testing.assert_allclose(Trainer(exported.learner).eval_step(batch)["logits"][0],
                               expected,
                               atol=1e-5)


def _tasks(count: int, seed: int) -> dict[str, np.ndarray]:
    """`count` 5-way 2-shot tasks with 5 queries, classes in a different order each."""
    rng = np.random.default_rng(seed)
    tasks = dict(support_images=[], support_labels=[], query_images=[])
    for t in range(count):
        images = glyph_images(3, seed=seed * 10 + t)
        order = rng.permutation(5)
        tasks["support_images"].append(images[order, :2].reshape(-1, *SHAPE))
        tasks["support_labels"].append(np.repeat(np.arange(5), 2).astype(np.int32))
        tasks["query_images"].append(images[rng.permutation(5), 2])
    return {name: np.stack(value) for name, value in tasks.items()}


def test_meta_model_answers_concatenated_requests_as_each_alone(exported):
    """TF Serving's batching concatenates requests along axis 0: each keeps its own."""
    serve = tf.saved_model.load(exported.meta_dir).signatures["serving_default"]
    first, second = _tasks(1, seed=1), _tasks(2, seed=2)
    alone = [serve(**{k: tf.constant(v) for k, v in request.items()})
             for request in (first, second)]
    tasks = {k: np.concatenate([first[k], second[k]]) for k in first}
    together = serve(**{k: tf.constant(v) for k, v in tasks.items()})
    for name in ("logits", "probabilities", "class_ids"):
        np.testing.assert_allclose(together[name].numpy(),
                                   np.concatenate([a[name].numpy() for a in alone]),
                                   rtol=0,
                                   atol=1e-6)
    for t in range(3):
        expected = library_meta_logits(exported.learner, tasks["support_images"][t],
                                       tasks["support_labels"][t],
                                       tasks["query_images"][t])
        np.testing.assert_allclose(together["logits"].numpy()[t], expected, atol=1e-5)
    # Distinct tasks, distinct answers: the test would see answers mixed up.
    logits = together["logits"].numpy()
    assert np.abs(logits[1] - logits[2]).max() > 1e-2


def test_meta_model_encoded_signature_equals_float_signature(exported):
    model = tf.saved_model.load(exported.meta_dir)
    # Two tasks: one 28x28 and one 61x61 support image per class.
    support_files = [[os.path.join(exported.support_dir, name, file)
                      for name in SORTED_NAMES]
                     for file in ("a.png", "b.png")]
    labels = tf.constant([np.arange(5), np.arange(5)[::-1]], tf.int32)
    queries = [exported.query_files[:4], exported.query_files[4:8]]
    floats = model.signatures["serving_default"](
        support_images=tf.constant([[exported.preprocessing.load_file(f) for f in files]
                                    for files in support_files]),
        support_labels=labels,
        query_images=tf.constant([[exported.preprocessing.load_file(f) for f in files]
                                  for files in queries]))
    encoded = model.signatures["predict_encoded"](
        support_image_bytes=tf.constant(
            np.stack([serving_requests.read_files(files) for files in support_files])),
        support_labels=labels,
        query_image_bytes=tf.constant(
            np.stack([serving_requests.read_files(files) for files in queries])))
    assert encoded["logits"].shape == (2, 4, 5)
    np.testing.assert_allclose(encoded["logits"].numpy(),
                               floats["logits"].numpy(),
                               atol=1e-6)


@pytest.mark.parametrize("labels,query_tasks,message", [
    ([[0, 1, 2, 3, 5]], 1, "support_labels must be < n_way = 5"),
    ([[0, 1, 2, 3, -1]], 1, "support_labels must be >= 0"),
    ([[0, 1, 2, 3]], 1, r"support_labels \[T, N·K\] and support_images .* differ in"),
    ([[0, 1, 2, 3, 4]], 2, "query_images and support_images differ in their number of"),
])
def test_meta_model_rejects_bad_requests(exported, labels, query_tasks, message):
    serve = tf.saved_model.load(exported.meta_dir).signatures["serving_default"]
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        serve(support_images=tf.constant(exported.queries[None, :5]),
              support_labels=tf.constant(labels, tf.int32),
              query_images=tf.constant(np.stack([exported.queries[:2]] * query_tasks)))


def test_meta_model_refuses_an_empty_support_set(exported):
    serve = tf.saved_model.load(exported.meta_dir).signatures["serving_default"]
    with pytest.raises(tf.errors.InvalidArgumentError, match="support set is empty"):
        serve(support_images=tf.zeros([1, 0, *SHAPE]),
              support_labels=tf.zeros([1, 0], tf.int32),
              query_images=tf.constant(exported.queries[None, :2]))


def test_meta_model_refuses_an_empty_query_set(exported):
    serve = tf.saved_model.load(exported.meta_dir).signatures["serving_default"]
    with pytest.raises(tf.errors.InvalidArgumentError, match="query set is empty"):
        serve(support_images=tf.constant(exported.queries[None, :5]),
              support_labels=tf.constant([[0, 1, 2, 3, 4]], tf.int32),
              query_images=tf.zeros([1, 0, *SHAPE]))


def test_every_signature_is_batchable_along_its_first_axis(exported):
    """With batching on, TF Serving batches every signature of a model.

    So every input and output needs a free leading dimension (images, or tasks)
    that all of them share; the concatenation tests check that it is shared.
    """
    for path in (exported.task_dir, exported.meta_dir):
        signatures = tf.saved_model.load(path).signatures
        assert set(signatures) == {"serving_default", "predict_encoded"}
        for function in signatures.values():
            specs = [*function.structured_input_signature[1].values(),
                     *function.structured_outputs.values()]
            assert all(spec.shape.rank >= 1 and spec.shape[0] is None for spec in specs)


# ------------------------------------------------------------------ loaders

FRESH_PROCESS = r"""
import sys
# Unimportable even where the package is installed: the models must not need it.
sys.modules["mamlpp_tf"] = None
sys.modules["mamlpp_tf_export"] = None
import numpy as np
import tensorflow as tf

task_dir, meta_dir, io = sys.argv[1:]
task = tf.saved_model.load(task_dir).signatures["serving_default"]
meta = tf.saved_model.load(meta_dir).signatures["serving_default"]
np.save(f"{io}/task_probabilities.npy",
        task(images=tf.constant(np.load(f"{io}/images.npy")))["probabilities"].numpy())
np.save(f"{io}/meta_logits.npy", meta(
    support_images=tf.constant(np.load(f"{io}/support_images.npy")),
    support_labels=tf.constant(np.load(f"{io}/support_labels.npy")),
    query_images=tf.constant(np.load(f"{io}/query_images.npy")))["logits"].numpy()[0])
try:
    import mamlpp_tf
except ImportError:
    print("mamlpp_tf not importable")
# Wrong image rank: TF Serving does not check request shapes, so the graph must
# (a wrong-rank image reaching a oneDNN convolution aborts the process).
bad = tf.zeros([2, 28, 28])
for name, call in (("task", lambda: task(images=bad)), ("meta", lambda: meta(
        support_images=tf.zeros([1, 5, 28, 28, 1]), support_labels=tf.range(5)[None],
        query_images=bad[None]))):
    try:
        call()
    except tf.errors.InvalidArgumentError as error:
        print(name, "refused:", " ".join(error.message.split()))
"""


@pytest.fixture
def requests_on_disk(exported, tmp_path):
    """Inputs of both models as .npy files, and the library's outputs for them."""
    learner, support = exported.learner, exported.support
    # The task model is compared on the support images, where the library's
    # prediction uses the statistics the task model fixed (see above). The
    # meta-model's inputs carry its task axis (one task).
    arrays = dict(images=support.images,
                  support_images=support.images[None],
                  support_labels=support.labels[None],
                  query_images=exported.queries[None, :4])
    for name, value in arrays.items():
        np.save(tmp_path / f"{name}.npy", value)
    expected = dict(
        task_probabilities=library_task_probabilities(learner, support, support.images),
        meta_logits=library_meta_logits(learner, support.images, support.labels,
                                        exported.queries[:4]))
    return tmp_path, expected


def test_both_models_run_in_a_fresh_process_that_cannot_import_the_package(
        exported, requests_on_disk, tmp_path_factory):
    io, expected = requests_on_disk
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    command = [
        sys.executable, "-I", "-c", FRESH_PROCESS, exported.task_dir, exported.meta_dir,
        str(io)
    ]
    code, stdout, stderr = run_command(command, cwd=str(elsewhere))
    assert code == 0, stderr[-3000:]
    assert "mamlpp_tf not importable" in stdout
    for name, got, expected_shape in (("task", r"\[2,28,28\]", r"\[\?,28,28,1\]"),
                                      ("meta", r"\[1,2,28,28\]", r"\[\?,\?,28,28,1\]")):
        assert re.search(
            rf"{name} refused: .*Shape of tensor .*{got} is not compatible "
            rf"with expected shape {expected_shape}", stdout), stdout
    for name, value in expected.items():
        np.testing.assert_allclose(np.load(io / f"{name}.npy"), value, atol=1e-5)


def test_saved_model_cli_runs_both_models(exported, requests_on_disk):
    io, expected = requests_on_disk
    cli = [
        sys.executable, "-m", "tensorflow.python.tools.saved_model_cli", "run",
        "--tag_set=serve", "--signature_def=serving_default"
    ]
    task = start(cli + [
        f"--dir={exported.task_dir}", f"--inputs=images={io}/images.npy",
        f"--outdir={io}/task"
    ])
    meta = start(cli + [
        f"--dir={exported.meta_dir}", f"--outdir={io}/meta",
        f"--inputs=support_images={io}/support_images.npy;"
        f"support_labels={io}/support_labels.npy;query_images={io}/query_images.npy"
    ])
    for process in (task, meta):
        code, stdout, stderr = finish(process)
        assert code == 0, stderr[-3000:]
        assert "Result for output key class_ids" in stdout
    np.testing.assert_allclose(np.load(io / "task" / "probabilities.npy"),
                               expected["task_probabilities"],
                               atol=1e-5)
    np.testing.assert_allclose(np.load(io / "meta" / "logits.npy")[0],
                               expected["meta_logits"],
                               atol=1e-5)


def test_npy_inputs_writes_what_saved_model_cli_runs_from_image_files(exported, tmp_path):
    """README's meta-model example: the .npy files from a support folder and query files."""
    out = tmp_path / "inputs"
    code, stdout, stderr = finish(start([
        sys.executable, "-m", "mamlpp_tf_export.npy_inputs",
        f"--saved_model={exported.meta_dir}", f"--support={exported.support_dir}",
        f"--query={','.join(exported.query_files[:4])}", f"--out={out}"
    ], env=user_env()))
    assert code == 0 and not TF_START_UP.search(stderr), stderr[-3000:]
    names = ("support_images", "support_labels", "query_images")
    assert stdout.strip() == ";".join(f"{name}={out / name}.npy" for name in names)
    code, _, stderr = run_command([
        sys.executable, "-m", "tensorflow.python.tools.saved_model_cli", "run",
        f"--dir={exported.meta_dir}", "--tag_set=serve", "--signature_def=serving_default",
        f"--inputs={stdout.strip()}", f"--outdir={tmp_path / 'outputs'}"
    ])
    assert code == 0, stderr[-3000:]
    support = exported.support
    np.testing.assert_allclose(np.load(tmp_path / "outputs" / "logits.npy")[0],
                               library_meta_logits(exported.learner, support.images,
                                                   support.labels, exported.queries[:4]),
                               atol=1e-5)


def test_npy_inputs_fit_each_models_signature(exported, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for file in exported.query_files[:3]:
        shutil.copy(file, folder)
    entries = [str(folder), exported.query_files[3]]  # A folder stands for its images.
    files = [str(folder / os.path.basename(f)) for f in sorted(exported.query_files[:3])]
    files.append(exported.query_files[3])
    assert image_files(entries) == files
    queries = np.stack([exported.preprocessing.load_file(file) for file in files])
    cases = {exported.task_dir: (model_inputs(exported.task_dir, images=entries),
                                 {"images": queries}),
             exported.meta_dir: (model_inputs(exported.meta_dir, support=exported.support_dir,
                                              query=entries),
                                 {"support_images": exported.support.images[None],
                                  "support_labels": exported.support.labels[None],
                                  "query_images": queries[None]})}
    for path, (arrays, expected) in cases.items():
        specs = tf.saved_model.load(path).signatures["serving_default"]
        specs = specs.structured_input_signature[1]
        assert set(arrays) == set(specs) == set(expected)
        for name, value in arrays.items():
            assert value.dtype == specs[name].dtype.as_numpy_dtype, (path, name)
            assert specs[name].shape.is_compatible_with(value.shape), (path, name)
            np.testing.assert_array_equal(value, expected[name])


def test_npy_inputs_name_what_does_not_fit(exported, tmp_path):
    meta, task = re.escape(exported.meta_dir), re.escape(exported.task_dir)
    with pytest.raises(ValueError, match=f"{meta} is a meta-model: it takes a support set"):
        model_inputs(exported.meta_dir, images=exported.query_files)
    with pytest.raises(ValueError, match=f"{task} is a task model: it takes the images"):
        model_inputs(exported.task_dir, support=exported.support_dir,
                     query=exported.query_files)
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path))} is no version folder"):
        model_inputs(str(tmp_path), images=exported.query_files)
    with pytest.raises(ValueError, match="missing.png does not exist"):
        image_files([str(tmp_path / "missing.png")])
    with pytest.raises(ValueError, match=f"folder {re.escape(str(tmp_path))} has no images"):
        image_files([str(tmp_path)])


# ------------------------------------------------------------------ warm-up


def warmup_requests(path: str) -> list[tuple[str, dict[str, np.ndarray]]]:
    """`(signature, inputs)` of each record of a version's TF Serving warm-up file."""
    requests = []
    for record in tf.data.TFRecordDataset(os.path.join(path, warmup.WARMUP_PATH)):
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        request = log.predict_log.request
        requests.append((request.model_spec.signature_name,
                         {k: tf.make_ndarray(v) for k, v in request.inputs.items()}))
    return requests


def _shapes(requests) -> list[tuple[str, dict[str, tuple]]]:
    return [(signature, {k: v.shape for k, v in inputs.items()})
            for signature, inputs in requests]


def test_every_export_writes_warm_up_requests_for_every_signature(exported):
    image = SHAPE
    # The task model's: both signatures at every batch size the batching
    # config allows. The meta-model's: one task of the run's episode shape
    # (5-way 1-shot, 2 queries per class).
    sizes = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
    assert warmup.TASK_WARMUP_BATCH_SIZES == sizes
    expected = {
        exported.task_dir: [(signature, {name: (size, *shape)})
                            for size in sizes
                            for signature, name, shape in (
                                ("serving_default", "images", image),
                                ("predict_encoded", "image_bytes", ()))],
        exported.meta_dir: [
            ("serving_default", {"support_images": (1, 5, *image),
                                 "support_labels": (1, 5),
                                 "query_images": (1, 10, *image)}),
            ("predict_encoded", {"support_image_bytes": (1, 5),
                                 "support_labels": (1, 5),
                                 "query_image_bytes": (1, 10)}),
        ],
    }
    for path, shapes in expected.items():
        records = list(
            tf.data.TFRecordDataset(os.path.join(path, warmup.WARMUP_PATH)))
        assert len(records) <= warmup.MAX_WARMUP_RECORDS
        logs = [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in records]
        # The model name is the export folder's (models/task, models/meta).
        assert {log.predict_log.request.model_spec.name for log in logs} == {
            os.path.basename(os.path.dirname(path))}
        requests = warmup_requests(path)
        assert _shapes(requests) == shapes
        assert {s for s, _ in requests} == set(tf.saved_model.load(path).signatures)
        for _, inputs in requests:
            for name, value in inputs.items():
                if name.endswith("_bytes"):  # Real PNGs of the model's size.
                    for png in value.reshape(-1):
                        assert png.startswith(b"\x89PNG\r\n\x1a\n")
                        assert tf.io.decode_png(png).shape == SHAPE
    _, meta_inputs = warmup_requests(exported.meta_dir)[0]
    assert meta_inputs["support_labels"].tolist() == [[0, 1, 2, 3, 4]]


def _float_images(prep: preprocessing.Preprocessing, inputs: dict,
                  name: str) -> np.ndarray:
    """A request's images `name` (e.g. `query_images`), decoding its `*_image_bytes`."""
    if name in inputs:
        return inputs[name]
    encoded = inputs[name[:-1] + "_bytes"]
    images = [prep.decode(tf.constant(png)).numpy() for png in encoded.reshape(-1)]
    return np.stack(images).reshape(*encoded.shape, *SHAPE)


def test_warm_up_requests_replay_through_the_tf1_loader_as_the_library(exported):
    """Replayed as TF Serving does (TF1 loader, Session.run): each answers right."""
    prep, learner, support = exported.preprocessing, exported.learner, exported.support
    requests = warmup_requests(exported.meta_dir)
    for (_, inputs), outputs in zip(requests, session_run(exported.meta_dir, requests)):
        support_x, query_x = (_float_images(prep, inputs, name)
                              for name in ("support_images", "query_images"))
        support_y = inputs["support_labels"]
        for t in range(len(support_x)):
            expected = library_meta_logits(learner, support_x[t], support_y[t],
                                           query_x[t])
            np.testing.assert_allclose(outputs["logits"][t], expected, atol=1e-5)
    served = task_model.served_logits_fn(learner, "support", len(support.labels))
    requests = warmup_requests(exported.task_dir)
    for (_, inputs), outputs in zip(requests, session_run(exported.task_dir, requests)):
        images = _float_images(prep, inputs, "images")
        expected = softmax(served(support.images, support.labels, images))
        np.testing.assert_allclose(outputs["probabilities"], expected, atol=1e-5)


def test_export_without_tensorflow_serving_api_names_the_install_command(
        exported, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_serving.apis.prediction_log_pb2", None)
    export_dir = tmp_path / "models" / "meta"
    with pytest.raises(ImportError,
                       match="warm-up records need tensorflow-serving-api: pip install "
                       "tensorflow-serving-api"):
        saved_models.export_meta_model(exported.model_dir, str(export_dir))
    assert not export_dir.exists()


@pytest.mark.parametrize("count", [0, warmup.MAX_WARMUP_RECORDS + 1])
def test_warm_up_files_hold_one_to_a_thousand_records(tmp_path, count):
    request = ("serving_default", {"images": np.zeros((1, *SHAPE), np.float32)})
    with pytest.raises(ValueError,
                       match=f"{count} warm-up requests: TF Serving takes 1 to 1000"):
        warmup.write_warmup(str(tmp_path / "warmup"), "task", [request] * count)
    assert not os.listdir(tmp_path)


# ---------------------------------------------------------- bad input, versions


def _unreadable_image(support, tmp):
    with open(os.path.join(support, "mu", "broken.png"), "wb") as stream:
        stream.write(b"not a png")
    return support, r"cannot read image .*mu/broken\.png"


def _class_without_images(support, tmp):
    for file in os.listdir(os.path.join(support, "beta")):
        os.rename(os.path.join(support, "beta", file),
                  os.path.join(support, "beta", file + ".txt"))
    return support, r"class 'beta' \(.*beta\) has no images"


def _too_few_classes(support, tmp):
    os.rename(os.path.join(support, "zeta"), os.path.join(tmp, "zeta"))
    return support, r"has 4 classes \(alpha, beta, mu, omega\) but the model is 5-way"


def _wrong_rank(support, tmp):
    path = os.path.join(tmp, "support.npz")
    np.savez(path, x=np.zeros((10, 28, 28), np.float32), y=np.repeat(np.arange(5), 2))
    return path, r"x has shape \(10, 28, 28\), the model takes images \[n, 28, 28, 1\]"


@pytest.mark.parametrize(
    "make_bad",
    [_unreadable_image, _class_without_images, _too_few_classes, _wrong_rank])
def test_bad_support_is_a_clear_error_and_writes_nothing(exported, tmp_path, make_bad):
    support = str(tmp_path / "support")
    shutil.copytree(exported.support_dir, support)
    support, message = make_bad(support, str(tmp_path))
    export_dir = tmp_path / "models" / "task"
    with pytest.raises(ValueError, match=message):
        saved_models.export_task_model(exported.model_dir, support, str(export_dir))
    assert not (tmp_path / "models").exists()


def test_cli_reports_bad_input_in_one_line(exported, tmp_path):
    support = str(tmp_path / "support")
    shutil.copytree(exported.support_dir, support)
    _unreadable_image(support, str(tmp_path))
    code, _, stderr = run_command([
        sys.executable, "-m", "mamlpp_tf_export.task_model", f"--model_dir={exported.model_dir}",
        f"--support={support}", f"--export_dir={tmp_path}/models/task"
    ])
    assert code == 2 and "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "broken.png" in errors[0]
    assert not (tmp_path / "models").exists()


def test_a_sigterm_inside_the_write_ends_the_export_in_one_line_leaving_nothing(
        exported, tmp_path):
    export_dir = tmp_path / "models" / "task"
    # `keras.export.ExportArchive()` builds a backend subclass: the SavedModel
    # write is the method of the base class below.
    code, _, stderr = run_command([
        sys.executable, os.path.join(ROOT, "tests", "fault_injection.py"), "sigterm",
        "keras.src.export.saved_model_export_archive:SavedModelExportArchive.write_out",
        "mamlpp_tf_export.task_model",
        f"--model_dir={exported.model_dir}", f"--support={exported.support_dir}",
        f"--export_dir={export_dir}"
    ])
    assert code == 128 + signal.SIGTERM and "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "during the export of a task model" in errors[0], stderr
    # The hidden temporary folder is gone, and so is the folder the export created.
    assert not (tmp_path / "models" / "task").exists()


class _Archive:
    """Stands in for an ExportArchive: writes a marker, or fails half-way."""

    def __init__(self, marker: str, fail: bool = False):
        self.marker, self.fail = marker, fail

    def write_out(self, path, verbose=True):
        del verbose
        with open(os.path.join(path, "saved_model.pb"), "w") as stream:
            stream.write(self.marker)
        if self.fail:
            raise OSError("disk full")


def test_versions_increment_and_never_overwrite(tmp_path):
    export_dir = str(tmp_path / "name")
    assert saved_models.write_version(export_dir, _Archive("a"), {}).endswith("/1")
    assert saved_models.write_version(export_dir, _Archive("b"), {}).endswith("/2")
    os.makedirs(os.path.join(export_dir, "7"))
    with open(os.path.join(export_dir, "7", "saved_model.pb"), "w") as stream:
        stream.write("kept")
    os.makedirs(os.path.join(export_dir, "notes"))
    assert saved_models.write_version(export_dir, _Archive("c"), {}).endswith("/8")
    assert sorted(os.listdir(export_dir)) == ["1", "2", "7", "8", "notes"]
    for version, marker in (("1", "a"), ("2", "b"), ("7", "kept"), ("8", "c")):
        with open(os.path.join(export_dir, version, "saved_model.pb")) as stream:
            assert stream.read() == marker


def test_failed_write_leaves_no_folder(tmp_path):
    export_dir = str(tmp_path / "name")
    with pytest.raises(OSError, match="disk full"):
        saved_models.write_version(export_dir, _Archive("x", fail=True), {})
    assert not os.path.exists(export_dir)
    saved_models.write_version(export_dir, _Archive("a"), {})
    with pytest.raises(OSError, match="disk full"):
        saved_models.write_version(export_dir, _Archive("x", fail=True), {})
    assert os.listdir(export_dir) == ["1"]


# ------------------------------------------------------------ preprocessing


def test_omniglot_preprocessing_is_the_training_one_at_any_size(tmp_path):
    prep = preprocessing.Preprocessing("omniglot", (28, 28, 1))
    for name in sorted(os.listdir(FIXTURES)):
        if not name.endswith(".png"):
            continue
        path = os.path.join(FIXTURES, name)
        decoded = tf.io.decode_png(open(path, "rb").read(), channels=1).numpy()
        np.testing.assert_array_equal(prep.load_file(path),
                                      omniglot.preprocess(decoded[None])[0])
        # Another size: the same nearest-neighbour formula with that size.
        other = str(tmp_path / name)
        Image.open(path).convert("L").resize((77, 90)).save(other)
        decoded = np.asarray(Image.open(other))[None]
        np.testing.assert_array_equal(prep.load_file(other),
                                      omniglot.preprocess(decoded)[0])


def test_imagenet_graph_preprocessing_matches_training_at_model_size(tmp_path):
    prep = preprocessing.Preprocessing("imagenet", (84, 84, 3))
    path = str(tmp_path / "image.png")
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (84, 84, 3),
                                                     np.uint8)).save(path)
    graph = prep.decode_batch(tf.constant(serving_requests.read_files([path
                                                                      ])))[0].numpy()
    training = mini_imagenet.normalize(mini_imagenet.decode_image(path))
    np.testing.assert_array_equal(graph, training)
    np.testing.assert_array_equal(prep.load_file(path), training)


# ---------------------------------------------------------------- clients


def json_tensor(value) -> np.ndarray:
    """A tensor in TF Serving's JSON: nested lists, bytes as `{"b64": ...}` leaves."""

    def decode(item):
        if isinstance(item, dict):
            return base64.b64decode(item["b64"])
        return [decode(v) for v in item] if isinstance(item, list) else item

    decoded, leaf = decode(value), value
    while isinstance(leaf, list) and leaf:
        leaf = leaf[0]
    return np.array(decoded, dtype=object if isinstance(leaf, dict) else None)


class FakeServing:
    """TF Serving's REST and gRPC predict APIs, answered by SavedModels in this process.

    Args:
      models: Model name -> SavedModel version folder.
    """

    def __init__(self, models: dict[str, str]):
        self.models = {name: tf.saved_model.load(path) for name, path in models.items()}

    def run(self, name: str, signature: str, inputs: dict) -> dict[str, np.ndarray]:
        function = self.models[name].signatures[signature or "serving_default"]
        specs = function.structured_input_signature[1]
        outputs = function(**{
            key: tf.constant(value, specs[key].dtype) for key, value in inputs.items()
        })
        return {key: value.numpy() for key, value in outputs.items()}

    def rest_handler(self):
        serving = self

        class Handler(http.server.BaseHTTPRequestHandler):

            def do_POST(self):  # pylint: disable=invalid-name
                name = re.match(r"/v1/models/([^/:]+)(/versions/\d+)?:predict$",
                                self.path).group(1)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                inputs = {k: json_tensor(v) for k, v in body["inputs"].items()}
                outputs = serving.run(name, body["signature_name"], inputs)
                answer = json.dumps({
                    "outputs": {
                        key: [v.decode() for v in value] if value.dtype == object else
                             value.tolist() for key, value in outputs.items()
                    }
                }).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                del args

        return Handler

    def servicer(self):
        serving = self

        class Servicer(prediction_service_pb2_grpc.PredictionServiceServicer):

            def Predict(self, request, context):  # pylint: disable=invalid-name
                del context
                outputs = serving.run(
                    request.model_spec.name, request.model_spec.signature_name, {
                        k: tf.make_ndarray(v) for k, v in request.inputs.items()
                    })
                response = predict_pb2.PredictResponse()
                for key, value in outputs.items():
                    response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
                return response

        return Servicer()


@pytest.fixture(scope="module")
def serving(exported):
    """Both models under the names of the sample models.config."""
    return FakeServing({
        "omniglot_5way_task": exported.task_dir,
        "omniglot_5way_meta": exported.meta_dir
    })


@pytest.fixture(scope="module")
def rest_server(serving):
    """host:port of a REST stand-in."""
    server = http.server.ThreadingHTTPServer(("localhost", 0), serving.rest_handler())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"localhost:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def grpc_server(serving):
    """host:port of a gRPC stand-in."""
    if predict_pb2 is None:
        pytest.skip("tensorflow-serving-api is not installed "
                    "(pip install tensorflow-serving-api)")
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        serving.servicer(), server)
    port = server.add_insecure_port("localhost:0")
    server.start()
    yield f"localhost:{port}"
    server.stop(None)


@needs_serving_api
def test_grpc_request_round_trips_through_the_protos(exported):
    inputs, names = serving_requests.meta_inputs(exported.support_dir,
                                                 exported.query_files[:3])
    assert names == SORTED_NAMES
    request = serving_requests.grpc_request("meta",
                                            "predict_encoded",
                                            inputs,
                                            version=4)
    parsed = predict_pb2.PredictRequest.FromString(request.SerializeToString())
    assert parsed == request
    assert (parsed.model_spec.name, parsed.model_spec.signature_name,
            parsed.model_spec.version.value) == ("meta", "predict_encoded", 4)
    assert parsed.inputs["support_labels"].dtype == tf.int32.as_datatype_enum
    assert parsed.inputs["query_image_bytes"].dtype == tf.string.as_datatype_enum
    for key, value in inputs.items():
        assert tf.make_ndarray(parsed.inputs[key]).tolist() == value.tolist()
    # One task per request: a task axis of 1.
    assert tf.make_ndarray(parsed.inputs["support_labels"]).tolist() == [
        [0] * 2 + [1] * 2 + [2] * 2 + [3] * 2 + [4] * 2
    ]
    assert tf.make_ndarray(parsed.inputs["query_image_bytes"]).shape == (1, 3)


def test_rest_body_sends_bytes_as_b64_at_any_depth(exported):
    inputs, _ = serving_requests.meta_inputs(exported.support_dir,
                                             exported.query_files[:3])
    body = json.loads(json.dumps(serving_requests.rest_body("predict_encoded", inputs)))
    assert body["signature_name"] == "predict_encoded"
    classes = serving_requests.class_folders(exported.support_dir)
    files = [f for _, class_files in classes for f in class_files]
    assert [[base64.b64decode(v["b64"]) for v in task]
            for task in body["inputs"]["support_image_bytes"]
           ] == [[open(f, "rb").read() for f in files]]
    assert [[base64.b64decode(v["b64"]) for v in task]
            for task in body["inputs"]["query_image_bytes"]
           ] == [[open(f, "rb").read() for f in exported.query_files[:3]]]
    assert body["inputs"]["support_labels"] == [np.repeat(np.arange(5), 2).tolist()]


@pytest.mark.parametrize("protocol", serving_requests.PROTOCOLS)
def test_client_requests_answer_as_the_models(exported, serving, request, protocol):
    server = request.getfixturevalue(f"{protocol}_server")
    task = serving_requests.predict(protocol, server, "omniglot_5way_task",
                                    serving_requests.task_inputs(exported.query_files))
    direct = serving.run("omniglot_5way_task", "serving_default",
                         {"images": exported.queries})
    np.testing.assert_allclose(task["probabilities"],
                               direct["probabilities"],
                               atol=1e-6)
    inputs, _ = serving_requests.meta_inputs(exported.support_dir, exported.query_files)
    meta = serving_requests.one_task(
        serving_requests.predict(protocol, server, "omniglot_5way_meta", inputs))
    expected = library_meta_logits(exported.learner, exported.support.images,
                                   exported.support.labels, exported.queries)
    np.testing.assert_allclose(meta["logits"], expected, atol=1e-5)
    assert meta["class_ids"].tolist() == expected.argmax(axis=1).tolist()


def test_predict_refuses_an_unknown_protocol():
    with pytest.raises(ValueError,
                       match=r"protocol 'http' must be one of \('rest', 'grpc'\)"):
        serving_requests.predict("http", "localhost:1", "m", {})


def test_one_task_refuses_an_answer_of_several_tasks():
    with pytest.raises(serving_requests.ServingError,
                       match=r"for one task .*\(2, 3, 5\)"):
        serving_requests.one_task({"logits": np.zeros((2, 3, 5))})


# Runs `python -m mamlpp_tf_export.client ARGS` and lists the modules it imported
# (interpreter start-up excluded) as the last line.
CLIENT_IMPORTS = r"""
import json, runpy, sys
before = set(sys.modules)
sys.argv[0] = "mamlpp_tf_export.client"
try:
    runpy.run_module("mamlpp_tf_export.client", run_name="__main__", alter_sys=True)
except SystemExit as exit:
    code = exit.code
print(json.dumps({"code": code, "modules": sorted(set(sys.modules) - before)}))
"""


def run_client(args: list[str],
               code: str = CLIENT_IMPORTS) -> tuple[int, list, list, str]:
    """`python -m mamlpp_tf_export.client ARGS` in a new process.

    Returns:
      `(exit status, output lines split at tabs, modules imported, stderr)`.
    """
    _, stdout, stderr = run_command([sys.executable, "-c", code, *args])
    *lines, last = stdout.strip().splitlines()
    result = json.loads(last)
    lines = [line.split("\t") for line in lines]
    return result["code"], lines, result["modules"], stderr


def test_rest_client_imports_only_the_standard_library_and_numpy(exported, rest_server):
    """Over REST the client runs where TensorFlow is not installed; it answers right."""
    files = exported.query_files[:3]
    answers = {
        "task": run_client([
            f"--server={rest_server}", "--model_name=omniglot_5way_task",
            f"--images={','.join(files)}"
        ]),
        "meta": run_client([
            f"--server={rest_server}", "--model_name=omniglot_5way_meta",
            f"--support={exported.support_dir}", f"--query={','.join(files)}"
        ]),
    }
    learner, support = exported.learner, exported.support
    served = task_model.served_logits_fn(learner, "support", len(support.labels))
    expected = {
        "task": softmax(served(support.images, support.labels, exported.queries[:3])),
        "meta": softmax(library_meta_logits(learner, support.images, support.labels,
                                            exported.queries[:3])),
    }
    for kind, (code, lines, modules, stderr) in answers.items():
        assert code == 0, stderr[-2000:]
        top_level = {m.split(".")[0] for m in modules}
        foreign = sorted(top_level - set(sys.stdlib_module_names) - {"numpy", "mamlpp_tf_export"})
        assert not foreign, (kind, foreign)
        assert "tensorflow" not in modules
        assert [line[0] for line in lines] == files
        for line, probabilities in zip(lines, expected[kind]):
            assert line[1] == SORTED_NAMES[probabilities.argmax()]
            assert float(line[2]) == pytest.approx(probabilities.max(), abs=1e-4)


def test_client_without_serving_api_names_the_install_command(exported):
    code, lines, _, stderr = run_client([
        "--protocol=grpc", "--server=localhost:1", "--model_name=omniglot_5way_task",
        f"--images={exported.query_files[0]}"
    ], "import sys\nsys.modules['tensorflow_serving'] = None\n" + CLIENT_IMPORTS)
    assert code == 2 and not lines and "Traceback" not in stderr
    errors = stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(
        "error: gRPC requests need tensorflow-serving-api: pip install "
        "tensorflow-serving-api ("), errors


@needs_serving_api
def test_grpc_client_to_an_unreachable_server_prints_one_line_and_no_tensorflow_notice(
        exported):
    """The gRPC path loads TensorFlow (the protos need it); its notices stay hidden."""
    code, lines, _, stderr = run_client([
        "--protocol=grpc", "--server=localhost:1", "--model_name=omniglot_5way_task",
        f"--images={exported.query_files[0]}", "--timeout_s=5"])
    errors = stderr.strip().splitlines()
    assert code == 2 and not lines
    assert len(errors) == 1 and errors[0].startswith("error: localhost:1: UNAVAILABLE"), errors


@pytest.mark.parametrize("args,message", [
    (["--images=a.png", "--support=s", "--query=b.png"], "--support needs --query"),
    (["--query=b.png"], "give --images"),
    (["--support=/nonexistent", "--query=b.png"],
     "support folder /nonexistent does not exist"),
    (["--images=/nonexistent.png"], "No such file or directory"),
    (["--images=a.png", "--model_version=0"], "--model_version=0 must be >= 1"),
    (["--images=a.png", "--timeout_s=0"], "--timeout_s=0.0 must be > 0"),
])
def test_client_reports_bad_flags_and_files_in_one_line(args, message):
    code, lines, _, stderr = run_client(["--model_name=m", *args])
    assert code == 2 and not lines
    errors = stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0]


def test_client_reads_support_folders_as_the_exporter(tmp_path):
    support = tmp_path / "support"
    for path in ("b/1.png", "b/2.JPG", "b/notes.txt", "b/.hidden.png", "b/deeper/3.png",
                 "a/x.jpeg", ".hidden/4.png"):
        (support / path).parent.mkdir(parents=True, exist_ok=True)
        (support / path).write_bytes(b"")
    (support / "file.png").write_bytes(b"")
    expected = [
        ("a", [str(support / "a" / "x.jpeg")]),
        ("b", [str(support / "b" / "1.png"), str(support / "b" / "2.JPG")]),
    ]
    assert class_folders is serving_requests.class_folders  # One reader for both.
    assert class_folders(str(support)) == expected
    (support / "c").mkdir()
    (tmp_path / "empty").mkdir()
    for path, message in ((support, "class 'c'.*has no images"),
                          (tmp_path / "empty", "no class sub-folders"),
                          (tmp_path / "missing", "does not exist")):
        with pytest.raises(ValueError, match=message):
            class_folders(str(path))


def _request_images(images) -> np.ndarray:
    """A request's `{"b64": PNG}` leaves (nested lists) as float32 images `[..., 28, 28, 1]`.

    Decoded with PIL and preprocessed by the training code, independently of the
    served graph's own decoding.
    """
    if isinstance(images, list):
        return np.stack([_request_images(item) for item in images])
    picture = Image.open(io.BytesIO(base64.b64decode(images["b64"]))).convert("L")
    return omniglot.preprocess(np.asarray(picture)[None])[0]


def _sample_request_logits(exported, inputs: dict) -> np.ndarray:
    """What the library computes for a sample request, in the served model's layout.

    Task model: the network adapted to the exported support set, normalising every
    query with the support set's statistics (what a `bn_stats=batch` run's task
    model fixes at export), i.e. the support set as the context of the query pass.
    Meta-model: `adapt` + `predict` on the request's own task.
    """
    learner = exported.learner
    if "image_bytes" in inputs:
        support = exported.support.images
        params = learner.adapt(support, exported.support.labels)
        logits, _ = learner.backbone.forward(
            tf.concat([support, _request_images(inputs["image_bytes"])], 0), params,
            learner.config.eval_inner_steps - 1, False, context=len(support))
        return logits.numpy()[len(support):]
    support_x = _request_images(inputs["support_image_bytes"])[0]
    query_x = _request_images(inputs["query_image_bytes"])[0]
    support_y = np.array(inputs["support_labels"][0], np.int32)
    return library_meta_logits(learner, support_x, support_y, query_x)[None]


@pytest.mark.parametrize("model,file,shape",
                         [("omniglot_5way_task", "task_model_request.json", (2, 5)),
                          ("omniglot_5way_meta", "meta_model_request.json", (1, 2, 5))])
def test_sample_rest_requests_are_served(exported, rest_server, model, file, shape):
    with open(os.path.join(SERVING, file)) as stream:
        body = json.load(stream)
    outputs = serving_requests.rest_predict(
        serving_requests.rest_url(rest_server, model), body)
    assert outputs["probabilities"].shape == shape
    expected = _sample_request_logits(exported, body["inputs"])
    assert expected.shape == shape
    np.testing.assert_allclose(outputs["probabilities"], softmax(expected), atol=1e-5)
    np.testing.assert_array_equal(outputs["class_ids"], expected.argmax(axis=-1))
    if "logits" in outputs:
        np.testing.assert_allclose(outputs["logits"], expected, atol=1e-5)
    # The answer tells the images apart: a near-uniform one would pass any check above.
    assert np.ptp(softmax(expected), axis=-1).min() > 1e-2


@needs_serving_api
def test_models_config_parses_and_names_both_models():
    with open(os.path.join(SERVING, "models.config")) as stream:
        config = text_format.Parse(stream.read(),
                                   model_server_config_pb2.ModelServerConfig())
    assert [(c.name, c.base_path) for c in config.model_config_list.config
           ] == [("omniglot_5way_task", "/models/omniglot_5way_task"),
                 ("omniglot_5way_meta", "/models/omniglot_5way_meta")]


def batching_parameters_message() -> type:
    """TF Serving's `tensorflow.serving.BatchingParameters` message class.

    The message of `--batching_parameters_file`. tensorflow-serving-api ships
    no Python module of it, so it is built here with the fields this
    repository's file may set, numbered and typed as TF Serving defines them;
    any other field fails the parse.
    """
    file = descriptor_pb2.FileDescriptorProto(
        name="batching_parameters.proto",
        package="tensorflow.serving",
        syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"])
    message = file.message_type.add(name="BatchingParameters")
    field = descriptor_pb2.FieldDescriptorProto
    wrapped = [("max_batch_size", "Int64Value"), ("batch_timeout_micros", "Int64Value"),
               ("max_enqueued_batches", "Int64Value"),
               ("num_batch_threads", "Int64Value"), ("thread_pool_name", "StringValue")]
    for number, (name, wrapper) in enumerate(wrapped, 1):
        message.field.add(name=name, number=number, type=field.TYPE_MESSAGE,
                          label=field.LABEL_OPTIONAL,
                          type_name=f".google.protobuf.{wrapper}")
    message.field.add(name="allowed_batch_sizes", number=6, type=field.TYPE_INT64,
                      label=field.LABEL_REPEATED)
    message.field.add(name="pad_variable_length_inputs", number=7, type=field.TYPE_BOOL,
                      label=field.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(file)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters"))


def test_batching_parameters_parse_and_their_sizes_are_consistent():
    with open(os.path.join(SERVING, "batching_parameters.txt")) as stream:
        params = text_format.Parse(stream.read(), batching_parameters_message()())
    for name in ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches",
                 "num_batch_threads"):
        assert params.HasField(name) and getattr(params, name).value > 0, name
    sizes = list(params.allowed_batch_sizes)
    # TF Serving's rules: increasing, the last one is max_batch_size.
    assert sizes and sizes == sorted(set(sizes)) and sizes[0] >= 1
    assert sizes[-1] == params.max_batch_size.value
    # Padding variable-length inputs would add made-up support images to a task.
    assert not params.pad_variable_length_inputs
    # The benchmarked requests fit one batch: 16 task-model images, 8 meta-model tasks.
    assert params.max_batch_size.value >= 16
    # Every batch size the server can form is warmed up by the task model's export.
    assert tuple(sizes) == warmup.TASK_WARMUP_BATCH_SIZES

