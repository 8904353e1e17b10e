"""The first hour of a new user (issue 16).

Fast offline failures, failed starts that claim nothing, clear input errors, and output
that says what the job is doing.
"""

import io
import json
import logging
import os
import socket
import subprocess
import sys
import time

from absl import flags
from absl.testing import flagsaver
import numpy as np
from PIL import Image
import pytest

from mamlpp_tf import MamlPlusPlus, Trainer, cli, data, files
from mamlpp_tf import flags as run_flags
from mamlpp_tf.config import RunConfig
from mamlpp_tf.data import omniglot_prepare, synthetic
from mamlpp_tf.training import run_dir
from mamlpp_tf_export.preprocessing import Preprocessing
from mamlpp_tf_export.support import class_folders, load_support

from conftest import ROOT, TINY, random_batch, run_job, tiny_config


def closed_port() -> int:
    """A local TCP port nothing listens on (connections to it are refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def error_block(stderr: str) -> list[str]:
    """The `error:` line of a command's stderr and the lines after it."""
    lines = stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error:")]
    assert len(starts) == 1, stderr[-3000:]
    return lines[starts[0]:]


# --- Offline, the job stops within seconds, in command-line terms ------------------------


def test_offline_download_stops_within_seconds_with_the_command_line_remedy(tmp_path):
    """The network is unreachable: every HTTPS connection goes to a closed local port."""
    proxy = f"http://127.0.0.1:{closed_port()}"
    model_dir, data_dir = tmp_path / "run", tmp_path / "tfds"
    started = time.time()
    code, _, stderr = run_job(str(model_dir), "--dataset=omniglot", f"--data_dir={data_dir}",
                              env={"HTTPS_PROXY": proxy, "https_proxy": proxy,
                                   "NO_PROXY": "", "no_proxy": ""})
    # TFDS alone retries for minutes; starting Python and TF takes 5-30 s.
    assert time.time() - started < 90
    assert code == 2, stderr[-3000:]
    block = error_block(stderr)
    assert f"--data_dir={data_dir}" in block[0] and "the download cannot start" in block[0]
    assert "HTTPS proxy 127.0.0.1" in block[0]
    remedies = "\n".join(block[1:])
    assert "--data_dir=DIR --nodownload" in remedies
    for name in omniglot_prepare.ORIGINAL_ZIPS:
        assert name in remedies
    assert str(data_dir / "downloads" / "manual") in remedies
    assert "download=True" not in stderr and "Traceback" not in stderr
    assert not model_dir.exists() and not data_dir.exists()


def test_download_probe_fails_fast_on_a_closed_port_and_writes_nothing(tmp_path, monkeypatch):
    for name in ("https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    port = closed_port()
    monkeypatch.setattr(omniglot_prepare, "DOWNLOAD_HOST", ("127.0.0.1", port))
    started = time.time()
    with pytest.raises(data.DatasetNotFoundError) as error:
        data.load("omniglot", data_dir=tmp_path, download=True)
    assert time.time() - started < omniglot_prepare.PROBE_TIMEOUT_S + 2
    assert f"no connection to 127.0.0.1:{port}" in str(error.value)
    assert f"data_dir={tmp_path}" in str(error.value)  # The Python API's terms...
    assert "--data_dir" not in str(error.value) and "--nodownload" not in str(error.value)
    assert "--data_dir=DIR --nodownload" in error.value.command_line  # ...and the flags'.
    assert not os.listdir(tmp_path)


def test_download_probe_passes_when_the_host_answers(monkeypatch):
    # pylint: disable=protected-access
    for name in ("https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert omniglot_prepare._unreachable(server.getsockname()) is None


def test_missing_data_with_nodownload_names_the_flags(tmp_path):
    with pytest.raises(data.DatasetNotFoundError) as error:
        data.load("omniglot", data_dir=tmp_path, download=False)
    first, *remedies = error.value.command_line.splitlines()
    assert f"--data_dir={tmp_path}" in first and "--nodownload is set" in first
    assert any("--data_dir=DIR --nodownload" in line for line in remedies)


def test_a_command_line_error_prints_its_own_wording(capsys):
    error = data.DatasetNotFoundError("api words", command_line="flag words\n  * remedy")
    with pytest.raises(SystemExit) as stop:
        cli.exit_on_user_error(error)
    assert stop.value.code == 2
    assert capsys.readouterr().err == "error: flag words\n  * remedy\n"


# --- A failed start claims nothing ------------------------------------------------------


@pytest.mark.parametrize("extra,named", [
    (["--dataset=omniglot", "--nodownload"], "--nodownload is set"),
    (["--n_way=25"], "n_way=25"),
    (["--strategy=mirrored", "--cpu_replicas=2", "--test_tasks=3"], "--test_tasks=3"),
], ids=["missing_data", "n_way_over_a_split", "test_tasks_over_replicas"])
def test_a_failing_start_leaves_nothing_behind(tmp_path, extra, named):
    model_dir = tmp_path / "run"
    if extra[0] == "--dataset=omniglot":
        extra = extra + [f"--data_dir={tmp_path / 'tfds'}"]
    code, _, stderr = run_job(str(model_dir), *extra)
    assert code == 2, stderr[-3000:]
    assert named in error_block(stderr)[0] and "Traceback" not in stderr
    assert not model_dir.exists()


def test_a_model_dir_with_only_a_config_json_accepts_the_corrected_command(tmp_path):
    """What a failed start of an older version left: config.json (other flags), lock."""
    model_dir = tmp_path / "run"
    with flagsaver.flagsaver():
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["train", *TINY, "--n_way=25", f"--model_dir={model_dir}"])
        wrong = run_flags.run_config_from_flags()
    files.write_json(str(model_dir / "config.json"), wrong.to_dict())
    (model_dir / "lock").write_text("999999")
    code, stdout, stderr = run_job(str(model_dir))
    assert code == 0, stderr[-3000:]
    assert "holds no checkpoint; starting afresh with --n_way: 25 -> 3" in stderr
    assert json.loads((model_dir / "config.json").read_text())["learner"]["n_way"] == 3
    # Not a terminal: a progress line every --log_every=2 iterations, no Keras bar.
    progress = [line for line in stderr.splitlines() if "] iteration " in line]
    assert len(progress) == 8, progress
    assert "iteration 16/16 (epoch 1)" in progress[-1] and "ETA 0s" in progress[-1]
    assert all("iterations/s, ETA" in line for line in progress[1:])
    assert "meta-iteration" not in stdout


def test_other_flags_are_refused_once_the_run_has_a_checkpoint(tmp_path):
    run = run_dir.RunDir(str(tmp_path))

    def config(n_way):
        return RunConfig(learner=tiny_config(n_way=n_way), model_dir=str(tmp_path))

    run.write_or_check_config(config(2))
    run.write_or_check_config(config(3))  # No checkpoint yet: free for other flags.
    assert json.loads(open(run.config_path).read())["learner"]["n_way"] == 3
    os.makedirs(run.latest_dir)
    open(os.path.join(run.latest_dir, "checkpoint"), "w").close()
    with pytest.raises(ValueError, match="--n_way: 3 -> 2"):
        run.check_config(config(2))
    with pytest.raises(ValueError, match="--n_way: 3 -> 2"):
        run.write_or_check_config(config(2))
    assert run.check_config(config(2), override=True) == ["--n_way: 3 -> 2"]


# --- Clear input errors -----------------------------------------------------------------


def _replace(batch, index, value):
    return tuple(value if i == index else part for i, part in enumerate(batch))


@pytest.mark.parametrize("make_batch,message", [
    (lambda b, wide: wide, r"support_y holds labels 0\.\.3, but this learner is 2-way: "
     r"labels must be in \[0, 2\)"),
    (lambda b, wide: _replace(b, 3, b[3] - 1), r"query_y holds labels -1\.\.0"),
    (lambda b, wide: b[:3], r"a meta-batch is a tuple .* got tuple of 3"),
    (lambda b, wide: _replace(b, 0, b[0][0]), r"support_x must be non-empty images "
     r"\[T, N·K, 6, 6, 1\] .* got shape \[4, 6, 6, 1\]"),
    (lambda b, wide: _replace(b, 2, b[2][..., :4, :]), r"query_x must be .* got shape "
     r"\[2, 4, 6, 4, 1\]"),
    (lambda b, wide: _replace(b, 2, b[2][:1]), r"support_x has 2 tasks but query_x has 1"),
    (lambda b, wide: _replace(b, 1, b[1][:, :3]), r"support_y must hold one label per image "
     r"of support_x, shape \[2, 4\]; got \[2, 3\]"),
    (lambda b, wide: _replace(b, 0, b[0][:, :0]), r"support_x must be non-empty images"),
    (lambda b, wide: _replace(b, 0, b[0].astype(np.float32)), r"support_x must be float64 "
     r"\(the learner's dtype\); got float32"),
    (lambda b, wide: _replace(b, 3, b[3].astype(np.float64)), r"query_y must be integer "
     r"class labels; got float64"),
], ids=["wider_task", "negative_label", "three_parts", "no_task_axis", "image_shape",
        "task_counts", "label_count", "empty_support", "image_dtype", "label_dtype"])
def test_a_bad_batch_is_refused_before_tracing(make_batch, message):
    learner = MamlPlusPlus(tiny_config())
    trainer = Trainer(learner)
    batch = random_batch(learner.config)
    wide = random_batch(tiny_config(n_way=4))  # A 4-way batch for this 2-way learner.
    bad = make_batch(batch, wide)
    for step in (lambda: trainer.train_step(bad), lambda: trainer.eval_step(bad),
                 lambda: learner.meta_loss(bad, 0)):
        with pytest.raises(ValueError, match=message):
            step()
    assert trainer.trace_count == 0


def test_adapt_and_predict_check_their_inputs():
    learner = MamlPlusPlus(tiny_config())
    support_x, support_y, query_x, _ = (part[0] for part in random_batch(learner.config))
    with pytest.raises(ValueError, match=r"support_y holds labels 1\.\.2"):
        learner.adapt(support_x, support_y + 1)
    with pytest.raises(ValueError, match=r"support_x must be non-empty images \[n, 6, 6, 1\]"):
        learner.adapt(support_x[None], support_y)
    with pytest.raises(ValueError, match=r"num_steps=0 must be at least 1"):
        learner.adapt(support_x, support_y, num_steps=0)
    params = learner.adapt(support_x, support_y)
    with pytest.raises(ValueError, match=r"images must be non-empty images \[B, 6, 6, 1\]"):
        learner.predict(query_x[..., :3, :], params)
    assert learner.predict(query_x, params).shape == (len(query_x), 2)
    context = MamlPlusPlus(tiny_config(bn_stats="support"))
    params = context.adapt(support_x, support_y)
    with pytest.raises(ValueError, match=r"support_x must be non-empty images \[n, 6, 6, 1\]"):
        context.predict(query_x, params, support_x=support_x[..., :3, :])


def _png(path, size=28):
    Image.fromarray(np.full((size, size), 255, np.uint8)).save(path)


def test_a_support_folder_names_the_files_it_skips(tmp_path, caplog):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        _png(tmp_path / name / "1.png")
    (tmp_path / "README.txt").write_text("my support set")
    (tmp_path / "a" / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "b" / "notes.txt").write_text("")
    (tmp_path / "b" / "more").mkdir()
    with caplog.at_level(logging.WARNING, logger="absl"):
        classes = class_folders(str(tmp_path))
    assert [name for name, _ in classes] == ["a", "b"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "skipped 4 entries" in warnings[0]
    assert "README.txt, a/.DS_Store, b/more/, b/notes.txt" in warnings[0]


def test_a_support_folder_without_stray_files_is_silent(tmp_path, caplog):
    (tmp_path / "a").mkdir()
    _png(tmp_path / "a" / "1.png")
    with caplog.at_level(logging.WARNING, logger="absl"):
        class_folders(str(tmp_path))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_corrupt_image_is_named_without_tensorflow_noise(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        _png(tmp_path / name / "1.png")
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(buffer, "PNG")
    broken = tmp_path / "b" / "2.png"
    broken.write_bytes(buffer.getvalue()[:40])
    with pytest.raises(ValueError) as error:
        load_support(str(tmp_path), Preprocessing("omniglot", (28, 28, 1)), 2)
    assert str(error.value) == (f"cannot read image {broken}: Invalid PNG. Failed to "
                                 "initialize decoder.")


# --- Quiet, useful output ---------------------------------------------------------------


def test_help_lists_the_jobs_own_flags_without_tensorflow_load_notices():
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run([sys.executable, "-m", "mamlpp_tf.train", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, check=False, env=env)
    for flag in ("--flagfile", "--model_dir", "--data_dir", "--[no]download", "--n_way",
                 "--log_every", "--[no]override_config"):
        assert flag in result.stdout, (flag, result.stderr[-2000:])
    assert result.stderr == "", result.stderr[-2000:]
    # Asked for every line, TensorFlow's notices are there: the filter is what removed them.
    env["TF_CPP_MIN_LOG_LEVEL"] = "0"
    loud = subprocess.run([sys.executable, "-c", "import mamlpp_tf"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False, env=env)
    # Which notices TensorFlow prints depends on the CPU (no oneDNN notice on every one).
    assert any(notice in loud.stderr for notice in (
        "oneDNN custom operations are on",
        "All log messages before absl::InitializeLog() is called")), loud.stderr[-2000:]


def test_stderr_filter_drops_only_the_matching_lines():
    """At the file-descriptor level, where C++ writes (a subprocess: pytest owns fd 2 here)."""
    code = ("import os, mamlpp_tf\n"
            "with mamlpp_tf.drop_stderr_lines(('load notice',)):\n"
            "    os.write(2, b'I0000 a load notice\\nW0000 a real warning\\n')\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, check=True)
    assert result.stderr == "W0000 a real warning\n"


def test_class_set_repr_summarises_instead_of_dumping_pixels():
    train_set = synthetic.load(num_classes=(5, 3, 3), images_per_class=4)["train"]
    assert repr(train_set) == (
        "ClassSet(dataset='synthetic', split='train', classes=5, images_per_class=4, "
        "image_shape=(28, 28, 1), dtype=float32, augment=False, images in memory)")

    class Store:
        counts = (3, 5)
        image_shape = (4, 4, 3)

        def take(self, class_index, image_indices):
            del class_index
            return np.zeros((len(image_indices), 4, 4, 3), np.float32)

    uneven = data.ClassSet(images=Store(), class_names=("x", "y"), split="val", dataset="d")
    assert "images_per_class=3-5" in repr(uneven)
    assert "read on demand by Store" in repr(uneven)
