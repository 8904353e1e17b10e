"""What the report reads from a run directory: config, results, learned values, summaries.

Everything comes from the run directory (`config.json`, `history.json`,
`results.json`, the checkpoints and the TensorBoard event files), never from
the dataset, so a finished run, an interrupted one and one still training can
all be reported.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow as tf

from mamlpp_tf import tensorboard_scalars
from mamlpp_tf.config import RunConfig
from mamlpp_tf.learner import MamlPlusPlus
from mamlpp_tf.nets import PerStepBatchNorm
from mamlpp_tf.training import run_dir

# Training scalars `train` writes every --log_every iterations.
_TRAIN_TAGS = ("loss", "accuracy", "meta_lr")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """The checkpoint whose variables the heatmaps show.

    Attributes:
      path: Checkpoint prefix, readable by `tf.train.load_checkpoint`.
      description: Which one it is, for figure titles (e.g. "epoch 3, best
        validation").
    """
    path: str
    description: str


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything the report shows about one run directory.

    Attributes:
      model_dir: The run directory.
      label: Short name in legends, titles and file names.
      config: The run's config.
      history: Validation result per finished epoch (`history.json`).
      results: Final results (`results.json`), None if the run has not finished.
      iteration: Meta-iterations trained, as far as the checkpoints know.
      checkpoint: The checkpoint the heatmaps show.
      inner_rates: The update rule's inner learning rates by adapted tensor
        name, network order: `[inner_steps]` per-step rates (LSLR, fixed, and
        Meta-SGD's mean over each tensor's elements), `[1]` for Meta-SGD's
        rates shared by all steps.
      bn: Per batch-norm layer (pass order) its name, gamma and beta:
        `[inner_steps, channels]` with per-step BN, `[channels]` without.
      tasknorm_alpha: For `--bn_stats=tasknorm` runs, per batch-norm layer its
        name and TaskNorm's blend `α = sigmoid(a·n + b)` at the run's support
        size `n` (`[inner_steps]`, or one value without per-step BN); empty
        otherwise.
      train_scalars: Training summaries by tag (`loss`, `accuracy`,
        `meta_lr`): iterations and values, empty without event files.
    """
    model_dir: str
    label: str
    config: RunConfig
    history: list[dict]
    results: dict | None
    iteration: int
    checkpoint: Checkpoint
    inner_rates: dict[str, np.ndarray]
    bn: list[tuple[str, np.ndarray, np.ndarray]]
    tasknorm_alpha: list[tuple[str, np.ndarray]]
    train_scalars: dict[str, tuple[np.ndarray, np.ndarray]]

    @property
    def total_iterations(self) -> int:
        """Meta-iterations the run was configured for (epochs × iterations per epoch)."""
        learner = self.config.learner
        return learner.epochs * learner.iterations_per_epoch


def load_run(model_dir: str, label: str | None = None) -> Run:
    """Reads one run directory.

    Args:
      model_dir: Directory written by `mamlpp_tf.train`.
      label: Name in legends; defaults to the directory's base name.

    Returns:
      The run, with variables from the best-validation epoch checkpoint if it
      was kept, else from the latest training checkpoint, read through the
      learner the run's config describes (its variable groups).

    Raises:
      FileNotFoundError: `model_dir` holds no run or no checkpoint yet.
      ValueError: a checkpoint lacks variables the run's config implies.
    """
    run = run_dir.RunDir(model_dir)
    config = run.read_config()
    history = run.read_history()
    latest = tf.train.latest_checkpoint(run.latest_dir)
    checkpoint = _choose_checkpoint(run, history, latest)
    learner = _restored_learner(config, checkpoint)
    if latest is not None:
        iteration = _checkpoint_number(latest)
    else:
        iteration = (max(run.kept_epochs()) + 1) * config.learner.iterations_per_epoch
    norms = learner.backbone.norms
    return Run(
        model_dir=model_dir,
        label=label or os.path.basename(os.path.normpath(model_dir)),
        config=config,
        history=history,
        results=run.read_results(),
        iteration=iteration,
        checkpoint=checkpoint,
        inner_rates={name: _per_step(learner, rate.numpy())
                     for name, rate in learner.variable_groups()["update_rule"].items()},
        bn=[(norm.name, norm.gamma.numpy(), norm.beta.numpy()) for norm in norms],
        tasknorm_alpha=([(norm.name, _tasknorm_alpha(norm, config.learner.n_way * config.k_shot))
                         for norm in norms] if config.learner.bn_stats == "tasknorm" else []),
        train_scalars=tensorboard_scalars.read_scalars(
            os.path.join(run.tensorboard_dir, "train"), _TRAIN_TAGS))


def _choose_checkpoint(run: run_dir.RunDir, history: list[dict],
                       latest: str | None) -> Checkpoint:
    """The best-validation epoch's model (the single model tested), else the latest."""
    kept = run.kept_epochs()
    best = run.best_epochs(1, history)
    if best:
        return Checkpoint(os.path.join(run.epoch_path(best[0]), "model"),
                          f"epoch {best[0]}, best validation")
    if latest is not None:
        return Checkpoint(latest,
                          f"iteration {_checkpoint_number(latest)}, latest checkpoint")
    if kept:
        return Checkpoint(os.path.join(run.epoch_path(kept[-1]), "model"),
                          f"epoch {kept[-1]}")
    raise FileNotFoundError(
        f"--model_dir={run.model_dir} has no checkpoint yet (nothing in "
        f"{run.checkpoint_dir}); the report needs at least the first "
        "checkpoint of training")


def _checkpoint_number(path: str) -> int:
    """The iteration of a `checkpoints/latest/ckpt-N` prefix (train saves it as N)."""
    return int(path.rsplit("-", 1)[-1])


def _restored_learner(config: RunConfig, checkpoint: Checkpoint) -> MamlPlusPlus:
    """The run's learner holding the model of `checkpoint` (its optimiser state left out).

    Raises:
      ValueError: the checkpoint does not hold the model `config.json` describes.
    """
    learner = MamlPlusPlus(config.learner)
    status = tf.train.Checkpoint(**learner.checkpoint_items()).read(checkpoint.path)
    try:
        status.expect_partial().assert_existing_objects_matched()
    except AssertionError as error:
        raise ValueError(f"checkpoint {checkpoint.path} does not match the run's config.json: "
                         f"{str(error).splitlines()[0]}") from None
    return learner


def _per_step(learner: MamlPlusPlus, rate: np.ndarray) -> np.ndarray:
    """A rate variable as one value per inner step: Meta-SGD's as its mean over elements."""
    rows = rate if learner.update_rule.per_step else rate[None]
    return rows.reshape(len(rows), -1).mean(axis=1)


def _tasknorm_alpha(norm: PerStepBatchNorm, support_size: int) -> np.ndarray:
    """TaskNorm's blend `sigmoid(a·n + b)` of one batch-norm layer at support size `n`."""
    scale, offset = norm.alpha_scale.numpy(), norm.alpha_offset.numpy()
    return np.atleast_1d(1.0 / (1.0 + np.exp(-(scale * support_size + offset))))
