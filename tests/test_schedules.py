"""MSL weights, derivative-order annealing and the cosine meta-LR (the official code's formulas)."""

import math

import numpy as np
import pytest

from mamlpp_tf import schedules


@pytest.mark.parametrize("msl_epochs", [10, 15])
@pytest.mark.parametrize("epoch", range(0, 16))
def test_msl_invariants(msl_epochs, epoch):
    v = schedules.msl_weights(epoch, 5, msl_epochs)
    assert v.dtype == np.float32 and v.shape == (5,)
    assert abs(v.sum() - 1.0) < 1e-6
    if epoch >= msl_epochs:
        np.testing.assert_array_equal(v, [0, 0, 0, 0, 1])
        return
    assert np.all(v[:-1] == v[0])
    assert v[-1] >= v[:-1].max()
    assert v[0] >= 0.03 / 5 - 1e-7 and v[-1] <= 1 - 4 * 0.03 / 5 + 1e-7


def test_msl_published_values():
    np.testing.assert_allclose(schedules.msl_weights(0, 5, 10), [0.2] * 5, atol=1e-7)
    np.testing.assert_allclose(schedules.msl_weights(1, 5, 10), [0.18] * 4 + [0.28], atol=1e-7)
    np.testing.assert_allclose(schedules.msl_weights(9, 5, 10), [0.02] * 4 + [0.92], atol=1e-7)
    np.testing.assert_allclose(schedules.msl_weights(14, 5, 15),
                               [0.0133333] * 4 + [0.9466667], atol=1e-6)
    assert schedules.msl_active(9, 10) and not schedules.msl_active(10, 10)


def test_msl_clamps_and_single_step():
    # Far past the clamp threshold (only reachable with msl_epochs large).
    v = schedules.msl_weights(99, 5, 100)
    np.testing.assert_allclose(v, [0.006] * 4 + [0.976], atol=1e-7)
    for epoch in range(5):
        np.testing.assert_array_equal(schedules.msl_weights(epoch, 1, 10), [1.0])
    np.testing.assert_array_equal(schedules.msl_weights(0, 3, 0), [0, 0, 1])
    with pytest.raises(ValueError):
        schedules.msl_weights(-1, 5, 10)


def test_derivative_order_annealing_switch():
    assert [schedules.use_second_order(e, True, 2) for e in range(5)] == [
        False, False, False, True, True]
    assert schedules.use_second_order(0, True, -1)
    assert not schedules.use_second_order(50, False, -1)


def test_cosine_meta_lr_published_values():
    schedule = schedules.CosineMetaLearningRate(1e-3, 1e-5, total_epochs=100,
                                                iterations_per_epoch=500)
    for epoch, want in ((0, 1e-3), (50, 5.05e-4), (99, 1.02443e-5)):
        # Constant within the epoch: its first and last iteration agree.
        for iteration in (epoch * 500, epoch * 500 + 499):
            assert float(schedule(iteration)) == pytest.approx(want, rel=1e-4)
        assert schedules.cosine_meta_lr(epoch, 1e-3, 1e-5, 100) == pytest.approx(want, rel=1e-4)
    independent = 1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * 37 / 100)) / 2
    assert float(schedule(37 * 500 + 123)) == pytest.approx(independent, rel=1e-6)
    flat = schedules.CosineMetaLearningRate(1e-3, 1e-3, 100, 500)
    assert float(flat(40_000)) == pytest.approx(1e-3)
    assert schedules.CosineMetaLearningRate(**schedule.get_config()).get_config() == \
        schedule.get_config()
