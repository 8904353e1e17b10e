"""What a job shows as it goes: log lines, terminal bars, their numbers and words."""

import logging
import os

import pytest

from mamlpp_tf.training import progress


class Clock:
    """A monotonic clock that the test moves."""

    def __init__(self, now=100.0):
        self.now = now

    def __call__(self):
        return self.now


def messages(caplog):
    return [record.getMessage() for record in caplog.records]


def test_log_lines_show_window_means_rate_and_eta(caplog):
    clock = Clock()
    lines = progress.LogLines(clock)
    with caplog.at_level(logging.INFO, logger="absl"):
        for iteration in range(1, 11):
            clock.now += 2.0 if iteration > 1 else 30.0  # The first step also traces.
            lines.step(iteration, loss=float(iteration), accuracy=0.5)
            if iteration in (4, 8, 10):
                lines.window(progress.Window(iteration=iteration, total=10,
                                             epoch=(iteration - 1) // 5, loss=iteration - 1.5,
                                             accuracy=0.5, size=4 if iteration < 10 else 2))
    assert messages(caplog) == [
        "iteration 4/10 (epoch 0): train loss 2.5000, accuracy 0.5000 (mean of 4); "
        "0.5 iterations/s, ETA 12s",
        "iteration 8/10 (epoch 1): train loss 6.5000, accuracy 0.5000 (mean of 4); "
        "0.5 iterations/s, ETA 4s",
        "iteration 10/10 (epoch 1): train loss 8.5000, accuracy 0.5000 (mean of 2); "
        "0.5 iterations/s, ETA 0s",
    ]


def test_a_window_before_any_rate_says_when_the_speed_comes(caplog):
    lines = progress.LogLines(Clock())
    with caplog.at_level(logging.INFO, logger="absl"):
        lines.step(1, 1.0, 0.5)
        lines.window(progress.Window(1, 10, 0, 1.0, 0.5, 1))
    assert messages(caplog)[0].endswith("(mean of 1); speed: after the next line")


def test_log_lines_start_every_phase_and_count_tenths_of_long_ones(caplog):
    clock = Clock()
    lines = progress.LogLines(clock)
    with caplog.at_level(logging.INFO, logger="absl"):
        lines.phase("validating epoch 3", 40, detail="40 tasks")
        for _ in range(10):
            clock.now += 1.0
            lines.advance(4)  # No lines: a validation asks for none.
        lines.phase("loading")
        lines.advance(5)  # Counts nothing.
        lines.phase("testing", 100, detail="epochs 2, 1", tenths=True)
        clock.now += 20.0  # The first meta-batch traces: left out of the rate.
        lines.advance(8)
        for _ in range(23):
            clock.now += 1.0
            lines.advance(4)
        lines.message("results written to /x/results.json")
    assert messages(caplog) == [
        "validating epoch 3 (40 tasks)",
        "loading",
        "testing (epochs 2, 1)",
        "testing: 12/100 tasks (12%); 4 tasks/s, ETA 22s",
        "testing: 20/100 tasks (20%); 4 tasks/s, ETA 20s",
        "testing: 32/100 tasks (32%); 4 tasks/s, ETA 17s",
        "testing: 40/100 tasks (40%); 4 tasks/s, ETA 15s",
        "testing: 52/100 tasks (52%); 4 tasks/s, ETA 12s",
        "testing: 60/100 tasks (60%); 4 tasks/s, ETA 10s",
        "testing: 72/100 tasks (72%); 4 tasks/s, ETA 7s",
        "testing: 80/100 tasks (80%); 4 tasks/s, ETA 5s",
        "testing: 92/100 tasks (92%); 4 tasks/s, ETA 2s",
        "testing: 100/100 tasks (100%) in 43s",
        "results written to /x/results.json",
    ]


def test_a_first_count_past_a_tenth_has_no_rate_yet(caplog):
    lines = progress.LogLines(Clock())
    with caplog.at_level(logging.INFO, logger="absl"):
        lines.phase("testing as served", 4, tenths=True)
        lines.advance(1)
    assert messages(caplog)[-1] == "testing as served: 1/4 tasks (25%); speed: after the next line"


def test_bars_print_each_phase_and_the_epoch_as_an_integer(capsys):
    bars = progress.Bars()
    bars.phase("epoch 0", 3, unit="meta-iteration", detail="meta-iterations 1-3 of 6")
    for iteration in (1, 2, 3):
        bars.step(iteration, loss=1.0, accuracy=0.5)
    bars.window(progress.Window(3, 6, 0, 1.0, 0.5, 3))  # Nothing: the bar showed each step.
    bars.phase("validating epoch 0", 4, detail="4 tasks")
    bars.advance(2)  # The bar's line stays open...
    bars.message("results written to /x/results.json")  # ...until a line ends it.
    out = capsys.readouterr().out
    assert out.startswith("epoch 0 (meta-iterations 1-3 of 6)\n")
    assert "3/3" in out and "loss: 1.0000" in out and "accuracy: 0.5000" in out
    assert "e+00" not in out and "epoch:" not in out
    assert "\nvalidating epoch 0 (4 tasks)\n" in out and "2/4" in out
    assert out.endswith("\nresults written to /x/results.json\n")
    assert "\n\nresults" not in out  # One line break, not an empty line.


def test_reporter_picks_bars_on_a_terminal_and_lines_in_a_log():
    assert isinstance(progress.reporter(terminal=True), progress.Bars)
    assert isinstance(progress.reporter(terminal=False), progress.LogLines)


def test_the_base_progress_shows_nothing(capsys, caplog):
    quiet = progress.Progress()
    with caplog.at_level(logging.INFO, logger="absl"):
        quiet.phase("testing", 10, tenths=True)
        quiet.advance(10)
        quiet.step(1, 1.0, 0.5)
        quiet.window(progress.Window(1, 1, 0, 1.0, 0.5, 1))
        quiet.message("results")
    assert not caplog.records and capsys.readouterr() == ("", "")


def test_shown_paths_are_absolute_when_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert progress.shown_path("runs/a/results.json") == os.path.join(
        str(tmp_path), "runs", "a", "results.json")
    assert progress.shown_path("gs://bucket/run/results.json") == "gs://bucket/run/results.json"


@pytest.mark.parametrize("seconds,text", [
    (0.4, "0s"), (59, "59s"), (61, "1m 01s"), (3 * 3600 + 7 * 60 + 5, "3h 07m"),
    (2 * 86400 + 5 * 3600 + 1800, "2d 05h"),
])
def test_format_duration(seconds, text):
    assert progress.format_duration(seconds) == text
