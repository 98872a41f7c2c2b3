"""Learner ops written for XLA: transposes whose gradients stay compile-time constants, and, for XLA on a CPU,
convolutions and max pooling in the forms its CPU compiler runs on fast kernels.

XLA's CPU compiler hands a convolution to its Eigen/oneDNN kernels only in the forward form (batch first, features
last). Outside a loop it rewrites TensorFlow's backward convolutions into that form; inside one (the inner loop's
`tf.while_loop`) it leaves them transposed and emits them as plain loops, about 100x slower (benchmarks/README.md).
`conv2d` here computes both gradients as forward convolutions of transposed tensors, at every order of
differentiation, so the CPU compiler takes its fast path whatever loop the convolution sits in. `max_pool` pools
disjoint windows as a reduction over a reshape, whose gradient (a one-hot of each window's argmax) XLA fuses with
its neighbours, instead of the select-and-scatter it otherwise compiles max-pool gradients into (6-8x slower than
TensorFlow's own kernel).
Sums over the batch and spatial axes (batch-norm moments, bias gradients) are matrix products with a row of ones
(`channel_sum`): XLA's CPU compiler splits a reduction over an axis longer than 32 into a windowed reduction that it
emits as plain loops (nearly a third of the 84x84 step's time). Batch normalisation, built on them, takes its
backward pass in closed form. The coordinate LSTM has a CPU form too (the episodes' gate biases inside its matrix
product, `keras_metalstm.layers.coordinate_lstm`).

The CPU forms are used only inside `traced_for_xla()` on a machine without a GPU or TPU: the library traces the
functions it compiles with XLA within it (`meta_train_step(..., jit_compile=True)`, `metalstm train --xla`, `fit`
after `compile(jit_compile=True)`), and so can a function of your own that you compile with XLA. The GPU and TPU
compilers map TensorFlow's own convolution gradients onto cuDNN and the TPU's convolution units; the rewrite is not
for them, and outside XLA TensorFlow's oneDNN kernels are faster. `explaining_uncompilable_ops` turns TensorFlow's
error for a learner op XLA has no kernel for into one naming the op, its layer and the way out.
"""

import contextlib
import re
import threading
import warnings

import numpy as np
import tensorflow as tf
from tensorflow.python.ops import control_flow_util

from keras_metalstm.fused_batch_norm import values_per_channel
from keras_metalstm.ops import fused_kernels

_state = threading.local()


def accelerator_present():
    """Whether TensorFlow sees a GPU or TPU."""
    return bool(tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))


def in_xla_context():
    """Whether the function being traced is compiled by XLA (tf.function(jit_compile=True), TPUs)."""
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


@contextlib.contextmanager
def traced_for_xla():
    """Trace a function that XLA compiles (tf.function(jit_compile=True)) within this: the coordinate LSTM as stock
    TensorFlow ops (XLA cannot compile the fused CPU kernel) and, on a machine without a GPU or TPU, the learner's
    convolutions and max pooling in the forms XLA's CPU compiler runs fast (`cpu_forms`)."""
    with fused_kernels.disabled(), contextlib.nullcontext() if accelerator_present() else cpu_forms():
        yield


# TensorFlow 2.16.2's and 2.17.1's XLA computed a meta-gradient 4 % away from the plain step's, and from every later
# TensorFlow's with or without XLA (1e-6), for one learner of tests/test_batched_learner.py (depthwise and separable
# convolutions, batch norm, PReLU, unit normalisation; any one of them removed, it agreed); 2.18.1-2.21 agree.
FIRST_TRUSTED_XLA = (2, 18)


def tensorflow_release(version=None):
    """(major, minor) of a TensorFlow version string ("2.18.0rc1" -> (2, 18)), default the installed one."""
    return tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", version or tf.__version__).groups())


def untrusted_xla_reason(version=None):
    """Why XLA should not be trusted with meta-gradients on this TensorFlow (`version`, default the installed
    one), or None."""
    version = version or tf.__version__
    if tensorflow_release(version) >= FIRST_TRUSTED_XLA:
        return None
    return (
        f"TensorFlow {version}'s XLA computed a wrong meta-gradient (4 % off the plain step's) for a learner of "
        "depthwise and separable convolutions in keras-metalstm's tests; TensorFlow 2.18 and later are right. "
        "Upgrade TensorFlow for XLA or a TPU, or train without XLA on a CPU/GPU"
    )


def warn_if_xla_untrusted():
    """A RuntimeWarning when the step is about to be compiled by an XLA that `untrusted_xla_reason` names."""
    reason = untrusted_xla_reason()
    if reason:
        warnings.warn(reason, RuntimeWarning, stacklevel=3)


# TensorFlow's message for each op of a compiled function that has no XLA kernel on the device.
_UNCOMPILABLE_OP = re.compile(
    r"No registered '(\w+)' OpKernel for XLA_\w+ devices compatible with node \{\{node ([^}]+)\}\}"
)


@contextlib.contextmanager
def explaining_uncompilable_ops(learner):
    """Turns TensorFlow's error for a learner op that XLA cannot compile (a stack trace from deep inside the
    compiler) into a LearnerError naming the ops, the learner's layers that use them and the way out."""
    try:
        yield
    except tf.errors.InvalidArgumentError as error:
        refused = _UNCOMPILABLE_OP.findall(error.message)
        if not refused:
            raise
        from keras_metalstm.learner_spec import LearnerError

        ops = sorted({op for op, _ in refused})
        components = {component for _, node in refused for component in node.split("/")}
        layers = sorted(
            {layer.name for layer in learner._flatten_layers(include_self=False) if _named_in(layer.name, components)}
        )
        where = f" (layers: {', '.join(layers)})" if layers else ""
        raise LearnerError(
            f"XLA cannot compile the learner: TensorFlow has no XLA kernel for {', '.join(ops)}{where}. XLA "
            "compiles the training step with --xla (jit_compile=True) and always on a TPU. Keras' RandomTranslation, "
            "RandomRotation, RandomZoom and RandomShear use such an op: augment the images before they reach the "
            "learner, or train without --xla on a CPU or GPU."
        ) from None


def _named_in(name, components):
    """Whether a node path has a component for the layer `name` (Keras appends _1, _2... to repeated scopes)."""
    return any(component == name or re.fullmatch(re.escape(name) + r"_\d+", component) for component in components)


def transpose(tensor, permutation):
    """tf.transpose with a gradient (of any order) that is a transpose by a constant permutation. tf.transpose's own
    gradient computes the inverse permutation at run time, and inside the gradient of a compiled loop (the
    second-order meta-gradient) XLA then refuses it as a shape that is not a compile-time constant."""
    inverse = [int(axis) for axis in np.argsort(permutation)]

    @tf.custom_gradient
    def transposed(value):
        return tf.transpose(value, permutation), lambda upstream: transpose(upstream, inverse)

    return transposed(tensor)


@contextlib.contextmanager
def cpu_forms():
    """Within this context, in this thread, learner functions traced use the forms here for the layers they can
    stand in for (`LearnerFunction`: convolutions, max pooling, batch normalisation), and the coordinate LSTM its
    CPU form. Thread-local: MirroredStrategy traces each replica in a thread."""
    previous = cpu_forms_active()
    _state.active = True
    try:
        yield
    finally:
        _state.active = previous


def cpu_forms_active():
    """Whether the function being traced is inside `cpu_forms()`."""
    return getattr(_state, "active", False)


def _pad_or_crop(images, padding):
    """`images` (N, H, W, C) padded with zeros by the non-negative and cropped by the negative amounts of
    `padding` ((top, bottom), (left, right))."""
    (top, bottom), (left, right) = padding
    padded = tf.pad(images, [[0, 0], [max(top, 0), max(bottom, 0)], [max(left, 0), max(right, 0)], [0, 0]])
    height, width = padded.shape[1] - max(-bottom, 0), padded.shape[2] - max(-right, 0)
    return padded[:, max(-top, 0) : height, max(-left, 0) : width]


def conv2d(images, kernel, padding):
    """A stride-1 2-D convolution (channels last, `kernel` (KH, KW, C, F)) with explicit `padding`
    ((top, bottom), (left, right), negative to crop), whose gradients are forward convolutions again.

    Input gradient: the upstream gradient convolved with the kernel flipped in space and with its channel axes
    swapped. Kernel gradient: the images with their channels as the batch, convolved with the upstream gradient
    as a (HO, WO, N, F) kernel, whose "images" axis plays the input channels. Both are `conv2d` themselves, so
    second and higher derivatives take the same forms.
    """
    kernel_height, kernel_width = kernel.shape[0], kernel.shape[1]
    (top, bottom), (left, right) = padding

    @tf.custom_gradient
    def convolve(images, kernel):
        outputs = tf.nn.conv2d(_pad_or_crop(images, padding), kernel, strides=1, padding="VALID")

        def gradient(upstream):
            flipped = transpose(tf.reverse(kernel, axis=[0, 1]), [0, 1, 3, 2])
            images_gradient = conv2d(
                upstream,
                flipped,
                ((kernel_height - 1 - top, kernel_height - 1 - bottom), (kernel_width - 1 - left, kernel_width - 1 - right)),
            )
            kernel_gradient = conv2d(transpose(images, [3, 1, 2, 0]), transpose(upstream, [1, 2, 0, 3]), padding)
            return images_gradient, transpose(kernel_gradient, [1, 2, 0, 3])

        return outputs, gradient

    return convolve(images, kernel)


def same_padding(kernel_size):
    """((top, bottom), (left, right)) of TensorFlow's "same" padding for a stride-1 undilated kernel: the smaller
    half before."""
    return tuple(((size - 1) // 2, size - 1 - (size - 1) // 2) for size in kernel_size)


def max_pool(images, pool_size):
    """Max pooling of `images` (N, H, W, C) over disjoint (pool_size) windows with "valid" padding, as a
    reduction over a reshape: the same values as tf.nn.max_pool2d. Its gradient goes to one maximum of each window
    (`_window_argmax_gradient`), as TensorFlow's kernel's does."""
    pool_height, pool_width = pool_size
    rows, columns = images.shape[1] // pool_height, images.shape[2] // pool_width
    cropped = images[:, : rows * pool_height, : columns * pool_width]
    windows = tf.reshape(cropped, [-1, rows, pool_height, columns, pool_width, images.shape[3]])

    @tf.custom_gradient
    def pooled(windows):
        return tf.reduce_max(windows, axis=[2, 4]), lambda upstream: _window_argmax_gradient(windows, upstream)

    return pooled(windows)


def _window_argmax_gradient(windows, upstream):
    """The gradient of a max over axes 2 and 4 of `windows` (N, rows, PH, cols, PW, C): `upstream` at one argmax
    of each window, zero elsewhere. TensorFlow's gradient of reduce_max sends it where the input equals the
    output instead, and XLA may fuse a recomputation of the input into that comparison that rounds differently
    from the forward pass: no element is then equal, and the gradient is 0/0 (a residual block, LeakyReLU,
    then this pooling, in a tf.map_fn over episodes: NaN after one meta-update). An argmax always picks one."""
    pool_height, pool_width = windows.shape[2], windows.shape[4]
    positions = [(row, column) for row in range(pool_height) for column in range(pool_width)]
    candidates = tf.stack([windows[:, :, row, :, column] for row, column in positions], axis=-1)
    chosen = tf.one_hot(tf.argmax(candidates, axis=-1), len(positions), dtype=upstream.dtype)
    parts = tf.unstack(chosen * upstream[..., tf.newaxis], axis=-1)
    # Back to (N, rows, PH, cols, PW, C): each window row's parts stacked on axis 3, the rows on axis 2.
    window_rows = [tf.stack(parts[row * pool_width : (row + 1) * pool_width], axis=3) for row in range(pool_height)]
    return tf.stack(window_rows, axis=2)


def channel_sum(tensor):
    """The sum of `tensor` (..., C) over every axis but the last, as a (1, M) x (M, C) matrix product with ones.
    Its gradient is `broadcast_channels`, whose gradient is `channel_sum` again: every order of derivative takes
    these forms.

    A reduction over an axis longer than 32 is split by XLA's CPU compiler into a windowed reduction emitted as
    plain loops; it merges sums of partial sums back into one such reduction, and fuses partial sums into a
    following product as loops again (both measured slower than the product alone).
    """
    shape, channels = tf.shape(tensor), tensor.shape[-1]

    @tf.custom_gradient
    def summed(values):
        rows = tf.reshape(values, [-1, channels])
        total = tf.matmul(tf.ones([1, tf.shape(rows)[0]], values.dtype), rows)[0]
        return total, lambda upstream: broadcast_channels(upstream, shape)

    return summed(tensor)


def broadcast_channels(values, shape):
    """`values` (C,) broadcast to `shape` (..., C), with `channel_sum` as its gradient: the sums over the batch
    that TensorFlow's broadcasting gradients would compute as reductions."""

    @tf.custom_gradient
    def broadcast(values):
        return tf.broadcast_to(values, shape), channel_sum

    return broadcast(values)


def batch_normalization_training(inputs, gamma, beta, epsilon):
    """Training-mode batch normalisation of channels-last `inputs` by their own batch moments, with every sum over
    the batch a `channel_sum` and the backward pass in closed form (two sums where differentiating the forward
    pass takes three; first and second derivatives exact). Returns the outputs, the batch mean and the biased
    batch variance, as `keras_metalstm.fused_batch_norm.batch_normalization_training` does."""
    shape, count = tf.shape(inputs), values_per_channel(inputs)

    def moments(inputs):
        mean = channel_sum(inputs) / count
        centred = inputs - broadcast_channels(mean, shape)
        variance = channel_sum(tf.square(centred)) / count
        return mean, centred, variance

    @tf.custom_gradient
    def normalise(inputs, gamma, beta):
        mean, centred, variance = moments(inputs)
        outputs = centred * broadcast_channels(tf.math.rsqrt(variance + epsilon) * gamma, shape)
        outputs += broadcast_channels(beta, shape)

        def gradient(output_gradient, mean_gradient, variance_gradient):
            # Recomputed from the inputs, not captured from the forward pass, so the outer tape of a second
            # derivative sees how they depend on the inputs.
            _, centred, variance = moments(inputs)
            inverse_deviation = tf.math.rsqrt(variance + epsilon)
            normalised = centred * broadcast_channels(inverse_deviation, shape)
            beta_gradient = channel_sum(output_gradient)
            gamma_gradient = channel_sum(output_gradient * normalised)
            input_gradient = broadcast_channels(gamma * inverse_deviation, shape) * (
                output_gradient
                - broadcast_channels(beta_gradient / count, shape)
                - normalised * broadcast_channels(gamma_gradient / count, shape)
            )
            input_gradient += broadcast_channels(mean_gradient / count, shape)
            input_gradient += centred * broadcast_channels(2.0 * variance_gradient / count, shape)
            return input_gradient, gamma_gradient, beta_gradient

        return (outputs, mean, variance), gradient

    return normalise(inputs, gamma, beta)


def conv2d_layer_call(layer, padding, inputs):
    """A Keras Conv2D layer's call (convolution, bias, activation) with `conv2d` and `broadcast_channels`."""
    outputs = conv2d(inputs, layer.kernel, padding)
    if layer.use_bias:
        outputs = outputs + broadcast_channels(layer.bias, tf.shape(outputs))
    return outputs if layer.activation is None else layer.activation(outputs)
