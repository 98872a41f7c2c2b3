"""preprocess() against a NumPy transcription of Andrychowicz et al.'s preprocessing."""

import math

import numpy as np
import pytest
import tensorflow as tf

import keras_metalstm as km


def numpy_preprocess(values, p):
    values = np.asarray(values, dtype=np.float64)
    out = np.empty(values.shape + (2,))
    for index, x in np.ndenumerate(values):
        if abs(x) > math.exp(-p):
            out[index] = (math.log(abs(x)) / p, np.sign(x))
        else:
            out[index] = (-1.0, math.exp(p) * x)
    return out


@pytest.mark.parametrize("p", [10.0, 5.0])
def test_matches_numpy_on_values_straddling_the_threshold(p):
    rng = np.random.default_rng(0)
    threshold = math.exp(-p)
    values = np.concatenate(
        [
            rng.normal(size=200) * 10.0 ** rng.integers(-8, 4, size=200),
            [0.0, -0.0, threshold * 1.01, -threshold * 1.01, threshold * 0.99, -threshold * 0.99, 1e-30, -1e30],
        ]
    ).astype(np.float32)
    expected = numpy_preprocess(values, p)
    actual = km.preprocess(tf.constant(values), p).numpy()
    assert actual.shape == values.shape + (2,)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


def test_finite_values_and_gradients_for_zero_tiny_huge_and_negative():
    values = tf.constant([0.0, 1e-38, -1e-38, 1e-45, 3e38, -3e38, -2.5], dtype=tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(values)
        features = km.preprocess(values)
        total = tf.reduce_sum(features)
    gradient = tape.gradient(total, values)
    assert np.all(np.isfinite(features.numpy()))
    assert np.all(np.isfinite(gradient.numpy()))
    # Small values are passed on linearly: the gradient of exp(p) * x is exp(p).
    assert gradient.numpy()[0] == pytest.approx(math.exp(10.0), rel=1e-5)


def test_keeps_leading_shape():
    features = km.preprocess(tf.zeros((3, 4, 5)))
    assert features.shape == (3, 4, 5, 2)
