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

from mamlpp_tf import runs, tensorboard_scalars
from mamlpp_tf.config import RunConfig
from mamlpp_tf.nets import Backbone, build_backbone

_VALUE_KEY = "/.ATTRIBUTES/VARIABLE_VALUE"
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
      lslr: Inner learning rates `[inner_steps]` by tensor name, network order.
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
    lslr: dict[str, np.ndarray]
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
      was kept, else from the latest training checkpoint.

    Raises:
      FileNotFoundError: `model_dir` holds no run or no checkpoint yet.
      ValueError: a checkpoint lacks variables the run's config implies.
    """
    run = runs.RunDir(model_dir)
    config = run.read_config()
    history = run.read_history()
    latest = tf.train.latest_checkpoint(run.latest_dir)
    checkpoint = _choose_checkpoint(run, history, latest)
    reader = _Reader(checkpoint)
    backbone = _describe_network(config)
    if latest is not None:
        iteration = _checkpoint_number(latest)
    else:
        iteration = (max(run.kept_epochs()) + 1) * config.learner.iterations_per_epoch
    return Run(
        model_dir=model_dir,
        label=label or os.path.basename(os.path.normpath(model_dir)),
        config=config,
        history=history,
        results=run.read_results(),
        iteration=iteration,
        checkpoint=checkpoint,
        lslr={name: reader.read(f"lslr/rate_{name.replace('/', '_')}")
              for name in backbone.param_names},
        bn=[(norm.name, reader.read(f"backbone/{norm.name}/gamma"),
             reader.read(f"backbone/{norm.name}/beta")) for norm in backbone.norms],
        tasknorm_alpha=(_tasknorm_alpha(reader, backbone, config.learner.n_way * config.k_shot)
                        if config.learner.bn_stats == "tasknorm" else []),
        train_scalars=tensorboard_scalars.read_scalars(
            os.path.join(run.tensorboard_dir, "train"), _TRAIN_TAGS))


def _choose_checkpoint(run: runs.RunDir, history: list[dict],
                       latest: str | None) -> Checkpoint:
    """The best-validation epoch's model (the single model tested), else the latest."""
    kept = run.kept_epochs()
    best = runs.top_epochs(history, 1)
    if best and best[0] in kept:
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


def _describe_network(config: RunConfig) -> Backbone:
    """The run's backbone, built only for its tensor and layer names, in order."""
    return build_backbone(config.learner)


def _tasknorm_alpha(reader: _Reader, backbone: Backbone,
                    support_size: int) -> list[tuple[str, np.ndarray]]:
    """TaskNorm's blend `sigmoid(a·n + b)` of each batch-norm layer at support size `n`."""
    alphas = []
    for norm in backbone.norms:
        scale = reader.read(f"backbone/{norm.name}/alpha_scale")
        offset = reader.read(f"backbone/{norm.name}/alpha_offset")
        alpha = 1.0 / (1.0 + np.exp(-(scale * support_size + offset)))
        alphas.append((norm.name, np.atleast_1d(alpha)))
    return alphas


class _Reader:
    """Variables of one checkpoint by their object path (`backbone/norm0/gamma`)."""

    def __init__(self, checkpoint: Checkpoint):
        self._checkpoint = checkpoint
        self._reader = tf.train.load_checkpoint(checkpoint.path)

    def read(self, key: str) -> np.ndarray:
        """The value of `key`.

        Raises:
          ValueError: the checkpoint has no such variable, i.e. it was written
            by a network other than the one `config.json` describes.
        """
        if not self._reader.has_tensor(key + _VALUE_KEY):
            raise ValueError(
                f"checkpoint {self._checkpoint.path} has no variable {key}: it does not "
                "match the run's config.json")
        return np.asarray(self._reader.get_tensor(key + _VALUE_KEY))
