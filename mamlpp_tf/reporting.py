"""The run report: `report.md` with the results tables, and the figures beside it.

The logic behind `python -m mamlpp_tf.report`, kept free of absl flags so that
tests and notebooks can import it. Runs are read by `report_data.load_run`
and drawn by `report_figures`; this module writes the figures as PNG (Agg)
and the markdown that shows them.
"""

from __future__ import annotations

from collections.abc import Sequence
import io
import os
import re

from matplotlib.figure import Figure

from mamlpp_tf import files, report_data, report_figures
from mamlpp_tf.report_data import Run

REPORT_NAME = "report.md"
_DPI = 100


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
        figures[f"lslr_{slug}.png"] = report_figures.lslr_figure(run)
        figures[f"bn_{slug}.png"] = report_figures.bn_figure(run)
    figures["msl_weights.png"] = report_figures.msl_figure(runs_)
    figures["curves.png"] = report_figures.curves_figure(runs_)
    figures["meta_lr.png"] = report_figures.meta_lr_figure(runs_)
    return figures


def write_report(model_dirs: Sequence[str], out: str | None = None) -> str:
    """Writes the figures and `report.md` of the runs in `model_dirs` to `out`.

    Every file goes through `files.atomic_write`, so a reader never sees half
    a file, and `out` may be on any `tf.io.gfile` filesystem; files of `out`
    the report does not produce are left alone.

    Args:
      model_dirs: One or more run directories; curves of several are overlaid.
      out: Output directory; defaults to `<first model_dir>/report`.

    Returns:
      The path of `report.md`.

    Raises:
      FileNotFoundError, ValueError: as `report_data.load_run`, naming the
        directory; ValueError also without any directory.
    """
    if not model_dirs:
        raise ValueError("give at least one --model_dir")
    labels = _labels(model_dirs)
    runs_ = [report_data.load_run(model_dir, label)
             for model_dir, label in zip(model_dirs, labels)]
    out = out or os.path.join(model_dirs[0], "report")
    figures = build_figures(runs_)
    for name, figure in figures.items():
        png = io.BytesIO()
        figure.savefig(png, format="png", dpi=_DPI)
        files.atomic_write(os.path.join(out, name), png.getvalue())
    path = os.path.join(out, REPORT_NAME)
    files.atomic_write(path, _markdown(runs_, list(figures)))
    return path


def _markdown(runs_: Sequence[Run], figure_names: Sequence[str]) -> str:
    """report.md: what was run, the results table and every figure with a caption."""
    lines = ["# MAML++ run report", ""]
    for run in runs_:
        config, learner = run.config, run.config.learner
        lines.append(
            f"- **{run.label}** (`{run.model_dir}`): {config.dataset} "
            f"{learner.n_way}-way {config.k_shot}-shot, {learner.backbone} network, "
            f"adapting {learner.adapt} with the {learner.update_rule} update rule, "
            f"{learner.inner_steps} inner "
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
    lines += ["Inner steps are numbered from 0 throughout, as in TensorBoard's "
              "`step_i` tags.", ""]
    sections = [
        ("lslr_", "Inner learning rates",
         "The update rule's rates of each adapted weight tensor (rows, network order) per "
         "inner step (columns): LSLR's (or the fixed rate), or the mean of Meta-SGD's "
         "per-element rates. Sequential colours over the rates' range; if some rates are "
         "negative, diverging colours with 0 white and negative rates blue."),
        ("bn_", "Per-step batch norm",
         "L2 norm over channels of gamma and beta per step."),
        ("msl_weights", "Multi-step loss weights",
         "Weight of each inner step's query loss over the epochs, stacked: each band's "
         "height is its step's weight, and the bands sum to 1."),
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

