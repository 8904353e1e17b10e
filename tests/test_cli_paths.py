"""Every entry point's output directory: a file in the way or a refused write is one line.

The entry points run in one process of their own (absl's flags are global, and
evaluate, report and the exports each define `--model_dir`), one after the
other as `python -m` runs them (`runpy`), each run's flags removed after it.
The directory is checked before the job does anything, so each run takes
milliseconds and none needs a real run directory.
"""

import errno
import json
import os
import subprocess
import sys

from absl import flags
from absl.testing import flagsaver
import pytest

from mamlpp_tf import cli, files

from conftest import ROOT

# Entry point: (its output-directory flag, the other flags it requires).
ENTRY_POINTS = {
    "mamlpp_tf.train": ("model_dir", []),
    "mamlpp_tf.evaluate": ("model_dir", []),
    "mamlpp_tf.report": ("out", ["--model_dir=RUN"]),
    "mamlpp_tf_export.task_model": ("export_dir", ["--model_dir=RUN", "--support=SUPPORT"]),
    "mamlpp_tf_export.meta_model": ("export_dir", ["--model_dir=RUN"]),
    "mamlpp_tf_export.npy_inputs": ("out", ["--saved_model=MODEL"]),
}
FAULTS = ("a_file", "under_a_file", "read_only")

# Runs `python -m MODULE ARGS...` for each [MODULE, ARGS] of argv[1] (JSON) in this process
# and prints, as the last line, each run's exit status and what it wrote to file descriptor 2.
DRIVER = r"""
import json, os, runpy, sys, tempfile, traceback
from absl import app, flags
import mamlpp_tf  # TensorFlow and Keras: their flags, and absl's, stay for every run.
app.define_help_flags()

results = []
for module, args in json.loads(sys.argv[1]):
    defined = set(flags.FLAGS)
    sys.argv = [module, *args]
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        code = 0
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as stop:
            code = stop.code
        except BaseException:
            traceback.print_exc()
            code = "raised"
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        results.append({"code": code, "stderr": captured.read().decode("utf-8", "replace")})
    # The next run defines its flags anew: the entry point's, and those of the modules that
    # define flags as they are imported (mamlpp_tf.flags), imported again.
    definers = {name for name, defined_there in flags.FLAGS.flags_by_module_dict().items()
                if set(flag.name for flag in defined_there) - defined}
    for name in set(flags.FLAGS) - defined:
        delattr(flags.FLAGS, name)
    for name in definers:
        if sys.modules.pop(name, None) is not None:
            parent, _, child = name.rpartition(".")
            vars(sys.modules[parent]).pop(child, None)
print(json.dumps(results))
"""


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def read_only_dir(tmp_path_factory):
    """A directory that refuses new entries, or why there is none (`ReadOnlyUnavailable`).

    Root writes into a mode-0555 directory: for root it is a read-only bind mount.
    """
    path = str(tmp_path_factory.mktemp("read_only"))
    if os.geteuid():
        os.chmod(path, 0o555)
        yield path
        os.chmod(path, 0o755)
        return
    try:
        _mount("--bind", path, path)
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        yield ReadOnlyUnavailable("for root a refused write needs a read-only bind mount "
                                  f"(CAP_SYS_ADMIN); mount failed: {detail.strip()}")
        return
    try:
        _mount("-o", "remount,bind,ro", path)
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False, capture_output=True)


class ReadOnlyUnavailable(str):
    """Why this machine offers no read-only directory (the cases that need one skip)."""


def _output_path(fault: str, tmp: str, read_only: str) -> str:
    """An output directory path with `fault`, under the scratch folder `tmp`."""
    a_file = os.path.join(tmp, "a_file")
    return {"a_file": a_file, "under_a_file": os.path.join(a_file, "sub", "dir"),
            "read_only": os.path.join(read_only, "new")}[fault]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, read_only_dir):
    """(entry point, fault) -> (output path, exit status, stderr), all run in one process."""
    tmp = str(tmp_path_factory.mktemp("paths"))
    with open(os.path.join(tmp, "a_file"), "w") as stream:
        stream.write("kept")
    cases = [(module, fault) for module in ENTRY_POINTS for fault in FAULTS
             if fault != "read_only" or not isinstance(read_only_dir, ReadOnlyUnavailable)]
    runs = []
    for module, fault in cases:
        flag, required = ENTRY_POINTS[module]
        runs.append([module, [f"--{flag}={_output_path(fault, tmp, read_only_dir)}",
                              *required]])
    result = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(runs)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    with open(os.path.join(tmp, "a_file")) as stream:
        assert stream.read() == "kept"
    return {case: (run[1][0].split("=", 1)[1], outcome["code"], outcome["stderr"])
            for case, run, outcome in zip(cases, runs, results)}


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_an_unusable_output_directory_is_one_line_naming_flag_and_path(
        outcomes, read_only_dir, module, fault):
    if fault == "read_only" and isinstance(read_only_dir, ReadOnlyUnavailable):
        pytest.skip(read_only_dir)
    path, code, stderr = outcomes[module, fault]
    flag = ENTRY_POINTS[module][0]
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --{flag}={path}"), stderr[-3000:]
    # A path in the way is the user's to change (2); a refused write the storage's (74).
    if fault == "read_only":
        assert code == cli.STORAGE_FAILURE
        assert lines[0] == (
            f"error: --{flag}={path}: cannot write {os.path.dirname(path)}: "
            f"{os.strerror(errno.EACCES if os.geteuid() else errno.EROFS)}; nothing was "
            f"written: fix the storage or choose another --{flag}")
    else:
        assert code == 2
        suffix = "" if fault == "a_file" else f": {os.path.dirname(os.path.dirname(path))}"
        assert lines[0] == f"error: --{flag}={path}{suffix} is a file, not a directory"
    assert not os.path.isdir(path)


def test_a_missing_directory_under_a_writable_one_passes_the_check(tmp_path):
    files.check_output_dir(str(tmp_path / "new" / "deeper"))  # Created by the job.
    files.check_output_dir(str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_a_file_in_the_way_on_another_filesystem_is_found():
    files.atomic_write("ram://cli_paths/a_file", "x")
    with pytest.raises(NotADirectoryError) as raised:
        files.check_output_dir("ram://cli_paths/a_file")
    assert raised.value.filename == "ram://cli_paths/a_file"
    files.check_output_dir("ram://cli_paths/new")


def test_a_symlink_to_a_directory_is_a_directory(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    files.check_output_dir(str(tmp_path / "link" / "run"))
    (tmp_path / "dangling").symlink_to(tmp_path / "nothing")
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        files.check_output_dir(str(tmp_path / "dangling" / "run"))


def _run_in_process(monkeypatch, body):
    """`cli.run(body)` in this process; (exit status, stderr lines)."""
    monkeypatch.setattr(sys, "argv", ["job"])
    # Flag parsing is not under test: another module of this process may have defined
    # required flags.
    monkeypatch.setattr(cli, "parse_flags_or_exit",
                        lambda argv: flags.FLAGS.mark_as_parsed() or argv)
    with flagsaver.flagsaver(), pytest.raises(SystemExit) as stop:
        cli.run(body)
    return stop.value.code


def test_a_refused_write_outside_the_writers_is_one_line(monkeypatch, capsys):
    def body():  # E.g. the run's lock file, made read-only after the check.
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/runs/x/lock")

    assert _run_in_process(monkeypatch, body) == cli.STORAGE_FAILURE
    assert capsys.readouterr().err == (
        "error: cannot write /runs/x/lock: Permission denied; what was written before is "
        "intact: fix the storage and run the same command again\n")


def test_other_os_errors_are_not_taken_for_refused_writes(monkeypatch):
    def body():
        raise OSError(errno.EINVAL, "Invalid argument")

    with pytest.raises(OSError, match="Invalid argument"):
        _run_in_process(monkeypatch, body)
