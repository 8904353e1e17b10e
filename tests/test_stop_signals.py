"""SIGTERM/SIGINT handling: at once outside a deferred block, at its end or its grace inside."""

import os
import signal
import sys
import time

from absl import flags
from absl.testing import flagsaver
import pytest

from mamlpp_tf import cli
from mamlpp_tf.training import stop_signals


def _signal_self(signum=signal.SIGTERM):
    os.kill(os.getpid(), signum)
    time.sleep(0.01)  # Python runs the handler at the next bytecode of the main thread.


def test_a_signal_outside_a_deferred_block_raises_at_once_naming_the_phase():
    with stop_signals.StopSignals(resume=lambda: "resumes from ckpt-7") as signals:
        signals.phase = "validation of epoch 2"
        with pytest.raises(stop_signals.Interrupted) as raised:
            _signal_self()
    message = str(raised.value)
    assert raised.value.signum == signal.SIGTERM
    assert "during validation of epoch 2; resumes from ckpt-7; re-run" in message


def test_a_deferred_block_runs_to_its_end_and_leaves_the_signal_to_its_owner():
    with stop_signals.StopSignals() as signals:
        with signals.deferred():
            _signal_self(signal.SIGINT)
            finished = True
        assert finished and signals.signum == signal.SIGINT
        with pytest.raises(stop_signals.Interrupted):
            signals.raise_interrupted()


def test_a_deferred_block_is_cut_when_its_grace_runs_out():
    with stop_signals.StopSignals(grace_s=0.3) as signals:
        signals.phase = "meta-iteration 1 (epoch 0)"
        started = time.monotonic()
        with pytest.raises(stop_signals.Interrupted) as raised:
            with signals.deferred():
                _signal_self()
                while time.monotonic() - started < 10:  # A long trace.
                    time.sleep(0.01)
    assert time.monotonic() - started < 2
    assert "meta-iteration 1 (epoch 0) (0.3 s after the signal)" in str(raised.value)


def test_a_second_signal_cuts_a_deferred_block():
    with stop_signals.StopSignals(grace_s=60) as signals:
        with pytest.raises(stop_signals.Interrupted):
            with signals.deferred():
                _signal_self()
                _signal_self()


def test_the_previous_handlers_and_no_alarm_remain_after_the_job():
    before = signal.getsignal(signal.SIGTERM)
    with stop_signals.StopSignals() as signals:
        with signals.deferred():
            _signal_self()
    assert signal.getsignal(signal.SIGTERM) is before
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


class _SignalsWhenCollected:
    """A finaliser that a signal lands in, as it now and then does in TensorFlow's."""

    def __del__(self):
        _signal_self()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_signal_whose_raise_a_finaliser_swallowed_stops_the_next_phase():
    with stop_signals.StopSignals(resume=lambda: "resumes from ckpt-3") as signals:
        signals.phase = "the writes of epoch 1"
        _SignalsWhenCollected()  # Collected at once: Python prints "Exception ignored".
        assert signals.signum == signal.SIGTERM  # The job went on...
        with pytest.raises(stop_signals.Interrupted) as raised:
            signals.phase = "the final test"  # ...until its next phase.
    assert "during the writes of epoch 1; resumes from ckpt-3" in str(raised.value)


def test_an_entry_point_stopped_by_a_signal_names_its_job_in_one_line(capsys, monkeypatch):
    """evaluate, export and report: `cli.run` turns a signal into one line and 128 + signum."""
    monkeypatch.setattr(sys, "argv", ["export"])
    # Flag parsing is not under test: another module of this process may have
    # defined required flags (the job's --model_dir).
    monkeypatch.setattr(cli, "parse_flags_or_exit",
                        lambda argv: flags.FLAGS.mark_as_parsed() or argv)

    def body():
        _signal_self()
        return "finished"

    before = signal.getsignal(signal.SIGTERM)
    with flagsaver.flagsaver(), pytest.raises(SystemExit) as stop:
        cli.run(body, job="the export of a task model")
    assert stop.value.code == 128 + signal.SIGTERM
    captured = capsys.readouterr()
    assert "finished" not in captured.out
    assert captured.err.startswith("error: stopped by signal 15 during the export of a task "
                                   "model; what was written before is intact;"), captured.err
    assert signal.getsignal(signal.SIGTERM) is before
