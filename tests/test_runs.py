"""A run directory on TF's in-memory `ram://` filesystem: everything through tf.io.gfile."""

import ast
import json
import logging
import os
import uuid

from absl import flags
from absl.testing import flagsaver
import numpy as np
import pytest
import tensorflow as tf

from mamlpp_tf import MamlPlusPlus, Trainer, files
from mamlpp_tf import flags as run_flags
from mamlpp_tf.config import RunConfig
from mamlpp_tf.training import loop, run_dir

from conftest import ROOT, TINY, tiny_config


@pytest.fixture
def ram_dir():
    """A fresh run directory on the process-wide `ram://` filesystem, deleted afterwards."""
    path = f"ram://test_runs_{uuid.uuid4().hex}/run"
    yield path
    root = os.path.dirname(path)
    if tf.io.gfile.exists(root):
        tf.io.gfile.rmtree(root)
    # A local-only API given a ram:// path would have made ./ram: instead.
    assert not os.path.exists("ram:")


def weights(learner):
    return [v.numpy() for v in learner.backbone.weights + learner.lslr.weights]


def pattern(shift, shape):
    """Distinct, known values for a variable of `shape`."""
    return np.arange(np.prod(shape), dtype=np.float64).reshape(shape) / 100 + shift


def shifted_learner(shift):
    """A tiny learner whose weights are `pattern(shift, ...)`, one array per variable."""
    learner = MamlPlusPlus(tiny_config())
    for variable in learner.backbone.weights + learner.lslr.weights:
        variable.assign(pattern(shift, variable.shape))
    return learner


def test_config_history_and_results_on_ram(ram_dir):
    run = run_dir.RunDir(ram_dir)

    def config(n_way):
        return RunConfig(learner=tiny_config(n_way=n_way), model_dir=ram_dir)

    assert run.read_history() == [] and run.read_results() is None
    run.write_or_check_config(config(2))
    assert run.read_config() == config(2)
    run.write_or_check_config(config(3))  # No progress yet: free for other flags.
    assert files.read_json(run.config_path)["learner"]["n_way"] == 3
    history = [{"epoch": 0, "accuracy": 0.5, "loss": 1.25}]
    run.write_history(history)
    assert run.read_history() == history
    results = {"test": {"accuracy": 0.75}, "validation": history}
    run.write_results(results)
    assert run.read_results() == results and run.has_progress()
    with tf.io.gfile.GFile(run.results_path, "rb") as stream:
        assert stream.read() == json.dumps(results, indent=2, sort_keys=True).encode()
    with pytest.raises(ValueError, match="--n_way: 3 -> 2"):
        run.check_config(config(2))
    assert sorted(tf.io.gfile.listdir(ram_dir)) == ["config.json", "history.json",
                                                    "results.json"]


def test_a_run_with_progress_gives_its_data_location_and_records_a_moved_one(ram_dir, caplog):
    run = run_dir.RunDir(ram_dir)

    def config(data_dir):
        return RunConfig(learner=tiny_config(), model_dir=ram_dir, data_dir=data_dir,
                         download=False)

    assert run.data_location() == {}  # A new run: its flags are free.
    run.write_or_check_config(config("/data/a"))
    assert run.data_location() == {}  # No progress yet: still free.
    run.write_history([{"epoch": 0, "accuracy": 0.5, "loss": 1.0}])
    run.write_results({"test": {}})
    assert run.has_progress()
    assert run.data_location() == {"data_dir": "/data/a", "download": False}
    with caplog.at_level(logging.INFO, logger="absl"):
        run.write_or_check_config(config("/data/b"))  # Moved: accepted and recorded.
    assert run.data_location() == {"data_dir": "/data/b", "download": False}
    assert run.read_config() == config("/data/b")
    assert any("--data_dir: '/data/a' -> '/data/b'" in record.getMessage()
               for record in caplog.records)


def test_flag_defaults_apply_only_to_flags_the_command_line_leaves_out(ram_dir):
    recorded = {"data_dir": "/recorded", "download": False}
    with flagsaver.flagsaver():
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["train", *TINY, f"--model_dir={ram_dir}", "--data_dir=/given"])
        config = run_flags.run_config_from_flags(defaults=recorded)
    assert (config.data_dir, config.download) == ("/given", False)
    with flagsaver.flagsaver():
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["train", *TINY, f"--model_dir={ram_dir}", "--download"])
        config = run_flags.run_config_from_flags(defaults=recorded)
    assert (config.data_dir, config.download) == ("/recorded", True)


def test_epoch_checkpoints_save_restore_and_prune_on_ram(ram_dir):
    run = run_dir.RunDir(ram_dir)
    for epoch in range(3):
        run.save_epoch(shifted_learner(float(epoch)).checkpoint_items(), epoch)
    run.save_epoch(shifted_learner(5.0).checkpoint_items(), 1)  # Overwrites epoch 1.
    assert run.kept_epochs() == [0, 1, 2] and run.has_progress()
    assert sorted(tf.io.gfile.listdir(run.checkpoint_dir)) == [
        "epoch_000", "epoch_001", "epoch_002"]  # No temporary left.
    run.prune_epochs([0, 1])
    assert run.kept_epochs() == [0, 1]
    for epoch, shift in ((0, 0.0), (1, 5.0)):
        learner = shifted_learner(-9.0)
        run.restore_epoch(learner.checkpoint_items(), epoch)
        for restored in weights(learner):
            np.testing.assert_array_equal(restored, pattern(shift, restored.shape))
    with pytest.raises(FileNotFoundError, match="epoch 2"):
        run.restore_epoch(shifted_learner(0.0).checkpoint_items(), 2)


def test_a_half_published_epoch_is_not_kept_and_is_pruned(ram_dir):
    """What a kill leaves: data moved without its index, unpublished temporaries."""
    run = run_dir.RunDir(ram_dir)
    run.save_epoch(shifted_learner(0.0).checkpoint_items(), 0)
    run.save_epoch(shifted_learner(1.0).checkpoint_items(), 3)
    tf.io.gfile.remove(os.path.join(run.epoch_path(3), "model.index"))
    files.atomic_write(f"{run.checkpoint_dir}/.tmp_epoch_004/model.index", "partial")
    files.atomic_write(f"{run.checkpoint_dir}/epoch_005.tmp/model.index", "older version")
    assert run.kept_epochs() == [0]
    with pytest.raises(FileNotFoundError, match="epoch 3"):
        run.restore_epoch(shifted_learner(0.0).checkpoint_items(), 3)
    run.prune_epochs([0, 3, 4, 5])
    assert tf.io.gfile.listdir(run.checkpoint_dir) == ["epoch_000"]


def test_the_latest_manager_saves_and_restores_on_ram(ram_dir):
    run = run_dir.RunDir(ram_dir)
    trainer = Trainer(shifted_learner(2.0))
    trainer.step.assign(7)
    manager = run.latest_manager(trainer.checkpoint_items())
    manager.save()
    restored = Trainer(shifted_learner(0.0))
    fresh = run.latest_manager(restored.checkpoint_items())
    fresh.checkpoint.restore(fresh.latest_checkpoint).assert_existing_objects_matched()
    assert int(restored.step.numpy()) == 7 and run.has_progress()
    restored = restored.learner
    for got in weights(restored):
        np.testing.assert_array_equal(got, pattern(2.0, got.shape))


def test_a_checkpoint_restores_the_open_training_window_and_an_older_one_starts_it_empty(
        ram_dir):
    run = run_dir.RunDir(ram_dir)
    trainer = Trainer(shifted_learner(2.0))
    trainer.step.assign(7)
    older = run.latest_manager(trainer.checkpoint_items())  # As saved before windows.
    older.save(checkpoint_number=7)
    window = tf.Variable([1.5, 0.75, 1.0], dtype=tf.float64)
    newer = run.latest_manager({**trainer.checkpoint_items(), loop._WINDOW: window})
    newer.save(checkpoint_number=8)
    for path, expected in ((newer.latest_checkpoint, [1.5, 0.75, 1.0]),
                           (older.latest_checkpoint, [0.0, 0.0, 0.0])):
        restored = Trainer(shifted_learner(0.0))
        items = restored.checkpoint_items()
        fresh = tf.Variable(tf.zeros([3], tf.float64))
        tf.io.gfile.remove(os.path.join(run.latest_dir, "checkpoint"))
        tf.compat.v1.train.update_checkpoint_state(run.latest_dir, path, [path],
                                                   all_model_checkpoint_timestamps=[1.0])
        manager = run.latest_manager({**items, loop._WINDOW: fresh})
        loop._restore_latest(manager, items, fresh)
        assert int(restored.step.numpy()) == 7, path
        np.testing.assert_array_equal(fresh.numpy(), expected)


def test_the_run_lock_is_skipped_with_a_warning_off_local_disk(ram_dir, caplog):
    with caplog.at_level(logging.WARNING):
        with run_dir.RunLock(ram_dir):
            pass
    assert any("cross-machine locking is not provided" in record.getMessage() and
               ram_dir in record.getMessage() for record in caplog.records)
    assert not tf.io.gfile.exists(ram_dir)  # No lock file written anywhere.


# Calls that work on local paths only; allowed in `RunLock` (local by design).
_LOCAL_ONLY = {"open", "os.open", "os.replace", "os.rename", "os.makedirs", "os.mkdir",
               "os.rmdir", "os.remove", "os.unlink", "os.listdir", "os.scandir", "os.walk",
               "os.stat", "os.path.exists", "os.path.isdir", "os.path.isfile",
               "os.path.getsize", "os.fsync"}
_LOCAL_MODULES = ("shutil", "tempfile", "fcntl")


def _local_calls(tree, allowed_class=None):
    """Names of local-only calls in `tree`, outside the class `allowed_class`."""
    found = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.ClassDef) and node.name == allowed_class:
            continue
        if isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            if name in _LOCAL_ONLY or name.startswith(tuple(m + "." for m in _LOCAL_MODULES)):
                found.append(name)
        found += _local_calls(node, allowed_class)
    return found


@pytest.mark.parametrize("path, allowed_class", [
    ("mamlpp_tf/training/run_dir.py", "RunLock"), ("mamlpp_tf/training/evaluation.py", None),
    ("export/saved_models.py", None), ("export/warmup.py", None)])
def test_run_directory_code_calls_no_local_only_file_api(path, allowed_class):
    with open(os.path.join(ROOT, path), encoding="utf-8") as stream:
        tree = ast.parse(stream.read())
    assert _local_calls(tree, allowed_class) == []


def test_the_checker_finds_local_only_calls():
    tree = ast.parse("import shutil\nclass RunLock:\n    def f(self):\n        open('x')\n"
                     "def g(p):\n    shutil.rmtree(p)\n    os.path.exists(p)\n")
    assert _local_calls(tree, "RunLock") == ["shutil.rmtree", "os.path.exists"]
    assert _local_calls(tree) == ["open", "shutil.rmtree", "os.path.exists"]


def test_a_tiny_run_trains_to_the_end_on_ram(ram_dir):
    with flagsaver.flagsaver():
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["train", *TINY, f"--model_dir={ram_dir}"])
        config = run_flags.run_config_from_flags()
    results = json.loads(json.dumps(loop.train(config, log_every=8)))  # Tuples as lists.
    run = run_dir.RunDir(ram_dir)
    assert files.read_json(run.results_path) == results
    assert run.read_history() == results["validation"] and len(results["validation"]) == 2
    assert run.kept_epochs() == [0, 1] and results["iterations"] == 16
    assert sorted(tf.io.gfile.listdir(run.checkpoint_dir)) == ["epoch_000", "epoch_001",
                                                               "latest"]
    assert tf.io.gfile.glob(os.path.join(run.tensorboard_dir, "*", "events.*"))
    assert loop.train(config) == results  # Finished: read back, not trained again.


def test_best_epochs_ranks_kept_epochs_by_accuracy_nan_last_ties_earlier(ram_dir):
    run = run_dir.RunDir(ram_dir)
    for epoch in range(5):
        run.save_epoch(shifted_learner(float(epoch)).checkpoint_items(), epoch)
    run.prune_epochs([0, 1, 2, 4])  # Epoch 3, the best by accuracy, is no longer kept.
    history = [{"epoch": 0, "accuracy": 0.5}, {"epoch": 1, "accuracy": float("nan")},
               {"epoch": 2, "accuracy": 0.7}, {"epoch": 3, "accuracy": 0.9},
               {"epoch": 4, "accuracy": 0.5}]
    assert run.best_epochs(5, history) == [2, 0, 4, 1]
    assert run.best_epochs(1, history) == [2]
    run.write_history(history)
    assert run.best_epochs(2) == [2, 0]  # From history.json by default.
    assert run_dir.RunDir(ram_dir + "/none").best_epochs(3) == []


def test_the_run_directory_module_imports_neither_learner_nor_trainer():
    with open(os.path.join(ROOT, "mamlpp_tf/training/run_dir.py"), encoding="utf-8") as stream:
        tree = ast.parse(stream.read())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for alias in node.names}
    assert not {m for m in imported if m and m.startswith("mamlpp_tf") and
                m not in ("mamlpp_tf", "mamlpp_tf.config")}, imported
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
             for alias in node.names}
    assert not names & {"learner", "trainer", "MamlPlusPlus", "Trainer"}
