"""The evaluation protocol: fixed tasks, per-task accuracy, 95% CI, top-k logit ensembles.

SPEC §10: the same fixed tasks at every evaluation; the test ensembles the
top-k validation epochs by averaging their final-step query *logits*. We
report the mean accuracy over tasks with a 95% confidence interval over tasks
(1.96·std/√tasks), and also the official code's per-sample standard deviation
of correctness (which is not a confidence interval).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterable

import numpy as np
import tensorflow as tf

from mamlpp_tf import data
from mamlpp_tf import distribute
from mamlpp_tf import experiment
from mamlpp_tf import runs
from mamlpp_tf.config import RunConfig
from mamlpp_tf.learner import MamlPlusPlus


@dataclasses.dataclass(frozen=True)
class TaskResults:
    """Per-task outcomes of evaluating one model on a fixed task set.

    Attributes:
      losses: `[tasks]` final-step query loss.
      accuracies: `[tasks]` final-step query accuracy.
      logits: `[tasks, N·Q, N]` final-step query logits.
      labels: `[tasks, N·Q]` query labels.
    """
    losses: np.ndarray
    accuracies: np.ndarray
    logits: np.ndarray
    labels: np.ndarray


def evaluate(learner: MamlPlusPlus,
             dataset: Iterable,
             strategy: tf.distribute.Strategy | None = None) -> TaskResults:
    """Runs `learner.eval_step` over every meta-batch of `dataset`.

    Args:
      learner: The learner (its variables are left unchanged).
      dataset: Meta-batches; a `tf.data.Dataset` of the fixed tasks.
      strategy: If given, the dataset is distributed with it; every worker
        then takes part and receives the results of all tasks.

    Returns:
      Per-task results of all tasks, gathered from the replicas in replica
      order: task order on one machine, and the same order for every model.
    """
    if strategy is not None:
        dataset = distribute.distribute_dataset(strategy, dataset)
    parts: dict[str, list[np.ndarray]] = {
        "loss": [], "accuracy": [], "logits": [], "labels": []}
    for batch in dataset:
        result = learner.eval_step(batch)
        for key, values in parts.items():
            values.append(result[key].numpy())
    return TaskResults(losses=np.concatenate(parts["loss"]),
                       accuracies=np.concatenate(parts["accuracy"]),
                       logits=np.concatenate(parts["logits"]),
                       labels=np.concatenate(parts["labels"]))


def summarize(accuracies: np.ndarray,
              correct: np.ndarray | None = None) -> dict[str, float]:
    """Mean accuracy over tasks with a 95% CI over tasks.

    Args:
      accuracies: `[tasks]` per-task accuracy.
      correct: Optional 0/1 correctness of every query sample, for the official
        per-sample standard deviation.

    Returns:
      `{"accuracy", "ci95", "std_over_tasks", "tasks"}` (+ `"per_sample_std"`).
    """
    tasks = len(accuracies)
    std = float(np.std(accuracies))
    summary = dict(accuracy=float(np.mean(accuracies)),
                   ci95=1.96 * std / np.sqrt(tasks),
                   std_over_tasks=std,
                   tasks=tasks)
    if correct is not None:
        summary["per_sample_std"] = float(np.std(correct))
    return summary


def ensemble(results: list[TaskResults]) -> tuple[np.ndarray, np.ndarray]:
    """Averages logits over models; returns per-task accuracy and per-sample correctness.

    Raises:
      ValueError: if the models were evaluated on different tasks.
    """
    labels = results[0].labels
    if any(r.labels.shape != labels.shape or (r.labels != labels).any()
           for r in results):
        raise ValueError("ensemble members were evaluated on different tasks")
    logits = np.mean([r.logits for r in results], axis=0)
    correct = (logits.argmax(axis=-1) == labels).astype(np.float64)
    return correct.mean(axis=1), correct


def correctness(result: TaskResults) -> np.ndarray:
    """0/1 correctness of every query sample `[tasks, N·Q]` of one model."""
    return (result.logits.argmax(axis=-1) == result.labels).astype(np.float64)


def run_test(config: RunConfig, run: runs.RunDir, learner: MamlPlusPlus,
             test_set: data.ClassSet, history: list[dict],
             strategy: tf.distribute.Strategy) -> dict:
    """The final test: the best single epoch and the top-k logit ensemble.

    Args:
      config: The run's config (tasks, ensemble size).
      run: Its run directory (epoch checkpoints).
      learner: A learner of the run's shape; it ends holding the last member.
      test_set: The test classes.
      history: Validation entries of the epochs that may be used.
      strategy: Distribution strategy of `learner`.

    Returns:
      `{"test": {...}}` with accuracy, CI and per-sample std for both.
    """
    top = runs.top_epochs(history, config.ensemble_top_k)
    tasks = experiment.eval_tasks(config, test_set, "test", config.test_tasks,
                                  strategy.num_replicas_in_sync)
    members = []
    for epoch in top:
        run.restore_epoch(learner, epoch)
        members.append(evaluate(learner, tasks, strategy))
    single = summarize(members[0].accuracies, correctness(members[0]))
    accuracies, correct = ensemble(members)
    combined = summarize(accuracies, correct)
    test = dict(accuracy=single["accuracy"],
                ci95=single["ci95"],
                per_sample_std=single["per_sample_std"],
                best_epoch=top[0],
                ensemble_accuracy=combined["accuracy"],
                ensemble_ci95=combined["ci95"],
                ensemble_per_sample_std=combined["per_sample_std"],
                ensemble_epochs=top,
                tasks=single["tasks"])
    return dict(test=test)


def format_results(results: dict) -> str:
    """A small text table of the test results."""
    test = results["test"]
    rows = [("best single model (epoch %d)" % test["best_epoch"], test["accuracy"],
             test["ci95"], test["per_sample_std"]),
            (f"top-{len(test['ensemble_epochs'])} ensemble", test["ensemble_accuracy"],
             test["ensemble_ci95"], test["ensemble_per_sample_std"])]
    lines = [
        f"Test on {test['tasks']} tasks:",
        f"{'model':<32}{'accuracy':>10}{'95% CI':>10}{'sample std':>12}"
    ]
    lines += [
        f"{name:<32}{acc:>10.4f}{ci:>10.4f}{std:>12.4f}" for name, acc, ci, std in rows
    ]
    return "\n".join(lines)


def evaluate_run(model_dir: str,
                 data_dir: str | None = None,
                 ensemble_top_k: int | None = None,
                 test_tasks: int | None = None) -> dict:
    """Tests the kept checkpoints of the run in `model_dir`.

    Raises:
      FileNotFoundError: `model_dir` holds no run or no validated epoch.
      ValueError, data.DatasetNotFoundError: as for training.
    """
    run = runs.RunDir(model_dir)
    config = run.read_config()
    overrides = {
        k: v for k, v in (("data_dir", data_dir), ("ensemble_top_k", ensemble_top_k),
                          ("test_tasks", test_tasks)) if v is not None
    }
    config = dataclasses.replace(config, **overrides)
    kept = set(run.kept_epochs())
    history = [entry for entry in run.read_history() if entry["epoch"] in kept]
    if not history:
        raise FileNotFoundError(
            f"--model_dir={model_dir} has no validated epoch checkpoint "
            "yet; train at least one epoch first")
    strategy = tf.distribute.get_strategy()
    sets = experiment.load_class_sets(config)
    learner = experiment.build_learner(config, strategy)
    results = run_test(config, run, learner, sets["test"], history, strategy)
    results.update(config=config.to_dict(), validation=history)
    runs.write_json_atomic(os.path.join(model_dir, "evaluation.json"), results)
    return results
