"""How the meta-learner runs a learner's BatchNormalization layers in training mode (the calls `LearnerFunction`
sets on them while it traces the learner).

- `twice_differentiable_moments`: Keras' moments with a variance whose derivatives are exact at every order;
- `fused_training_call`: the normalisation as TensorFlow's fused ops (or their XLA CPU form), a fraction of the
  passes over the activations of Keras' chain of ops;
- `rectified_pool_chains`: a normalisation followed by a ReLU and a 2x2 max pooling as one fused CPU kernel
  (keras_metalstm/ops/norm_relu_pool_kernel.cc) where it can run.
"""

import threading

import keras
import tensorflow as tf

from keras_metalstm import xla_ops
from keras_metalstm.fused_batch_norm import (
    batch_normalization_relu_max_pool_training,
    batch_normalization_training,
)
from keras_metalstm.ops import fused_kernels


def twice_differentiable_moments(layer):
    """`layer._moments` with a variance whose derivatives are exact at every order.

    keras.ops.moments is tf.nn.moments on TensorFlow, which centres the variance on stop_gradient(mean): exact
    first derivatives, but the second derivatives that the second-order meta-gradient takes through every
    support pass miss a term. Masked and synchronised statistics keep Keras' own code.
    """
    keras_moments = layer._moments

    def moments(inputs, mask):
        if mask is not None or layer.synchronized:
            return keras_moments(inputs, mask)
        axes = layer._reduction_axes
        centred = inputs - keras.ops.mean(inputs, axis=axes, keepdims=True)
        return keras.ops.mean(inputs, axis=axes), keras.ops.mean(keras.ops.square(centred), axis=axes)

    return moments


def fused_training_call(layer):
    """`layer.call` with a training-mode normalisation of float32 channels-last inputs as TensorFlow's fused op
    (`batch_normalization_training`: first and second derivatives exact, like the moments above, in a fraction of
    the passes over the activations), or inside `xla_ops.cpu_forms()` as its XLA CPU form; every other case
    (inference mode, masks, renormalisation, synchronised statistics, float64) runs Keras' own call. None for a
    subclass with a `call` of its own, which is left alone."""
    if type(layer).call is not keras.layers.BatchNormalization.call or layer.renorm or layer.synchronized:
        return None
    keras_call = layer.call

    def call(inputs, training=None, mask=None):
        inputs = tf.convert_to_tensor(inputs)
        compute_dtype = keras.backend.result_type(inputs.dtype, "float32")
        fused = (
            training
            and layer.trainable
            and mask is None
            and compute_dtype == "float32"
            and layer.axis in (-1, inputs.shape.rank - 1)
        )
        if not fused:
            return keras_call(inputs, training=training, mask=mask)
        normalise = batch_normalization_training
        if xla_ops.cpu_forms_active():
            normalise = xla_ops.batch_normalization_training
        gamma, beta = _scale_and_offset(layer, inputs.shape[-1])
        outputs, mean, variance = normalise(tf.cast(inputs, "float32"), gamma, beta, layer.epsilon)
        _update_moving_statistics(layer, mean, variance)
        return tf.cast(outputs, layer.compute_dtype)

    return call


def _scale_and_offset(layer, channels):
    """A BatchNormalization layer's gamma and beta as float32, ones and zeros where it has none."""
    gamma = layer.gamma if layer.scale else tf.ones((channels,))
    beta = layer.beta if layer.center else tf.zeros((channels,))
    return tf.cast(gamma, "float32"), tf.cast(beta, "float32")


def _update_moving_statistics(layer, mean, variance):
    for moving, batch_value in ((layer.moving_mean, mean), (layer.moving_variance, variance)):
        moving.assign(tf.cast(moving, "float32") * layer.momentum + batch_value * (1.0 - layer.momentum))


def _is_relu(layer):
    if type(layer) is keras.layers.ReLU:
        return layer.max_value is None and layer.negative_slope == 0 and layer.threshold == 0
    return type(layer) is keras.layers.Activation and layer.activation is keras.activations.relu


def _is_disjoint_2x2_max_pooling(layer):
    return (
        type(layer) is keras.layers.MaxPooling2D
        and tuple(layer.pool_size) == (2, 2)
        and tuple(layer.strides) == (2, 2)
        and layer.padding == "valid"
        and layer.data_format == "channels_last"
    )


def _only_consumer(layer):
    """The one layer that takes `layer`'s output, if `layer` is called once and its output goes nowhere else (no
    other layer, no model output); else None."""
    if len(layer._inbound_nodes) != 1 or len(layer._outbound_nodes) != 1:
        return None
    consumer = layer._outbound_nodes[0].operation
    return consumer if len(consumer._inbound_nodes) == 1 else None


def _model_outputs(model):
    """The ids of the output tensors of `model` and of every model nested in it."""
    return {
        id(tensor)
        for graph in model._flatten_layers()
        if isinstance(graph, keras.Model)
        for tensor in tf.nest.flatten(getattr(graph, "outputs", None) or [])
    }


def rectified_pool_chains(model, normalization_calls):
    """A `RectifiedPoolChain` for every BatchNormalization layer of `model` (with its training call in
    `normalization_calls`, by layer id) whose output goes only to a ReLU whose output goes only to a 2x2 max
    pooling, none of them a model's output."""
    outputs = _model_outputs(model)
    chains = []
    for normalization in model._flatten_layers(include_self=False):
        if id(normalization) not in normalization_calls:
            continue
        activation = _only_consumer(normalization)
        if activation is None or not _is_relu(activation):
            continue
        pooling = _only_consumer(activation)
        if pooling is None or not _is_disjoint_2x2_max_pooling(pooling):
            continue
        if {id(normalization.output), id(activation.output)} & outputs:
            continue
        chains.append(RectifiedPoolChain(normalization, activation, pooling, normalization_calls[id(normalization)]))
    return chains


class RectifiedPoolChain:
    """A batch normalisation, its ReLU and its 2x2 max pooling, run as one fused CPU op where it can
    (`fused_kernels.norm_relu_pool`: float32 within `fused_kernels.enabled()`, a training-mode call of a trainable
    layer on NHWC inputs with a multiple of 8 channels). Keras calls the three layers one after the other, and only
    the normalisation's call sees whether the op applies: it then hands its inputs on unchanged and notes the op,
    the ReLU hands them on too, and the pooling computes all three. Otherwise each layer runs its own call (the
    normalisation the `training_call` it would have without the chain)."""

    def __init__(self, normalization, activation, pooling, training_call):
        self.normalization, self.activation, self.pooling = normalization, activation, pooling
        self._training_call = training_call
        # The kernel ops, from the normalisation's call to the pooling's; per thread, as `fused_kernels.enabled()`
        # (MirroredStrategy traces each replica in its own thread).
        self._pending = threading.local()

    @property
    def _kernel_ops(self):
        return getattr(self._pending, "kernel_ops", None)

    @_kernel_ops.setter
    def _kernel_ops(self, kernel_ops):
        self._pending.kernel_ops = kernel_ops

    def overrides(self):
        """(layer, attribute, replacement) for `LearnerFunction._layer_overrides`."""
        self._kernel_ops = None
        return [
            (self.normalization, "call", self._normalization_call),
            (self.activation, "call", self._activation_call),
            (self.pooling, "call", self._pooling_call),
        ]

    def _normalization_call(self, inputs, training=None, mask=None):
        inputs = tf.convert_to_tensor(inputs)
        layer = self.normalization
        self._kernel_ops = fused_kernels.norm_relu_pool(inputs.dtype)
        applies = (
            training
            and layer.trainable
            and mask is None
            and inputs.shape.rank == 4
            and layer.axis in (-1, 3)
            and inputs.shape[-1] % 8 == 0
            and None not in inputs.shape
        )
        if self._kernel_ops is None or not applies:
            self._kernel_ops = None
            return self._training_call(inputs, training=training, mask=mask)
        return inputs

    def _activation_call(self, inputs):
        if self._kernel_ops is None:
            return type(self.activation).call(self.activation, inputs)
        return inputs

    def _pooling_call(self, inputs):
        if self._kernel_ops is None:
            return type(self.pooling).call(self.pooling, inputs)
        kernel_ops, self._kernel_ops = self._kernel_ops, None
        layer = self.normalization
        outputs, mean, variance = batch_normalization_relu_max_pool_training(
            inputs, *_scale_and_offset(layer, inputs.shape[-1]), layer.epsilon, kernel_ops
        )
        _update_moving_statistics(layer, mean, variance)
        return outputs
