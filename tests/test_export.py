"""Serving exports: task model and meta-model SavedModels, loaders, errors, client.

The run exported here is made in-process (random weights with distinct per-step
batch-norm rows and learning rates, no training): what is tested is that the
served graphs compute what the library computes, not that the model is good.
TF Serving itself is not installable here; `saved_model_cli run` (the TF1
SavedModel loader TF Serving uses) and in-process stand-ins for its REST and
gRPC front ends are the loader checks.
"""

import base64
import concurrent.futures
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import types

import grpc
import numpy as np
from PIL import Image
from google.protobuf import text_format
import pytest
import tensorflow as tf
try:
    from tensorflow_serving.apis import predict_pb2
    from tensorflow_serving.apis import prediction_service_pb2_grpc
    from tensorflow_serving.config import model_server_config_pb2
except ImportError:  # An optional dependency: only the gRPC client needs it.
    predict_pb2 = prediction_service_pb2_grpc = model_server_config_pb2 = None

from export import preprocessing
from export import saved_models
from export import serving_requests
from export.support import load_support
from mamlpp_tf import experiment
from mamlpp_tf import runs
from mamlpp_tf.config import LearnerConfig, RunConfig
from mamlpp_tf.data import mini_imagenet, omniglot, synthetic

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
                                       "(pip install --no-deps tensorflow-serving-api)")


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
    run = runs.RunDir(model_dir)
    run.write_or_check_config(config)
    learner = experiment.build_learner(config)
    rng = np.random.RandomState(seed)
    for norm in learner.backbone.norms:
        shape = norm.gamma.shape
        norm.gamma.assign(rng.uniform(0.5, 1.5, shape))
        norm.beta.assign(rng.normal(0.0, 0.2, shape))
        norm.running_mean.assign(rng.normal(0.0, 0.2, shape))
        norm.running_var.assign(rng.uniform(0.5, 2.0, shape))
    for rate in learner.lslr.rates.values():
        rate.assign(rng.uniform(0.05, 0.3, rate.shape))
    run.save_epoch(learner, EPOCH)
    run.write_history([{"epoch": EPOCH, "accuracy": 0.5, "loss": 1.0, "ci95": 0.1}])
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


def start(command: list[str], cwd: str = ROOT) -> subprocess.Popen:
    """Starts a command (several run at once on the 2-core CI machine)."""
    return subprocess.Popen(command,
                            cwd=cwd,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE,
                            text=True,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    """Waits for a started command: (exit code, stdout, stderr)."""
    stdout, stderr = process.communicate(timeout=300)
    return process.returncode, stdout, stderr


def run_command(command: list[str], cwd: str = ROOT) -> tuple[int, str, str]:
    return finish(start(command, cwd))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A run, a support folder, query images, and both models exported by their CLIs."""
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
    task = start([
        sys.executable, "-m", "export.task_model", f"--model_dir={model_dir}",
        f"--support={support_dir}", f"--export_dir={task_dir}"
    ])
    meta = start([
        sys.executable, "-m", "export.meta_model", f"--model_dir={model_dir}",
        f"--export_dir={meta_dir}"
    ])
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
    return learner.predict(query_x, learner.adapt(support_x, support_y)).numpy()


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


def test_running_statistics_task_model_equals_library_predict(tmp_path, exported):
    model_dir = make_run(str(tmp_path / "run"), bn_stats="running", seed=1)
    path = saved_models.export_task_model(model_dir, exported.support_dir,
                                          str(tmp_path / "models" / "task"))
    with open(os.path.join(path, saved_models.INFO_PATH)) as stream:
        assert json.load(stream)["bn_stats"] == "running"
    _, learner, _ = saved_models.restore_learner(model_dir)
    expected = library_task_probabilities(learner, exported.support, exported.queries)
    serve = tf.saved_model.load(path).signatures["serving_default"]
    np.testing.assert_allclose(
        serve(images=tf.constant(exported.queries))["probabilities"],
        expected,
        atol=1e-5)
    np.testing.assert_allclose(
        serve(images=tf.constant(exported.queries[3:4]))["probabilities"],
        expected[3:4],
        atol=1e-5)


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


def test_running_statistics_need_per_step_batch_norm():
    config = LearnerConfig(per_step_bn=False)
    with pytest.raises(ValueError, match="needs a run with --per_step_bn"):
        saved_models.check_bn_stats(config, "running")
    saved_models.check_bn_stats(config, "support")


# --------------------------------------------------------------- meta-model


@pytest.mark.parametrize("k_shot,queries", [(1, 3), (5, 7), (2, 1)])
def test_meta_model_adapts_any_shot_and_query_count_like_the_library(
        exported, k_shot, queries):
    serve = tf.saved_model.load(exported.meta_dir).signatures["serving_default"]
    images = glyph_images(k_shot + 2, seed=k_shot)
    support_x = images[:, :k_shot].reshape(-1, *SHAPE)
    support_y = np.repeat(np.arange(5), k_shot).astype(np.int32)
    query_x = images[:, k_shot:].reshape(-1, *SHAPE)[:queries]
    out = serve(support_images=tf.constant(support_x),
                support_labels=tf.constant(support_y),
                query_images=tf.constant(query_x))
    expected = library_meta_logits(exported.learner, support_x, support_y, query_x)
    np.testing.assert_allclose(out["logits"].numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(out["probabilities"].numpy(),
                               softmax(expected),
                               atol=1e-5)
    assert (out["class_ids"].numpy() == expected.argmax(axis=1)).all()
    # adapt + predict is the per-task logits of eval_step (the evaluation protocol).
    batch = (support_x[None], support_y[None], query_x[None],
             np.zeros((1, queries), np.int32))
    np.testing.assert_allclose(exported.learner.eval_step(batch)["logits"][0],
                               expected,
                               atol=1e-5)


def test_meta_model_encoded_signature_equals_float_signature(exported):
    model = tf.saved_model.load(exported.meta_dir)
    support_files = [
        os.path.join(exported.support_dir, name, "a.png") for name in SORTED_NAMES
    ]
    labels = tf.range(5, dtype=tf.int32)
    floats = model.signatures["serving_default"](support_images=tf.constant(
        np.stack([exported.preprocessing.load_file(f) for f in support_files])),
                                                 support_labels=labels,
                                                 query_images=tf.constant(
                                                     exported.queries))
    encoded = model.signatures["predict_encoded"](
        support_image_bytes=tf.constant(serving_requests.read_files(support_files)),
        support_labels=labels,
        query_image_bytes=tf.constant(serving_requests.read_files(
            exported.query_files)))
    np.testing.assert_allclose(encoded["logits"].numpy(),
                               floats["logits"].numpy(),
                               atol=1e-6)


@pytest.mark.parametrize("labels,message",
                         [([0, 1, 2, 3, 5], "support_labels must be < n_way = 5"),
                          ([0, 1, 2, 3], "differ in length")])
def test_meta_model_rejects_bad_labels(exported, labels, message):
    serve = tf.saved_model.load(exported.meta_dir).signatures["serving_default"]
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        serve(support_images=tf.constant(exported.queries[:5]),
              support_labels=tf.constant(labels, tf.int32),
              query_images=tf.constant(exported.queries[:2]))


# ------------------------------------------------------------------ loaders

FRESH_PROCESS = r"""
import sys
# Unimportable even where the package is installed: the models must not need it.
sys.modules["mamlpp_tf"] = None
sys.modules["export"] = None
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
    query_images=tf.constant(np.load(f"{io}/query_images.npy")))["logits"].numpy())
try:
    import mamlpp_tf
except ImportError:
    print("mamlpp_tf not importable")
# Wrong image rank: TF Serving does not check request shapes, so the graph must
# (a wrong-rank image reaching a oneDNN convolution aborts the process).
bad = tf.zeros([2, 28, 28])
for name, call in (("task", lambda: task(images=bad)), ("meta", lambda: meta(
        support_images=tf.zeros([5, 28, 28, 1]), support_labels=tf.range(5),
        query_images=bad))):
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
    # prediction uses the statistics the task model fixed (see above).
    arrays = dict(images=support.images,
                  support_images=support.images,
                  support_labels=support.labels,
                  query_images=exported.queries[:4])
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
    for name in ("task", "meta"):
        assert re.search(
            rf"{name} refused: .*Shape of tensor .*\[2,28,28\] is not compatible "
            r"with expected shape \[\?,28,28,1\]", stdout), stdout
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
    np.testing.assert_allclose(np.load(io / "meta" / "logits.npy"),
                               expected["meta_logits"],
                               atol=1e-5)


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
        sys.executable, "-m", "export.task_model", f"--model_dir={exported.model_dir}",
        f"--support={support}", f"--export_dir={tmp_path}/models/task"
    ])
    assert code == 2 and "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "broken.png" in errors[0]
    assert not (tmp_path / "models").exists()


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
                inputs = {
                    key:
                        np.array([base64.b64decode(v["b64"]) for v in value], object)
                        if value and isinstance(value[0], dict) else np.asarray(value)
                    for key, value in body["inputs"].items()
                }
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
                    "(pip install --no-deps tensorflow-serving-api)")
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
    assert tf.make_ndarray(parsed.inputs["support_labels"]).tolist(
    ) == [0] * 2 + [1] * 2 + [2] * 2 + [3] * 2 + [4] * 2


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
    meta = serving_requests.predict(protocol, server, "omniglot_5way_meta", inputs)
    direct = serving.run(
        "omniglot_5way_meta", "serving_default",
        dict(support_images=exported.support.images,
             support_labels=exported.support.labels,
             query_images=exported.queries))
    np.testing.assert_allclose(meta["logits"], direct["logits"], atol=1e-5)


def test_client_cli_prints_a_line_per_image(exported, rest_server):
    code, stdout, stderr = run_command([
        sys.executable, "-m", "export.client", f"--server={rest_server}",
        "--model_name=omniglot_5way_task",
        f"--images={','.join(exported.query_files[:2])}"
    ])
    assert code == 0, stderr[-2000:]
    lines = [line.split("\t") for line in stdout.strip().splitlines()]
    assert [line[0] for line in lines] == exported.query_files[:2]
    assert all(line[1] in CLASS_NAMES and 0 < float(line[2]) <= 1 for line in lines)


@pytest.mark.parametrize("model,file,rows",
                         [("omniglot_5way_task", "task_model_request.json", 2),
                          ("omniglot_5way_meta", "meta_model_request.json", 2)])
def test_sample_rest_requests_are_served(rest_server, model, file, rows):
    with open(os.path.join(SERVING, file)) as stream:
        body = json.load(stream)
    outputs = serving_requests.rest_predict(
        serving_requests.rest_url(rest_server, model), body)
    assert outputs["probabilities"].shape == (rows, 5)
    np.testing.assert_allclose(outputs["probabilities"].sum(axis=1), 1.0, atol=1e-5)


@needs_serving_api
def test_models_config_parses_and_names_both_models():
    with open(os.path.join(SERVING, "models.config")) as stream:
        config = text_format.Parse(stream.read(),
                                   model_server_config_pb2.ModelServerConfig())
    assert [(c.name, c.base_path) for c in config.model_config_list.config
           ] == [("omniglot_5way_task", "/models/omniglot_5way_task"),
                 ("omniglot_5way_meta", "/models/omniglot_5way_meta")]
