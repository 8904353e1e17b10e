r"""Served accuracy of every batch-norm mode against `batch`'s reported, paired over test tasks.

Trains the main job's shape (Omniglot 20-way 1-shot, `flags/omniglot.cfg`) and
5-way 1-shot on real Omniglot with the paper split and second order, once per
arm and seed, on a short schedule (10 epochs × 50 iterations; the meta-batch
shortened to 4 at 20-way and 8 at 5-way so that a run takes tens of minutes
on 2 cores; 2,000 test tasks; the best single validation epoch, as the
protocol selects it). An arm is a training mode (`--bn_stats` and TaskNorm's
options) or a serving-only swap on the `batch` run (`python -m
mamlpp_tf.evaluate --served_bn_stats=...`: the same weights served with other
task-model statistics, no retraining).

Every arm is scored on the same fixed test tasks (they come from the run's
`val_seed`, not `--seed`), so its served accuracy is compared with the `batch`
run's reported accuracy task by task: the paired difference is the mean of
the per-task accuracy differences, with a 95 % CI of 1.96·std/√tasks. With
several seeds, a last row per arm pairs the seed-averaged per-task
accuracies.

One JSON line per arm and seed on stdout, then a Markdown table per case.
Runs resume: an arm whose run directory (BASE/CASE/ARM/seedS) holds
`results.json` (or whose swap holds its `evaluation_served_<mode>.json`) is
only read. A benchmark, not a test: a 20-way run trains for about 30 minutes.

    python benchmarks/serving_parity.py --base_dir=/tmp/parity
    python benchmarks/serving_parity.py --cases=omniglot_5way_1shot --arms=batch,support,rn \
        --seeds=0,1 --base_dir=/tmp/parity
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import app, flags
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mamlpp_tf.training.evaluation import summarize  # pylint: disable=wrong-import-position

# Case: its flagfile and the flags that shorten it (beside the schedule's).
CASES = {
    "omniglot_20way_1shot": ("flags/omniglot.cfg", ["--meta_batch_size=4",
                                                    "--val_tasks=300"]),
    "omniglot_5way_1shot": ("flags/omniglot_5way_1shot.cfg", ["--meta_batch_size=8"]),
}
SCHEDULE = ["--epochs=10", "--iterations_per_epoch=50", "--test_tasks=2000",
            "--ensemble_top_k=1"]
# Training arms: their flags.
TRAINED = {
    "batch": ["--bn_stats=batch"],
    "support": ["--bn_stats=support"],
    "rn": ["--bn_stats=rn"],
    "tasknorm": ["--bn_stats=tasknorm"],
    "tasknorm_layer": ["--bn_stats=tasknorm", "--tasknorm_alpha=layer"],
    "tasknorm_unbiased": ["--bn_stats=tasknorm", "--tasknorm_unbiased"],
    "tasknorm_layer_unbiased": ["--bn_stats=tasknorm", "--tasknorm_alpha=layer",
                                "--tasknorm_unbiased"],
    "tasknorm_channel": ["--bn_stats=tasknorm", "--tasknorm_alpha=channel"],
}
# Serving-only swaps on the batch run: the task model's statistics.
SWAPS = {"batch>rn": "rn"}
ARMS = tuple(TRAINED) + tuple(SWAPS)

flags.DEFINE_list("cases", list(CASES), f"Cases, from {tuple(CASES)}.")
flags.DEFINE_list("arms", ["batch", "support", "rn", "tasknorm", "tasknorm_layer_unbiased",
                           "batch>rn"],
                  f"Arms, from {ARMS} (`batch` is always trained: it is the reference).")
flags.DEFINE_list("seeds", ["0"], "Training seeds (--seed) of every arm.")
flags.DEFINE_string("data_dir", os.path.join(ROOT, "..", "shared", "data", "tfds"),
                    "Prepared TFDS data dir holding omniglot/3.0.0.")
flags.DEFINE_string("base_dir", None, "Run directories go to BASE/CASE/ARM/seedS.")
flags.mark_flag_as_required("base_dir")
FLAGS = flags.FLAGS


def _run(command: list[str], log_path: str) -> None:
    """Runs a job from the repository root, its output to `log_path`; raises if it fails."""
    with open(log_path, "w", encoding="utf-8") as log:
        status = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                check=False).returncode
    if status:
        raise RuntimeError(f"{' '.join(command)} failed with status {status}; see {log_path}")


def trained_test(case: str, arm: str, seed: str) -> dict:
    """The `test` results of one trained arm, training it first unless done."""
    model_dir = os.path.join(FLAGS.base_dir, case, arm, f"seed{seed}")
    results_path = os.path.join(model_dir, "results.json")
    if not os.path.exists(results_path):
        os.makedirs(model_dir, exist_ok=True)
        flagfile, shortened = CASES[case]
        _run([sys.executable, "-m", "mamlpp_tf.train", f"--flagfile={flagfile}",
              f"--data_dir={FLAGS.data_dir}", "--nodownload", *shortened, *SCHEDULE,
              f"--seed={seed}", *TRAINED[arm], f"--model_dir={model_dir}"],
             os.path.join(model_dir, "train.log"))
    with open(results_path, encoding="utf-8") as stream:
        results = json.load(stream)
    return results["test"]


def swapped_test(case: str, arm: str, seed: str) -> dict:
    """The `test` results of the batch run served with a swap's statistics."""
    model_dir = os.path.join(FLAGS.base_dir, case, "batch", f"seed{seed}")
    path = os.path.join(model_dir, f"evaluation_served_{SWAPS[arm]}.json")
    if not os.path.exists(path):
        _run([sys.executable, "-m", "mamlpp_tf.evaluate", f"--model_dir={model_dir}",
              f"--data_dir={FLAGS.data_dir}", f"--served_bn_stats={SWAPS[arm]}"],
             os.path.join(model_dir, f"evaluate_{SWAPS[arm]}.log"))
    with open(path, encoding="utf-8") as stream:
        return json.load(stream)["test"]


def paired(served: np.ndarray, reference: np.ndarray) -> dict:
    """Mean per-task difference `served − reference` with its 95 % CI over tasks."""
    if served.shape != reference.shape:
        raise ValueError(f"{served.shape} vs {reference.shape} tasks: not the same test tasks")
    difference = summarize(served - reference)
    return dict(vs_batch=difference["accuracy"], vs_batch_ci95=difference["ci95"])


def line(case: str, arm: str, seed: str, test: dict, batch: dict) -> dict:
    """One arm's JSON line: reported, served, and served − batch's reported, paired."""
    served = np.asarray(test["per_task"]["served_accuracy"])
    reference = np.asarray(batch["per_task"]["accuracy"])
    record = dict(case=case, arm=arm, seed=seed, tasks=test["tasks"],
                  best_epoch=test["best_epoch"], served_bn_stats=test["served_bn_stats"],
                  reported=test["accuracy"], reported_ci95=test["ci95"],
                  served=test["served_accuracy"], served_ci95=test["served_ci95"],
                  served_minus_reported=test["served_difference"],
                  served_minus_reported_ci95=test["served_difference_ci95"],
                  per_task_served=served, per_task_reference=reference)
    record.update(paired(served, reference))
    return record


def seed_mean(records: list[dict]) -> dict:
    """An arm's row over seeds: seed-averaged per-task accuracies, paired."""
    served = np.mean([r["per_task_served"] for r in records], axis=0)
    reference = np.mean([r["per_task_reference"] for r in records], axis=0)
    first = records[0]
    record = dict(case=first["case"], arm=first["arm"], seed="mean",
                  served=float(served.mean()), served_ci95=summarize(served)["ci95"],
                  reported=float(np.mean([r["reported"] for r in records])),
                  reported_ci95=None)
    record.update(paired(served, reference))
    return record


def _percent(value: float, ci95: float | None) -> str:
    return f"{100 * value:.2f}" + ("" if ci95 is None else f" ± {100 * ci95:.2f}")


def table(records: list[dict]) -> str:
    """Markdown: per arm and seed, reported, served and served − batch reported (paired)."""
    rows = ["| arm | seed | reported (protocol) | served (one image at a time) | "
            "served − `batch` reported (paired) |", "|---|---|---:|---:|---:|"]
    for r in records:
        rows.append(f"| `{r['arm']}` | {r['seed']} | {_percent(r['reported'], r['reported_ci95'])} "
                    f"| {_percent(r['served'], r['served_ci95'])} "
                    f"| {100 * r['vs_batch'] + 0.0:+.2f} ± {100 * r['vs_batch_ci95']:.2f} |")
    return "\n".join(rows)


def main(argv: list[str]) -> None:
    """Trains or reads every arm of every case and seed; prints JSON lines and tables."""
    del argv
    for name, values, known in (("cases", FLAGS.cases, CASES), ("arms", FLAGS.arms, ARMS)):
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise app.UsageError(f"--{name}: unknown {unknown}; choose from {tuple(known)}")
    tables = []
    for case in FLAGS.cases:
        records = []
        for arm in FLAGS.arms:
            per_seed = []
            for seed in FLAGS.seeds:
                batch = trained_test(case, "batch", seed)
                test = swapped_test(case, arm, seed) if arm in SWAPS else trained_test(
                    case, arm, seed)
                per_seed.append(line(case, arm, seed, test, batch))
                print(json.dumps({k: v for k, v in per_seed[-1].items()
                                  if not k.startswith("per_task")}), flush=True)
            records += per_seed
            if len(per_seed) > 1:
                records.append(seed_mean(per_seed))
                print(json.dumps(records[-1]), flush=True)
        tables.append(f"### {case}\n\n{table(records)}")
    print("\n\n".join(tables))


if __name__ == "__main__":
    app.run(main)
