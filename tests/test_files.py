"""Durable file I/O (`mamlpp_tf.files`) on TF's in-memory `ram://` filesystem and local disk."""

import json
import os
import uuid

import pytest
import tensorflow as tf

from mamlpp_tf import files
from mamlpp_tf_export import saved_models

# Nested values, a float, a non-ASCII string, None: what results.json holds.
VALUE = {"test": {"accuracy": 0.875, "ci95": 0.0125, "epochs": [3, 1]},
         "label": "naïve", "missing": None, "validation": [{"epoch": 0, "loss": 1.5}]}


@pytest.fixture
def ram_dir():
    """A fresh directory of the process-wide `ram://` filesystem, deleted afterwards."""
    path = f"ram://test_files_{uuid.uuid4().hex}"
    yield path
    if tf.io.gfile.exists(path):
        tf.io.gfile.rmtree(path)
    # A local-only API given a ram:// path would have made ./ram: instead.
    assert not os.path.exists("ram:")


def read_bytes(path):
    with tf.io.gfile.GFile(path, "rb") as stream:
        return stream.read()


def test_atomic_write_creates_parents_and_overwrites(ram_dir):
    path = f"{ram_dir}/a/b/c.txt"
    files.atomic_write(path, "first")
    assert read_bytes(path) == b"first"
    files.atomic_write(path, b"\x00second")
    assert read_bytes(path) == b"\x00second"
    assert tf.io.gfile.listdir(f"{ram_dir}/a/b") == ["c.txt"]  # No temporary left.


@pytest.mark.parametrize("error", [tf.errors.UnavailableError(None, None, "store down"),
                                   KeyboardInterrupt()], ids=["op_error", "interrupt"])
def test_a_failed_write_leaves_the_old_file_and_no_temporary(ram_dir, monkeypatch, error):
    path = f"{ram_dir}/results.json"
    files.atomic_write(path, "old")

    def failing_rename(*args, **kwargs):
        del args, kwargs
        raise error

    monkeypatch.setattr(tf.io.gfile, "rename", failing_rename)
    with pytest.raises(type(error)):
        files.atomic_write(path, "new")
    assert tf.io.gfile.listdir(ram_dir) == ["results.json"]
    assert read_bytes(path) == b"old"


def test_json_round_trips_with_the_bytes_of_json_dumps(ram_dir):
    path = f"{ram_dir}/run/results.json"
    files.write_json(path, VALUE)
    assert files.read_json(path) == VALUE
    assert read_bytes(path) == json.dumps(VALUE, indent=2, sort_keys=True).encode("utf-8")


def test_local_json_has_the_bytes_of_a_plain_json_dump(tmp_path):
    """The bytes the former `runs.write_json_atomic` wrote: `json.dump` to a text file."""
    with open(tmp_path / "reference.json", "w") as stream:
        json.dump(VALUE, stream, indent=2, sort_keys=True)
    files.write_json(str(tmp_path / "run" / "results.json"), VALUE)
    assert ((tmp_path / "run" / "results.json").read_bytes() ==
            (tmp_path / "reference.json").read_bytes())
    assert os.listdir(tmp_path / "run") == ["results.json"]


def test_an_unserialisable_value_writes_nothing(ram_dir):
    with pytest.raises(TypeError):
        files.write_json(f"{ram_dir}/x.json", {"bad": object()})
    assert not tf.io.gfile.exists(ram_dir)


def test_read_json_of_a_missing_file_is_not_found(ram_dir):
    with pytest.raises(tf.errors.NotFoundError):
        files.read_json(f"{ram_dir}/missing.json")


def test_is_local_tells_scheme_paths_apart():
    assert files.is_local("runs/omniglot") and files.is_local("/tmp/run")
    assert not files.is_local("gs://bucket/run") and not files.is_local("ram://run")


def make_tree(root):
    """A directory with a nested file, an empty folder and a `commit` file."""
    files.atomic_write(f"{root}/variables/data", "weights")
    files.atomic_write(f"{root}/commit", "done")
    tf.io.gfile.makedirs(f"{root}/assets")


def listing(root):
    """Every entry below `root`, relative, with the content of each file."""
    entries = {}
    for directory, _, names in tf.io.gfile.walk(root):
        relative = directory[len(root):].strip("/")
        entries[relative or "."] = None
        for name in names:
            entries[os.path.join(relative, name)] = read_bytes(os.path.join(directory, name))
    return entries


@pytest.mark.parametrize("where", ["ram", "local"])
def test_publish_dir_moves_the_whole_tree(ram_dir, tmp_path, where):
    root = ram_dir if where == "ram" else str(tmp_path)
    make_tree(f"{root}/tmp")
    expected = listing(f"{root}/tmp")
    files.publish_dir(f"{root}/tmp", f"{root}/final", "commit")
    assert listing(f"{root}/final") == expected == {
        ".": None, "assets": None, "variables": None, "commit": b"done",
        "variables/data": b"weights"}
    assert not tf.io.gfile.exists(f"{root}/tmp")


def test_publish_dir_off_local_disk_moves_the_commit_file_last(ram_dir, monkeypatch):
    make_tree(f"{ram_dir}/tmp")
    rename, targets = tf.io.gfile.rename, []

    def logged_rename(source, target, overwrite=False):
        targets.append(target)
        rename(source, target, overwrite)

    monkeypatch.setattr(tf.io.gfile, "rename", logged_rename)
    files.publish_dir(f"{ram_dir}/tmp", f"{ram_dir}/final", "commit")
    assert targets == [f"{ram_dir}/final/variables/data", f"{ram_dir}/final/commit"]


@pytest.mark.parametrize("where", ["ram", "local"])
def test_publish_dir_refuses_an_existing_target_or_a_missing_commit(ram_dir, tmp_path, where):
    root = ram_dir if where == "ram" else str(tmp_path)
    make_tree(f"{root}/tmp")
    files.atomic_write(f"{root}/final/kept", "kept")
    with pytest.raises(tf.errors.AlreadyExistsError):
        files.publish_dir(f"{root}/tmp", f"{root}/final", "commit")
    with pytest.raises(tf.errors.NotFoundError):
        files.publish_dir(f"{root}/tmp", f"{root}/other", "no_such_file")
    assert listing(f"{root}/final") == {".": None, "kept": b"kept"}
    assert not tf.io.gfile.exists(f"{root}/other")
    assert listing(f"{root}/tmp")["variables/data"] == b"weights"  # Nothing moved.


class _GfileArchive:
    """Stands in for an ExportArchive, writing through gfile; or fails half-way."""

    def __init__(self, marker: str, fail: bool = False):
        self.marker, self.fail = marker, fail

    def write_out(self, path, verbose=True):
        del verbose
        files.atomic_write(os.path.join(path, "variables", "variables.index"), "variables")
        if self.fail:
            raise OSError("disk full")
        files.atomic_write(os.path.join(path, "saved_model.pb"), self.marker)


def test_export_versions_are_written_on_ram(ram_dir):
    export_dir = f"{ram_dir}/models/name"
    info = {"epoch": 3, "model": "task"}
    assert saved_models.write_version(export_dir, _GfileArchive("a"), info) == f"{export_dir}/1"
    tf.io.gfile.makedirs(f"{export_dir}/notes")
    assert saved_models.write_version(export_dir, _GfileArchive("b"), {}) == f"{export_dir}/2"
    with pytest.raises(OSError, match="disk full"):
        saved_models.write_version(export_dir, _GfileArchive("x", fail=True), {})
    assert sorted(tf.io.gfile.listdir(export_dir)) == ["1", "2", "notes"]
    assert listing(f"{export_dir}/1") == {
        ".": None, "assets.extra": None, "variables": None, "saved_model.pb": b"a",
        "variables/variables.index": b"variables",
        saved_models.INFO_PATH: json.dumps(info, indent=2, sort_keys=True).encode()}
    assert read_bytes(f"{export_dir}/2/saved_model.pb") == b"b"


def test_a_failed_first_export_on_ram_leaves_no_folder(ram_dir):
    with pytest.raises(OSError, match="disk full"):
        saved_models.write_version(f"{ram_dir}/name", _GfileArchive("x", fail=True), {})
    assert not tf.io.gfile.exists(f"{ram_dir}/name")


def test_a_refused_write_raises_one_write_error_naming_the_path(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    path = str(blocker / "results.json")
    with pytest.raises(files.WriteError, match=f"cannot write {path}: ") as raised:
        files.write_json(path, {"a": 1})
    assert raised.value.path == path
    assert blocker.read_text() == "not a directory"


def test_writing_names_the_whole_for_a_part_and_the_cause_of_tensorflow_errors():
    with pytest.raises(files.WriteError) as raised:
        with files.writing("/exports/model"):
            raise files.WriteError("/exports/model/.tmp/info.json", "Read-only file system")
    assert str(raised.value) == "cannot write /exports/model: Read-only file system"
    with pytest.raises(files.WriteError) as raised:
        with files.writing("/run/checkpoints/latest/ckpt-6"):
            raise tf.errors.ResourceExhaustedError(
                None, None, "/run/ckpt-6_temp/part-0.index.tempstate1; No space left on device")
    assert raised.value.cause == "No space left on device"
    with pytest.raises(ValueError):  # Not a storage error: passes unchanged.
        with files.writing("/run/x"):
            raise ValueError("bad value")
