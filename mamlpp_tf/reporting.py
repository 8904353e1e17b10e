"""What a run learned, as figures: LSLR and BN heatmaps, schedules, curves, results.

The logic behind `python -m mamlpp_tf.report`, kept free of absl flags so that
tests and notebooks can import it. Everything is read from the run directory
(`config.json`, `history.json`, `results.json`, the checkpoints and the
TensorBoard event files), never from the dataset, so a finished run, an
interrupted one and one still training can all be reported.

Figures are drawn on `matplotlib.figure.Figure` objects directly (no pyplot,
hence no GUI backend and no global state) and saved as PNG through Agg.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import tempfile
from typing import Callable, Sequence

import matplotlib
from matplotlib import colors
from matplotlib.figure import Figure
import numpy as np
import tensorflow as tf

from mamlpp_tf import runs
from mamlpp_tf import schedules
from mamlpp_tf.backbone import VGGBackbone
from mamlpp_tf.config import RunConfig

REPORT_NAME = "report.md"
_VALUE_KEY = "/.ATTRIBUTES/VARIABLE_VALUE"
# Training scalars `train` writes every --log_every iterations.
_TRAIN_TAGS = ("loss", "accuracy", "meta_lr")
_DPI = 100


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
        learner = self.config.learner
        return learner.epochs * learner.iterations_per_epoch


# ------------------------------------------------------------------ reading


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
    reader = tf.train.load_checkpoint(checkpoint.path)
    backbone = _describe_network(config)
    lslr = {
        name: _read(reader, checkpoint, f"lslr/rate_{name.replace('/', '_')}")
        for name in backbone.param_names
    }
    bn = [(norm.name, _read(reader, checkpoint, f"backbone/{norm.name}/gamma"),
           _read(reader, checkpoint, f"backbone/{norm.name}/beta"))
          for norm in backbone.norms]
    tasknorm_alpha = []
    if config.learner.bn_stats == "tasknorm":
        support_size = config.learner.n_way * config.k_shot
        for norm in backbone.norms:
            scale, offset = (_read(reader, checkpoint, f"backbone/{norm.name}/{name}")
                             for name in ("alpha_scale", "alpha_offset"))
            alpha = 1.0 / (1.0 + np.exp(-(scale * support_size + offset)))
            tasknorm_alpha.append((norm.name, np.atleast_1d(alpha)))
    if latest is not None:
        iteration = _checkpoint_number(latest)
    else:
        iteration = (max(run.kept_epochs()) + 1) * config.learner.iterations_per_epoch
    return Run(model_dir=model_dir,
               label=label or os.path.basename(os.path.normpath(model_dir)),
               config=config,
               history=history,
               results=run.read_results(),
               iteration=iteration,
               checkpoint=checkpoint,
               lslr=lslr,
               bn=bn,
               tasknorm_alpha=tasknorm_alpha,
               train_scalars=read_scalars(os.path.join(run.tensorboard_dir, "train"),
                                          _TRAIN_TAGS))


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


def _describe_network(config: RunConfig) -> VGGBackbone:
    """The run's backbone, built only for its tensor and layer names, in order."""
    learner = config.learner
    return VGGBackbone(n_way=learner.n_way,
                       image_shape=learner.image_shape,
                       num_filters=learner.num_filters,
                       num_stages=learner.num_stages,
                       max_pooling=learner.max_pooling,
                       num_steps=learner.inner_steps,
                       per_step_bn=learner.per_step_bn,
                       bn_policy=learner.bn_stats,
                       dtype=learner.dtype,
                       name="backbone")


def _read(reader: tf.train.CheckpointReader, checkpoint: Checkpoint,
          key: str) -> np.ndarray:
    if not reader.has_tensor(key + _VALUE_KEY):
        raise ValueError(
            f"checkpoint {checkpoint.path} has no variable {key}: it does not "
            "match the run's config.json")
    return np.asarray(reader.get_tensor(key + _VALUE_KEY))


def read_scalars(directory: str,
                 tags: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Scalar summaries of `tags` from the event files in `directory`.

    Handles both encodings of a scalar (TF1 `simple_value`, TF2 tensor). A
    resumed run writes the iterations after its checkpoint again; the value
    written last wins. A truncated final record (killed writer) is skipped.

    Returns:
      Per tag found, `(iterations, values)` sorted by iteration.
    """
    events = []
    for path in glob.glob(os.path.join(directory, "events.out.tfevents.*")):
        try:
            for record in tf.data.TFRecordDataset(path):
                event = tf.compat.v1.Event.FromString(record.numpy())
                events.extend((event.wall_time, value.tag, event.step, _scalar(value))
                              for value in event.summary.value
                              if value.tag in tags)
        except tf.errors.DataLossError:
            pass
    by_tag: dict[str, dict[int, float]] = {}
    for _, tag, step, value in sorted(events, key=lambda event: event[0]):
        by_tag.setdefault(tag, {})[step] = value
    return {
        tag: (np.array(sorted(values)), np.array([values[s] for s in sorted(values)]))
        for tag, values in by_tag.items()
    }


def _scalar(value) -> float:
    if value.WhichOneof("value") == "simple_value":
        return float(value.simple_value)
    return float(tf.make_ndarray(value.tensor))


# ------------------------------------------------------------------ figures


def lslr_figure(run: Run) -> Figure:
    """Heatmap of the inner learning rates: tensors (network order) × inner steps.

    The colour map is diverging and symmetric around 0, so rates the model
    turned negative (gradient ascent on that tensor at that step) stand out.
    """
    names = list(run.lslr)
    values = np.stack([run.lslr[name] for name in names]).astype(np.float64)
    limit = float(np.abs(values).max()) or 1.0
    kind = "learned" if run.config.learner.learn_inner_lr else "fixed, not learned"
    figure = Figure(figsize=(1.6 + 0.9 * values.shape[1], 1.4 + 0.32 * len(names)),
                    layout="constrained")
    axes = figure.add_subplot()
    _heatmap(axes,
             values,
             names,
             _step_labels(values.shape[1]),
             cmap="RdBu_r",
             norm=colors.Normalize(-limit, limit),
             colorbar_label="inner learning rate")
    axes.set_title(
        f"Inner learning rates ({kind})\n{run.label}: {run.checkpoint.description}",
        fontsize=9)
    return figure


def bn_figure(run: Run) -> Figure:
    """Heatmaps of the L2 norm over channels of each BN layer's gamma and beta per step.

    Without per-step batch norm each layer has one shared column.
    """
    names = [name for name, _, _ in run.bn]
    per_step = run.config.learner.per_step_bn
    steps = run.config.learner.inner_steps if per_step else 1
    figure = Figure(figsize=(2.6 + 1.5 * steps, 1.4 + 0.35 * len(names)),
                    layout="constrained")
    for index, label in enumerate(("gamma", "beta")):
        norms = np.stack([
            np.linalg.norm(np.atleast_2d(params[index + 1]), axis=-1)
            for params in run.bn
        ]).astype(np.float64)
        axes = figure.add_subplot(1, 2, index + 1)
        _heatmap(axes,
                 norms,
                 names,
                 _step_labels(steps) if per_step else ["shared"],
                 cmap="viridis",
                 norm=colors.Normalize(norms.min(), norms.max()),
                 colorbar_label=f"‖{label}‖₂")
        axes.set_title(f"BN {label} norm", fontsize=9)
        if index:
            axes.set_yticklabels([])
    kind = "Per-step" if per_step else "Shared"
    figure.suptitle(f"{kind} batch norm: {run.label}, {run.checkpoint.description}",
                    fontsize=9)
    return figure


def msl_figure(runs_: Sequence[Run]) -> Figure:
    """Multi-step loss weight of each inner step over the epochs (one panel per run).

    Computed from each run's config with `schedules.msl_weights`, the function
    training used; a dotted line marks how far an unfinished run got.
    """
    figure = Figure(figsize=(4.2 * len(runs_), 3.2), layout="constrained")
    for index, run in enumerate(runs_):
        learner = run.config.learner
        epochs = np.arange(learner.epochs + 1)
        weights = np.stack([
            schedules.msl_weights(min(e, learner.epochs - 1), learner.inner_steps,
                                  learner.msl_epochs) for e in epochs
        ])
        axes = figure.add_subplot(1, len(runs_), index + 1)
        for step in range(learner.inner_steps):
            axes.step(epochs, weights[:, step], where="post", label=f"step {step + 1}")
        _mark_progress(axes, run, run.iteration / learner.iterations_per_epoch)
        axes.set(xlabel="epoch",
                 ylabel="weight of the step's query loss",
                 ylim=(-0.03, 1.03),
                 title=f"MSL weights: {run.label} (msl_epochs={learner.msl_epochs})")
        axes.title.set_fontsize(9)
        axes.legend(fontsize=7)
    return figure


def curves_figure(runs_: Sequence[Run]) -> Figure:
    """Training (TensorBoard) and validation (`history.json`) loss and accuracy.

    Training values are meta-batch means every --log_every iterations;
    validation points sit at the end of each epoch with their 95% CI.
    """
    figure = Figure(figsize=(10, 3.6), layout="constrained")
    for index, metric in enumerate(("loss", "accuracy")):
        axes = figure.add_subplot(1, 2, index + 1)
        for run_index, run in enumerate(runs_):
            color = _color(run_index)
            if metric in run.train_scalars:
                steps, values = run.train_scalars[metric]
                axes.plot(steps,
                          values,
                          color=color,
                          alpha=0.45,
                          linewidth=1,
                          label=f"{run.label} train")
            if run.history:
                iterations = [(h["epoch"] + 1) * run.config.learner.iterations_per_epoch
                              for h in run.history]
                axes.errorbar(iterations, [h[metric] for h in run.history],
                              yerr=[h["ci95"] for h in run.history]
                              if metric == "accuracy" else None,
                              color=color,
                              marker="o",
                              markersize=4,
                              capsize=3,
                              label=f"{run.label} validation")
        axes.set(xlabel="meta-iteration", ylabel=metric, title=metric)
        axes.legend(fontsize=7)
    return figure


def meta_lr_figure(runs_: Sequence[Run]) -> Figure:
    """The outer (Adam) learning rate over iterations: schedule and logged values.

    At iteration `t` both show the optimiser's rate after `t` updates (the one
    for the next update): the line is `schedules.cosine_meta_lr` of epoch
    `t // iterations_per_epoch` over the whole planned run, the dots are what
    training logged, so the two must agree.
    """
    figure = Figure(figsize=(6, 3.4), layout="constrained")
    axes = figure.add_subplot()
    for index, run in enumerate(runs_):
        color, learner = _color(index), run.config.learner
        iterations = np.arange(run.total_iterations + 1)
        rates = [
            schedules.cosine_meta_lr(t // learner.iterations_per_epoch, learner.meta_lr,
                                     learner.min_meta_lr, learner.epochs)
            for t in iterations
        ]
        axes.step(iterations,
                  rates,
                  where="post",
                  color=color,
                  label=f"{run.label} schedule")
        if "meta_lr" in run.train_scalars:
            axes.plot(*run.train_scalars["meta_lr"],
                      linestyle="none",
                      marker=".",
                      markersize=3,
                      color=color,
                      label=f"{run.label} logged")
    axes.set(xlabel="meta-iteration",
             ylabel="meta learning rate",
             title="Meta learning rate (cosine annealing per epoch)")
    axes.title.set_fontsize(9)
    axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    axes.legend(fontsize=7)
    return figure


def _heatmap(axes, values: np.ndarray, row_labels: Sequence[str],
             column_labels: Sequence[str], cmap: str, norm: colors.Normalize,
             colorbar_label: str) -> None:
    """Draws `values` as an annotated image; exact values stay in `axes.images[0]`."""
    image = axes.imshow(values, cmap=cmap, norm=norm, aspect="auto")
    axes.set_xticks(range(len(column_labels)), column_labels, fontsize=8)
    axes.set_yticks(range(len(row_labels)), row_labels, fontsize=8)
    axes.tick_params(length=0)
    colormap = matplotlib.colormaps[cmap]
    for (row, column), value in np.ndenumerate(values):
        red, green, blue, _ = colormap(norm(value))
        dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
        axes.text(column,
                  row,
                  f"{value:.3g}",
                  ha="center",
                  va="center",
                  fontsize=7,
                  color="white" if dark else "black")
    axes.figure.colorbar(image, ax=axes, shrink=0.9).set_label(colorbar_label,
                                                               fontsize=8)


def _step_labels(steps: int) -> list[str]:
    return [f"step {step + 1}" for step in range(steps)]


def _mark_progress(axes, run: Run, epochs_done: float) -> None:
    if run.results is None and epochs_done < run.config.learner.epochs:
        axes.axvline(epochs_done, color="grey", linestyle=":", label="trained so far")


def _color(index: int) -> str:
    """Matplotlib's default cycle colour of the `index`-th run."""
    return f"C{index % 10}"


# ------------------------------------------------------------------ report


def results_table(runs_: Sequence[Run]) -> str:
    """Markdown table: best validation, single-model and ensemble test accuracy ± CI."""
    lines = [
        "| run | status | best validation | test, best epoch | test, top-k ensemble "
        "| served, best epoch (− test) | test tasks |", "|---|---|---|---|---|---|---|"
    ]
    for run in runs_:
        best = max(run.history, key=lambda h: h["accuracy"], default=None)
        validation = (
            f"{best['accuracy']:.4f} ± {best['ci95']:.4f} (epoch {best['epoch']})"
            if best else "—")
        status = ("finished" if run.results is not None else
                  f"unfinished: iteration {run.iteration} of {run.total_iterations}")
        single = ensemble = served = tasks = "—"
        if run.results is not None:
            test = run.results["test"]
            single = (f"{test['accuracy']:.4f} ± {test['ci95']:.4f} "
                      f"(epoch {test['best_epoch']})")
            ensemble = (
                f"{test['ensemble_accuracy']:.4f} ± {test['ensemble_ci95']:.4f} "
                f"(epochs {', '.join(str(e) for e in test['ensemble_epochs'])})")
            tasks = str(test["tasks"])
            if "served_accuracy" in test:  # Absent from results of older versions.
                served = (f"{test['served_accuracy']:.4f} ± {test['served_ci95']:.4f} "
                          f"({test['served_difference'] + 0.0:+.4f} ± "
                          f"{test['served_difference_ci95']:.4f})")
        lines.append(f"| {run.label} | {status} | {validation} | {single} | {ensemble} "
                     f"| {served} | {tasks} |")
    return "\n".join(lines)


def build_figures(runs_: Sequence[Run]) -> dict[str, Figure]:
    """Every figure of the report by file name (per-run heatmaps, then shared plots)."""
    figures = {}
    for run, slug in zip(runs_, _slugs([run.label for run in runs_])):
        figures[f"lslr_{slug}.png"] = lslr_figure(run)
        figures[f"bn_{slug}.png"] = bn_figure(run)
    figures["msl_weights.png"] = msl_figure(runs_)
    figures["curves.png"] = curves_figure(runs_)
    figures["meta_lr.png"] = meta_lr_figure(runs_)
    return figures


def write_report(model_dirs: Sequence[str], out: str | None = None) -> str:
    """Writes the figures and `report.md` of the runs in `model_dirs` to `out`.

    Every file is written to a temporary name and renamed, so a reader never
    sees half a file; files of `out` the report does not produce are left alone.

    Args:
      model_dirs: One or more run directories; curves of several are overlaid.
      out: Output directory; defaults to `<first model_dir>/report`.

    Returns:
      The path of `report.md`.

    Raises:
      FileNotFoundError, ValueError: as `load_run`, naming the directory.
    """
    if not model_dirs:
        raise ValueError("give at least one --model_dir")
    labels = _labels(model_dirs)
    runs_ = [load_run(model_dir, label) for model_dir, label in zip(model_dirs, labels)]
    out = out or os.path.join(model_dirs[0], "report")
    os.makedirs(out, exist_ok=True)
    figures = build_figures(runs_)
    for name, figure in figures.items():
        _write_atomic(os.path.join(out, name),
                      lambda stream, figure=figure: figure.savefig(
                          stream, format="png", dpi=_DPI))
    markdown = _markdown(runs_, list(figures))
    path = os.path.join(out, REPORT_NAME)
    _write_atomic(path, lambda stream: stream.write(markdown.encode("utf-8")))
    return path


def _markdown(runs_: Sequence[Run], figure_names: Sequence[str]) -> str:
    """report.md: what was run, the results table and every figure with a caption."""
    lines = ["# MAML++ run report", ""]
    for run in runs_:
        config, learner = run.config, run.config.learner
        lines.append(
            f"- **{run.label}** (`{run.model_dir}`): {config.dataset} "
            f"{learner.n_way}-way {config.k_shot}-shot, {learner.inner_steps} inner "
            f"steps, {learner.epochs} epochs × {learner.iterations_per_epoch} "
            f"iterations; heatmaps from {run.checkpoint.description}.")
    lines += [
        "", "## Test results (mean accuracy ± 95% CI)", "",
        "Served: each test query alone through its task model (the exported "
        "computation), on the same tasks; in brackets the paired difference to the "
        "protocol's accuracy.", "",
        results_table(runs_), ""
    ]
    lines += tasknorm_tables(runs_)
    sections = [
        ("lslr_", "Learned inner learning rates (LSLR)",
         "One rate per weight tensor (rows, network order) and inner step (columns); "
         "blue is negative."),
        ("bn_", "Per-step batch norm",
         "L2 norm over channels of gamma and beta per step."),
        ("msl_weights", "Multi-step loss weights",
         "Weight of each inner step's query loss."),
        ("curves", "Training and validation",
         "Loss and accuracy over meta-iterations."),
        ("meta_lr", "Meta learning rate",
         "Outer Adam learning rate: schedule and logged."),
    ]
    for prefix, title, caption in sections:
        lines += [f"## {title}", "", caption, ""]
        lines += [
            f"![{name}]({name})" for name in figure_names if name.startswith(prefix)
        ]
        lines.append("")
    return "\n".join(lines)


def tasknorm_tables(runs_: Sequence[Run]) -> list[str]:
    """Markdown lines: TaskNorm's learned blend per layer and step of each tasknorm run."""
    lines = []
    for run in runs_:
        if not run.tasknorm_alpha:
            continue
        steps = len(run.tasknorm_alpha[0][1])
        support = run.config.learner.n_way * run.config.k_shot
        lines += [
            f"## TaskNorm blend of {run.label}", "",
            f"α = sigmoid(a·{support} + b) per batch-norm layer and inner step: the weight "
            "of the support set's moments against each image's own.", "",
            "| layer | " + " | ".join(f"step {s}" for s in range(steps)) + " |",
            "|---|" + "---:|" * steps
        ]
        lines += [f"| {name} | " + " | ".join(f"{a:.3f}" for a in alpha) + " |"
                  for name, alpha in run.tasknorm_alpha]
        lines.append("")
    return lines


def _labels(model_dirs: Sequence[str]) -> list[str]:
    """Base names of the directories, or whole paths where base names collide."""
    names = [os.path.basename(os.path.normpath(d)) for d in model_dirs]
    return [
        name if names.count(name) == 1 else os.path.normpath(d)
        for name, d in zip(names, model_dirs)
    ]


def _slugs(labels: Sequence[str]) -> list[str]:
    """File-name-safe, unique versions of `labels`."""
    slugs = []
    for label in labels:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_.") or "run"
        while slug in slugs:
            slug += "_"
        slugs.append(slug)
    return slugs


def _write_atomic(path: str, write: Callable) -> None:
    """Calls `write(binary_stream)` on a temporary file beside `path`, renames it."""
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                                         prefix=".tmp_")
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
        # mkstemp creates the file owner-only; give it the permissions open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
