"""The fused CPU kernel of a learner block's batch normalisation, ReLU and 2x2 max pooling against NumPy in float64,
results that do not depend on the number of threads, and where the learner function uses it: the chains of layers
it recognises, the same loss and gradient as the stock ops, and the cases that keep the stock ops.
(Kept out of XLA, exports and user functions: test_fused_kernel.py and test_fused_kernel_scope.py.)"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import graph_op_types, needs_kernel_compiler
from test_fused_kernel import arrays_with_one_and_two_threads, assert_bitwise_equal

import keras_metalstm as km
from keras_metalstm.fused_batch_norm import (
    batch_normalization_relu_max_pool_training,
    batch_normalization_training,
)
from keras_metalstm.learner_function import LearnerFunction
from keras_metalstm.ops import fused_kernels

pytestmark = needs_kernel_compiler

EPSILON = 1e-3


def numpy_norm_relu_pool(inputs, gamma, beta, pooled_grad, mean_grad, variance_grad):
    """Forward outputs and input/gamma/beta gradients in float64, window by window."""
    x = inputs.astype(np.float64)
    images, height, width, channels = x.shape
    count = images * height * width
    mean = x.mean(axis=(0, 1, 2))
    variance = ((x - mean) ** 2).mean(axis=(0, 1, 2))
    normalized = (x - mean) / np.sqrt(variance + EPSILON)
    y = gamma * normalized + beta
    pooled = np.zeros((images, height // 2, width // 2, channels))
    y_grad = np.zeros_like(x)
    for image in range(images):
        for row in range(height // 2):
            for column in range(width // 2):
                for channel in range(channels):
                    window = y[image, 2 * row : 2 * row + 2, 2 * column : 2 * column + 2, channel].ravel()
                    corner = int(np.argmax(window))  # the first maximum, as TensorFlow's max pooling
                    pooled[image, row, column, channel] = max(window[corner], 0.0)
                    if window[corner] > 0:
                        y_grad[image, 2 * row + corner // 2, 2 * column + corner % 2, channel] = pooled_grad[
                            image, row, column, channel
                        ]
    beta_grad = y_grad.sum(axis=(0, 1, 2))
    gamma_grad = (y_grad * normalized).sum(axis=(0, 1, 2))
    normalized_grad = y_grad * gamma
    input_grad = (
        count * normalized_grad - normalized_grad.sum(axis=(0, 1, 2)) - normalized * gamma_grad * gamma
    ) / (count * np.sqrt(variance + EPSILON))
    input_grad += (mean_grad + 2.0 * variance_grad * (x - mean)) / count
    return [pooled, mean, variance], [input_grad, gamma_grad, beta_grad]


def kernel_ops():
    ops = fused_kernels.load()
    return ops.meta_lstm_norm_relu_pool, ops.meta_lstm_norm_relu_pool_grad


@pytest.mark.parametrize(
    "shape",
    [(2, 6, 6, 8), (3, 7, 9, 16), (1, 1, 5, 8), (2, 5, 1, 8), (4, 28, 28, 32)],
    ids=["even", "odd-height-and-width", "height-1", "width-1", "conv4-28x28"],
)
def test_outputs_and_gradients_match_numpy(shape):
    """Inputs on a grid of quarters: many windows hold exact ties (the first maximum takes the gradient) and no
    two distinct values are close enough for float32 rounding to pick another maximum than float64 does."""
    rng = np.random.default_rng(sum(shape))
    channels = shape[-1]
    inputs = rng.integers(-8, 9, size=shape) / 4.0
    gamma = rng.choice([-1.5, -0.5, 0.75, 1.25], size=channels)  # negative scales flip which corner is largest
    beta = rng.normal(scale=0.3, size=channels)
    pooled_shape = (shape[0], shape[1] // 2, shape[2] // 2, channels)
    pooled_grad = rng.normal(size=pooled_shape)
    mean_grad, variance_grad = rng.normal(size=channels), rng.normal(size=channels)
    expected_outputs, expected_grads = numpy_norm_relu_pool(inputs, gamma, beta, pooled_grad, mean_grad, variance_grad)

    arguments = [tf.constant(value, tf.float32) for value in (inputs, gamma, beta)]
    with tf.GradientTape() as tape:
        tape.watch(arguments)
        outputs = batch_normalization_relu_max_pool_training(*arguments, EPSILON, kernel_ops())
        objective = sum(
            tf.reduce_sum(output * upstream)
            for output, upstream in zip(outputs, (pooled_grad, mean_grad, variance_grad), strict=True)
        )
    grads = tape.gradient(objective, arguments)
    for name, ours, expected in zip(
        ["pooled", "mean", "variance", "inputs grad", "gamma grad", "beta grad"],
        [*outputs, *grads],
        [*expected_outputs, *expected_grads],
        strict=True,
    ):
        assert ours.shape == expected.shape, name
        scale = np.abs(expected).max(initial=1.0)
        np.testing.assert_allclose(ours.numpy(), expected, rtol=2e-5, atol=2e-5 * scale, err_msg=name)


def stock_norm_relu_pool(inputs, gamma, beta, epsilon, _):
    outputs, mean, variance = batch_normalization_training(inputs, gamma, beta, epsilon)
    return tf.nn.max_pool2d(tf.nn.relu(outputs), 2, 2, "VALID"), mean, variance


def test_a_mean_far_from_zero_costs_less_accuracy_than_in_the_stock_ops():
    """Activations 2,000 standard deviations from zero: the float32 mean itself is rounded (to 5e-4 at 5,000),
    so both lose accuracy; the kernel, which centres before it scales, loses less (measured: pooled outputs 9e-5
    of their largest value from float64, the stock ops 3e-3)."""
    shape = (4, 28, 28, 32)
    rng = np.random.default_rng(0)
    inputs = 5000 + rng.integers(-8, 9, size=shape) / 4.0
    gamma, beta = rng.choice([-1.5, 0.75, 1.25], size=32), rng.normal(scale=0.3, size=32)
    pooled_grad = rng.normal(size=(4, 14, 14, 32))
    (expected_pooled, *_), (expected_inputs_grad, *_) = numpy_norm_relu_pool(
        inputs, gamma, beta, pooled_grad, np.zeros(32), np.zeros(32)
    )

    def relative_errors(function):
        arguments = [tf.constant(value, tf.float32) for value in (inputs, gamma, beta)]
        with tf.GradientTape() as tape:
            tape.watch(arguments)
            pooled, _, _ = function(*arguments, EPSILON, kernel_ops())
            objective = tf.reduce_sum(pooled * pooled_grad)
        inputs_grad = tape.gradient(objective, arguments[0])
        return [
            np.abs(ours.numpy() - expected).max() / np.abs(expected).max()
            for ours, expected in ((pooled, expected_pooled), (inputs_grad, expected_inputs_grad))
        ]

    kernel_errors = relative_errors(batch_normalization_relu_max_pool_training)
    stock_errors = relative_errors(stock_norm_relu_pool)
    assert max(kernel_errors) < 2e-4
    for kernel_error, stock_error in zip(kernel_errors, stock_errors, strict=True):
        assert kernel_error < stock_error


# The forward and backward op on an input cut into 32 chunks of pixels, saved for comparison with another thread
# count. The thread count is process-wide, fixed before the first op.
THREAD_COUNT_SCRIPT = """
import sys
import tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(int(sys.argv[1]))
import numpy as np
from keras_metalstm.ops import fused_kernels

rng = np.random.default_rng(0)
inputs = tf.constant(rng.normal(size=(8, 64, 64, 16)), tf.float32)
gamma, beta = (tf.constant(rng.normal(size=16), tf.float32) for _ in range(2))
library = fused_kernels.load()
outputs = library.meta_lstm_norm_relu_pool(inputs, gamma, beta, epsilon=1e-3)
pooled, mean, variance, normalized_at_max = outputs
pooled_grad = tf.constant(rng.normal(size=pooled.shape), tf.float32)
grads = library.meta_lstm_norm_relu_pool_grad(
    inputs, gamma, beta, mean, variance, pooled, normalized_at_max, pooled_grad, epsilon=1e-3)
np.savez(sys.argv[2], *[tensor.numpy() for tensor in [*outputs, *grads]])
"""


def test_results_are_bitwise_the_same_with_one_and_two_threads(tmp_path):
    one_thread, two_threads = arrays_with_one_and_two_threads(THREAD_COUNT_SCRIPT, tmp_path)
    assert len(one_thread) == 4 + 3  # the forward op's outputs, then the backward op's
    assert_bitwise_equal(one_thread, two_threads)


def test_the_kernel_rejects_channels_it_cannot_take_with_a_message():
    forward, _ = kernel_ops()
    with pytest.raises(tf.errors.InvalidArgumentError, match="multiple of 8 channels"):
        forward(tf.zeros((2, 4, 4, 12)), tf.ones(12), tf.zeros(12), epsilon=EPSILON)


def block(features, name, activation=None, pool_size=2):
    features = keras.layers.BatchNormalization(name=f"{name}_bn")(features)
    features = activation(features) if activation else keras.layers.ReLU(name=f"{name}_relu")(features)
    return keras.layers.MaxPooling2D(pool_size, name=f"{name}_pool")(features)


def chained_layer_names(learner):
    return [chain.normalization.name for chain in LearnerFunction(learner)._chains]


def test_the_chains_are_each_normalisation_whose_output_only_a_relu_and_then_a_2x2_pooling_take():
    images = keras.Input((64, 64, 8))
    convolved = keras.layers.Conv2D(8, 3, padding="same")(images)
    chained = block(convolved, "plain")
    chained = block(chained, "activation", activation=keras.layers.Activation("relu"))
    leaky = block(chained, "leaky", activation=keras.layers.LeakyReLU(0.1))
    wide = block(leaky, "wide", pool_size=3)
    # A ReLU whose output also feeds an Add: the fused op would not produce that output.
    normalized = keras.layers.BatchNormalization(name="shared_bn")(keras.layers.Conv2D(8, 1)(wide))
    rectified = keras.layers.ReLU(name="shared_relu")(normalized)
    pooled = keras.layers.MaxPooling2D(2)(keras.layers.Add()([rectified, wide]))
    logits = keras.layers.Dense(5)(keras.layers.Flatten()(pooled))
    assert chained_layer_names(keras.Model(images, logits)) == ["plain_bn", "activation_bn"]

    assert chained_layer_names(km.learners.conv4(input_shape=(28, 28, 1))) == ["bn1", "bn2", "bn3", "bn4"]
    sequential = keras.Sequential(
        [keras.Input((8, 8, 3)), keras.layers.Conv2D(8, 3), keras.layers.BatchNormalization(name="seq_bn")]
        + [keras.layers.ReLU(), keras.layers.MaxPooling2D(2), keras.layers.Flatten(), keras.layers.Dense(5)]
    )
    assert chained_layer_names(sequential) == ["seq_bn"]


def test_a_normalisation_whose_rectified_output_is_a_model_output_is_not_chained():
    images = keras.Input((8, 8, 8))
    rectified = keras.layers.ReLU()(keras.layers.BatchNormalization()(images))
    logits = keras.layers.Dense(5)(keras.layers.Flatten()(keras.layers.MaxPooling2D(2)(rectified)))
    assert chained_layer_names(keras.Model(images, [logits, rectified])) == []


def support_pass(learner, kernels):
    """The support loss and gradient of `learner` under LearnerFunction, traced with or without the kernels."""
    function = LearnerFunction(learner)
    rng = np.random.default_rng(0)
    images = tf.constant(rng.normal(size=(10, *learner.input_shape[1:])), tf.float32)
    labels = tf.constant(np.repeat(np.arange(5), 2))
    traced = tf.function(lambda theta: function.loss_and_gradient(theta, function.initial_state(), images, labels))
    theta = function.initial_theta()
    with fused_kernels.enabled() if kernels else fused_kernels.disabled():
        concrete = traced.get_concrete_function(theta)
    loss, gradient, state = concrete(theta)
    return graph_op_types(concrete), [loss.numpy(), gradient.numpy(), *(value.numpy() for value in state)]


@pytest.mark.parametrize("filters, fused", [(16, True), (12, False)])
def test_the_learner_function_gives_the_stock_ops_results_with_the_kernel_where_it_applies(filters, fused):
    """conv4 with 16 filters runs its four blocks on the kernel; with 12 (not a multiple of 8) on the stock ops."""
    keras.utils.set_random_seed(0)
    learner = km.learners.conv4(input_shape=(28, 28, 1), filters=filters)
    op_types, results = support_pass(learner, kernels=True)
    stock_op_types, expected = support_pass(learner, kernels=False)
    assert ("MetaLstmNormReluPool" in op_types) == fused
    assert ("MetaLstmNormReluPoolGrad" in op_types) == fused
    assert ("FusedBatchNormV3" in op_types) != fused
    assert "MetaLstmNormReluPool" not in stock_op_types
    # loss, gradient, then each layer's moving mean and variance
    for name, ours, stock in zip(["loss", "gradient"] + ["moving statistics"] * 8, results, expected, strict=True):
        np.testing.assert_allclose(ours, stock, rtol=1e-5, atol=1e-5 * np.abs(stock).max(), err_msg=name)


def test_inference_mode_and_frozen_normalisations_keep_keras_own_calls():
    keras.utils.set_random_seed(0)
    learner = km.learners.conv4(input_shape=(28, 28, 1), filters=8)
    learner.get_layer("bn2").trainable = False
    function = LearnerFunction(learner)
    images = tf.constant(np.random.default_rng(0).normal(size=(5, 28, 28, 1)), tf.float32)
    theta, state = function.initial_theta(), function.initial_state()
    with fused_kernels.enabled():
        training = tf.function(lambda: function(theta, state, images, training=True)).get_concrete_function()
        inference = tf.function(lambda: function(theta, state, images, training=False)).get_concrete_function()
    kernel_calls = [op for op in training.graph.get_operations() if op.type == "MetaLstmNormReluPool"]
    assert len(kernel_calls) == 3  # bn2 is frozen: it normalises with its moving statistics, as Keras does
    assert "MetaLstmNormReluPool" not in graph_op_types(inference)
    with fused_kernels.disabled():
        expected = tf.function(lambda: function(theta, state, images, training=True))()
    for ours, stock in zip(tf.nest.flatten(training()), tf.nest.flatten(expected), strict=True):
        np.testing.assert_allclose(ours.numpy(), stock.numpy(), rtol=1e-5, atol=1e-5 * np.abs(stock.numpy()).max())
