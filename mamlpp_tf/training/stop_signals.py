"""SIGTERM/SIGINT handling that ends the training job within a bounded time.

A preemption gives a job tens of seconds. Waiting for a quiet moment to
notice a signal is not bounded: validation, the final test or the first
step's tracing can each take minutes. So a signal raises `Interrupted` at once
(Python runs its handler between two bytecodes, i.e. as soon as the current
TensorFlow op returns), except inside a `deferred()` block, where it is
recorded and the block's owner acts on it at the block's end. The training
loop defers around each meta-step and the checkpoint after it, so that a
preempted run loses nothing, and around its epoch writes, so that they are
not cut between two files that must agree. A deferred block gets `grace_s`
seconds after the signal (a step that traces a new graph can take minutes);
then, or at a second signal, `Interrupted` is raised inside it. That is safe:
every write is atomic (a temporary file, then a rename) and a resume falls
back past a damaged checkpoint, so the run directory stays readable.

`Interrupted` derives from `BaseException`, as `KeyboardInterrupt` does, so
that no `except Exception` in a library (TFDS, absl, TensorFlow's tracing)
swallows it.
"""

from __future__ import annotations

from collections.abc import Callable
import contextlib
import signal

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """The job stopped on a signal.

    Args:
      signum: The signal.
      where: The phase it stopped in, e.g. "validation of epoch 3".
      resume: What the run directory holds for a resume, e.g. "checkpoint
        ckpt-30 saved".
    """

    def __init__(self, signum: int, where: str, resume: str):
        super().__init__(f"stopped by signal {signum} during {where}; {resume}; re-run the "
                         "same command to resume")
        self.signum = signum
        self.where = where


class StopSignals:
    """Installs the handler for SIGTERM and SIGINT while the job runs (a context manager).

    Args:
      resume: Called when a signal raises, for the `resume` text of
        `Interrupted` (what the run directory holds now).
      grace_s: Seconds a deferred block may run on after a signal.
    """

    def __init__(self, resume: Callable[[], str] = lambda: "no checkpoint yet",
                 grace_s: float = 15.0):
        self.signum: int | None = None
        self._phase = "start-up"
        self._resume = resume
        self._grace_s = grace_s
        self._deferring = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        for signum in SIGNALS + (signal.SIGALRM,):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    @property
    def phase(self) -> str:
        """What the job is doing, for the message of `Interrupted`."""
        return self._phase

    @phase.setter
    def phase(self, where: str) -> None:
        """Enters the phase `where`; first raises `Interrupted` for a signal left pending.

        Python ignores an exception raised in a finaliser (`__del__`, a
        weakref callback), printing "Exception ignored", and a signal handler
        runs in whatever code the main thread is in: now and then, one of
        TensorFlow's finalisers. A signal whose `Interrupted` was swallowed so
        is still recorded here, and the next phase the job enters stops it.
        """
        if self.signum is not None and not self._deferring:
            self.raise_interrupted()
        self._phase = where

    def reinstall(self) -> None:
        """Takes SIGTERM and SIGINT back after a library took them.

        TensorFlow's coordination service (started with a multi-worker
        strategy) installs its own SIGTERM handler in C++, for its preemption
        notifier; Python still believes its handler is in place, and a SIGTERM
        then does nothing visible. Call this once the strategy exists.
        """
        for signum in SIGNALS:
            signal.signal(signum, self._handle)

    def __exit__(self, *exc) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        del frame
        if signum == signal.SIGALRM:  # The grace of a deferred block ran out.
            self._phase += f" ({self._grace_s:g} s after the signal)"
            self.raise_interrupted()
        first = self.signum is None
        self.signum = signum
        if self._deferring and first:
            signal.setitimer(signal.ITIMER_REAL, self._grace_s)
            return
        self.raise_interrupted()

    def raise_interrupted(self, signum: int | None = None) -> None:
        """Raises `Interrupted` for the recorded signal in the current phase.

        Args:
          signum: The signal, if not this process's: another worker's, which
            the training loop learns by agreement (the phase says so).
        """
        signal.setitimer(signal.ITIMER_REAL, 0)
        where = self.phase
        if self.signum is None and signum is not None:
            where += " (the signal went to another worker)"
        raise Interrupted(self.signum or signum, where, self._resume())

    @contextlib.contextmanager
    def deferred(self):
        """A block that a (first) signal does not cut: the owner checks `signum` after it."""
        outer, self._deferring = self._deferring, True
        try:
            yield
        finally:
            self._deferring = outer
