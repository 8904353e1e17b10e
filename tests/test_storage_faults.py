"""Storage faults: a disk that fills, a run directory that turns read-only, under real mounts.

Each fault is real, not simulated: a small tmpfs fills up (ENOSPC), a bind
mount is remounted read-only (EROFS) while the job runs. The job must stop
with one `error:` line naming the path it could not write (exit status
`cli.STORAGE_FAILURE`), leave the previous state readable, and the same
command must then resume to the result of an uninterrupted run.
"""

import json
import os
import subprocess
import time

import pytest
import tensorflow as tf

from mamlpp_tf import cli

from conftest import comparable_results, run_job


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


class Mounts:
    """Mounts made by one test, undone at its end (last first)."""

    def __init__(self):
        self._points: list[str] = []

    def tmpfs(self, path: str, size: str) -> str:
        """A tmpfs of `size` (e.g. "64k") at `path` (created)."""
        os.makedirs(path, exist_ok=True)
        _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", path)
        self._points.append(path)
        return path

    def resize(self, path: str, size: str) -> None:
        """Grows (or shrinks) the tmpfs at `path`: space freed for the resume."""
        _mount("-o", f"remount,size={size}", path)

    def read_only(self, path: str) -> None:
        """Makes the existing directory `path` read-only (a read-only bind onto itself)."""
        _mount("--bind", path, path)
        self._points.append(path)
        _mount("-o", "remount,bind,ro", path)

    def undo(self, path: str) -> None:
        """Unmounts the mount at `path` made here."""
        subprocess.run(["umount", path], check=True, capture_output=True)
        self._points.remove(path)

    def undo_all(self) -> None:
        for path in reversed(self._points):
            subprocess.run(["umount", "-l", path], check=False, capture_output=True)
        self._points.clear()


@pytest.fixture
def mounts(tmp_path):
    """Real mounts (tmpfs, read-only binds); skips, saying why, where mounting is not allowed."""
    probe = Mounts()
    try:
        probe.tmpfs(str(tmp_path / "probe"), "4k")
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        pytest.skip(f"storage-fault tests mount a tmpfs and read-only binds, which needs root "
                    f"(CAP_SYS_ADMIN); mount failed: {detail.strip()}")
    probe.undo_all()
    yield probe
    probe.undo_all()


def assert_storage_error(code: int, stderr: str, path_prefix: str) -> str:
    """Exit status 74, one `error:` line naming a path under `path_prefix`, no traceback."""
    assert code == cli.STORAGE_FAILURE, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith(f"error: cannot write {path_prefix}"), lines[0]
    assert "Traceback" not in stderr
    return lines[0]


def assert_readable(model_dir: str) -> None:
    """Every JSON file of the run parses and its latest checkpoint (if any) restores."""
    for directory, _, names in os.walk(model_dir):
        for name in names:
            if name.endswith(".json") and not name.startswith("."):
                with open(os.path.join(directory, name)) as stream:
                    json.load(stream)
    latest = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints", "latest"))
    if latest is not None:
        tf.train.load_checkpoint(latest)  # Raises on a damaged index or data file.


def test_a_full_disk_stops_the_job_naming_the_path_and_the_resume_is_identical(
        finished_run, mounts, tmp_path):
    disk = mounts.tmpfs(str(tmp_path / "disk"), "96k")  # Full in the middle of epoch 1.
    model_dir = os.path.join(disk, "run")
    code, _, stderr = run_job(model_dir)
    line = assert_storage_error(code, stderr, model_dir)
    assert "No space left on device" in line
    assert_readable(model_dir)
    mounts.resize(disk, "8m")
    code, _, stderr = run_job(model_dir)
    assert code == 0, stderr[-3000:]
    assert comparable_results(model_dir) == comparable_results(finished_run[0])


# The same path as a full disk (a refused write mid-run, then a resume), by another errno.
@pytest.mark.slow
def test_a_run_directory_turned_read_only_mid_run_stops_it_and_resumes_identically(
        finished_run, mounts, tmp_path):
    model_dir = str(tmp_path / "run")
    process = run_job(model_dir, wait=False)
    latest = os.path.join(model_dir, "checkpoints", "latest")
    deadline = time.time() + 300
    while (tf.train.latest_checkpoint(latest) if os.path.isdir(latest) else None) is None:
        assert process.poll() is None and time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    mounts.read_only(model_dir)
    _, stderr = process.communicate(timeout=300)
    line = assert_storage_error(process.returncode, stderr, model_dir)
    assert "Read-only file system" in line
    assert_readable(model_dir)
    mounts.undo(model_dir)
    code, _, stderr = run_job(model_dir)
    assert code == 0, stderr[-3000:]
    assert comparable_results(model_dir) == comparable_results(finished_run[0])


def test_an_export_to_a_full_disk_names_the_export_dir_and_leaves_no_version(
        finished_run, mounts, tmp_path):
    disk = mounts.tmpfs(str(tmp_path / "disk"), "64k")  # A SavedModel is larger.
    export_dir = os.path.join(disk, "models", "meta")
    code, _, stderr = run_job(finished_run[0], f"--export_dir={export_dir}",
                              module="mamlpp_tf_export.meta_model")
    line = assert_storage_error(code, stderr, export_dir)
    assert "No space left on device" in line
    assert not os.path.exists(export_dir) or os.listdir(export_dir) == []


def test_a_report_to_a_full_disk_names_its_path(finished_run, mounts, tmp_path):
    disk = mounts.tmpfs(str(tmp_path / "disk"), "16k")  # The figures are larger.
    out = os.path.join(disk, "report")
    code, _, stderr = run_job(finished_run[0], f"--out={out}", module="mamlpp_tf.report")
    assert_storage_error(code, stderr, out)
    leftovers = [name for name in os.listdir(out) if name.startswith(".tmp_")] if (
        os.path.isdir(out)) else []
    assert leftovers == []
