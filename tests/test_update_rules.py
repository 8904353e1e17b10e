"""The inner update rules (`mamlpp_tf.update_rules`) and their config, against numpy.

* Meta-SGD's per-element rates: shapes, initial value, the step `θ − α ⊙ g`
  per step or shared by all steps, task-stacked weights, serialization;
* the rule each `--inner_update` (and `--nolearn_inner_lr`) builds, its
  trainable variables and the checkpoint names of its rates.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from mamlpp_tf import LearnerConfig
from mamlpp_tf.config import ConfigError
from mamlpp_tf.update_rules import (
    PerElementLearningRates,
    PerStepLearningRates,
    UpdateRule,
    build_update_rule,
)

SHAPES = {"conv0/kernel": (3, 3, 1, 2), "conv0/bias": (2,), "dense/kernel": (8, 5)}


def random_like(rng, shapes, leading=()):
    return {name: rng.randn(*leading, *shape) for name, shape in shapes.items()}


@pytest.mark.parametrize("per_step", [True, False], ids=["per_step", "shared"])
def test_meta_sgd_rates_have_the_weights_shapes_and_start_at_the_initial_rate(per_step):
    rule = PerElementLearningRates(SHAPES, num_steps=4, initial_rate=0.03, per_step=per_step,
                                   dtype="float64")
    assert isinstance(rule, UpdateRule) and rule.per_step == per_step
    assert list(rule.rates) == list(SHAPES) and len(rule.trainable_variables) == 3
    for name, shape in SHAPES.items():
        assert tuple(rule.rates[name].shape) == ((4,) if per_step else ()) + shape
        # Keras' Constant initialiser rounds to float32 first, as for LSLR's rates.
        np.testing.assert_array_equal(rule.rates[name].numpy(), np.float32(0.03))


def test_meta_sgd_steps_every_element_with_its_own_rate_of_the_step():
    rng = np.random.RandomState(0)
    rule = PerElementLearningRates(SHAPES, num_steps=3, per_step=True, dtype="float64")
    rates = random_like(rng, SHAPES, leading=(3,))  # Negative entries too: unconstrained.
    for name, value in rates.items():
        rule.rates[name].assign(value)
    params, grads = random_like(rng, SHAPES), random_like(rng, SHAPES)
    for step in range(3):
        new = rule.update(params, grads, step)
        for name in SHAPES:
            np.testing.assert_allclose(new[name],
                                       params[name] - rates[name][step] * grads[name],
                                       rtol=1e-15)
    with pytest.raises(ValueError, match="step 3"):
        rule.update(params, grads, 3)


def test_shared_meta_sgd_rates_serve_every_step_and_stacked_tasks():
    rng = np.random.RandomState(1)
    rule = PerElementLearningRates(SHAPES, num_steps=2, per_step=False, dtype="float64")
    rates = random_like(rng, SHAPES)
    for name, value in rates.items():
        rule.rates[name].assign(value)
    # A stack of 4 tasks' weights (the batched layout) broadcasts against the rates.
    params, grads = random_like(rng, SHAPES, (4,)), random_like(rng, SHAPES, (4,))
    for step in (0, 7):  # No per-step rows: any step uses the one rate tensor.
        new = rule.update(params, grads, step)
        for name in SHAPES:
            np.testing.assert_allclose(new[name], params[name] - rates[name] * grads[name],
                                       rtol=1e-15)


def test_meta_sgd_config_round_trips():
    rule = PerElementLearningRates(SHAPES, num_steps=2, initial_rate=0.2, per_step=False,
                                   name="meta_sgd")
    config = rule.get_config()
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(rule))
    assert isinstance(restored, PerElementLearningRates)
    assert restored.get_config() == config
    assert {name: tuple(shape) for name, shape in restored.param_shapes.items()} == SHAPES
    with pytest.raises(ValueError, match="param_shapes"):
        PerElementLearningRates({}, num_steps=2)
    with pytest.raises(ValueError, match="num_steps"):
        PerElementLearningRates(SHAPES, num_steps=0)


@pytest.mark.parametrize("kind,cls,name,trainable", [
    ("lslr", PerStepLearningRates, "lslr", 3),
    ("fixed", PerStepLearningRates, "lslr", 0),
    ("meta_sgd", PerElementLearningRates, "meta_sgd", 3),
])
def test_each_kind_builds_its_rule_with_rates_checkpointed_as_rate_names(kind, cls, name,
                                                                          trainable, tmp_path):
    rule = build_update_rule(kind, SHAPES, num_steps=2, initial_rate=0.4, per_step=True,
                             dtype="float32")
    assert isinstance(rule, cls) and rule.name == name
    assert len(rule.trainable_variables) == trainable and len(rule.variables) == 3
    path = tf.train.Checkpoint(lslr=rule).write(str(tmp_path / "ckpt"))
    saved = {key for key, _ in tf.train.list_variables(path)}
    for weight in SHAPES:
        assert f"lslr/rate_{weight.replace('/', '_')}/.ATTRIBUTES/VARIABLE_VALUE" in saved
    with pytest.raises(ValueError, match="unknown inner update rule 'adam'"):
        build_update_rule("adam", SHAPES, num_steps=2, initial_rate=0.4, per_step=True,
                          dtype="float32")


def test_the_rule_in_effect_and_the_contradiction_refused():
    assert LearnerConfig().update_rule == "lslr"
    assert LearnerConfig(inner_update="meta_sgd").update_rule == "meta_sgd"
    assert LearnerConfig(inner_update="fixed").update_rule == "fixed"
    # Today's --nolearn_inner_lr keeps its meaning: the fixed rate.
    assert LearnerConfig(learn_inner_lr=False).update_rule == "fixed"
    assert LearnerConfig(learn_inner_lr=False, inner_update="fixed").update_rule == "fixed"
    with pytest.raises(ConfigError) as error:
        LearnerConfig(learn_inner_lr=False, inner_update="meta_sgd")
    assert len(error.value.problems) == 1
    assert str(error.value).startswith("learn_inner_lr=False is plain MAML's fixed rate")
    for field, value in (("inner_update", "adam"), ("adapt", "tail")):
        with pytest.raises(ConfigError, match=rf"^{field}='{value}' must be one of"):
            LearnerConfig(**{field: value})
