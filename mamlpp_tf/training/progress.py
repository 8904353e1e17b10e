"""What a job is doing: its phases and their progress, on a terminal or in a log file.

The library (the training loop, the evaluation) reports to a `Progress` and
never prints: a phase starts (`phase`: an epoch of meta-training, a
validation, the test, with how many units it counts), units of it get done
(`advance`), a meta-iteration is done (`step`), a window of `--log_every`
meta-iterations closes (`window`: the mean loss and accuracy that the log
prints and TensorBoard records), and lines that start no phase (`message`,
e.g. where the results went). `Progress` itself shows nothing: the default of
library calls. The command lines choose by where stdout goes (`reporter`):

- `LogLines` (stdout not a terminal: a log file): an absl log line at each
  phase start, one per training window with the rate and the time left and,
  for long phases that ask for it, one every tenth of the phase.
- `Bars` (a terminal): each phase's start line and a Keras progress bar of
  its units, the training metrics of every meta-iteration on an epoch's bar.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import os
import time

from absl import logging
import keras

from mamlpp_tf import files


@dataclasses.dataclass(frozen=True)
class Window:
    """The training metrics of the meta-iterations since the previous window.

    Attributes:
      iteration: The window's last meta-iteration (1-based, over the whole run).
      total: Meta-iterations of the whole run.
      epoch: The epoch of `iteration`.
      loss: Mean meta-loss of the window's meta-batches.
      accuracy: Mean query accuracy of the window's meta-batches.
      size: Meta-iterations in the window.
    """
    iteration: int
    total: int
    epoch: int
    loss: float
    accuracy: float
    size: int


class Progress:
    """Receives what a job is doing; this base class shows nothing.

    Phases follow each other (a phase ends when the next starts); `advance`
    and `step` count units of the current one.
    """

    def phase(self, name: str, total: int = 0, *, unit: str = "task", detail: str = "",
              tenths: bool = False) -> None:
        """A phase starts.

        Args:
          name: What it does, short (e.g. "validating epoch 3"); it starts
            every line of the phase.
          total: Units it counts; 0 for a phase that counts nothing.
          unit: The unit, singular ("task", "meta-iteration").
          detail: More for its start line (e.g. its size, or that it traces).
          tenths: Whether a log also gets a line every tenth of `total` (for
            phases long enough to leave a log silent for minutes).
        """

    def advance(self, count: int = 1) -> None:
        """`count` more units of the current phase are done."""

    def step(self, iteration: int, loss: float, accuracy: float) -> None:
        """Meta-iteration `iteration` (1-based, over the whole run) is done, with its metrics."""

    def window(self, window: Window) -> None:
        """A window of meta-iterations closed with these means (every `--log_every`)."""

    def message(self, text: str) -> None:
        """A line that starts no phase (e.g. where the results went)."""


def reporter(terminal: bool) -> Progress:
    """Progress bars on a terminal, log lines otherwise."""
    return Bars() if terminal else LogLines()


def _start_line(name: str, detail: str) -> str:
    return f"{name} ({detail})" if detail else name


class LogLines(Progress):
    """Progress for log files: absl log lines, none per unit.

    Without a terminal a progress bar prints only when it ends; these lines
    show that a job of days is alive, what it is doing and when it will end.

    Args:
      clock: Seconds of a monotonic clock (tests pass their own).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        # (iteration, time) at the end of this process's first meta-step: the
        # training rate leaves out its tracing and includes validation.
        self._first_step: tuple[int, float] | None = None
        self._phase: _Tenths | None = None

    def phase(self, name: str, total: int = 0, *, unit: str = "task", detail: str = "",
              tenths: bool = False) -> None:
        """Logs the phase's start line (see `Progress.phase`)."""
        logging.info("%s", _start_line(name, detail))
        self._phase = _Tenths(name, total, unit, self._clock) if tenths and total else None

    def advance(self, count: int = 1) -> None:
        """Counts units; logs a line when the phase passes a tenth of its units."""
        if self._phase is not None:
            line = self._phase.advance(count)
            if line:
                logging.info("%s", line)

    def step(self, iteration: int, loss: float, accuracy: float) -> None:
        """Notes the time of this process's first meta-step, for the rate."""
        del loss, accuracy  # The window's means are logged.
        if self._first_step is None:
            self._first_step = (iteration, self._clock())

    def window(self, window: Window) -> None:
        """Logs the window's means, the rate since the first meta-step and the time left."""
        speed = "speed: after the next line"
        if self._first_step is not None:
            done = window.iteration - self._first_step[0]
            elapsed = self._clock() - self._first_step[1]
            if done and elapsed > 0:
                rate = done / elapsed
                speed = (f"{rate:.3g} iterations/s, ETA "
                         f"{format_duration((window.total - window.iteration) / rate)}")
        logging.info("iteration %d/%d (epoch %d): train loss %.4f, accuracy %.4f (mean of "
                     "%d); %s", window.iteration, window.total, window.epoch, window.loss,
                     window.accuracy, window.size, speed)

    def message(self, text: str) -> None:
        """Logs `text`."""
        logging.info("%s", text)


class _Tenths:
    """The count of one phase, with a line every tenth of it.

    The rate is measured from the end of the first `advance`, which may have
    traced a function; the last line gives the phase's whole time.
    """

    def __init__(self, name: str, total: int, unit: str, clock: Callable[[], float]):
        self.name, self.total, self.unit, self.clock = name, total, unit, clock
        self.tenth = -(-total // 10)  # Units per line, rounded up.
        self.done = 0
        self.start = clock()
        self.first: tuple[int, float] | None = None

    def advance(self, count: int) -> str | None:
        """Counts `count` units; returns the line due, if one is."""
        before, self.done = self.done, self.done + count
        now = self.clock()
        first = self.first
        if first is None:
            self.first = (self.done, now)
        if self.done // self.tenth == before // self.tenth and self.done < self.total:
            return None
        head = (f"{self.name}: {self.done}/{self.total} {self.unit}s "
                f"({100 * self.done // self.total}%)")
        if self.done >= self.total:
            return f"{head} in {format_duration(now - self.start)}"
        if first is None or now <= first[1]:
            return f"{head}; speed: after the next line"
        rate = (self.done - first[0]) / (now - first[1])
        return (f"{head}; {rate:.3g} {self.unit}s/s, ETA "
                f"{format_duration((self.total - self.done) / rate)}")


class Bars(Progress):
    """Progress on a terminal: each phase's start line, then a Keras progress bar.

    An epoch's bar shows the loss and accuracy of the latest meta-iteration;
    the epoch is in the line above it.
    """

    def __init__(self):
        self._bar: keras.utils.Progbar | None = None
        self._done = 0

    def phase(self, name: str, total: int = 0, *, unit: str = "task", detail: str = "",
              tenths: bool = False) -> None:
        """Prints the phase's start line and, for a counted phase, starts its bar."""
        del tenths  # A bar shows every unit.
        self._end_line()
        print(_start_line(name, detail), flush=True)
        self._done = 0
        self._bar = keras.utils.Progbar(total, unit_name=unit,
                                        stateful_metrics=["loss", "accuracy"]) if total else None

    def advance(self, count: int = 1) -> None:
        """Moves the bar by `count` units."""
        self._update(count, None)

    def step(self, iteration: int, loss: float, accuracy: float) -> None:
        """Moves the bar by one meta-iteration and shows its metrics."""
        del iteration  # The bar counts the phase's own.
        self._update(1, [("loss", loss), ("accuracy", accuracy)])

    def message(self, text: str) -> None:
        """Prints `text` on a line of its own."""
        self._end_line()
        print(text, flush=True)

    def _update(self, count: int, values: list[tuple[str, float]] | None) -> None:
        if self._bar is not None:
            self._done += count
            self._bar.update(self._done, values)

    def _end_line(self) -> None:
        """Ends the line of a bar left unfinished (a bar ends its line when full)."""
        if self._bar is not None and 0 < self._done < self._bar.target:
            print(flush=True)
        self._bar = None


def shown_path(path: str) -> str:
    """`path` as a line shows it: absolute if local, else as given (`gs://...`)."""
    return os.path.abspath(path) if files.is_local(path) else path


def format_duration(seconds: float) -> str:
    """`seconds` as the two largest units, e.g. "2d 05h", "3h 07m", "4m 09s", "12s"."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"
