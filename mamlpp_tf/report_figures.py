"""The report's figures: inner-rate and BN heatmaps, MSL and meta-LR schedules, curves.

Figures are drawn on `matplotlib.figure.Figure` objects directly (no pyplot,
hence no GUI backend and no global state); the exact values each one shows
stay in its artists (`axes.images[0].get_array()`, line data), where tests
read them back.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
from matplotlib import colors
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
import numpy as np

from mamlpp_tf import schedules
from mamlpp_tf.report_data import Run

# Below this many points a curve also marks each point.
_FEW_POINTS = 20
# Heatmaps with more cells than this are not annotated: a wall of numbers is
# not read, and the image keeps the exact values.
_MAX_ANNOTATED_CELLS = 200
# How each update rule's rates are described in the heatmap's title.
# Meta-SGD's cells are the means of each tensor's per-element rates.
_RATE_KINDS = {"lslr": "LSLR, learned", "fixed": "fixed, not learned",
               "meta_sgd": "Meta-SGD means"}


def lslr_figure(run: Run) -> Figure:
    """Heatmap of the inner learning rates: adapted tensors (network order) × inner steps.

    One column per inner step, numbered from 0 like TensorBoard's `step_i` tags
    (one column in all for Meta-SGD's rates shared by all steps). The colours
    follow `_rate_colours`: sequential over the rates' range when they share a
    sign, diverging around 0 when some are negative.
    """
    names = list(run.inner_rates)
    values = np.stack([run.inner_rates[name] for name in names]).astype(np.float64)
    kind = _RATE_KINDS[run.config.learner.update_rule]
    cmap, norm = _rate_colours(values)
    figure = Figure(figsize=(1.6 + 0.9 * values.shape[1], 1.4 + 0.32 * len(names)),
                    layout="constrained")
    axes = figure.add_subplot()
    _heatmap(axes,
             values,
             names,
             _step_labels(values.shape[1]),
             cmap=cmap,
             norm=norm,
             colorbar_label="inner learning rate")
    axes.set_title(
        f"Inner learning rates ({kind})\n{run.label}: {run.checkpoint.description}",
        fontsize=9)
    return figure


def _rate_colours(values: np.ndarray) -> tuple[str, colors.Normalize]:
    """The colour map and norm of the inner-rate heatmap.

    Rates of one sign (the usual case: LSLR starts at `--inner_lr` and most
    rates stay near it) get the sequential `viridis` over `[min, max]`, so
    rates of 0.09 and 0.15 look different; a map centred on 0 would give them
    one colour. Only when the rates change sign is the map diverging
    (`RdBu_r`) with 0 at its white centre and each side spanning its own range
    (`TwoSlopeNorm`), so the few negative rates (gradient ascent on that tensor
    at that step) stand out however small; the colour bar and the cell labels
    keep the two sides' scales apart.
    """
    low, high = float(values.min()), float(values.max())
    if low < 0 < high:
        return "RdBu_r", colors.TwoSlopeNorm(vcenter=0.0, vmin=low, vmax=high)
    return "viridis", colors.Normalize(low, high)


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
    """Multi-step loss weight of each inner step over the epochs, stacked (one panel per run).

    The weights sum to 1 and all non-final steps share one weight, so as lines
    they would coincide and hide each other. Stacked, each step is a band of
    its own colour whose height is its weight (step 0 at the bottom, the final
    step on top, the legend in the same order): equal weights become bands of
    equal height, every band stays visible while its weight is above 0, and no
    value is shifted. Computed from each run's config with
    `schedules.msl_weights`, the function training used; steps are numbered
    from 0 like TensorBoard's `msl_weight/step_i`; a dotted line marks how far
    an unfinished run got.
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
        bands = axes.stackplot(epochs,
                               weights.T,
                               step="post",
                               labels=_step_labels(learner.inner_steps),
                               colors=_step_colours(learner.inner_steps),
                               linewidth=0)
        progress = _mark_progress(axes, run, run.iteration / learner.iterations_per_epoch)
        axes.set(xlabel="epoch",
                 ylabel="weight of the step's query loss\n(stacked, sums to 1)",
                 xlim=(0, learner.epochs),
                 ylim=(0, 1),
                 title=f"MSL weights: {run.label} (msl_epochs={learner.msl_epochs})")
        axes.title.set_fontsize(9)
        # The top band first, as stacked.
        axes.legend(handles=bands[::-1] + ([progress] if progress else []),
                    fontsize=7,
                    loc="center left",
                    bbox_to_anchor=(1, 0.5))
    return figure


def curves_figure(runs_: Sequence[Run]) -> Figure:
    """Training (TensorBoard) and validation (`history.json`) loss and accuracy.

    Training values are meta-batch means every --log_every iterations: a pale
    line behind the validation points, with a bolder marker on every point
    while there are fewer than `_FEW_POINTS` (a line through one point draws
    nothing, and a short run's few points are all it has to show); validation
    points sit at the end of each epoch with their 95% CI. Axes with nothing
    logged yet say so.
    """
    figure = Figure(figsize=(10, 3.6), layout="constrained")
    for index, metric in enumerate(("loss", "accuracy")):
        axes = figure.add_subplot(1, 2, index + 1)
        for run_index, run in enumerate(runs_):
            color = _color(run_index)
            if metric in run.train_scalars:
                steps, values = run.train_scalars[metric]
                few = len(steps) < _FEW_POINTS
                axes.plot(steps,
                          values,
                          color=color,
                          alpha=0.8 if few else 0.45,
                          linewidth=1,
                          marker="o" if few else None,
                          markersize=4,
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
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=7)
        else:
            axes.text(0.5, 0.5, "nothing logged yet", transform=axes.transAxes,
                      ha="center", va="center", color="grey")
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
    """Draws `values` as an image, each cell labelled with its value if they are few.

    Exact values stay in `axes.images[0]`.
    """
    image = axes.imshow(values, cmap=cmap, norm=norm, aspect="auto")
    axes.set_xticks(range(len(column_labels)), column_labels, fontsize=8)
    axes.set_yticks(range(len(row_labels)), row_labels, fontsize=8)
    axes.tick_params(length=0)
    colormap = matplotlib.colormaps[cmap]
    if values.size <= _MAX_ANNOTATED_CELLS:
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
    """Inner steps numbered from 0, like TensorBoard's `step_i` tags and the code's indices."""
    return [f"step {step}" for step in range(steps)]


def _mark_progress(axes, run: Run, epochs_done: float) -> Line2D | None:
    """A dotted line at `epochs_done` if the run is unfinished; returns it for the legend."""
    if run.results is None and epochs_done < run.config.learner.epochs:
        return axes.axvline(epochs_done, color="black", linestyle=":", label="trained so far")
    return None


def _step_colours(steps: int) -> list:
    """One distinct colour per inner step: the default cycle's 10, else tab20's 20."""
    return list(matplotlib.colormaps["tab10" if steps <= 10 else "tab20"].colors)[:steps]


def _color(index: int) -> str:
    """Matplotlib's default cycle colour of the `index`-th run."""
    return f"C{index % 10}"
