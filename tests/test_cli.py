"""The entry points' shared behaviour: quiet library logs, error lines of a stopped job."""

import io
import logging as std_logging
import os

from absl import logging

from mamlpp_tf import cli


def _record(path: str, level: int) -> std_logging.LogRecord:
    return std_logging.LogRecord("absl", level, path, 1, "a line", None, None)


def test_library_chatter_is_dropped_from_the_log_and_ours_and_errors_kept():
    cli.quiet_tensorflow_logs()
    handler = logging.get_absl_handler()
    site = os.path.join(os.sep, "venv", "lib", "python3.11", "site-packages")
    tensorboard = os.path.join(site, "tensorboard", "backend", "directory_watcher.py")
    datasets = os.path.join(site, "tensorflow_datasets", "core", "dataset_builder.py")
    ours = os.path.join(os.sep, "work", "mamlpp_tf", "training", "progress.py")
    assert not handler.filter(_record(tensorboard, std_logging.INFO))
    assert not handler.filter(_record(datasets, std_logging.WARNING))
    assert handler.filter(_record(tensorboard, std_logging.ERROR))
    assert handler.filter(_record(ours, std_logging.INFO))


class _Terminal(io.StringIO):

    def isatty(self) -> bool:
        return True


def test_a_stop_error_starts_a_new_line_after_a_terminal_progress_bar(monkeypatch, capsys):
    terminal = _Terminal()
    monkeypatch.setattr("sys.stdout", terminal)
    terminal.write(" 14/472 - loss: 1.8061 - accuracy: 0.5375")  # A bar's open line.
    cli.print_stop_error("stopped by signal 2")
    assert terminal.getvalue().endswith("accuracy: 0.5375\n")
    assert capsys.readouterr().err == "error: stopped by signal 2\n"


def test_a_stop_error_adds_no_blank_line_to_a_log_file(capsys):
    cli.print_stop_error("lost another worker")
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "error: lost another worker\n"
