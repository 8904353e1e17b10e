"""Accuracy of exported task models vs the transductive training-time protocol.

The training-time protocol (`learner.eval_step`, what `results.json`
reports) normalises each task's query batch with the batch's own statistics
when the run uses `--bn_stats=batch`. An exported task model cannot: it fixes
its batch-norm statistics at export time (`export.saved_models.bake_task`), so
that an image alone gets the same answer as in a batch. This script measures
the cost on the run's fixed test tasks, with the best validation epoch:

* `transductive`: `learner.eval_step` (query-batch statistics);
* `export_support`: the task model with the support set's statistics;
* `export_running`: the task model with the per-step running statistics
  (runs with per-step batch norm only).

For each it prints mean accuracy and 95% CI over tasks, and for the export
modes the paired per-task difference to `transductive` (with its 95% CI) and
the fraction of query predictions that agree. One JSON object on stdout.

    python benchmarks/export_accuracy.py --model_dir=runs/omniglot_5way_1shot
    python benchmarks/export_accuracy.py --model_dir=RUN --test_tasks=600 --data_dir=DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

from export import saved_models  # pylint: disable=g-import-not-at-top
from mamlpp_tf import evaluation, experiment  # pylint: disable=g-import-not-at-top


def compare(model_dir: str,
            test_tasks: int,
            data_dir: str | None = None,
            epoch: int | None = None) -> dict:
    """Scores the three protocols on the same `test_tasks` fixed test tasks."""
    config, learner, epoch = saved_models.restore_learner(model_dir, epoch)
    overrides = dict(test_tasks=test_tasks)
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    config = dataclasses.replace(config, **overrides)
    test_set = experiment.load_class_sets(config)["test"]
    tasks = experiment.eval_tasks(config, test_set, "test", test_tasks)
    modes = ["support"] + (["running"] if config.learner.per_step_bn else [])
    network = saved_models.task_network(learner)

    @tf.function(autograph=False)
    def exported_logits(support_x, support_y, query_x, bn_stats):
        saved_models.bake_task(learner, network, support_x, support_y, bn_stats)
        logits, _ = network.forward(query_x, network.initial_params(), 0, False)
        return logits

    predictions = {
        name: [] for name in ["transductive"] + [f"export_{m}" for m in modes]
    }
    labels = []
    start = time.time()
    for support_x, support_y, query_x, query_y in tasks:
        predictions["transductive"].append(
            np.argmax(learner.eval_step(
                (support_x, support_y, query_x, query_y))["logits"],
                      axis=-1))
        for mode in modes:
            predictions[f"export_{mode}"].append(
                np.stack([
                    np.argmax(
                        exported_logits(support_x[t], support_y[t], query_x[t], mode),
                        -1) for t in range(support_x.shape[0])
                ]))
        labels.append(query_y.numpy())
    labels = np.concatenate(labels)
    predictions = {name: np.concatenate(p) for name, p in predictions.items()}
    accuracies = {name: (p == labels).mean(axis=1) for name, p in predictions.items()}
    results = dict(model_dir=os.path.abspath(model_dir),
                   epoch=epoch,
                   dataset=config.dataset,
                   n_way=config.learner.n_way,
                   k_shot=config.k_shot,
                   n_query=config.n_query,
                   bn_stats=config.learner.bn_stats,
                   seconds=round(time.time() - start, 1))
    for name, accuracy in accuracies.items():
        results[name] = evaluation.summarize(accuracy)
        if name != "transductive":
            difference = evaluation.summarize(accuracy - accuracies["transductive"])
            results[name]["difference"] = difference["accuracy"]
            results[name]["difference_ci95"] = difference["ci95"]
            results[name]["agreement"] = float(
                (predictions[name] == predictions["transductive"]).mean())
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", required=True, help="Run directory.")
    parser.add_argument("--test_tasks", type=int, default=600, help="Fixed test tasks.")
    parser.add_argument("--data_dir",
                        default=None,
                        help="Override the run's --data_dir.")
    parser.add_argument("--epoch",
                        type=int,
                        default=None,
                        help="Checkpoint epoch (default: best validation epoch kept).")
    args = parser.parse_args()
    print(
        json.dumps(compare(args.model_dir, args.test_tasks, args.data_dir, args.epoch),
                   indent=1))


if __name__ == "__main__":
    main()
