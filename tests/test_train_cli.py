"""The main job end to end on the synthetic set: run, resume after SIGKILL, errors, flags."""

import dataclasses
import glob
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

from absl import flags
from absl.testing import flagsaver
import numpy as np
import pytest
import tensorflow as tf

from mamlpp_tf import cli, files, tensorboard_scalars, train
from mamlpp_tf import flags as run_flags
from mamlpp_tf.training import evaluation, progress
from mamlpp_tf.training.run import Run
from mamlpp_tf.training.run_dir import RunDir
from mamlpp_tf.training.trainer import Trainer

from conftest import ROOT, TINY, comparable_results, run_job


def test_two_epoch_run_writes_checkpoints_results_and_summaries(finished_run):
    model_dir, stdout = finished_run
    assert "top-2 ensemble" in stdout and "best single model" in stdout
    results = json.load(open(os.path.join(model_dir, "results.json")))
    test = results["test"]
    assert test["tasks"] == 6 and 0 <= test["accuracy"] <= 1
    assert len(results["validation"]) == 2 and results["iterations"] == 16
    assert results["config"]["learner"]["n_way"] == 3
    assert {"seed", "derived_train_seed"} <= set(results["seeds"])
    assert {"tensorflow", "keras", "mamlpp_tf"} <= set(results["versions"])
    assert sorted(os.listdir(os.path.join(model_dir, "checkpoints"))) == [
        "epoch_000", "epoch_001", "latest"]
    tensorboard = os.path.join(model_dir, "tensorboard")
    expected = {"train": ["loss", "accuracy", "meta_lr", "msl_weight/step_0",
                          "lslr/conv0_kernel/step_1", "lslr/dense_bias/step_0",
                          "bn/norm1/gamma_mean/step_1"],
                "val": ["loss", "accuracy", "ci95"]}
    for name, tags in expected.items():
        scalars = tensorboard_scalars.read_scalars(os.path.join(tensorboard, name), tags)
        assert sorted(scalars) == sorted(tags), (name, sorted(scalars))
    # The last epoch's summaries (iteration 16) hold the values of its checkpoint.
    train = tensorboard_scalars.read_scalars(
        os.path.join(tensorboard, "train"),
        ["lslr/conv0_kernel/step_1", "bn/norm1/gamma_mean/step_1"])
    reader = tf.train.load_checkpoint(os.path.join(model_dir, "checkpoints", "epoch_001",
                                                   "model"))

    def value(key):
        return reader.get_tensor(f"{key}/.ATTRIBUTES/VARIABLE_VALUE")

    for tag, expected_value in (
            ("lslr/conv0_kernel/step_1", value("lslr/rate_conv0_kernel")[1]),
            ("bn/norm1/gamma_mean/step_1", value("backbone/norm1/gamma")[1].mean())):
        steps, values = train[tag]
        assert steps[-1] == 16 and values[-1] == pytest.approx(expected_value, rel=1e-6), tag


def test_test_ci95_is_1_96_std_over_root_tasks_of_the_per_task_accuracies(finished_run):
    """The per-task accuracies are recomputed here, independently of the test code.

    From the best epoch's checkpoint on the same fixed test tasks, scored from
    the logits; results.json's own per-task list must equal them.
    """
    model_dir, _ = finished_run
    test = json.load(open(os.path.join(model_dir, "results.json")))["test"]
    run = Run.from_dir(model_dir)
    run.restore_epoch(test["best_epoch"])
    accuracies = []
    trainer = Trainer(run.learner)
    for batch in run.eval_tasks("test"):
        result = trainer.eval_step(batch)
        correct = result["logits"].numpy().argmax(axis=-1) == result["labels"].numpy()
        accuracies.extend(correct.mean(axis=1))
    accuracies = np.array(accuracies)
    assert len(accuracies) == test["tasks"] == 6
    assert accuracies.std() > 0  # Tasks differ, so the interval is not trivially 0.
    np.testing.assert_array_equal(test["per_task"]["accuracy"], accuracies)
    assert len(test["per_task"]["served_accuracy"]) == 6
    assert test["accuracy"] == pytest.approx(accuracies.mean(), abs=1e-12)
    std = np.sqrt(np.mean((accuracies - accuracies.mean())**2))
    assert test["ci95"] == pytest.approx(1.96 * std / np.sqrt(6), abs=1e-12)


def test_evaluate_reproduces_the_final_test(finished_run):
    model_dir, _ = finished_run
    results = json.load(open(os.path.join(model_dir, "results.json")))
    again = evaluation.evaluate_run(model_dir)
    for key in ("accuracy", "ci95", "ensemble_accuracy", "ensemble_ci95", "ensemble_epochs",
                "served_accuracy", "served_ci95", "served_difference",
                "ensemble_served_accuracy"):
        assert again["test"][key] == pytest.approx(results["test"][key], abs=1e-9), key


def test_evaluate_scores_a_serving_swap_as_the_swapped_run_would(finished_run):
    """`--served_bn_stats=rn` on a batch run = an RN learner's `eval_step` with its weights."""
    model_dir, _ = finished_run
    results = evaluation.evaluate_run(model_dir, served_bn_stats="rn")
    test = results["test"]
    assert test["served_bn_stats"] == "rn"
    with open(evaluation.evaluation_path(model_dir, "rn")) as stream:
        assert json.load(stream)["test"] == test
    config = Run.from_dir(model_dir).config
    run = Run(dataclasses.replace(
        config, learner=dataclasses.replace(config.learner, bn_stats="rn")))
    run.restore_epoch(test["best_epoch"])
    trainer = Trainer(run.learner)
    accuracies = []
    for batch in run.eval_tasks("test"):
        result = trainer.eval_step(batch)
        correct = result["logits"].numpy().argmax(axis=-1) == result["labels"].numpy()
        accuracies.extend(correct.mean(axis=1))
    np.testing.assert_array_equal(test["per_task"]["served_accuracy"], accuracies)
    batch_results = json.load(open(os.path.join(model_dir, "results.json")))["test"]
    assert test["per_task"]["accuracy"] == batch_results["per_task"]["accuracy"]
    process = subprocess.run(
        [sys.executable, "-m", "mamlpp_tf.evaluate", f"--model_dir={model_dir}",
         "--served_bn_stats=tasknorm"], cwd=ROOT, capture_output=True, text=True,
        timeout=300)
    errors = [line for line in process.stderr.splitlines() if line.startswith("error:")]
    assert process.returncode != 0 and len(errors) == 1, process.stderr[-2000:]
    assert "--served_bn_stats=tasknorm" in errors[0]


def test_a_batch_statistics_run_reports_its_served_accuracy_beside_the_protocol(
        finished_run):
    model_dir, stdout = finished_run
    test = json.load(open(os.path.join(model_dir, "results.json")))["test"]
    assert test["served_bn_stats"] == "support"
    assert 0 <= test["served_accuracy"] <= 1 and test["served_ci95"] >= 0
    # A paired mean difference is the difference of the two means.
    assert test["served_difference"] == pytest.approx(
        test["served_accuracy"] - test["accuracy"], abs=1e-12)
    assert "served, one image at a time" in stdout and "Served - protocol" in stdout


def test_a_tasknorm_run_serves_exactly_what_it_reports(tasknorm_run):
    """Protocol and served path are separate code; they must agree.

    Protocol: `eval_step`, support set passed with the queries. Served: baked task model,
    fixed statistics.
    """
    model_dir, stdout = tasknorm_run
    test = json.load(open(os.path.join(model_dir, "results.json")))["test"]
    assert test["served_bn_stats"] == "tasknorm"
    assert test["served_accuracy"] == test["accuracy"]
    assert test["ensemble_served_accuracy"] == test["ensemble_accuracy"]
    assert test["served_difference"] == 0 and test["served_difference_ci95"] == 0
    assert "+0.0000 ± 0.0000" in stdout
    reader = tf.train.load_checkpoint(os.path.join(model_dir, "checkpoints", "latest"))
    alphas = [k for k in reader.get_variable_to_shape_map() if "alpha_scale" in k]
    assert len(alphas) == 2 and all(reader.get_tensor(k).shape == (2,) for k in alphas)
    assert any(np.abs(reader.get_tensor(k)).max() > 0 for k in alphas)  # Meta-learned.


def test_finished_run_prints_results_instead_of_training(finished_run):
    model_dir, _ = finished_run
    before = os.path.getmtime(os.path.join(model_dir, "results.json"))
    code, stdout, stderr = run_job(model_dir)
    assert code == 0, stderr[-2000:]
    assert "top-2 ensemble" in stdout
    assert os.path.getmtime(os.path.join(model_dir, "results.json")) == before


def test_other_flags_on_an_existing_run_are_refused(finished_run):
    model_dir, _ = finished_run
    code, _, stderr = run_job(model_dir, "--n_way=4")
    assert code == 2
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "--n_way: 3 -> 4" in lines[0]
    assert "Traceback" not in stderr


# The default suite kills a run after a checkpoint in test_fault_tolerance.py (and
# damages that checkpoint too); this undamaged case runs with the slow tests.
@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_identical_results(finished_run, tmp_path):
    model_dir = str(tmp_path / "killed")
    process = run_job(model_dir, wait=False)
    marker = os.path.join(model_dir, "checkpoints", "latest", "checkpoint")
    deadline = time.time() + 300
    while not os.path.exists(marker) and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert not os.path.exists(os.path.join(model_dir, "results.json"))
    code, _, stderr = run_job(model_dir)
    assert code == 0, stderr[-3000:]
    assert comparable_results(model_dir) == comparable_results(finished_run[0])


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    model_dir = str(tmp_path / "term")
    process = run_job(model_dir, "--checkpoint_every=1000", wait=False)
    marker = os.path.join(model_dir, "tensorboard", "train")
    deadline = time.time() + 300
    while process.poll() is None and time.time() < deadline and not (
            os.path.isdir(marker) and any(os.path.getsize(p) > 200 for p in
                                          glob.glob(os.path.join(marker, "events.*")))):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "re-run the same command to resume" in stderr and "Traceback" not in stderr
    assert tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints", "latest"))


def train_in_process(monkeypatch, capsys, model_dir, *extra):
    """`python -m mamlpp_tf.train` on the TINY config inside this process.

    Returns (exit status, stderr). Op determinism, which the job turns on for
    good, stays as it was for the other tests of this process.
    """
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["mamlpp_tf.train", f"--model_dir={model_dir}", *TINY,
                                      *extra])
    monkeypatch.setattr(tf.config.experimental, "enable_op_determinism", lambda: None)
    with flagsaver.flagsaver(), pytest.raises(SystemExit) as stop:
        cli.run(train._train, job="the training job")
    return stop.value.code, capsys.readouterr().err


@pytest.mark.parametrize("extra,named", [
    (["--nolearn_inner_lr", "--inner_update=meta_sgd"], "learn_inner_lr"),
    (["--n_way=25"], "n_way=25"),
    (["--dataset=omniglot", "--k_shot=15", "--n_query=6"], "k_shot"),
    (["--bn_stats=running"], "bn_stats='support'"),
    (["--tasknorm_alpha=layer"], "tasknorm_alpha=layer"),
    (["--meta_batch_size=0"], "meta_batch_size"),
    (["--inner_update=meta_sgd", "--nolearn_inner_lr", "--bn_stats=running"],
     "; flag --bn_stats=running"),
])
def test_bad_flags_give_one_named_line(tmp_path, monkeypatch, capsys, extra, named):
    code, stderr = train_in_process(monkeypatch, capsys, str(tmp_path / "bad"), *extra)
    assert_refused_in_one_line(code, stderr, named, tmp_path / "bad")


def test_a_meta_batch_the_replicas_cannot_share_gives_one_named_line(tmp_path):
    # A process of its own: the job sets up 3 logical CPU devices.
    code, _, stderr = run_job(str(tmp_path / "bad"), "--strategy=mirrored", "--cpu_replicas=3")
    assert_refused_in_one_line(code, stderr, "meta_batch_size=2", tmp_path / "bad")


def assert_refused_in_one_line(code, stderr, named, model_dir):
    """Status 2, one `error:` line naming `named`, no traceback, no checkpoint written."""
    assert code == 2, stderr[-2000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and named in lines[0], stderr[-2000:]
    assert "Traceback" not in stderr
    assert not os.path.exists(model_dir / "checkpoints")


def test_helpfull_lists_every_flag_with_help():
    result = subprocess.run([sys.executable, "-m", "mamlpp_tf.train", "--helpfull"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, check=False)
    text = result.stdout + result.stderr
    for name in ("dataset", "data_dir", "download", "omniglot_split", "n_way", "k_shot",
                 "n_query", "meta_batch_size", "inner_steps", "eval_inner_steps", "inner_lr",
                 "learn_inner_lr", "per_step_bn", "bn_stats", "msl_epochs", "second_order",
                 "first_order_epochs", "meta_lr", "min_meta_lr", "grad_clip", "num_filters",
                 "num_stages", "max_pooling", "epochs", "iterations_per_epoch", "val_tasks",
                 "test_tasks", "ensemble_top_k", "seed", "model_dir", "strategy",
                 "jit_compile"):
        assert f"--{name}" in text or f"--[no]{name}" in text, name
        assert flags.FLAGS[name].help, name


@pytest.mark.parametrize("flagfile", sorted(glob.glob(os.path.join(ROOT, "flags", "*.cfg"))),
                         ids=os.path.basename)
def test_every_flagfile_resolves_to_a_valid_config(flagfile, monkeypatch):
    # As README runs them, from the repository root: absl resolves a nested
    # --flagfile= (a MAML baseline including its MAML++ twin) against the CWD.
    monkeypatch.chdir(ROOT)
    with flagsaver.flagsaver():
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["train", "--flagfile=" + os.path.relpath(flagfile, ROOT)])
        config = run_flags.run_config_from_flags()
    assert open(flagfile).readline().startswith("# ")
    baseline = os.path.basename(flagfile).startswith("maml_")
    # A baseline's own --model_dir wins over its twin's: the runs do not share a directory.
    assert config.model_dir.startswith("runs/maml_" if baseline else "runs/")
    assert config.learner.msl_epochs == 0 if baseline else config.learner.msl_epochs > 0


def test_command_line_overrides_the_flagfile():
    with flagsaver.flagsaver():
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["train", "--flagfile=" + os.path.join(ROOT, "flags", "omniglot.cfg"),
                     "--n_way=5", "--model_dir=/tmp/elsewhere"])
        config = run_flags.run_config_from_flags()
    assert config.learner.n_way == 5 and config.model_dir == "/tmp/elsewhere"
    assert config.meta_batch_size == 16


def test_summarize_and_ensemble_against_hand_computation():
    accuracies = np.array([1.0, 0.5, 0.75, 0.25])
    summary = evaluation.summarize(accuracies)
    assert summary["accuracy"] == pytest.approx(0.625)
    assert summary["ci95"] == pytest.approx(1.96 * np.std(accuracies) / 2)
    labels = np.array([[0, 1], [1, 0]])

    def member(logits):
        return evaluation.TaskResults(np.zeros(2), np.zeros(2), np.array(logits), labels)

    # Logit averaging, not voting: the confident second model wins task 0's first sample.
    a = member([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]])
    b = member([[[-5.0, 5.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 1.0]]])
    task_accuracy, correct = evaluation.ensemble([a, b])
    np.testing.assert_array_equal(correct, [[0, 1], [1, 1]])
    np.testing.assert_array_equal(task_accuracy, [0.5, 1.0])


class _Messages(logging.Handler):
    """Keeps the messages of the records it gets."""

    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def logged_job(model_dir, *extra):
    """`python -m mamlpp_tf.train` on TINY in this process, its stdout a file (a log).

    Returns (exit status, absl log messages, stdout, stderr). Op determinism stays
    as it was for the other tests of this process.
    """
    handler, absl_logger = _Messages(), logging.getLogger("absl")
    level = absl_logger.level
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, flagsaver.flagsaver():
        patch.chdir(ROOT)
        patch.setattr(sys, "argv", ["mamlpp_tf.train", f"--model_dir={model_dir}", *TINY,
                                    *extra])
        patch.setattr(tf.config.experimental, "enable_op_determinism", lambda: None)
        patch.setattr(sys, "stdout", out)
        patch.setattr(sys, "stderr", err)
        absl_logger.addHandler(handler)
        absl_logger.setLevel(logging.INFO)
        try:
            with pytest.raises(SystemExit) as stop:
                cli.run(train._train, job="the training job")
        finally:
            absl_logger.removeHandler(handler)
            absl_logger.setLevel(level)
    return stop.value.code, handler.messages, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """A TINY run in this process, logged, started with a data location (unused by synthetic).

    Returns (model_dir, data_dir, log messages).
    """
    root = tmp_path_factory.mktemp("logged")
    model_dir, data_dir = str(root / "run"), str(root / "data")
    code, messages, stdout, stderr = logged_job(model_dir, f"--data_dir={data_dir}",
                                                "--nodownload")
    assert code in (None, 0), stderr[-3000:]
    assert "top-2 ensemble" in stdout
    return model_dir, data_dir, messages


_PHASE = re.compile(r"(loading|epoch \d+|validating epoch \d+|testing|testing as served) \(")
_WINDOW = re.compile(r"iteration (\d+)/16 \(epoch (\d)\): train loss (\d+\.\d{4}), "
                     r"accuracy (\d+\.\d{4}) \(mean of (\d+)\); ")


def test_a_logged_run_says_what_it_does_and_where_its_results_went(logged_run):
    model_dir, _, messages = logged_run
    test_detail = "on 6 test tasks each: the best one alone and their logit ensemble)"
    phases = [m for m in messages if _PHASE.match(m)]
    assert phases[:5] == [
        "loading (the synthetic classes of every split and the fixed validation and test "
        "tasks; building the learner)",
        "epoch 0 (meta-iterations 1-8 of 16; the first traces the second-order meta-step "
        "with multi-step loss, minutes for a large network)",
        "validating epoch 0 (4 tasks; the first meta-batch traces the evaluation step)",
        # --msl_epochs=1: epoch 1 runs (and traces) the step without MSL.
        "epoch 1 (meta-iterations 9-16 of 16; the first traces the second-order meta-step "
        "without multi-step loss, minutes for a large network)",
        "validating epoch 1 (4 tasks)",
    ]
    assert re.fullmatch(r"testing \(epochs [01], [01], best first, " + re.escape(test_detail),
                        phases[5])
    assert phases[6].startswith("testing as served (epochs ") and phases[6].endswith(
        "each through its task model with support statistics; the first task traces it)")
    assert len(phases) == 7
    # The test's two phases: 2 epochs x 6 tasks each, a line per tenth (2 tasks).
    for name in ("testing", "testing as served"):
        counts = [m for m in messages if m.startswith(f"{name}: ")]
        assert [int(m[len(name) + 2:].split("/")[0]) for m in counts] == [2, 4, 6, 8, 10, 12]
        assert counts[-1].startswith(f"{name}: 12/12 tasks (100%) in "), counts
    after = messages[messages.index(phases[6]):]
    assert after[-1] == f"results written to {os.path.join(model_dir, 'results.json')}"
    assert os.path.isabs(model_dir)


def test_tensorboard_train_scalars_are_the_logged_window_means(logged_run):
    model_dir, _, messages = logged_run
    windows = [_WINDOW.match(m) for m in messages if _WINDOW.match(m)]
    # --log_every=2 over 16 iterations: 8 windows of 2 meta-iterations each.
    assert [int(w[1]) for w in windows] == list(range(2, 17, 2))
    assert {int(w[5]) for w in windows} == {2}
    scalars = tensorboard_scalars.read_scalars(
        os.path.join(model_dir, "tensorboard", "train"), ["loss", "accuracy"])
    for tag, group in (("loss", 3), ("accuracy", 4)):
        steps, values = scalars[tag]
        assert steps.tolist() == [int(w[1]) for w in windows], tag
        logged = [float(w[group]) for w in windows]
        # The log rounds to 4 decimals; TensorBoard stores float32.
        np.testing.assert_allclose(values, logged, atol=5e-5 + 1e-6, rtol=0, err_msg=tag)


def test_a_window_open_at_a_kill_is_resumed_whole(logged_run, tmp_path):
    """Killed after checkpoint 15 (log_every=2): the resumed window of 16 is still 15-16."""
    source, data_dir, messages = logged_run
    model_dir = str(tmp_path / "killed")
    shutil.copytree(source, model_dir)
    os.remove(os.path.join(model_dir, "results.json"))
    latest = os.path.join(model_dir, "checkpoints", "latest")
    for path in glob.glob(os.path.join(latest, "ckpt-16.*")):
        os.remove(path)
    kept = os.path.join(latest, "ckpt-15")
    # With its time: CheckpointManager leaves out a checkpoint that has none.
    tf.compat.v1.train.update_checkpoint_state(latest, kept, [kept],
                                               all_model_checkpoint_timestamps=[time.time()])
    code, resumed, _, stderr = logged_job(model_dir)
    assert code in (None, 0), stderr[-3000:]
    assert f"Resumed from {kept}." in resumed
    last = [m for m in resumed if m.startswith("iteration ")]
    assert len(last) == 1 and last[0].startswith("iteration 16/16 (epoch 1)")
    reference = [m for m in messages if m.startswith("iteration 16/16 ")][0]
    assert last[0].split("; ")[0] == reference.split("; ")[0]  # The same means, of 2.
    steps, values = tensorboard_scalars.read_scalars(
        os.path.join(model_dir, "tensorboard", "train"), ["loss"])["loss"]
    _, uninterrupted = tensorboard_scalars.read_scalars(
        os.path.join(source, "tensorboard", "train"), ["loss"])["loss"]
    assert steps[-1] == 16 and values[-1] == uninterrupted[-1]
    assert comparable_results(model_dir) == comparable_results(source)


def test_a_resume_takes_the_data_location_its_run_recorded(logged_run, tmp_path):
    source, data_dir, _ = logged_run
    model_dir = str(tmp_path / "resumed")
    shutil.copytree(source, model_dir)
    results_path = os.path.join(model_dir, "results.json")
    os.remove(results_path)  # Resumes at its last iteration: the final test again.
    code, messages, _, stderr = logged_job(model_dir)
    assert code in (None, 0), stderr[-3000:]
    assert (f"Resuming {model_dir} with the data location it recorded: --data_dir={data_dir} "
            "--nodownload (give the flags to read the data elsewhere)") in messages
    config = files.read_json(results_path)["config"]
    assert (config["data_dir"], config["download"]) == (data_dir, False)
    # A moved data dir, given: used, and recorded for the next resume.
    os.remove(results_path)
    moved = str(tmp_path / "moved")
    code, messages, _, stderr = logged_job(model_dir, f"--data_dir={moved}")
    assert code in (None, 0), stderr[-3000:]
    assert (f"Resuming {model_dir} with the data location it recorded: --nodownload (give the "
            "flags to read the data elsewhere)") in messages
    assert (f"{model_dir} records its new data location for later resumes: "
            f"--data_dir: {data_dir!r} -> {moved!r}") in messages
    config = files.read_json(results_path)["config"]
    assert (config["data_dir"], config["download"]) == (moved, False)
    assert RunDir(model_dir).data_location() == {"data_dir": moved, "download": False}


def test_a_resume_reads_its_data_where_recorded_unless_given_another_place(
        tmp_path, monkeypatch, capsys):
    """mini-ImageNet needs --data_dir: a resume without it reads the recorded folder."""
    model_dir, recorded = tmp_path / "run", str(tmp_path / "recorded")
    with flagsaver.flagsaver():
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["train", *TINY, "--dataset=mini_imagenet", f"--data_dir={recorded}",
                     f"--model_dir={model_dir}"])
        RunDir(str(model_dir)).write_or_check_config(run_flags.run_config_from_flags())
    # Progress to resume (a checkpoint being written): the data fails to load before it.
    latest = model_dir / "checkpoints" / "latest"
    latest.mkdir(parents=True)
    (latest / "ckpt-3.index").write_bytes(b"")
    for given, read in ((None, recorded), (str(tmp_path / "moved"), str(tmp_path / "moved"))):
        extra = ["--dataset=mini_imagenet"] + ([f"--data_dir={given}"] if given else [])
        code, stderr = train_in_process(monkeypatch, capsys, str(model_dir), *extra)
        lines = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert code == 2 and len(lines) == 1, stderr[-2000:]
        assert f"mini-ImageNet data_dir={read} is not a directory" in lines[0]
    # A start that fails writes nothing: the recorded location stays.
    assert files.read_json(str(model_dir / "config.json"))["data_dir"] == recorded


def test_evaluate_says_what_it_does_and_where_it_wrote(finished_run, caplog):
    model_dir, _ = finished_run
    with caplog.at_level(logging.INFO, logger="absl"):
        evaluation.evaluate_run(model_dir, reporter=progress.LogLines())
    messages = [record.getMessage() for record in caplog.records]
    assert [m.split(" (")[0] for m in messages if _PHASE.match(m)] == [
        "loading", "testing", "testing as served"]
    assert "testing: 12/12 tasks (100%)" in " ".join(messages)
    assert messages[-1] == ("evaluation written to "
                            f"{os.path.abspath(evaluation.evaluation_path(model_dir))}")
