"""A run directory: config, checkpoints, history, results, and which epochs are best.

Layout of `--model_dir`:

    config.json              the resolved RunConfig (written once the run has passed
                             every check, checked on resume; a resume reads its data
                             location from it and records a new one given)
    checkpoints/latest/      tf.train.CheckpointManager of the training state
                             (`Trainer.checkpoint_items`: model, update rule, optimizer,
                             the meta-iteration counter that positions the task stream;
                             and the training loop's open window of metrics)
    checkpoints/epoch_NNN/   the model after epoch NNN (`MamlPlusPlus.checkpoint_items`),
                             kept for the top-k validation epochs (`best_epochs`)
    history.json             validation results per finished epoch
    results.json             final test results (present = run finished)
    tensorboard/{train,val}  summaries

Every path goes through `tf.io.gfile`, so `model_dir` may be local, on GCS
(`gs://...`) or in memory (`ram://...`). The JSON files are written with
`files.write_json` (never seen half-written). An epoch checkpoint is written to
`.tmp_epoch_NNN/` and published with `files.publish_dir`, its `model.index`
last; an epoch counts as kept only once that file is in place, so a kill at
any instant never leaves a half-written epoch that a restore would use.
`evaluate`, `report` and the exporters rebuild everything from here.

The objects a checkpoint holds are passed in as `tf.train.Checkpoint` items,
so this module knows the layout and not the learner or the trainer.
"""

from __future__ import annotations

from collections.abc import Mapping
import contextlib
import fcntl
import os
from typing import Any

from absl import logging
import tensorflow as tf

from mamlpp_tf import files
from mamlpp_tf.config import RunConfig

# `name: trackable` objects of a `tf.train.Checkpoint` (model, optimizer, counters).
CheckpointItems = Mapping[str, object]

# Fields that say where the data is, not what it is: a resume takes the run's
# recorded values of those its command line leaves out (`RunDir.data_location`).
DATA_LOCATION_FIELDS = ("data_dir", "download")
# Fields that may differ between the run that created a model_dir and a resumed
# one: where the data lives and how often to checkpoint do not change results.
_RESUMABLE_FIELDS = DATA_LOCATION_FIELDS + ("checkpoint_every", "model_dir", "nan_policy")
# The file of an epoch checkpoint written last: its presence marks the epoch complete.
_EPOCH_COMMIT = "model.index"
# Prefix of an epoch checkpoint being written (a prefix: see `mamlpp_tf.files`).
_TEMPORARY = ".tmp_"


def config_differences(old: RunConfig, new: RunConfig,
                       fields: tuple[str, ...] | None = None) -> list[str]:
    """Flags whose values differ between two configs, `--flag: old -> new` each.

    Args:
      old: The recorded config.
      new: This invocation's.
      fields: The flags to compare; default all but the resumable ones.
    """
    old_flat, new_flat = _flatten(old.to_dict()), _flatten(new.to_dict())
    keys = fields if fields is not None else [
        key for key in sorted(set(old_flat) | set(new_flat)) if key not in _RESUMABLE_FIELDS]
    return [f"--{key}: {old_flat.get(key)!r} -> {new_flat.get(key)!r}"
            for key in keys if old_flat.get(key) != new_flat.get(key)]


def _flatten(values: dict) -> dict:
    flat = dict(values)
    flat.update(flat.pop("learner"))
    flat["image_shape"] = list(flat["image_shape"])
    return flat


class RunDir:
    """Reads and writes everything of one run under `model_dir`.

    Args:
      model_dir: The run directory (created on first write).
    """

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        self.config_path = os.path.join(model_dir, "config.json")
        self.history_path = os.path.join(model_dir, "history.json")
        self.results_path = os.path.join(model_dir, "results.json")
        self.checkpoint_dir = os.path.join(model_dir, "checkpoints")
        self.latest_dir = os.path.join(self.checkpoint_dir, "latest")
        self.tensorboard_dir = os.path.join(model_dir, "tensorboard")

    # ----------------------------------------------------------------- config

    def read_config(self) -> RunConfig:
        """The config the run was created with.

        Raises:
          FileNotFoundError: if `model_dir` holds no run.
        """
        if not tf.io.gfile.exists(self.config_path):
            raise FileNotFoundError(f"--model_dir={self.model_dir} holds no run "
                                    f"(no {os.path.basename(self.config_path)})")
        return RunConfig.from_dict(files.read_json(self.config_path))

    def data_location(self) -> dict[str, Any]:
        """Where the run reads its data (`DATA_LOCATION_FIELDS`), if it has progress to resume.

        Returns:
          `{field: value}` as recorded in `config.json`; empty for a new run or
          one without progress (`has_progress`), whose flags are free.
        """
        if not tf.io.gfile.exists(self.config_path) or not self.has_progress():
            return {}
        config = self.read_config()
        return {name: getattr(config, name) for name in DATA_LOCATION_FIELDS}

    def has_progress(self) -> bool:
        """Whether the run holds anything to resume: a checkpoint, an epoch, results.

        Anything in `checkpoints/latest/` counts, even a half-written first
        checkpoint: only a directory with none is free for other flags.
        """
        latest = (tf.io.gfile.isdir(self.latest_dir) and
                  bool(tf.io.gfile.listdir(self.latest_dir)))
        return latest or bool(self.kept_epochs()) or tf.io.gfile.exists(self.results_path)

    def check_config(self, config: RunConfig, override: bool = False) -> list[str]:
        """Checks, without writing, that `config` may run in `model_dir`.

        A run with progress (`has_progress`) made with other flags refuses
        them unless `override`; a `config.json` alone (a start that failed or
        stopped before its first checkpoint) does not.

        Args:
          config: The config of this invocation.
          override: Accept a config that differs from the run's.

        Returns:
          The accepted differences from the recorded config, one
          `--flag: old -> new` each (none for a new or unchanged run).

        Raises:
          ValueError: listing the flags that differ from the existing run.
        """
        if not tf.io.gfile.exists(self.config_path):
            return []
        differences = config_differences(self.read_config(), config)
        if differences and not override and self.has_progress():
            raise ValueError(
                f"--model_dir={self.model_dir} was created with other flags "
                f"({'; '.join(differences)}); use a new --model_dir, the original "
                "flags, or --override_config")
        return differences

    def write_or_check_config(self, config: RunConfig, override: bool = False) -> None:
        """Records `config` for a new run, or checks a resumed run was made with it.

        Call it once the run is known to start (flags, data and tasks
        validated): a `config.json` claims the directory for these flags. A
        data location other than the recorded one (a moved data dir) is
        recorded, for the next resume to read.

        Args:
          config: The config of this invocation.
          override: Accept (and record) a config that differs from the run's.

        Raises:
          ValueError: as `check_config`.
        """
        differences = self.check_config(config, override)
        exists = tf.io.gfile.exists(self.config_path)
        moved = exists and config_differences(self.read_config(), config, DATA_LOCATION_FIELDS)
        if not exists or differences or moved:
            if moved:
                logging.info("%s records its new data location for later resumes: %s",
                             self.model_dir, "; ".join(moved))
            if differences and self.has_progress():
                logging.warning("--override_config: %s now runs with %s", self.model_dir,
                                "; ".join(differences))
            elif differences:
                logging.info("%s holds no checkpoint; starting afresh with %s",
                             self.model_dir, "; ".join(differences))
            files.write_json(self.config_path, config.to_dict())

    # ---------------------------------------------------------------- history

    def read_history(self) -> list[dict]:
        """Validation results of finished epochs, in epoch order."""
        if not tf.io.gfile.exists(self.history_path):
            return []
        return files.read_json(self.history_path)

    def write_history(self, history: list[dict]) -> None:
        """Replaces the validation history with `history` (all finished epochs)."""
        files.write_json(self.history_path, history)

    def read_results(self) -> dict | None:
        """Final results, or None while the run has not finished."""
        if not tf.io.gfile.exists(self.results_path):
            return None
        return files.read_json(self.results_path)

    def write_results(self, results: dict) -> None:
        """Writes the final results, marking the run finished."""
        files.write_json(self.results_path, results)

    # ------------------------------------------------------------ checkpoints

    def latest_manager(self, training_state: CheckpointItems) -> tf.train.CheckpointManager:
        """Manager of the full training state (two kept, so one can fall back).

        Save with `save_latest`, which names the path when a write fails.

        Args:
          training_state: What a resume needs (`Trainer.checkpoint_items`).
        """
        checkpoint = tf.train.Checkpoint(**training_state)
        return tf.train.CheckpointManager(checkpoint, self.latest_dir, max_to_keep=2)

    def save_latest(self, manager: tf.train.CheckpointManager, iteration: int) -> None:
        """Saves `manager`'s training state as checkpoint `ckpt-<iteration>`.

        TensorFlow writes it under a temporary prefix and renames it into place,
        then rewrites the manager's state file atomically, so a failed write
        leaves the previous checkpoints (and the state file naming them) intact.

        Raises:
          files.WriteError: the filesystem refused a write (naming the checkpoint).
        """
        prefix = os.path.join(self.latest_dir, f"ckpt-{iteration}")
        with files.writing(prefix):
            try:
                manager.save(checkpoint_number=iteration)
            except BaseException:
                files.remove_quietly(prefix + "_temp")  # The saver's partial shards.
                raise

    def epoch_path(self, epoch: int) -> str:
        """Checkpoint prefix of the model kept after `epoch`."""
        return os.path.join(self.checkpoint_dir, f"epoch_{epoch:03d}")

    def save_epoch(self, model: CheckpointItems, epoch: int) -> None:
        """Saves the model after `epoch` (`MamlPlusPlus.checkpoint_items`).

        Written to `.tmp_epoch_NNN/` and published (see the module docstring):
        a kill or a failed write leaves the epoch either complete or not
        counted as kept.

        Raises:
          files.WriteError: the filesystem refused a write (naming the epoch's path).
        """
        final = self.epoch_path(epoch)
        temporary = os.path.join(self.checkpoint_dir, _TEMPORARY + os.path.basename(final))
        with files.writing(final):
            try:
                _remove_tree(temporary)
                tf.train.Checkpoint(**model).write(os.path.join(temporary, "model"))
                _remove_tree(final)
                files.publish_dir(temporary, final, _EPOCH_COMMIT)
            except BaseException:
                files.remove_quietly(temporary)
                raise

    def restore_epoch(self, model: CheckpointItems, epoch: int) -> None:
        """Loads the model saved after `epoch` into `model`'s objects.

        Raises:
          FileNotFoundError: if that epoch's checkpoint was not kept.
        """
        path = self.epoch_path(epoch)
        if not tf.io.gfile.exists(os.path.join(path, _EPOCH_COMMIT)):
            raise FileNotFoundError(f"no checkpoint of epoch {epoch} in {self.checkpoint_dir}")
        tf.train.Checkpoint(**model).read(
            os.path.join(path, "model")).assert_existing_objects_matched()

    def best_epochs(self, k: int, history: list[dict] | None = None) -> list[int]:
        """The `k` kept epochs with the best validation accuracy, best first.

        The one ranking of the run's epochs: what the training job keeps and
        tests, what `evaluate`, the exporters and the report pick.

        Args:
          k: How many.
          history: Validation entries to rank (default: `read_history()`).
        """
        kept = set(self.kept_epochs())
        history = self.read_history() if history is None else history
        # A NaN accuracy (a diverged model) ranks last, never "best"; ties: the earlier epoch.
        ranked = sorted((entry for entry in history if entry["epoch"] in kept),
                        key=lambda entry: (-entry["accuracy"] if entry["accuracy"] ==
                                           entry["accuracy"] else float("inf"), entry["epoch"]))
        return [entry["epoch"] for entry in ranked[:k]]

    def kept_epochs(self) -> list[int]:
        """Epochs whose model checkpoints exist, complete."""
        return sorted(epoch for epoch, complete in self._epoch_dirs().values() if complete)

    def prune_epochs(self, keep: list[int]) -> None:
        """Deletes epoch checkpoints not in `keep` (and any half-written ones)."""
        for name, (epoch, complete) in self._epoch_dirs().items():
            if not complete or epoch not in keep:
                _remove_tree(os.path.join(self.checkpoint_dir, name))

    def _epoch_dirs(self) -> dict[str, tuple[int | None, bool]]:
        """`name: (epoch, complete)` of each epoch entry; epoch None for a temporary."""
        if not tf.io.gfile.isdir(self.checkpoint_dir):
            return {}
        entries = {}
        # GCS lists sub-directories with a trailing slash.
        for name in (n.rstrip("/") for n in tf.io.gfile.listdir(self.checkpoint_dir)):
            number = name[len("epoch_"):]
            if name.startswith("epoch_") and number.isdigit():
                entries[name] = (int(number), tf.io.gfile.exists(
                    os.path.join(self.checkpoint_dir, name, _EPOCH_COMMIT)))
            elif name.startswith(("epoch_", _TEMPORARY + "epoch_")):
                # Being written, or `epoch_NNN.tmp` of an older version.
                entries[name] = (None, False)
        return entries


def _remove_tree(path: str) -> None:
    """Deletes the directory `path` with its content, if it exists."""
    with contextlib.suppress(tf.errors.NotFoundError):
        tf.io.gfile.rmtree(path)


class RunLockedError(ValueError):
    """Another live process owns the run directory."""


class RunLock:
    """One writer per local run directory: an exclusive `flock` on `<model_dir>/lock`.

    The lock file holds the owner's pid for the error message. The kernel
    releases the lock when its owner dies, even by SIGKILL, so a stale lock file
    from a dead process is simply taken over.

    Local paths only (including NFS mounts, where Linux maps `flock` to NFS
    locks): object stores such as GCS offer no such lock, and this class
    provides no cross-machine locking there. For a `scheme://` model_dir it
    logs a warning and runs unlocked.

    Args:
      model_dir: The run directory (created if needed).
    """

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        self.path = os.path.join(model_dir, "lock")
        self._stream = None

    def __enter__(self) -> RunLock:
        if not files.is_local(self.model_dir):
            logging.warning(
                "--model_dir=%s is not on the local filesystem: running without the run "
                "lock (a local flock; cross-machine locking is not provided), so make sure "
                "no other process trains in it", self.model_dir)
            return self
        os.makedirs(self.model_dir, exist_ok=True)
        stream = open(self.path, "a+")  # pylint: disable=consider-using-with
        try:
            fcntl.flock(stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            stream.seek(0)
            owner = stream.read().strip() or "unknown"
            stream.close()
            raise RunLockedError(f"--model_dir={self.model_dir} is in use by "
                                 f"process {owner} (lock {self.path}); wait for it or stop "
                                 "it") from None
        stream.seek(0)
        stream.truncate()
        stream.write(str(os.getpid()))
        stream.flush()
        self._stream = stream
        return self

    def __exit__(self, *exc) -> None:
        if self._stream is not None:
            fcntl.flock(self._stream.fileno(), fcntl.LOCK_UN)
            self._stream.close()
            self._stream = None
