"""Training-mode batch normalisation as TensorFlow's fused ops, with the derivatives the meta-learner takes.

Keras' BatchNormalization normalises with separate moment, subtract, scale and shift ops, each a pass over the
activations, and its backward pass takes as many again: in a meta-training step on a CPU these elementwise passes
cost more than the learner's convolutions (benchmarks/README.md: the fused ops halved the 84x84 5-shot step).
TensorFlow's FusedBatchNormV3 computes the forward pass in one op and FusedBatchNormGradV3 the backward pass in
one more (oneDNN on a CPU, cuDNN on a GPU, and XLA compiles both). Their registered gradient, though, ignores the gradients of the
batch mean and variance the op returns, which carry the meta-gradient when the query pass normalises with the
support batch's statistics (query_statistics="support"). `batch_normalization_training` adds them in closed form,
with plain ops, so the backward pass stays differentiable: FusedBatchNormGradV3's own registered gradient is
exact (it differentiates a closed form of the backward pass), which the second-order meta-gradient needs.
"""

import numpy as np
import tensorflow as tf


def _is_zero(tensor):
    """Whether `tensor` is known to be all zeros while tracing: TensorFlow hands a custom gradient zeros for the
    outputs nothing depends on (here, the statistics of a batch whose moving averages are discarded)."""
    value = tf.get_static_value(tensor)
    return value is not None and not np.any(value)


def values_per_channel(inputs):
    """The number of values each channel's moments average over, as `inputs`' dtype."""
    return tf.cast(tf.reduce_prod(tf.shape(inputs)[:-1]), inputs.dtype)


def _statistics_gradient(inputs, mean_gradient, variance_gradient):
    """The gradient w.r.t. `inputs` through their batch mean and biased variance, None where both gradients
    are known to be zero (two passes over the activations saved)."""
    if _is_zero(mean_gradient) and _is_zero(variance_gradient):
        return None
    # The mean recomputed with plain ops, not taken from the fused op, whose gradient would ignore it.
    centred = inputs - tf.reduce_mean(inputs, list(range(inputs.shape.rank - 1)))
    return (mean_gradient + 2.0 * variance_gradient * centred) / values_per_channel(inputs)


def batch_normalization_training(inputs, gamma, beta, epsilon):
    """Normalises float32 `inputs` (channels last) with their own batch moments, as a training-mode
    keras.layers.BatchNormalization does.

    Args:
        inputs: float32, rank >= 2, channels on the last axis; the moments average over all other axes.
        gamma, beta: (channels,) scale and offset.
        epsilon: added to the variance.

    Returns:
        outputs (shaped like `inputs`), the batch mean and the biased batch variance (channels,): the
        statistics Keras folds into its moving averages.
    """
    channels = inputs.shape[-1]
    # The fused ops take 4-D NHWC; any channels-last batch is one by a free reshape.
    images = inputs if inputs.shape.rank == 4 else tf.reshape(inputs, [-1, 1, 1, channels])
    empty = tf.constant([], inputs.dtype)

    @tf.custom_gradient
    def normalise(images, gamma, beta):
        forward_outputs = tf.raw_ops.FusedBatchNormV3(
            x=images, scale=gamma, offset=beta, mean=empty, variance=empty, epsilon=epsilon, is_training=True
        )
        outputs, mean, corrected_variance = forward_outputs[:3]
        count = values_per_channel(images)
        # The op returns the Bessel-corrected variance (for moving averages); Keras averages the biased one.
        variance = corrected_variance * ((count - 1.0) / count)

        def backward(output_gradient, mean_gradient, variance_gradient):
            input_gradient, gamma_gradient, beta_gradient, _, _ = tf.raw_ops.FusedBatchNormGradV3(
                y_backprop=output_gradient,
                x=images,
                scale=gamma,
                reserve_space_1=forward_outputs[3],
                reserve_space_2=forward_outputs[4],
                reserve_space_3=forward_outputs[5],
                epsilon=epsilon,
                is_training=True,
            )
            through_statistics = _statistics_gradient(images, mean_gradient, variance_gradient)
            if through_statistics is not None:
                input_gradient += through_statistics
            return input_gradient, gamma_gradient, beta_gradient

        return (outputs, mean, variance), backward

    outputs, mean, variance = normalise(images, gamma, beta)
    return tf.reshape(outputs, tf.shape(inputs)), mean, variance


def batch_normalization_relu_max_pool_training(inputs, gamma, beta, epsilon, kernel_ops):
    """`batch_normalization_training` of float32 NHWC `inputs` followed by ReLU and 2x2 max pooling (stride 2,
    "valid"), as one fused CPU op forward and one backward (keras_metalstm/ops/norm_relu_pool_kernel.cc).

    Args:
        inputs: float32 (images, height, width, channels), channels a multiple of 8.
        gamma, beta, epsilon: as `batch_normalization_training`.
        kernel_ops: (forward op, backward op), from `keras_metalstm.ops.fused_kernels.norm_relu_pool`.

    Returns:
        the pooled outputs (images, height // 2, width // 2, channels), the batch mean and the biased batch
        variance (channels,). Differentiable once: the backward op has no gradient of its own, so a pass whose
        backward pass is differentiated again (a second-order meta-gradient's support passes) uses the stock ops.
    """
    forward, backward_op = kernel_ops

    @tf.custom_gradient
    def normalise_rectify_pool(images, gamma, beta):
        pooled, mean, variance, normalized_at_max = forward(images, gamma, beta, epsilon=epsilon)

        def backward(pooled_gradient, mean_gradient, variance_gradient):
            input_gradient, gamma_gradient, beta_gradient = backward_op(
                images, gamma, beta, mean, variance, pooled, normalized_at_max, pooled_gradient, epsilon=epsilon
            )
            through_statistics = _statistics_gradient(images, mean_gradient, variance_gradient)
            if through_statistics is not None:
                input_gradient += through_statistics
            return input_gradient, gamma_gradient, beta_gradient

        return (pooled, mean, variance), backward

    return normalise_rectify_pool(inputs, gamma, beta)
