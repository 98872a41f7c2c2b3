"""MultiplierAdam: Adam with theta_0's step a multiple of the update rule's, checked against a NumPy Adam."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_metalstm as km
from keras_metalstm.optimizers import MultiplierAdam


def numpy_adam(value, gradients, learning_rate, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
    """Keras' Adam in NumPy (epsilon is added to the root of the uncorrected second moment, as Keras does)."""
    value = np.array(value, np.float64)
    m = np.zeros_like(value)
    v = np.zeros_like(value)
    for step, gradient in enumerate(gradients, start=1):
        m = beta_1 * m + (1 - beta_1) * gradient
        v = beta_2 * v + (1 - beta_2) * gradient**2
        alpha = learning_rate * np.sqrt(1 - beta_2**step) / (1 - beta_1**step)
        value = value - alpha * m / (np.sqrt(v) + epsilon)
    return value


def run(optimizer, steps=5, seed=0):
    """Apply `steps` random gradients to two variables, 'theta0' and 'kernel'; returns (start, gradients, end)."""
    rng = np.random.default_rng(seed)
    theta0 = keras.Variable(rng.normal(size=6).astype("float32"), name="theta0")
    kernel = keras.Variable(rng.normal(size=(2, 3)).astype("float32"), name="kernel")
    start = [theta0.numpy().copy(), kernel.numpy().copy()]
    gradients = [[rng.normal(size=6), rng.normal(size=(2, 3))] for _ in range(steps)]
    optimizer.build([theta0, kernel])
    for step_gradients in gradients:
        optimizer.apply([tf.constant(g, tf.float32) for g in step_gradients], [theta0, kernel])
    return start, gradients, [theta0.numpy(), kernel.numpy()]


@pytest.mark.parametrize("scale", [0.1, 3.0])
def test_the_named_variable_takes_scaled_adam_steps_and_the_others_plain_ones(scale):
    start, gradients, (theta0, kernel) = run(MultiplierAdam(1e-2, learning_rate_multipliers={"theta0": scale}))
    expected_theta0 = numpy_adam(start[0], [g[0] for g in gradients], 1e-2 * scale)
    expected_kernel = numpy_adam(start[1], [g[1] for g in gradients], 1e-2)
    np.testing.assert_allclose(theta0, expected_theta0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kernel, expected_kernel, rtol=1e-5, atol=1e-6)
    # The scaled steps are measurably not the plain ones.
    assert not np.allclose(theta0, numpy_adam(start[0], [g[0] for g in gradients], 1e-2), atol=1e-4)


def test_a_zero_multiplier_freezes_the_variable():
    start, _, (theta0, kernel) = run(MultiplierAdam(1e-2, learning_rate_multipliers={"theta0": 0.0}))
    np.testing.assert_array_equal(theta0, start[0])
    assert np.abs(kernel - start[1]).min() > 1e-4


def test_a_schedule_is_scaled_too():
    schedule = keras.optimizers.schedules.ExponentialDecay(1e-2, decay_steps=1, decay_rate=0.5)
    start, gradients, (theta0, _) = run(MultiplierAdam(schedule, learning_rate_multipliers={"theta0": 0.1}), steps=1)
    np.testing.assert_allclose(theta0, numpy_adam(start[0], [gradients[0][0]], 1e-3), rtol=1e-5, atol=1e-6)


def test_bad_multipliers_are_refused_with_a_message():
    with pytest.raises(ValueError, match="must be >= 0"):
        MultiplierAdam(learning_rate_multipliers={"theta0": -1.0})
    with pytest.raises(ValueError, match="'theta_0'.*not among the optimised variables"):
        run(MultiplierAdam(learning_rate_multipliers={"theta_0": 0.1}))


def test_config_round_trip():
    optimizer = MultiplierAdam(3e-4, learning_rate_multipliers={"theta0": 0.05}, beta_1=0.8)
    clone = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert isinstance(clone, MultiplierAdam)
    assert clone.learning_rate_multipliers == {"theta0": 0.05}
    assert clone.beta_1 == pytest.approx(0.8)


def test_meta_optimizer_scales_the_meta_learners_theta0_only():
    assert type(km.meta_optimizer(1e-3)) is keras.optimizers.Adam  # the paper's optimizer by default
    optimizer = km.meta_optimizer(1e-3, theta0_learning_rate_scale=0.1)
    assert optimizer.learning_rate_multipliers == {"theta0": 0.1}
    learner = km.learners.conv4(input_shape=(16, 16, 1), num_classes=2, filters=2)
    meta = km.MetaLearner(learner, inner_steps=1)
    before = [variable.numpy().copy() for variable in meta.trainable_variables]
    # Adam's first step moves every coordinate with a non-zero gradient by about the learning rate.
    optimizer.apply([tf.ones_like(variable.value) for variable in meta.trainable_variables], meta.trainable_variables)
    for variable, start in zip(meta.trainable_variables, before, strict=True):
        expected = 1e-4 if variable is meta.theta0 else 1e-3
        np.testing.assert_allclose(start - variable.numpy(), expected, rtol=1e-3)
