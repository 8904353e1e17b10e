"""The run report: figures of a real (tiny, synthetic) run, read back from their data."""

import glob
import io
import json
import os
import re
import shutil
import subprocess
import sys

from matplotlib import colors
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from mamlpp_tf import report_data, report_figures, reporting, schedules, tensorboard_scalars
from mamlpp_tf.config import LearnerConfig, RunConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Two epochs of a 2-stage, 3-step network on synthetic glyphs: about 15 s.
TINY = [
    "--dataset=synthetic",
    "--n_way=3",
    "--k_shot=1",
    "--n_query=2",
    "--meta_batch_size=2",
    "--num_filters=4",
    "--num_stages=2",
    "--inner_steps=3",
    "--eval_inner_steps=3",
    "--msl_epochs=1",
    "--epochs=2",
    "--iterations_per_epoch=8",
    "--val_tasks=4",
    "--test_tasks=6",
    "--ensemble_top_k=2",
    "--checkpoint_every=3",
    "--task_impl=loop",
    "--meta_lr=0.01",
    "--min_meta_lr=0.001",
    "--log_every=2",
]
PARAM_NAMES = [
    "conv0/kernel", "conv0/bias", "conv1/kernel", "conv1/bias", "dense/kernel",
    "dense/bias"
]


def run_module(module, *args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    process = subprocess.run([sys.executable, "-m", module, *args],
                             cwd=ROOT,
                             env=env,
                             capture_output=True,
                             text=True,
                             timeout=600)
    return process.returncode, process.stdout, process.stderr


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("maml_pp"))
    code, _, stderr = run_module("mamlpp_tf.train", f"--model_dir={model_dir}", *TINY)
    assert code == 0, stderr[-3000:]
    return model_dir


def copy_run(model_dir, destination):
    shutil.copytree(model_dir, destination)
    return str(destination)


def checkpoint_lslr(path):
    reader = tf.train.load_checkpoint(path)
    return np.stack([
        reader.get_tensor(
            f"lslr/rate_{name.replace('/', '_')}/.ATTRIBUTES/VARIABLE_VALUE")
        for name in PARAM_NAMES
    ])


def assert_valid_png(path):
    assert os.path.getsize(path) > 5000, path
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        assert width >= 250 and height >= 200, (path, image.size)
        pixels = np.asarray(image.convert("RGB"))
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 20, (path, len(colours))  # Not blank.


def band_extents(bands, epochs):
    """Bottom and top of each stacked band in the middle of each epoch: `[bands, epochs]` each.

    Read off each band's polygon where the vertical line at `epoch + 0.5` crosses it.
    """
    bottoms, tops = [], []
    for band in bands:
        vertices = band.get_paths()[0].vertices
        crossings = [[
            y0 + (y1 - y0) * (epoch + 0.5 - x0) / (x1 - x0)
            for (x0, y0), (x1, y1) in zip(vertices[:-1], vertices[1:])
            if min(x0, x1) < epoch + 0.5 < max(x0, x1)
        ] for epoch in epochs]
        bottoms.append([min(ys) for ys in crossings])
        tops.append([max(ys) for ys in crossings])
    return np.array(bottoms), np.array(tops)


def band_heights(bands, epochs):
    bottoms, tops = band_extents(bands, epochs)
    return tops - bottoms


def synthetic_run(steps=5, msl_epochs=3, epochs=5, inner_rates=None, train_scalars=None,
                  history=(), results=None, iteration=50):
    """A `Run` built in memory (no training): 2 tensors × `steps` rates, 1 BN layer."""
    learner = LearnerConfig(inner_steps=steps,
                            eval_inner_steps=steps,
                            msl_epochs=msl_epochs,
                            epochs=epochs,
                            iterations_per_epoch=10)
    rates = np.linspace(0.09, 0.15, 2 * steps).reshape(2, steps)
    return report_data.Run(
        model_dir="runs/synthetic",
        label="synthetic",
        config=RunConfig(learner=learner, dataset="synthetic"),
        history=list(history),
        results=results,
        iteration=iteration,
        checkpoint=report_data.Checkpoint("runs/synthetic/ckpt-50", "iteration 50"),
        inner_rates=inner_rates or {"conv0/kernel": rates[0], "dense/kernel": rates[1]},
        bn=[("norm0", np.ones((steps, 4)), np.zeros((steps, 4)) + np.arange(steps)[:, None])],
        tasknorm_alpha=[],
        train_scalars=train_scalars or {})


def test_report_writes_every_figure_and_the_results_table(finished_run, tmp_path):
    out = str(tmp_path / "report")
    path = reporting.write_report([finished_run], out)
    assert path == os.path.join(out, "report.md")
    label = os.path.basename(finished_run)
    expected = {
        f"lslr_{label}.png", f"bn_{label}.png", "msl_weights.png", "curves.png",
        "meta_lr.png", "report.md"
    }
    assert set(os.listdir(out)) == expected  # No temporary files left behind.
    markdown = open(path).read()
    for name in expected - {"report.md"}:
        assert_valid_png(os.path.join(out, name))
        assert f"]({name})" in markdown
    test = json.load(open(os.path.join(finished_run, "results.json")))["test"]
    row = next(
        line for line in markdown.splitlines() if line.startswith(f"| {label} |"))
    assert "finished" in row
    single = f"{test['accuracy']:.4f} ± {test['ci95']:.4f} (epoch {test['best_epoch']})"
    assert single in row
    assert f"{test['ensemble_accuracy']:.4f} ± {test['ensemble_ci95']:.4f}" in row
    served = (f"{test['served_accuracy']:.4f} ± {test['served_ci95']:.4f} "
              f"({test['served_accuracy'] - test['accuracy'] + 0.0:+.4f}")
    assert served in row
    assert "TaskNorm" not in markdown  # Only for tasknorm runs.


def test_report_goes_to_any_gfile_filesystem(finished_run, tmp_path):
    local = reporting.write_report([finished_run], str(tmp_path / "report"))
    remote = reporting.write_report([finished_run], "ram://report_test/out")
    assert remote == "ram://report_test/out/report.md"
    names = sorted(tf.io.gfile.listdir("ram://report_test/out"))
    assert names == sorted(os.listdir(tmp_path / "report"))  # No temporaries either.
    with tf.io.gfile.GFile(remote) as stream:
        assert stream.read() == open(local).read()
    for name in names[:-1]:  # The PNGs, before report.md.
        with tf.io.gfile.GFile(f"ram://report_test/out/{name}", "rb") as stream:
            with Image.open(io.BytesIO(stream.read())) as image:
                assert image.format == "PNG"


def test_report_shows_tasknorm_blend_per_layer_and_step(tasknorm_run, tmp_path):
    model_dir, _ = tasknorm_run
    markdown = open(reporting.write_report([model_dir], str(tmp_path / "report"))).read()
    best = json.load(open(os.path.join(model_dir, "results.json")))["test"]["best_epoch"]
    reader = tf.train.load_checkpoint(
        os.path.join(model_dir, "checkpoints", f"epoch_{best:03d}", "model"))

    def value(key):
        return reader.get_tensor(f"backbone/{key}/.ATTRIBUTES/VARIABLE_VALUE")

    for layer in ("norm0", "norm1"):
        # 3-way 1-shot: a support set of 3 images.
        alpha = 1 / (1 + np.exp(-(value(f"{layer}/alpha_scale") * 3 +
                                  value(f"{layer}/alpha_offset"))))
        assert alpha.shape == (2,)
        assert f"| {layer} | {alpha[0]:.3f} | {alpha[1]:.3f} |" in markdown


def test_lslr_heatmap_shows_the_best_epoch_checkpoint(finished_run):
    run = report_data.load_run(finished_run)
    best = json.load(open(os.path.join(finished_run,
                                       "results.json")))["test"]["best_epoch"]
    expected = checkpoint_lslr(
        os.path.join(finished_run, "checkpoints", f"epoch_{best:03d}", "model"))
    assert not np.allclose(expected, 0.1)  # Training moved the rates off their init.
    axes = report_figures.lslr_figure(run).axes[0]
    np.testing.assert_array_equal(np.asarray(axes.images[0].get_array()), expected)
    assert [label.get_text() for label in axes.get_yticklabels()] == PARAM_NAMES
    assert [label.get_text() for label in axes.get_xticklabels()
           ] == ["step 0", "step 1", "step 2"]
    annotated = np.array([float(text.get_text()) for text in axes.texts]).reshape(6, 3)
    np.testing.assert_allclose(annotated, expected, rtol=5e-3, atol=1e-4)
    assert f"epoch {best}, best validation" in axes.get_title()
    # The colour scale spans the rates, diverging only if they change sign.
    image = axes.images[0]
    assert (image.norm.vmin, image.norm.vmax) == (expected.min(), expected.max())
    sign_changes = expected.min() < 0 < expected.max()
    assert image.get_cmap().name == ("RdBu_r" if sign_changes else "viridis")


def test_bn_heatmap_shows_per_step_gamma_and_beta_norms(finished_run):
    best = json.load(open(os.path.join(finished_run,
                                       "results.json")))["test"]["best_epoch"]
    path = os.path.join(finished_run, "checkpoints", f"epoch_{best:03d}", "model")
    reader = tf.train.load_checkpoint(path)
    listed = [name for name, _ in tf.train.list_variables(path)]
    figure = report_figures.bn_figure(report_data.load_run(finished_run))
    gamma_axes, beta_axes = figure.axes[0::2]  # Skip the colour bars.
    for axes, label, initial in ((gamma_axes, "gamma", 1.0), (beta_axes, "beta", 0.0)):
        # The checkpoint's own listing names the layers: 2 stages, one norm each.
        pattern = re.compile(rf"backbone/(\w+)/{label}/\.ATTRIBUTES/VARIABLE_VALUE")
        found = sorted((match[1], match[0]) for match in map(pattern.fullmatch, listed)
                       if match)
        values = [reader.get_tensor(name).astype(np.float64) for _, name in found]
        assert [value.shape for value in values] == [(3, 4)] * 2  # [steps, filters]
        assert not np.allclose(values, initial)  # Training moved them off their init.
        expected = np.array([np.sqrt((value**2).sum(axis=1)) for value in values])
        np.testing.assert_allclose(np.asarray(axes.images[0].get_array()),
                                   expected,
                                   rtol=1e-6)
        if label == "gamma":  # The beta panel shares the gamma panel's row labels.
            assert [text.get_text() for text in axes.get_yticklabels()
                   ] == [layer for layer, _ in found]
        assert [text.get_text() for text in axes.get_xticklabels()
               ] == ["step 0", "step 1", "step 2"]
        annotated = np.array([float(text.get_text()) for text in axes.texts]).reshape(2, 3)
        np.testing.assert_allclose(annotated, expected, rtol=5e-3)
    assert f"epoch {best}, best validation" in figure.get_suptitle()


def test_schedules_are_what_training_logged(finished_run):
    run = report_data.load_run(finished_run)
    iterations, logged = run.train_scalars["meta_lr"]
    assert list(iterations) == list(range(2, 17, 2))
    np.testing.assert_allclose(
        logged, [schedules.cosine_meta_lr(t // 8, 0.01, 0.001, 2) for t in iterations],
        rtol=1e-6)
    # MSL weights as training logged them, per step as TensorBoard numbers them,
    # are the heights of the figure's bands of the same names.
    tags = [f"msl_weight/step_{step}" for step in range(3)]
    logged = tensorboard_scalars.read_scalars(
        os.path.join(finished_run, "tensorboard", "train"), tags)
    assert list(logged) == tags
    bands = report_figures.msl_figure([run]).axes[0].collections
    assert [band.get_label() for band in bands] == ["step 0", "step 1", "step 2"]
    for step, tag in enumerate(tags):
        iterations, weights = logged[tag]
        assert list(iterations) == [8, 16]  # End of epochs 0 and 1.
        np.testing.assert_allclose(band_heights(bands, [0, 1])[step], weights, rtol=1e-6)
    np.testing.assert_allclose(logged["msl_weight/step_2"][1], [1 / 3, 1.0], rtol=1e-6)


def test_msl_weights_stack_so_that_every_step_shows():
    # 5 steps: the 4 non-final ones always share one weight, so as lines they coincide.
    run = synthetic_run(steps=5, msl_epochs=3, epochs=5, iteration=25)
    axes = report_figures.msl_figure([run]).axes[0]
    bands = axes.collections
    assert [band.get_label() for band in bands] == [f"step {step}" for step in range(5)]
    assert len({band.get_facecolor()[0].tobytes() for band in bands}) == 5
    bottoms, tops = band_extents(bands, range(5))
    expected = np.array([schedules.msl_weights(epoch, 5, 3) for epoch in range(5)]).T
    np.testing.assert_allclose(tops - bottoms, expected, atol=1e-6)  # Unshifted values.
    # Stacked edge to edge from 0 to 1: no band hides another.
    np.testing.assert_allclose(bottoms[0], 0, atol=1e-6)
    np.testing.assert_allclose(bottoms[1:], tops[:-1], atol=1e-6)
    np.testing.assert_allclose(tops[-1], 1, atol=1e-6)
    assert (tops - bottoms)[:4, :3].min() > 0.06  # Each step visible while MSL is on.
    # The legend lists the bands top down, then how far the unfinished run got.
    assert [text.get_text() for text in axes.get_legend().get_texts()
           ] == [f"step {step}" for step in range(4, -1, -1)] + ["trained so far"]
    assert axes.lines[0].get_xdata()[0] == 2.5


def test_curves_mark_the_points_of_a_short_run():
    one = {"loss": (np.array([5]), np.array([1.2])),
           "accuracy": (np.array([5]), np.array([0.4]))}
    for axes in report_figures.curves_figure([synthetic_run(train_scalars=one)]).axes:
        (line,) = axes.lines
        assert line.get_marker() == "o" and list(line.get_xdata()) == [5]
    steps = np.arange(1, 51)
    many = {"loss": (steps, np.linspace(1.6, 0.4, 50))}
    line = report_figures.curves_figure([synthetic_run(train_scalars=many)]).axes[0].lines[0]
    assert line.get_marker() == "None"  # A long curve stays a plain line.
    for axes in report_figures.curves_figure([synthetic_run()]).axes:
        assert axes.get_legend() is None  # Nothing to list, and no warning about it.
        assert [text.get_text() for text in axes.texts] == ["nothing logged yet"]


def test_lslr_colours_span_the_rates_and_diverge_only_across_zero():
    positive = synthetic_run(steps=3)  # Rates 0.09 … 0.15.
    image = report_figures.lslr_figure(positive).axes[0].images[0]
    assert image.get_cmap().name == "viridis"
    assert type(image.norm) is colors.Normalize
    assert (image.norm.vmin, image.norm.vmax) == pytest.approx((0.09, 0.15))
    rgba = image.to_rgba(np.asarray(image.get_array()))
    assert np.abs(rgba[0, 0] - rgba[-1, -1]).max() > 0.5  # Ends of the map, not one colour.
    mixed = synthetic_run(steps=3, inner_rates={"conv0/kernel": np.array([-0.004, 0.1, 0.12]),
                                                "dense/kernel": np.array([0.08, 0.15, 0.11])})
    image = report_figures.lslr_figure(mixed).axes[0].images[0]
    assert image.get_cmap().name == "RdBu_r"
    assert isinstance(image.norm, colors.TwoSlopeNorm)
    assert (image.norm.vmin, image.norm.vcenter, image.norm.vmax) == (-0.004, 0, 0.15)
    red, _, blue, _ = image.to_rgba(np.asarray(image.get_array()))[0, 0]
    assert blue - red > 0.3  # A negative rate is clearly blue however small.


def test_heatmaps_are_annotated_only_while_readable():
    axes = report_figures.lslr_figure(synthetic_run(steps=5)).axes[0]
    assert len(axes.texts) == 10
    wide = {f"conv{index}/kernel": np.full(20, 0.1 + index / 100) for index in range(12)}
    axes = report_figures.lslr_figure(synthetic_run(steps=20, inner_rates=wide)).axes[0]
    assert len(axes.texts) == 0 and np.asarray(axes.images[0].get_array()).shape == (12, 20)


def test_figures_number_inner_steps_from_zero_as_tensorboard_does():
    run = synthetic_run(steps=4)
    expected = ["step 0", "step 1", "step 2", "step 3"]
    lslr_axes = report_figures.lslr_figure(run).axes[0]
    assert [label.get_text() for label in lslr_axes.get_xticklabels()] == expected
    for axes in report_figures.bn_figure(run).axes[0::2]:
        assert [label.get_text() for label in axes.get_xticklabels()] == expected
    bands = report_figures.msl_figure([run]).axes[0].collections
    assert [band.get_label() for band in bands] == expected
    markdown = reporting._markdown([run], [])  # pylint: disable=protected-access
    assert "numbered from 0" in markdown


def test_scalars_of_a_resumed_run_and_a_truncated_event_file(tmp_path):
    # A resumed run writes step 2 again, to a new file: the later value wins.
    for writes in ([(1, 1.0), (2, 2.0)], [(2, 3.0)]):
        with tf.summary.create_file_writer(str(tmp_path)).as_default():
            for step, value in writes:
                tf.summary.scalar("loss", value, step=step)
                tf.summary.scalar("other", value, step=step)
    path = max(glob.glob(str(tmp_path / "events.*")))
    with open(path, "rb") as stream:
        data = stream.read()
    with open(path, "wb") as stream:  # A writer killed mid-record (the last "other").
        stream.write(data[:-5])
    scalars = tensorboard_scalars.read_scalars(str(tmp_path), ["loss", "missing"])
    assert list(scalars) == ["loss"]
    steps, values = scalars["loss"]
    assert list(steps) == [1, 2] and list(values) == [1.0, 3.0]
    other_steps, other_values = tensorboard_scalars.read_scalars(str(tmp_path),
                                                                 ["other"])["other"]
    assert list(other_steps) == [1, 2] and list(other_values) == [1.0, 2.0]
    assert tensorboard_scalars.read_scalars(str(tmp_path / "absent"), ["loss"]) == {}


def test_every_logged_scalar_is_read_back_unsampled(tmp_path):
    # TensorBoard keeps 10 tensor events per tag unless told otherwise.
    values = np.random.RandomState(0).rand(250)
    with tf.summary.create_file_writer(str(tmp_path)).as_default():
        for step, value in enumerate(values):
            tf.summary.scalar("loss", value, step=step * 3)
    steps, read = tensorboard_scalars.read_scalars(str(tmp_path), ["loss"])["loss"]
    np.testing.assert_array_equal(steps, np.arange(250) * 3)
    np.testing.assert_allclose(read, values, rtol=1e-7)  # Written as float32.


def test_several_runs_overlay_their_curves(finished_run, tmp_path):
    other = copy_run(finished_run, tmp_path / "maml")
    out = str(tmp_path / "compare")
    reporting.write_report([finished_run, other], out)
    label = os.path.basename(finished_run)
    for name in (f"lslr_{label}.png", "lslr_maml.png", "bn_maml.png", "curves.png"):
        assert_valid_png(os.path.join(out, name))
    runs_ = [report_data.load_run(finished_run), report_data.load_run(other, "maml")]
    for axes in report_figures.curves_figure(runs_).axes:
        labels = {text.get_text() for text in axes.get_legend().get_texts()}
        assert {
            f"{label} train", f"{label} validation", "maml train", "maml validation"
        } <= labels
    markdown = open(os.path.join(out, "report.md")).read()
    assert markdown.count("| finished |") == 2


def test_interrupted_run_reports_from_the_cli(finished_run, tmp_path):
    # Killed at iteration 15 of 16, no epoch checkpoint kept: no results, no history.
    model_dir = copy_run(finished_run, tmp_path / "interrupted")
    os.remove(os.path.join(model_dir, "results.json"))
    os.remove(os.path.join(model_dir, "history.json"))
    checkpoints = os.path.join(model_dir, "checkpoints")
    for name in ("epoch_000", "epoch_001"):
        shutil.rmtree(os.path.join(checkpoints, name), ignore_errors=True)
    latest = os.path.join(checkpoints, "latest", "ckpt-15")
    for path in glob.glob(os.path.join(checkpoints, "latest", "ckpt-16.*")):
        os.remove(path)
    tf.compat.v1.train.update_checkpoint_state(os.path.dirname(latest), latest,
                                               [latest])
    out = str(tmp_path / "out")
    code, stdout, stderr = run_module("mamlpp_tf.report", f"--model_dir={model_dir}",
                                      f"--out={out}")
    assert code == 0, stderr[-3000:]
    assert stdout.strip() == os.path.join(out, "report.md")
    markdown = open(os.path.join(out, "report.md")).read()
    assert "unfinished: iteration 15 of 16" in markdown
    assert_valid_png(os.path.join(out, "lslr_interrupted.png"))
    run = report_data.load_run(model_dir)
    assert run.checkpoint.description == "iteration 15, latest checkpoint"
    np.testing.assert_array_equal(
        np.asarray(report_figures.lslr_figure(run).axes[0].images[0].get_array()),
        checkpoint_lslr(latest))


def test_run_without_checkpoint_is_a_one_line_error(finished_run, tmp_path):
    model_dir = tmp_path / "fresh"
    model_dir.mkdir()
    shutil.copy(os.path.join(finished_run, "config.json"), model_dir)
    code, _, stderr = run_module("mamlpp_tf.report", f"--model_dir={model_dir}")
    assert code == 2
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert re.fullmatch(r"error: --model_dir=\S+ has no checkpoint yet .*",
                        lines[0]), lines
    assert not os.path.exists(model_dir / "report")
    with pytest.raises(FileNotFoundError, match="holds no run"):
        report_data.load_run(str(tmp_path))
