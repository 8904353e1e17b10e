"""Reported vs served accuracy of every batch-norm mode, trained on one short schedule.

For each `--bn_stats` mode, runs the main job on real Omniglot with the paper
split, second order and the same seed, then reads its `results.json`: the
protocol's test accuracy (what the run reports, best single epoch), the served
accuracy (each test query alone through the task model, on the same tasks) and
their paired difference, all with 95% CIs over the 600 test tasks. The modes'
served accuracy is also compared with the transductive `batch` mode's reported
one (unpaired: different runs; the CI combines both CIs).

One JSON line per mode on stdout, then a Markdown table. Runs resume: a mode
whose run directory holds a finished run is only read. A benchmark, not a
test: each mode trains for several minutes to hours.

    python benchmarks/serving_parity.py --base_dir=/tmp/parity
    python benchmarks/serving_parity.py --case=omniglot_20way_1shot --epochs=4 \
        --iterations_per_epoch=50 --modes=batch,tasknorm --base_dir=/tmp/parity
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = {
    "omniglot_5way_1shot": "flags/omniglot_5way_1shot.cfg",
    "omniglot_20way_1shot": "flags/omniglot.cfg",
}
MODES = ("batch", "running", "support", "tasknorm")

flags.DEFINE_enum("case", "omniglot_5way_1shot", list(CASES), "Paper configuration (its "
                  "flagfile) to train every mode with.")
flags.DEFINE_list("modes", list(MODES), f"Batch-norm modes to train, from {MODES}.")
flags.DEFINE_string("data_dir", os.path.join(ROOT, "..", "shared", "data", "tfds"),
                    "Prepared TFDS data dir holding omniglot/3.0.0.")
flags.DEFINE_string("base_dir", None, "Run directories go to BASE/CASE/MODE.")
flags.DEFINE_integer("epochs", 10, "Training epochs of every run.", lower_bound=1)
flags.DEFINE_integer("iterations_per_epoch", 50, "Meta-iterations per epoch.",
                     lower_bound=1)
flags.DEFINE_integer("meta_batch_size", None, "Override the flagfile's meta-batch size.",
                     lower_bound=1)
flags.mark_flag_as_required("base_dir")
FLAGS = flags.FLAGS


def train(mode: str, model_dir: str) -> dict:
    """Trains (or resumes, or only reads) one mode's run; returns its results.json."""
    command = [sys.executable, "-m", "mamlpp_tf.train", f"--flagfile={CASES[FLAGS.case]}",
               f"--data_dir={FLAGS.data_dir}", "--nodownload", f"--bn_stats={mode}",
               f"--epochs={FLAGS.epochs}",
               f"--iterations_per_epoch={FLAGS.iterations_per_epoch}",
               f"--model_dir={model_dir}"]
    if FLAGS.meta_batch_size:
        command.append(f"--meta_batch_size={FLAGS.meta_batch_size}")
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(model_dir, "results.json")) as stream:
        return json.load(stream)


def summary(mode: str, results: dict, seconds: float) -> dict:
    """The JSON line of one mode."""
    test = results["test"]
    keys = ("accuracy", "ci95", "served_accuracy", "served_ci95", "served_difference",
            "served_difference_ci95", "ensemble_accuracy", "ensemble_ci95",
            "ensemble_served_accuracy", "ensemble_served_ci95")
    line = dict(case=FLAGS.case, bn_stats=mode, epochs=FLAGS.epochs,
                iterations_per_epoch=FLAGS.iterations_per_epoch,
                meta_batch_size=results["config"]["meta_batch_size"],
                tasks=test["tasks"], best_epoch=test["best_epoch"],
                served_bn_stats=test["served_bn_stats"])
    line.update({key: round(test[key], 4) for key in keys})
    line.update(wall_time_s=results["wall_time_s"], this_invocation_s=round(seconds, 1))
    return line


def table(lines: list[dict]) -> str:
    """Markdown table: reported and served accuracy per mode, and the gaps."""
    batch = next((line for line in lines if line["bn_stats"] == "batch"), None)
    rows = ["| `--bn_stats` | reported (protocol) | served (one image at a time) | "
            "served − reported (paired) | served − `batch` reported |",
            "|---|---:|---:|---:|---:|"]
    for line in lines:
        gap = "—"
        if batch is not None:
            gap = (f"{100 * (line['served_accuracy'] - batch['accuracy']):+.2f} ± "
                   f"{100 * math.hypot(line['served_ci95'], batch['ci95']):.2f}")
        rows.append(
            f"| `{line['bn_stats']}` | {100 * line['accuracy']:.2f} ± {100 * line['ci95']:.2f} "
            f"| {100 * line['served_accuracy']:.2f} ± {100 * line['served_ci95']:.2f} "
            f"| {100 * line['served_difference'] + 0.0:+.2f} ± "
            f"{100 * line['served_difference_ci95']:.2f} | {gap} |")
    return "\n".join(rows)


def main(argv: list[str]) -> None:
    """Trains one run per `--modes` entry and prints served vs protocol accuracy."""
    del argv
    unknown = sorted(set(FLAGS.modes) - set(MODES))
    if unknown:
        raise app.UsageError(f"--modes: unknown {unknown}; choose from {MODES}")
    lines = []
    for mode in FLAGS.modes:
        start = time.time()
        results = train(mode, os.path.join(FLAGS.base_dir, FLAGS.case, mode))
        lines.append(summary(mode, results, time.time() - start))
        print(json.dumps(lines[-1]), flush=True)
    print(table(lines))


if __name__ == "__main__":
    app.run(main)
