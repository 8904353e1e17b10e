"""The evaluation protocol: fixed tasks, per-task accuracy, 95% CI, top-k logit ensembles.

As in the official code's `ExperimentBuilder`: the same fixed tasks at every
evaluation; the test ensembles the
top-k validation epochs by averaging their final-step query *logits*. We
report the mean accuracy over tasks with a 95% confidence interval over tasks
(1.96·std/√tasks), and also the official code's per-sample standard deviation
of correctness (which is not a confidence interval).

The test also scores the *served* path on the same tasks: each task's
exported task model (`mamlpp_tf.task_model`), which classifies every query
on its own. With `--bn_stats=batch` the protocol normalises each query batch
with its own statistics, so the two differ and the paired difference shows
what a deployment loses; with `support`, `rn` and `tasknorm` they are
one computation and agree exactly.

The test is two phases, each reported to a `progress.Progress`: every kept
epoch by the protocol, then every one as served.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
import dataclasses
import os

import numpy as np
import tensorflow as tf

from mamlpp_tf import files, task_model
from mamlpp_tf.training import distribute, progress
from mamlpp_tf.training.run import Run
from mamlpp_tf.training.trainer import Trainer


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


def evaluate(trainer: Trainer,
             dataset: Iterable,
             strategy: tf.distribute.Strategy | None = None,
             on_tasks: Callable[[int], None] | None = None) -> TaskResults:
    """Runs `trainer.eval_step` over every meta-batch of `dataset`.

    Args:
      trainer: The trainer of the learner (its variables are left unchanged).
      dataset: Meta-batches; a `tf.data.Dataset` of the fixed tasks.
      strategy: If given, the dataset is distributed with it; every worker
        then takes part and receives the results of all tasks.
      on_tasks: Called with the number of tasks of each meta-batch done (all
        replicas'), e.g. `Progress.advance`.

    Returns:
      Per-task results of all tasks, gathered from the replicas in replica
      order: task order on one machine, and the same order for every model.
    """
    if strategy is not None:
        dataset = distribute.distribute_dataset(strategy, dataset)
    parts: dict[str, list[np.ndarray]] = {"loss": [], "logits": [], "labels": []}
    for batch in dataset:
        result = trainer.eval_step(batch)
        for key, values in parts.items():
            values.append(result[key].numpy())
        if on_tasks is not None:
            on_tasks(len(parts["loss"][-1]))
    logits, labels = np.concatenate(parts["logits"]), np.concatenate(parts["labels"])
    # Accuracy from the logits in float64, as for the served path, so that
    # equal predictions give equal numbers to the last digit.
    return TaskResults(losses=np.concatenate(parts["loss"]),
                       accuracies=correctness_of(logits, labels).mean(axis=1),
                       logits=logits,
                       labels=labels)


def evaluate_served(served: Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor],
                    dataset: Iterable,
                    on_tasks: Callable[[int], None] | None = None) -> TaskResults:
    """Scores every task of `dataset` through its task model, as a server answers it.

    Args:
      served: `task_model.served_logits_fn` of the learner: it reads the
        learner's variables when called, so one traced function serves every
        checkpoint restored into the learner.
      dataset: Meta-batches (not distributed), in the order `evaluate` sees them.
      on_tasks: Called with 1 after each task, e.g. `Progress.advance`.

    Returns:
      Per-task results in dataset order; losses are the final query
      cross-entropies of the served logits.
    """
    logits, labels = [], []
    for support_x, support_y, query_x, query_y in dataset:
        for t in range(support_x.shape[0]):
            logits.append(served(support_x[t], support_y[t], query_x[t]).numpy())
            if on_tasks is not None:
                on_tasks(1)
        labels.append(query_y.numpy())
    logits, labels = np.stack(logits), np.concatenate(labels)
    log_probabilities = logits - _log_sum_exp(logits)
    losses = -np.take_along_axis(log_probabilities, labels[..., None], -1)[..., 0].mean(1)
    correct = correctness_of(logits, labels)
    return TaskResults(losses=losses, accuracies=correct.mean(axis=1), logits=logits,
                       labels=labels)


def _log_sum_exp(logits: np.ndarray) -> np.ndarray:
    peak = logits.max(axis=-1, keepdims=True)
    return peak + np.log(np.exp(logits - peak).sum(axis=-1, keepdims=True))


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
    correct = correctness_of(np.mean([r.logits for r in results], axis=0), labels)
    return correct.mean(axis=1), correct


def correctness_of(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """0/1 correctness `[tasks, N·Q]` of logits `[tasks, N·Q, N]`."""
    return (logits.argmax(axis=-1) == labels).astype(np.float64)


def correctness(result: TaskResults) -> np.ndarray:
    """0/1 correctness of every query sample `[tasks, N·Q]` of one model."""
    return correctness_of(result.logits, result.labels)


def run_test(run: Run, history: list[dict] | None = None,
             served_bn_stats: str | None = None,
             reporter: progress.Progress | None = None) -> dict:
    """The final test: the best single epoch and the top-k logit ensemble.

    Args:
      run: The run: its `--ensemble_top_k` best kept epochs are tested on its
        test tasks; its learner ends holding the last member.
      history: Validation entries to rank the epochs by (default: the run
        directory's).
      served_bn_stats: The task model's statistics (`task_model.BN_STATS`);
        None for the run's own (`task_model.default_bn_stats`).
      reporter: Gets the test's two phases (by the protocol, as served) and
        their tasks as they are done; default: shown nowhere.

    Returns:
      `{"test": {...}}` with accuracy, CI and per-sample std for both, and the
      same for the served path (`served_*`, see the module docstring) with
      the paired per-task difference served − protocol of the single model,
      and both per-task accuracies of the single model (`per_task`).
    """
    config, learner, strategy = run.config, run.learner, run.strategy
    top = run.dir.best_epochs(config.ensemble_top_k, history)
    if not top:
        raise FileNotFoundError(f"--model_dir={config.model_dir} has no validated epoch "
                                "checkpoint yet; train at least one epoch first")
    tasks = run.eval_tasks("test")
    if served_bn_stats is None:
        served_bn_stats = task_model.default_bn_stats(config.learner)
    served = task_model.served_logits_fn(learner, served_bn_stats,
                                         config.learner.n_way * config.k_shot)
    reporter = reporter or progress.Progress()
    count, epochs = config.test_tasks, ", ".join(map(str, top))
    reporter.phase("testing", len(top) * count, tenths=True,
                   detail=f"epochs {epochs}, best first, on {count} test tasks each: the best "
                   "one alone and their logit ensemble")
    members = []
    for epoch in top:
        run.restore_epoch(epoch)
        members.append(evaluate(run.trainer, tasks, strategy, on_tasks=reporter.advance))
    reporter.phase("testing as served", len(top) * count, tenths=True,
                   detail=f"epochs {epochs} on the same tasks, each through its task model "
                   f"with {served_bn_stats} statistics; the first task traces it")
    served_members = []
    for epoch in top:
        run.restore_epoch(epoch)
        served_members.append(evaluate_served(served, tasks, on_tasks=reporter.advance))
    single = summarize(members[0].accuracies, correctness(members[0]))
    accuracies, correct = ensemble(members)
    combined = summarize(accuracies, correct)
    served = summarize(served_members[0].accuracies)
    difference = summarize(served_members[0].accuracies - members[0].accuracies)
    served_combined = summarize(ensemble(served_members)[0])
    test = dict(accuracy=single["accuracy"],
                ci95=single["ci95"],
                per_sample_std=single["per_sample_std"],
                best_epoch=top[0],
                ensemble_accuracy=combined["accuracy"],
                ensemble_ci95=combined["ci95"],
                ensemble_per_sample_std=combined["per_sample_std"],
                ensemble_epochs=top,
                tasks=single["tasks"],
                served_bn_stats=served_bn_stats,
                served_accuracy=served["accuracy"],
                served_ci95=served["ci95"],
                served_difference=difference["accuracy"],
                served_difference_ci95=difference["ci95"],
                ensemble_served_accuracy=served_combined["accuracy"],
                ensemble_served_ci95=served_combined["ci95"],
                # Per task, in test-task order, so that runs scored on the same
                # tasks can be compared pairwise (benchmarks/serving_parity.py).
                per_task=dict(accuracy=members[0].accuracies.tolist(),
                              served_accuracy=served_members[0].accuracies.tolist()))
    return dict(test=test)


def format_results(results: dict) -> str:
    """A small text table of the test results."""
    test = results["test"]
    ensemble_name = f"top-{len(test['ensemble_epochs'])} ensemble"
    rows = [(f"best single model (epoch {test['best_epoch']:d})", test["accuracy"],
             test["ci95"], f"{test['per_sample_std']:>12.4f}"),
            (ensemble_name, test["ensemble_accuracy"], test["ensemble_ci95"],
             f"{test['ensemble_per_sample_std']:>12.4f}")]
    if "served_accuracy" in test:  # Results written before served scoring lack it.
        rows += [("  served, one image at a time", test["served_accuracy"],
                  test["served_ci95"], ""),
                 (f"  served {ensemble_name}", test["ensemble_served_accuracy"],
                  test["ensemble_served_ci95"], "")]
    lines = [
        f"Test on {test['tasks']} tasks:",
        f"{'model':<36}{'accuracy':>10}{'95% CI':>10}{'sample std':>12}"
    ]
    lines += [f"{name:<36}{acc:>10.4f}{ci:>10.4f}{std}" for name, acc, ci, std in rows]
    if "served_accuracy" in test:
        lines.append(f"Served - protocol (best single model, paired over tasks): "
                     f"{test['served_difference'] + 0.0:+.4f} ± "
                     f"{test['served_difference_ci95']:.4f} "
                     f"(task model statistics: {test['served_bn_stats']})")
    return "\n".join(lines)


def evaluation_path(model_dir: str, served_bn_stats: str | None = None) -> str:
    """Where `evaluate_run` writes: one file per task-model statistics swap."""
    name = "evaluation.json" if served_bn_stats is None else (
        f"evaluation_served_{served_bn_stats}.json")
    return os.path.join(model_dir, name)


def evaluate_run(model_dir: str,
                 data_dir: str | None = None,
                 ensemble_top_k: int | None = None,
                 test_tasks: int | None = None,
                 served_bn_stats: str | None = None,
                 reporter: progress.Progress | None = None) -> dict:
    """Tests the kept checkpoints of the run in `model_dir`; writes `evaluation_path`.

    Args:
      model_dir: The run directory.
      data_dir: Override of the run's `data_dir` (e.g. on another machine).
      ensemble_top_k: Override of the run's ensemble size.
      test_tasks: Override of the number of fixed test tasks.
      served_bn_stats: Score as served with these task-model statistics (a
        serving-only swap, e.g. `"rn"` on a `batch` run) instead of the run's.
      reporter: Gets the test's phases and, at the end, where it wrote.

    Raises:
      FileNotFoundError: `model_dir` holds no run or no validated epoch.
      ValueError, data.DatasetNotFoundError: as for training, or a
        `served_bn_stats` the run cannot serve.
    """
    overrides = {
        k: v for k, v in (("data_dir", data_dir), ("ensemble_top_k", ensemble_top_k),
                          ("test_tasks", test_tasks)) if v is not None
    }
    run = Run.from_dir(model_dir, **overrides)
    if served_bn_stats is not None:
        task_model.check_bn_stats(run.config.learner, served_bn_stats, "--served_bn_stats")
    reporter = reporter or progress.Progress()
    reporter.phase("loading", detail=f"the {run.config.dataset} test classes and "
                   f"{run.config.test_tasks} fixed test tasks")
    run.eval_tasks("test")  # Built once: the test reuses them.
    results = run_test(run, served_bn_stats=served_bn_stats, reporter=reporter)
    kept = set(run.dir.kept_epochs())
    results.update(config=run.config.to_dict(),
                   validation=[entry for entry in run.dir.read_history() if entry["epoch"] in kept])
    path = evaluation_path(model_dir, served_bn_stats)
    files.write_json(path, results)
    reporter.message(f"evaluation written to {progress.shown_path(path)}")
    return results
