"""Faults injected into the main job: damaged checkpoints, lock contention, config changes."""

import glob
import json
import os
import random
import shutil
import signal
import time

import numpy as np
import pytest
import tensorflow as tf

from mamlpp_tf import tensorboard_scalars
from mamlpp_tf.training import run_dir

from conftest import comparable_results, run_job


def kill_after_checkpoints(model_dir, count):
    """Starts the TINY run and SIGKILLs it once `count` latest checkpoints exist."""
    process = run_job(model_dir, wait=False)
    latest = os.path.join(model_dir, "checkpoints", "latest")

    def listed():
        # The manager's state file, not the files on disk: a checkpoint counts
        # once a restore would consider it.
        state = tf.train.get_checkpoint_state(latest) if os.path.isdir(latest) else None
        return list(state.all_model_checkpoint_paths) if state else []

    deadline = time.time() + 300
    while len(listed()) < count and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    return [os.path.join(latest, os.path.basename(p)) + ".index" for p in listed()]


def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(finished_run, tmp_path):
    model_dir = str(tmp_path / "damaged")
    indexes = kill_after_checkpoints(model_dir, 2)
    assert len(indexes) >= 2
    newest = indexes[-1][:-len(".index")]
    data_file = glob.glob(newest + ".data-*")[0]
    with open(data_file, "r+b") as stream:
        stream.truncate(os.path.getsize(data_file) // 2)
    code, _, stderr = run_job(model_dir)
    assert code == 0, stderr[-3000:]
    warning = [line for line in stderr.splitlines() if "is damaged" in line]
    assert warning and os.path.basename(newest) in warning[0]
    assert os.path.basename(indexes[-2][:-len(".index")]) in warning[0]
    assert comparable_results(model_dir) == comparable_results(finished_run[0])


def test_a_second_process_on_the_same_model_dir_is_refused(tmp_path):
    model_dir = str(tmp_path / "locked")
    with run_dir.RunLock(model_dir):
        code, _, stderr = run_job(model_dir)
    assert code == 2
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"in use by process {os.getpid()}" in lines[0]
    assert not os.path.exists(os.path.join(model_dir, "config.json"))


def test_a_stale_lock_from_a_dead_process_is_taken_over(tmp_path):
    model_dir = tmp_path / "stale"
    model_dir.mkdir()
    (model_dir / "lock").write_text("999999")  # No process holds the flock.
    with run_dir.RunLock(str(model_dir)):
        assert (model_dir / "lock").read_text() == str(os.getpid())
    with run_dir.RunLock(str(model_dir)):  # Released on exit: takeable again.
        pass


def test_override_config_resumes_with_recorded_new_flags(tmp_path):
    model_dir = str(tmp_path / "override")
    kill_after_checkpoints(model_dir, 1)
    code, _, stderr = run_job(model_dir, "--ensemble_top_k=1")
    assert code == 2 and "--ensemble_top_k: 2 -> 1" in stderr
    code, stdout, stderr = run_job(model_dir, "--ensemble_top_k=1", "--override_config")
    assert code == 0, stderr[-3000:]
    assert "top-1 ensemble" in stdout
    assert json.load(open(os.path.join(model_dir, "config.json")))["ensemble_top_k"] == 1


@pytest.mark.slow
def test_sigkill_at_ten_random_moments_loses_nothing(finished_run, tmp_path):
    """Kills land anywhere: start-up, tracing, training, checkpoint writes, validation, test."""
    model_dir = str(tmp_path / "chaos")
    rng = random.Random(20261126)
    started = time.time()
    code, _, stderr = run_job(str(tmp_path / "timing"))
    assert code == 0, stderr[-3000:]
    lifetime = time.time() - started
    kills = 0
    while kills < 10:
        process = run_job(model_dir, wait=False)
        time.sleep(rng.uniform(0.5, lifetime))
        if process.poll() is not None:  # Finished before the kill: start over.
            process.communicate()
            shutil.rmtree(model_dir)
            continue
        process.send_signal(signal.SIGKILL)
        process.communicate()
        kills += 1
    code, _, stderr = run_job(model_dir)
    assert code == 0, stderr[-3000:]
    assert comparable_results(model_dir) == comparable_results(finished_run[0])


def test_a_nan_batch_stops_the_run_naming_iteration_and_checkpoint(tmp_path):
    model_dir = str(tmp_path / "nan_stop")
    code, _, stderr = run_job(model_dir, fault=("nan", "5"))
    assert code == 3, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "iteration 5" in lines[0] and "ckpt-3" in lines[0], lines
    assert "Traceback" not in stderr
    assert not os.path.exists(os.path.join(model_dir, "results.json"))


def test_nan_policy_skip_finishes_and_counts_the_skip(finished_run, tmp_path):
    model_dir = str(tmp_path / "nan_skip")
    code, _, stderr = run_job(model_dir, "--nan_policy=skip", fault=("nan", "5"))
    assert code == 0, stderr[-3000:]
    results = json.load(open(os.path.join(model_dir, "results.json")))
    assert results["skipped_updates"] == 1
    assert all(entry["loss"] == entry["loss"] for entry in results["validation"])  # No NaN.
    reference = json.load(open(os.path.join(finished_run[0], "results.json")))
    assert reference["skipped_updates"] == 0
    # One withheld update changes the trajectory: the runs differ.
    assert results["validation"] != reference["validation"]
    # But not the schedules: the meta learning rate follows the iterations taken, as MSL
    # and derivative-order annealing do (iteration 16 starts epoch 2 in both runs).
    rates = [tensorboard_scalars.read_scalars(os.path.join(path, "tensorboard", "train"),
                                              ["meta_lr"])["meta_lr"]
             for path in (model_dir, finished_run[0])]
    np.testing.assert_array_equal(rates[0][0], rates[1][0])
    np.testing.assert_array_equal(rates[0][1], rates[1][1])
    assert rates[0][1][-1] == pytest.approx(0.001)


def test_an_epoch_checkpointed_but_not_validated_is_validated_on_resume(finished_run, tmp_path):
    """The state a signal or kill during the last validation leaves: its end saved, no entry."""
    model_dir = str(tmp_path / "unvalidated")
    shutil.copytree(finished_run[0], model_dir)
    os.remove(os.path.join(model_dir, "results.json"))
    history_path = os.path.join(model_dir, "history.json")
    history = json.load(open(history_path))
    assert [entry["epoch"] for entry in history] == [0, 1]
    json.dump(history[:1], open(history_path, "w"))
    shutil.rmtree(os.path.join(model_dir, "checkpoints", "epoch_001"), ignore_errors=True)
    code, _, stderr = run_job(model_dir)
    assert code == 0, stderr[-3000:]
    assert json.load(open(history_path)) == history
    assert comparable_results(model_dir) == comparable_results(finished_run[0])
