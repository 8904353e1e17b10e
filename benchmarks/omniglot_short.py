"""Real-data check of the main job: Omniglot 5-way 1-shot MAML++ in 500 meta-iterations.

Runs `python -m mamlpp_tf.train --flagfile=flags/omniglot_5way_1shot.cfg` with
10 epochs of 50 iterations (second order, paper-era hyper-parameters) on a
prepared TFDS directory, then prints one JSON line with the test accuracy (best
single epoch and top-k ensemble, 95% CI over 600 tasks) and the wall time. For
reference, the official PyTorch code run the same way on a 2-core CPU reached
91.0% ± 1.1 (single model). A benchmark, not a test: it takes tens of minutes.

    python benchmarks/omniglot_short.py --data_dir=../shared/data/tfds --model_dir=/tmp/o5w1s
    python benchmarks/omniglot_short.py --model_dir=/tmp/o5w1s -- --task_impl=loop  # extra flags
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


flags.DEFINE_string("data_dir", os.path.join(ROOT, "..", "shared", "data", "tfds"),
                    "Prepared TFDS data dir holding omniglot/3.0.0.")
flags.DEFINE_string("model_dir", None, "Run directory (resumes if present).")
flags.mark_flag_as_required("model_dir")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    """Trains and tests a short Omniglot run and prints its accuracy and times as JSON.

    Args:
      argv: The program name, then extra train flags given after `--`.
    """
    extra = argv[1:]
    command = [sys.executable, "-m", "mamlpp_tf.train", "--flagfile=flags/omniglot_5way_1shot.cfg",
               f"--data_dir={FLAGS.data_dir}", "--nodownload", "--epochs=10",
               "--iterations_per_epoch=50", f"--model_dir={FLAGS.model_dir}", *extra]
    start = time.time()
    subprocess.run(command, cwd=ROOT, check=True)
    with open(os.path.join(FLAGS.model_dir, "results.json")) as stream:
        results = json.load(stream)
    test = results["test"]
    print(json.dumps(dict(
        case="omniglot_5way_1shot_500_iterations", accuracy=round(test["accuracy"], 4),
        ci95=round(test["ci95"], 4), ensemble_accuracy=round(test["ensemble_accuracy"], 4),
        ensemble_ci95=round(test["ensemble_ci95"], 4), ensemble_epochs=test["ensemble_epochs"],
        tasks=test["tasks"], training_wall_time_s=results["wall_time_s"],
        this_invocation_s=round(time.time() - start, 1), extra_flags=extra)))


if __name__ == "__main__":
    app.run(main)
