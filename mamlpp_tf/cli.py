"""Shared behaviour of the command-line entry points (train, evaluate, export, report)."""

from __future__ import annotations

from collections.abc import Callable
import logging as std_logging
import os
import sys
from typing import NoReturn

from absl import app, flags, logging
import tensorflow as tf

from mamlpp_tf import files
from mamlpp_tf.training import stop_signals


def quiet_tensorflow_logs() -> None:
    """Drops TensorFlow's, TFDS's and TensorBoard's INFO/WARNING chatter from the absl log.

    Ours stays. TensorBoard's event reader, which the report uses, logs a line
    per events file it opens.
    """
    tf.get_logger().setLevel("ERROR")
    logging.get_absl_handler().addFilter(
        lambda record: record.levelno >= std_logging.ERROR or not any(
            f"{os.sep}{package}" in record.pathname for package in ("tensorflow", "tensorboard")))


def parse_flags_or_exit(argv: list[str]) -> list[str]:
    """The absl `flags_parser`: reports a bad flag in one line (no usage dump), exit 2."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        exit_on_user_error(error)


def exit_on_user_error(error: BaseException) -> NoReturn:
    """Reports a user error (bad flag combination, file, data) in one line, exit 2.

    absl lists each failed validator on its own line; they are joined with "; ".
    An error with a `command_line` text (`data.DatasetNotFoundError`) prints that
    instead, as written: its first line says what is wrong in the job's flags,
    the following ones list the remedies.
    """
    command_line = getattr(error, "command_line", None)
    if command_line:
        print(f"error: {command_line}", file=sys.stderr)
        sys.exit(2)
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    print(f"error: {'; '.join(lines)}", file=sys.stderr)
    sys.exit(2)


# Exit status of a write the storage refused (sysexits' EX_IOERR).
STORAGE_FAILURE = 74


def check_output_dir_flag(name: str) -> None:
    """Stops the job in one line if flag `name` names a directory it cannot write into.

    See `files.check_output_dir`. A path that is a file, or lies under one, is a
    user error (status 2); a directory that refuses writes (read-only
    filesystem, no permission) is a storage failure (`STORAGE_FAILURE`), as
    when a write fails later. The line names the flag, its value and the path
    at fault. An unset flag (None) passes.
    """
    path = flags.FLAGS[name].value
    if path is None:
        return
    try:
        files.check_output_dir(path)
    except NotADirectoryError as error:
        at = "" if error.filename in (path, os.path.abspath(path)) else f": {error.filename}"
        print(f"error: --{name}={path}{at} {error.strerror}", file=sys.stderr)
        sys.exit(2)
    except files.WriteError as error:
        print(f"error: --{name}={path}: {error}; nothing was written: fix the storage or "
              f"choose another --{name}", file=sys.stderr)
        sys.exit(STORAGE_FAILURE)


def run(body: Callable[[], str | None],
        user_errors: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError),
        job: str = "the job",
        output_dirs: tuple[str, ...] = ()) -> None:
    """Runs an entry point: flags parsed with one-line errors, quiet TF logs, user errors.

    Args:
      body: Does the work from the parsed flags; returns the text to print (or None).
      user_errors: Exceptions that mean bad flags, files or data: reported in one
        line with exit status 2 instead of a traceback.
      job: What `body` does, e.g. "the export", for the message of a signal.
      output_dirs: Names of the flags whose directory `body` writes into (created
        if missing), checked before `body` runs (`check_output_dir_flag`).

    SIGTERM or SIGINT stops `body` at once (`stop_signals.StopSignals`; the
    training loop installs its own, finer phases inside) and is reported in one
    line naming `job`, with status 128 + the signal; every writer is atomic and
    cleans up its temporary files, so the same command can simply run again.

    A write the storage refuses (`files.WriteError`: a full disk, a read-only
    directory; or an OSError naming the path, `files.refused_write`) is
    reported in one line naming the path, with status `STORAGE_FAILURE`; the
    writers leave what was there intact, so the same command goes on once the
    storage is fixed.
    """

    def main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        quiet_tensorflow_logs()
        for name in output_dirs:
            check_output_dir_flag(name)
        try:
            with stop_signals.StopSignals(
                    resume=lambda: "what was written before is intact") as signals:
                signals.phase = job
                text = body()
        except stop_signals.Interrupted as stop:
            print_stop_error(str(stop))
            sys.exit(128 + stop.signum)
        except files.WriteError as error:
            _exit_on_refused_write(error)
        except user_errors as error:
            exit_on_user_error(error)
        except OSError as error:
            # A write outside `files.writing` (e.g. the run's lock file) that the
            # check of `output_dirs` could not foresee (the storage changed since).
            refused = files.refused_write(error)
            if refused is None:
                raise
            _exit_on_refused_write(refused)
        if text is not None:
            print(text)

    app.run(main, flags_parser=parse_flags_or_exit)


def _exit_on_refused_write(error: files.WriteError) -> NoReturn:
    """Reports a write the storage refused in one line, exit `STORAGE_FAILURE`."""
    print_stop_error(f"{error}; what was written before is intact: fix the storage and run "
                     "the same command again")
    sys.exit(STORAGE_FAILURE)


def print_stop_error(text: str) -> None:
    """Prints `error: text` for a job stopped while it runs, on a line of its own.

    A progress bar on a terminal keeps its line open until it completes; the
    error line of a job stopped mid-bar (a signal, a refused write, a lost
    worker) would otherwise be glued to the bar's metrics.
    """
    sys.stdout.flush()
    if sys.stdout.isatty():
        print()
    print(f"error: {text}", file=sys.stderr)
