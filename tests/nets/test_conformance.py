"""One conformance suite for every network: each built-in backbone and a user's Keras model.

Every registered network (at small widths) and a small `KerasBackbone`
(`tiny_keras`, registered in conftest.py) must give the learner what the
paper's VGG gives it:
* the second-order meta-gradient of every variable group (fast weights,
  per-step batch norm, LSLR, TaskNorm's blend) against float64 finite
  differences, under the transductive and the non-transductive statistics;
* the task-batched layout equal to the per-task loop, where the network has one;
* first order at zero inner rates equal to a reference derived by hand from
  the network's forward pass alone;
* meta-steps on two mirrored CPU replicas equal to one device;
* the exported task model's answer to a single image equal to `eval_step`'s
  logits under the non-transductive statistics;
* `get_weights`/`set_weights` round trips;
* (built-ins) the training job, the export and the report with `--backbone`.

ResNet-12's mirrored and job cases trace for minutes on 2 cores: they carry the `slow`
mark (`python -m pytest -m slow -n auto --dist loadfile`), which CI runs after the default suite.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from mamlpp_tf import MamlPlusPlus, Trainer, schedules, task_model
from mamlpp_tf.nets import has_task_batched_pass
from mamlpp_tf_export import saved_models
from mamlpp_tf_export.preprocessing import Preprocessing

from conftest import (
    ROOT,
    directional_fd,
    meta_gradient,
    random_batch,
    relative_error,
    run_job,
    tiny_config,
)

# Small versions of every network: config overrides of conftest's tiny_config.
NETWORKS = {
    "vgg": dict(backbone="vgg"),
    "resnet12": dict(backbone="resnet12", resnet12_widths=(2, 3, 2, 3), image_shape=(8, 8, 1)),
    "mlp": dict(backbone="mlp", mlp_hidden=(5, 4)),
    "keras": dict(backbone="tiny_keras"),
}
HELPER = os.path.join(ROOT, "tests", "distributed_helper.py")


def make_learner(network: str, **overrides) -> MamlPlusPlus:
    """A float64 learner with the small `network` at weights of a common scale.

    Every network starts from the same kind of point: kernels with variance
    1/fan-in and small random biases (the MLP's own initialisation, σ = 0.01,
    leaves its batch norms' variances near their epsilon, where finite
    differences need far smaller steps), per-step gamma/beta that differ from
    step to step, and TaskNorm's a, b away from 0.
    """
    learner = MamlPlusPlus(tiny_config(**{**NETWORKS[network], **overrides}))
    weights = learner.get_weights()
    rng = np.random.RandomState(0)
    fast = {f"backbone/{name}" for name in learner.backbone.param_names}
    for name, value in weights.items():
        if name in fast:
            scale = 1 / np.sqrt(np.prod(value.shape[:-1])) if value.ndim > 1 else 0.1
            weights[name] = scale * rng.randn(*value.shape)
        elif name.endswith(("/alpha_scale", "/alpha_offset")):
            weights[name] = 0.5 * rng.randn(*value.shape)
        elif name.endswith(("/gamma", "/beta")):  # Rows that differ from step to step.
            weights[name] = value + 0.2 * rng.randn(*value.shape)
    learner.set_weights(weights)
    return learner


@pytest.fixture(params=sorted(NETWORKS))
def network(request):
    return request.param


@pytest.mark.parametrize("bn_stats", ["batch", "support", "tasknorm"])
def test_second_order_meta_gradient_equals_finite_differences(network, bn_stats):
    learner = make_learner(network, bn_stats=bn_stats)
    batch = random_batch(learner.config, tasks=1, k_shot=2, n_query=2)
    _, grads = meta_gradient(learner, batch, epoch=0)
    variables = learner.trainable_variables
    # All variables along a random direction, then each group along a direction of its
    # own. h = 1e-7: at these tiny widths ReLU kinks lie within 1e-5 of the point, so a
    # larger step's difference quotient jumps across them (float64 rounding stays ~1e-9).
    rng = np.random.RandomState(1)
    for name, group in {"all": variables, **_variable_groups(learner)}.items():
        ids = {id(v) for v in group}
        direction = [rng.randn(*g.shape) * (id(v) in ids) for v, g in zip(variables, grads)]
        analytic = sum(np.sum(g * d) for g, d in zip(grads, direction))
        assert abs(analytic) > 1e-8, f"{network}: {name} gets no gradient"
        numeric = directional_fd(learner, batch, 0, direction, h=1e-7)
        assert relative_error(analytic, numeric) < 1e-6, (name, analytic, numeric)


def _variable_groups(learner: MamlPlusPlus) -> dict[str, list]:
    """Fast weights, per-step batch norm (gamma/beta, TaskNorm's a, b) and LSLR."""
    fast = list(learner.backbone.weights_by_name.values())
    norms = [v for norm in learner.backbone.norms for v in norm.trainable_variables]
    groups = dict(fast_weights=fast, lslr=list(learner.lslr.trainable_variables))
    if norms:
        groups["batch_norm"] = norms
    return groups


@pytest.mark.parametrize("adapt", ["head", "body"], ids=["anil", "boil"])
def test_partial_adaptation_meta_gradient_equals_finite_differences(network, adapt):
    """ANIL and BOIL on every network: the second-order meta-gradient, and who adapts.

    Where the network splits into body and head, its `forward` must be the
    head's pass over the body's features (ANIL reuses those features across
    inner steps); either way the weights outside the adapted set keep θ_0.
    """
    learner = make_learner(network, adapt=adapt)
    backbone = learner.backbone
    head = set(backbone.head_param_names)
    batch = random_batch(learner.config, tasks=1, k_shot=2, n_query=2)
    support_x = tf.constant(batch[0][0])
    if hasattr(backbone, "forward_body"):
        params = backbone.initial_params()
        features, _ = backbone.forward_body(support_x, params, 0, True)
        np.testing.assert_allclose(backbone.forward_head(features, params),
                                   backbone.forward(support_x, params, 0, True)[0],
                                   rtol=1e-12, atol=1e-14)
    adapted = learner.adapt(support_x, tf.constant(batch[1][0]))
    moved = {name for name in backbone.param_names
             if not np.array_equal(adapted[name], backbone.weights_by_name[name].numpy())}
    # A bias right before a batch norm gets no gradient, so not every adapted weight moves.
    assert moved and all((name in head) == (adapt == "head") for name in moved), moved

    _, grads = meta_gradient(learner, batch, epoch=0)
    direction = [np.random.RandomState(2).randn(*g.shape) for g in grads]
    analytic = sum(np.sum(g * d) for g, d in zip(grads, direction))
    numeric = directional_fd(learner, batch, 0, direction, h=1e-7)
    assert relative_error(analytic, numeric) < 1e-6, (analytic, numeric)


def test_loop_layout_equals_batched_where_the_network_has_both(network):
    learner = make_learner(network, task_impl="loop")
    if not has_task_batched_pass(learner.backbone):
        with pytest.raises(ValueError, match="task_impl='batched' needs a task-batched pass"):
            make_learner(network, task_impl="batched")
        assert learner._task_impl(query_per_task=2) == "loop"  # pylint: disable=protected-access
        return
    batched = make_learner(network, task_impl="batched")
    batched.set_weights(learner.get_weights())
    batch = random_batch(learner.config, tasks=3, k_shot=2, n_query=2)
    loss_loop, grads_loop = meta_gradient(learner, batch, epoch=0)
    loss_batched, grads_batched = meta_gradient(batched, batch, epoch=0)
    np.testing.assert_allclose(loss_batched, loss_loop, rtol=1e-12)
    for got, want in zip(grads_batched, grads_loop):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_first_order_at_zero_inner_rates_equals_a_hand_derived_reference(network):
    """With α = 0 every θ_i is θ_0, so the first-order meta-gradient is written out directly.

    Network and batch-norm variables: `Σ_i v_i ∇L_query,i(θ_0)`. LSLR's rate of
    step `i`: `−Σ_{j≥i} v_j <g_i, ∇_θ L_query,j(θ_0)>` per tensor, with `g_i` the
    support gradient at step `i` (a constant in first order).
    """
    learner = make_learner(network, inner_lr=0.0, second_order=False, msl_epochs=2)
    batch = random_batch(learner.config, tasks=2, k_shot=2, n_query=2)
    _, grads = meta_gradient(learner, batch, epoch=0)
    got = dict(zip([id(v) for v in learner.trainable_variables], grads))

    backbone, steps = learner.backbone, learner.config.inner_steps
    v = schedules.msl_weights(0, steps, learner.config.msl_epochs)
    network_vars = learner.network_variables
    want_network = [np.zeros(var.shape) for var in network_vars]
    want_rates = {name: np.zeros(steps) for name in backbone.param_names}
    for t in range(2):
        support_x, support_y, query_x, query_y = (tf.constant(x[t]) for x in batch)
        support_grads, query_grads = [], []
        for step in range(steps):
            with tf.GradientTape(persistent=True) as tape:
                params = backbone.initial_params()
                tape.watch(list(params.values()))
                support_loss = _cross_entropy(
                    support_y, backbone.forward(support_x, params, step, True)[0])
                query_loss = _cross_entropy(query_y, _query_logits(learner, support_x, query_x,
                                                                   params, step))
            support_grads.append(tape.gradient(support_loss, params))
            query_grads.append(tape.gradient(query_loss, params))
            for k, g in enumerate(tape.gradient(query_loss, network_vars,
                                                unconnected_gradients="zero")):
                want_network[k] += v[step] * g.numpy() / 2
        for i in range(steps):
            for name in backbone.param_names:
                want_rates[name][i] -= sum(
                    v[j] * np.sum(support_grads[i][name].numpy() * query_grads[j][name].numpy())
                    for j in range(i, steps)) / 2
    for var, want in zip(network_vars, want_network):
        np.testing.assert_allclose(got[id(var)], want, rtol=1e-9, atol=1e-12,
                                   err_msg=var.path)
    for name, rate in learner.lslr.rates.items():
        np.testing.assert_allclose(got[id(rate)], want_rates[name], rtol=1e-9, atol=1e-12,
                                   err_msg=name)


def _cross_entropy(labels, logits):
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))


def _query_logits(learner, support_x, query_x, params, step):
    """Query logits at `step`; under the context modes the support set rides along first."""
    if learner.config.bn_stats not in ("support", "tasknorm"):
        return learner.backbone.forward(query_x, params, step, True)[0]
    logits, _ = learner.backbone.forward(tf.concat([support_x, query_x], 0), params, step,
                                         True, context=len(support_x))
    return logits[len(support_x):]


# ResNet-12's 16 batch norms make its steps slow to trace (minutes per test on 2 cores):
# its whole-path tests run with the slow tests.
SLOW_TO_TRACE = pytest.mark.slow


@pytest.mark.parametrize("name", [pytest.param("mlp", marks=pytest.mark.slow), "keras",
                                  pytest.param("resnet12", marks=SLOW_TO_TRACE)])
def test_mirrored_meta_steps_equal_one_device(name, tmp_path):
    """3 SGD meta-steps: 4 tasks on 2 logical CPUs vs one device (VGG: test_distribute.py).

    First order: the distribution (tasks split over replicas, one all-reduce, the clip
    of the sum) is the same code in both orders, and second-order steps take far longer
    to trace (tests/test_distribute.py runs VGG's second order). float64: in float32 the
    replicas' different summation order moves ResNet-12's parameters by up to 1e-4 in
    three steps, which would hide a real difference.
    """
    out = str(tmp_path / "equivalence.npz")
    nets = {name: dict(NETWORKS[name], second_order=False, dtype="float64")}
    result = subprocess.run(
        [sys.executable, HELPER, "equivalence", out, "batch", json.dumps(nets)], cwd=ROOT,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), capture_output=True, text=True,
        timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    z = dict(np.load(out))
    assert int(z[f"{name}/mirrored/replicas"]) == 2
    np.testing.assert_allclose(z[f"{name}/mirrored/losses"], z[f"{name}/one/losses"],
                               rtol=1e-10)
    keys = [k for k in z if k.startswith((f"{name}/one/params/", f"{name}/one/stats/"))]
    assert keys
    for key in keys:
        np.testing.assert_allclose(z[key.replace("/one/", "/mirrored/", 1)], z[key],
                                   rtol=1e-9, atol=1e-12, err_msg=key)
    assert bool(z[f"{name}/mirrored/copies_identical"])


@pytest.mark.parametrize("network,bn_stats", [
    pytest.param(network, bn_stats, marks=SLOW_TO_TRACE if (network, bn_stats) == (
        "resnet12", "tasknorm") else [], id=f"{network}-{bn_stats}")
    for network in sorted(NETWORKS) for bn_stats in ("support", "tasknorm")])
def test_exported_task_model_answers_one_image_as_eval_step(network, bn_stats, tmp_path):
    learner = make_learner(network, bn_stats=bn_stats, dtype="float32")
    support_x, support_y, query_x, labels = (x[:1] for x in random_batch(
        learner.config, tasks=1, k_shot=2, n_query=2))
    expected = Trainer(learner).eval_step((support_x, support_y, query_x, labels))
    expected = expected["logits"].numpy()[0]
    network_copy = task_model.task_network(learner, bn_stats, support_x.shape[1])
    task_model.bake_task(learner, network_copy, support_x[0], support_y[0], bn_stats)
    preprocessing = Preprocessing(image_shape=learner.config.image_shape, kind="omniglot")
    archive = saved_models.task_archive(network_copy, ("a", "b"), preprocessing)
    archive.write_out(str(tmp_path / "task"), verbose=False)
    serve = tf.saved_model.load(str(tmp_path / "task")).signatures["serving_default"]
    for q in range(query_x.shape[1]):
        probabilities = serve(images=tf.constant(query_x[0, q:q + 1]))["probabilities"]
        np.testing.assert_allclose(probabilities.numpy()[0],
                                   tf.nn.softmax(expected[q]).numpy(), atol=1e-5)


def test_get_weights_and_set_weights_round_trip(network):
    learner = make_learner(network)
    other = make_learner(network)
    rng = np.random.RandomState(5)
    weights = {name: rng.randn(*value.shape) for name, value in learner.get_weights().items()}
    learner.set_weights(weights)
    for name, value in learner.get_weights().items():
        np.testing.assert_array_equal(value, weights[name], err_msg=name)
    other.set_weights(learner.get_weights())
    batch = random_batch(learner.config, tasks=1)
    np.testing.assert_array_equal(other.meta_loss(batch, 0).numpy(),
                                  learner.meta_loss(batch, 0).numpy())
    with pytest.raises(ValueError, match="missing key"):
        learner.set_weights(dict(list(weights.items())[1:]))


@pytest.mark.parametrize("backbone,flags", [
    # What is checked is that every part of the job takes its network from --backbone:
    # first order and one inner step keep ResNet-12's tracing short.
    pytest.param("resnet12", ["--resnet12_widths=3,4,4,5", "--nosecond_order",
                              "--inner_steps=1", "--eval_inner_steps=1"],
                 marks=SLOW_TO_TRACE),
    ("mlp", ["--mlp_hidden=8,6"]),
])
def test_train_export_and_report_with_a_backbone_flag(backbone, flags, tmp_path):
    model_dir = str(tmp_path / "run")
    code, stdout, stderr = run_job(model_dir, f"--backbone={backbone}", *flags,
                                   "--bn_stats=support")
    assert code == 0, stderr[-3000:]
    with open(os.path.join(model_dir, "results.json")) as stream:
        results = json.load(stream)
    assert results["config"]["learner"]["backbone"] == backbone
    assert results["test"]["served_accuracy"] == pytest.approx(results["test"]["accuracy"])
    support = str(tmp_path / "support.npz")
    rng = np.random.RandomState(0)
    np.savez(support, x=rng.rand(3, 28, 28, 1).astype(np.float32), y=np.arange(3))
    command = [sys.executable, "-m", "mamlpp_tf_export.task_model", f"--model_dir={model_dir}",
               f"--support={support}", f"--export_dir={tmp_path / 'export'}"]
    exported = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False,
                              timeout=600)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert os.path.isdir(tmp_path / "export" / "1")
    code, _, stderr = run_job(model_dir, module="mamlpp_tf.report")
    assert code == 0, stderr[-3000:]
    with open(os.path.join(model_dir, "report", "report.md"), encoding="utf-8") as stream:
        report = stream.read()
    assert f"{backbone} network" in report
