"""The short real-data schedule of a training flagfile, for the benchmark scripts.

`train` runs `python -m mamlpp_tf.train` with a flagfile of `flags/` on a
prepared TFDS directory for 10 epochs × 50 iterations (the paper's class
split, seed 0, 600 validation and 600 test tasks unless the flagfile says
otherwise) and reads back its test accuracy (best validated epoch, 95 % CI
over tasks), its served accuracy (each query alone through the exported task
model) and the process's peak RSS. A run finished by an earlier invocation
(its `<name>.train.json` beside the run directory) is read, not repeated, so
a driver that was stopped resumes where it was.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 10
ITERATIONS_PER_EPOCH = 50


def define_driver_flags() -> None:
    """Defines a driver's `--data_dir` (prepared TFDS data) and `--out_dir` (the runs) flags."""
    from absl import flags  # pylint: disable=import-outside-toplevel

    flags.DEFINE_string("data_dir", os.path.join(ROOT, "..", "shared", "data", "tfds"),
                        "Prepared TFDS data dir holding omniglot/3.0.0.")
    flags.DEFINE_string("out_dir", None, "Folder of the runs' directories (resumed if "
                        "present).")


def run_process(command: list[str], log_path: str | None = None) -> tuple[int, float, str]:
    """Runs `command` from the repository root: `(exit status, peak RSS in MB, stdout)`.

    The peak RSS is the child's own (`wait4`), not the driver's.
    """
    with open(log_path or os.devnull, "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                                   stderr=log, text=True)
        stdout = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)
    # Reaped by wait4: tell Popen so that it does not wait for the process again.
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, round(usage.ru_maxrss / 1024, 1), stdout


def train(name: str, flagfile: str, out_dir: str, data_dir: str,
          extra_flags: list[str] = ()) -> dict:
    """The short schedule of `flagfile`, run (or read, if done) in `out_dir/name`.

    Args:
      name: The run's name: its directory, log (`name.log`) and marker file.
      flagfile: A training flagfile, relative to the repository root.
      out_dir: Folder of the run directories.
      data_dir: Prepared TFDS data dir holding `omniglot/3.0.0`.
      extra_flags: Job flags after the schedule's (they win).

    Returns:
      `accuracy`, `ci95`, `served_accuracy`, `served_ci95`, `served_bn_stats`,
      `best_epoch`, `test_tasks`, `training_wall_time_s`, `train_peak_rss_mb`;
      or `{"train_error": ...}` naming the log when the job failed.
    """
    model_dir = os.path.join(out_dir, name)
    done = model_dir + ".train.json"
    if not os.path.exists(done):
        command = [sys.executable, "-m", "mamlpp_tf.train", f"--flagfile={flagfile}",
                   f"--data_dir={data_dir}", "--nodownload", f"--epochs={EPOCHS}",
                   f"--iterations_per_epoch={ITERATIONS_PER_EPOCH}",
                   f"--model_dir={model_dir}", *extra_flags]
        status, rss, _ = run_process(command, log_path=model_dir + ".log")
        if status:
            return dict(train_error=f"exit status {status}; see {model_dir}.log")
        with open(done + ".tmp", "w", encoding="utf-8") as stream:
            json.dump(dict(train_peak_rss_mb=rss), stream)
        os.replace(done + ".tmp", done)
    with open(done, encoding="utf-8") as stream:
        rss = json.load(stream)["train_peak_rss_mb"]
    with open(os.path.join(model_dir, "results.json"), encoding="utf-8") as stream:
        results = json.load(stream)
    test = results["test"]
    return dict(accuracy=round(test["accuracy"], 4), ci95=round(test["ci95"], 4),
                served_accuracy=round(test["served_accuracy"], 4),
                served_ci95=round(test["served_ci95"], 4),
                served_bn_stats=test["served_bn_stats"], best_epoch=test["best_epoch"],
                test_tasks=test["tasks"], training_wall_time_s=results["wall_time_s"],
                train_peak_rss_mb=rss)


def percent(value: float, ci95: float) -> str:
    """`0.9127, 0.0102` as `91.27 % ± 1.02`."""
    return f"{100 * value:.2f} % ± {100 * ci95:.2f}"
