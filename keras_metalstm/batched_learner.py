"""Runs a Keras learner on B episodes' parameter vectors at once: one evaluation per layer for all episodes.

`LearnerFunction` evaluates the learner with one parameter vector; the meta-learner maps it over the B episodes
of a meta-batch, one after the other. `BatchedLearnerFunction` evaluates each layer once for all B episodes,
each with its own parameters and batch-norm state, which is what lets a GPU or TPU run the episodes of a
meta-batch side by side:

- activations are episode-major, (B, N, ...) for N examples per episode;
- Conv2D runs as one grouped convolution: the episodes stacked along the channels, (N, H, W, B*C), convolved
  with the episodes' filters stacked along the output channels, (kh, kw, C, B*F), in B groups;
  DepthwiseConv2D as one depthwise convolution of the same stacked channels, which keeps every channel apart
  already; SeparableConv2D as that, then a batched matrix product for its pointwise part;
- Dense is a batched matrix product; PReLU takes each episode's slopes; BatchNormalization takes each
  episode's batch moments and moving statistics (in training mode on TensorFlow's fused op, the episodes side by
  side along the channels);
  GroupNormalization and LayerNormalization (over the channels) normalise every example as the layer does and
  apply each episode's scale and offset;
- layers without weights that act on each example alone (activations, pooling, flatten, reshape, padding,
  resizing, merges such as Add or Concatenate) run on the B*N examples as one batch.

Functional and Sequential models (nested ones included) of these layers are supported; `unsupported_layers`
names anything else, and the meta-learner then maps the per-episode function instead. TensorFlow has no CPU
gradient of grouped convolutions outside XLA, so on a CPU-only machine a convolutional learner is batched only
in XLA-compiled functions.
"""

import keras
import tensorflow as tf

from keras_metalstm.fused_batch_norm import batch_normalization_training
from keras_metalstm.learner_function import LearnerFunction
from keras_metalstm.xla_ops import accelerator_present, in_xla_context, transpose

NORMALISATIONS_OF_EACH_EXAMPLE = (keras.layers.GroupNormalization, keras.layers.LayerNormalization)
# Layers without weights whose output for an example depends on that example alone.
EXAMPLE_WISE = (
    keras.layers.Activation,
    keras.layers.ReLU,
    keras.layers.LeakyReLU,
    keras.layers.ELU,
    keras.layers.Softmax,
    keras.layers.MaxPooling1D,
    keras.layers.MaxPooling2D,
    keras.layers.MaxPooling3D,
    keras.layers.AveragePooling1D,
    keras.layers.AveragePooling2D,
    keras.layers.AveragePooling3D,
    keras.layers.GlobalAveragePooling1D,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalAveragePooling3D,
    keras.layers.GlobalMaxPooling1D,
    keras.layers.GlobalMaxPooling2D,
    keras.layers.GlobalMaxPooling3D,
    keras.layers.Flatten,
    keras.layers.Reshape,
    keras.layers.Permute,
    keras.layers.RepeatVector,
    keras.layers.ZeroPadding1D,
    keras.layers.ZeroPadding2D,
    keras.layers.ZeroPadding3D,
    keras.layers.Cropping1D,
    keras.layers.Cropping2D,
    keras.layers.Cropping3D,
    keras.layers.UpSampling1D,
    keras.layers.UpSampling2D,
    keras.layers.UpSampling3D,
    keras.layers.Resizing,
    keras.layers.CenterCrop,
    keras.layers.Rescaling,
    keras.layers.UnitNormalization,
    keras.layers.Identity,
    keras.layers.Add,
    keras.layers.Subtract,
    keras.layers.Multiply,
    keras.layers.Average,
    keras.layers.Maximum,
    keras.layers.Minimum,
    keras.layers.Concatenate,
)


def unsupported_layers(model):
    """Why `model` cannot be batched: a list of "path: reason" strings, empty when it can."""
    if not isinstance(model, keras.Model) or not is_graph_model(model):
        return [f"{model.name}: a subclassed model (only functional and Sequential models have a layer graph)"]
    problems = []
    for layer in graph_layers(model):
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, keras.Model):
            problems.extend(unsupported_layers(layer))
            continue
        reason = _unsupported_reason(layer)
        if reason:
            # A layer never built, or an operation, has no path.
            problems.append(f"{getattr(layer, 'path', None) or layer.name}: {reason}")
    return problems


def is_graph_model(model):
    """Whether `model` is a Sequential or functional model: one whose layer graph Keras knows."""
    return isinstance(model, keras.Sequential) or hasattr(model, "_run_through_graph")


def graph_layers(model):
    """The layers (and Keras operations) of a graph model, in order."""
    if isinstance(model, keras.Sequential):
        return model.layers
    return model.operations


def _input_rank(layer):
    shape = getattr(layer, "_build_shapes_dict", {}).get("input_shape")
    return None if shape is None else len(shape)


def _channels_last(axis, rank):
    axes = list(axis) if isinstance(axis, (list, tuple)) else [axis]
    return axes in ([-1], [rank - 1] if rank else [-1])


def _unsupported_reason(layer):
    if not isinstance(layer, keras.layers.Layer):  # a Keras operation on layer outputs, e.g. `x + y`, ops.mean
        return f"the Keras operation {type(layer).__name__} is not batched, layers are (keras.layers.Add for x + y)"
    if layer.compute_dtype != layer.variable_dtype:
        return f"mixed precision ({layer.dtype_policy.name})"
    if type(layer) in (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D):
        if layer.data_format != "channels_last":
            return "channels_first data format"
        if getattr(layer, "groups", 1) != 1:
            return "grouped convolution"
        return None
    if type(layer) is keras.layers.PReLU:
        return None
    if type(layer) is keras.layers.Dense:
        return "LoRA or quantised weights" if layer.lora_enabled or layer.quantization_mode else None
    if type(layer) is keras.layers.BatchNormalization:
        if layer.renorm or layer.synchronized:
            return "batch renormalisation or synchronised statistics"
        return None if _channels_last(layer.axis, _input_rank(layer)) else "normalises an axis other than the last"
    if type(layer) in NORMALISATIONS_OF_EACH_EXAMPLE:
        if getattr(layer, "rms_scaling", False):
            return "rms_scaling"
        return None if _channels_last(layer.axis, _input_rank(layer)) else "normalises an axis other than the last"
    if type(layer) in EXAMPLE_WISE:
        return None if not layer.weights else "has weights"
    return f"{type(layer).__name__} layers are not batched"


def batched_with_grouped_convolutions(learner) -> bool:
    """Whether batching `learner` over episodes convolves with grouped convolutions (its Conv2D layers), whose
    gradient TensorFlow computes only on a GPU or TPU, or in XLA."""
    return any(type(layer) is keras.layers.Conv2D for layer in learner._flatten_layers(include_self=False))


class BatchedLearnerFunction(LearnerFunction):
    """A Keras learner seen as `logits, states = f(theta, states, images, training)` for B episodes at once.

    theta is (B, num_parameters), each state tensor and the logits carry the episodes on their first axis, and
    images are (B, N, ...). Episode b's results equal those of `LearnerFunction` with theta[b], its state and
    images[b]; so do `loss_and_gradient` (losses (B,), gradients (B, num_parameters)) and `batch_statistics`.

    Raises:
        ValueError: the learner has layers that cannot be batched (`unsupported_layers` says which).
    """

    def __init__(self, learner, bn_momentum=None):
        super().__init__(learner, bn_momentum=bn_momentum)
        problems = unsupported_layers(learner)
        if problems:
            raise ValueError("This learner cannot be evaluated for a batch of episodes at once: " + "; ".join(problems))
        self._has_convolutions = batched_with_grouped_convolutions(learner)

    def differentiable_here(self):
        """Whether the function being traced can differentiate this learner: not a convolutional one on a CPU-only
        machine outside XLA (TensorFlow has no CPU gradient of grouped convolutions)."""
        return not self._has_convolutions or accelerator_present() or in_xla_context()

    def check_differentiable(self):
        """Raises ValueError where `differentiable_here` is False."""
        if not self.differentiable_here():
            raise ValueError(
                "A convolutional learner is batched over episodes with grouped convolutions, which TensorFlow "
                "cannot differentiate on a CPU outside XLA: compile the step with XLA (jit_compile=True, "
                "metalstm train --xla), run on a GPU/TPU, or use episode_batching='per_episode' (or 'auto')."
            )

    def loss_and_gradient(self, theta, state, images, labels, divide_by_batch=False):
        self.check_differentiable()
        return super().loss_and_gradient(theta, state, images, labels, divide_by_batch=divide_by_batch)

    def __call__(self, theta, state, images, training, momentum=None):
        episodes = theta.shape[0]
        pieces = tf.split(theta, self.sizes, axis=1)
        values = {
            id(variable): tf.reshape(piece, (episodes, *shape))
            for variable, piece, shape in zip(self.learner.trainable_variables, pieces, self.shapes, strict=True)
        }
        values.update(
            {id(variable): value for variable, value in zip(self.learner.non_trainable_variables, state, strict=True)}
        )
        momentum = self.bn_momentum if momentum is None else momentum
        run = _Run(values, episodes, training, momentum)
        logits = tf.cast(run.model(self.learner, images), theta.dtype)  # as LearnerFunction's
        new_state = [values[id(variable)] for variable in self.learner.non_trainable_variables]
        return logits, new_state

    def batch_statistics(self, theta, images):
        _, state = self(theta, self.stacked_initial_state(theta.shape[0]), images, training=True, momentum=0.0)
        return state


class _Run:
    """One batched evaluation: the episodes' variable values (updated in place for moving statistics), the
    number of episodes, the training flag and the batch-norm momentum override."""

    def __init__(self, values, episodes, training, momentum):
        self.values = values
        self.episodes = episodes
        self.training = training
        self.momentum = momentum

    def value(self, variable, dtype):
        return tf.cast(self.values[id(variable)], dtype)

    def model(self, model, inputs):
        if isinstance(model, keras.Sequential) and model._functional is None:
            for layer in model.layers:
                inputs = self.layer(layer, inputs)
            return inputs
        graph = model._functional if isinstance(model, keras.Sequential) else model
        return graph._run_through_graph(inputs, operation_fn=lambda layer: lambda *args, **_: self.layer(layer, *args))

    def layer(self, layer, inputs):
        if isinstance(layer, keras.Model):
            return self.model(layer, inputs)
        if type(layer) is keras.layers.Conv2D:
            return self.conv2d(layer, inputs)
        if type(layer) is keras.layers.DepthwiseConv2D:
            return self.depthwise_conv2d(layer, inputs)
        if type(layer) is keras.layers.SeparableConv2D:
            return self.separable_conv2d(layer, inputs)
        if type(layer) is keras.layers.Dense:
            return self.dense(layer, inputs)
        if type(layer) is keras.layers.PReLU:
            return self.prelu(layer, inputs)
        if type(layer) is keras.layers.BatchNormalization:
            return self.batch_normalization(layer, inputs)
        if type(layer) in NORMALISATIONS_OF_EACH_EXAMPLE:
            return self.normalisation_of_each_example(layer, inputs)
        return self.example_wise(layer, inputs)

    def _examples(self, tensor):
        """(B, N, ...) -> (B*N, ...)."""
        return tf.reshape(tensor, [-1, *tensor.shape[2:]])

    def _episodes(self, tensor):
        """(B*N, ...) -> (B, N, ...)."""
        return tf.reshape(tensor, [self.episodes, -1, *tensor.shape[1:]])

    def example_wise(self, layer, inputs):
        merged = [self._examples(tensor) for tensor in inputs] if isinstance(inputs, list) else self._examples(inputs)
        return self._episodes(layer(merged))

    def _stacked_channels(self, inputs):
        """(B, N, H, W, C) -> (N, H, W, B*C): the episodes side by side along the channels."""
        episodes, examples, height, width, channels = inputs.shape
        return tf.reshape(transpose(inputs, [1, 2, 3, 0, 4]), [examples, height, width, episodes * channels])

    def _unstacked_channels(self, outputs):
        """(N, H, W, B*K) -> (B, N, H, W, K): the inverse of `_stacked_channels`."""
        examples, height, width, stacked = outputs.shape
        unstacked = tf.reshape(outputs, [examples, height, width, self.episodes, stacked // self.episodes])
        return transpose(unstacked, [3, 0, 1, 2, 4])

    def conv2d(self, layer, inputs):
        dtype = layer.compute_dtype
        kernel = self.value(layer.kernel, dtype)  # (B, kh, kw, C, F)
        kernel_height, kernel_width, channels, filters = kernel.shape[1:]
        # The filters stacked along the output channels: B groups, each episode's channels against its filters.
        stacked_filters = tf.reshape(
            transpose(kernel, [1, 2, 3, 0, 4]), [kernel_height, kernel_width, channels, self.episodes * filters]
        )
        outputs = tf.nn.convolution(
            self._stacked_channels(tf.cast(inputs, dtype)),
            stacked_filters,
            strides=layer.strides,
            padding=layer.padding.upper(),
            dilations=layer.dilation_rate,
        )
        return self._bias_and_activation(layer, self._unstacked_channels(outputs))

    def _depthwise(self, layer, inputs, kernel):
        """(B, N, H, W, C) inputs convolved channel by channel with each episode's (B, kh, kw, C, M) kernel."""
        kernel_height, kernel_width, channels, multiplier = kernel.shape[1:]
        # A depthwise convolution keeps channels apart, so with the episodes stacked along the channels each
        # episode's channels meet only its own filters, and output channel (b*C + c)*M + m is episode b's.
        stacked_filters = tf.reshape(
            transpose(kernel, [1, 2, 0, 3, 4]), [kernel_height, kernel_width, self.episodes * channels, multiplier]
        )
        outputs = keras.ops.depthwise_conv(
            self._stacked_channels(inputs),
            stacked_filters,
            strides=layer.strides,
            padding=layer.padding,
            dilation_rate=layer.dilation_rate,
        )
        return self._unstacked_channels(outputs)

    def _bias_and_activation(self, layer, outputs):
        if layer.use_bias:
            outputs = outputs + self._per_channel(self.value(layer.bias, outputs.dtype), outputs.shape.rank)
        return layer.activation(outputs)

    def depthwise_conv2d(self, layer, inputs):
        dtype = layer.compute_dtype
        outputs = self._depthwise(layer, tf.cast(inputs, dtype), self.value(layer.kernel, dtype))
        return self._bias_and_activation(layer, outputs)

    def separable_conv2d(self, layer, inputs):
        dtype = layer.compute_dtype
        depthwise = self._depthwise(layer, tf.cast(inputs, dtype), self.value(layer.depthwise_kernel, dtype))
        pointwise = self.value(layer.pointwise_kernel, dtype)  # (B, 1, 1, C*M, F)
        pointwise = tf.reshape(pointwise, [self.episodes, *pointwise.shape[-2:]])
        flat = tf.reshape(depthwise, [self.episodes, -1, depthwise.shape[-1]])
        outputs = tf.reshape(tf.matmul(flat, pointwise), [*depthwise.shape[:-1], pointwise.shape[-1]])
        return self._bias_and_activation(layer, outputs)

    def prelu(self, layer, inputs):
        # As Keras' PReLU: x where positive, alpha * x where negative, with each episode's alpha.
        alpha = self.value(layer.alpha, inputs.dtype)  # (B, *example shape, with shared axes 1)
        alpha = tf.reshape(alpha, [self.episodes, 1, *alpha.shape[1:]])
        return tf.nn.relu(inputs) - alpha * tf.nn.relu(-inputs)

    def dense(self, layer, inputs):
        dtype = layer.compute_dtype
        kernel = self.value(layer.kernel, dtype)  # (B, D, K)
        # A batched matmul over (B, examples, D), not an einsum: the second derivative of an einsum in a compiled
        # loop asks XLA for a shape it only knows at run time.
        flat = tf.reshape(tf.cast(inputs, dtype), [self.episodes, -1, inputs.shape[-1]])
        outputs = tf.reshape(tf.matmul(flat, kernel), [self.episodes, *inputs.shape[1:-1], kernel.shape[-1]])
        return self._bias_and_activation(layer, outputs)

    def _per_channel(self, vector, rank):
        """(B, C) -> (B, 1, ..., 1, C), broadcastable against (B, N, ..., C) of `rank`."""
        return tf.reshape(vector, [self.episodes] + [1] * (rank - 2) + [vector.shape[-1]])

    def batch_normalization(self, layer, inputs):
        # As keras.layers.BatchNormalization (channels last), the moments of each episode's batch; a frozen layer
        # (trainable=False) normalises with its moving statistics even in training, as Keras does.
        compute_dtype = tf.as_dtype(keras.backend.result_type(inputs.dtype, "float32"))
        inputs = tf.cast(inputs, compute_dtype)
        if not (self.training and layer.trainable):
            mean, variance = (self.value(moving, compute_dtype) for moving in (layer.moving_mean, layer.moving_variance))
            return tf.cast(self._normalise(layer, inputs, mean, variance), layer.compute_dtype)
        if compute_dtype == tf.float32:
            outputs, mean, variance = self._fused_batch_normalization(layer, inputs)
        else:
            axes = list(range(1, inputs.shape.rank - 1))
            mean = tf.reduce_mean(inputs, axis=axes)
            centred = inputs - self._per_channel(mean, inputs.shape.rank)
            # No stop_gradient on the mean (tf.nn.moments has one): second derivatives exact, as LearnerFunction.
            variance = tf.reduce_mean(tf.square(centred), axis=axes)
            outputs = self._normalise(layer, inputs, mean, variance)
        momentum = layer.momentum if self.momentum is None else self.momentum
        for moving, batch_value in ((layer.moving_mean, mean), (layer.moving_variance, variance)):
            self.values[id(moving)] = self.value(moving, compute_dtype) * momentum + batch_value * (1.0 - momentum)
        return tf.cast(outputs, layer.compute_dtype)

    def _normalise(self, layer, inputs, mean, variance):
        """(B, N, ..., C) inputs normalised with each episode's (B, C) mean and variance, then scaled and shifted."""
        rank, dtype = inputs.shape.rank, inputs.dtype
        return tf.nn.batch_normalization(
            inputs,
            self._per_channel(mean, rank),
            self._per_channel(variance, rank),
            offset=self._per_channel(self.value(layer.beta, dtype), rank) if layer.center else None,
            scale=self._per_channel(self.value(layer.gamma, dtype), rank) if layer.scale else None,
            variance_epsilon=layer.epsilon,
        )

    def _fused_batch_normalization(self, layer, inputs):
        """Training-mode batch norm of float32 (B, N, ..., C) inputs on TensorFlow's fused ops, with the episodes
        side by side along the channels, (N, ..., B*C), so that the op's per-channel moments are each episode's.
        Returns the outputs and each episode's batch mean and biased variance, (B, C)."""
        rank = inputs.shape.rank
        episodes, channels = self.episodes, inputs.shape[-1]
        stacked = transpose(inputs, [*range(1, rank - 1), 0, rank - 1])  # (N, ..., B, C)
        stacked_shape = stacked.shape
        gamma = self.value(layer.gamma, tf.float32) if layer.scale else tf.ones((episodes, channels))
        beta = self.value(layer.beta, tf.float32) if layer.center else tf.zeros((episodes, channels))
        outputs, mean, variance = batch_normalization_training(
            tf.reshape(stacked, [*stacked_shape[:-2], episodes * channels]),
            tf.reshape(gamma, [-1]),
            tf.reshape(beta, [-1]),
            layer.epsilon,
        )
        outputs = transpose(tf.reshape(outputs, stacked_shape), [rank - 2, *range(rank - 2), rank - 1])
        return outputs, tf.reshape(mean, [episodes, channels]), tf.reshape(variance, [episodes, channels])

    def normalisation_of_each_example(self, layer, inputs):
        # Each example is normalised on its own: the layer itself does that for all B*N examples with unit scale
        # and zero offset, then each episode's scale and offset apply.
        identity = []
        if layer.scale:
            identity.append((layer.gamma, tf.ones(layer.gamma.shape, layer.gamma.dtype)))
        if layer.center:
            identity.append((layer.beta, tf.zeros(layer.beta.shape, layer.beta.dtype)))
        with keras.StatelessScope(state_mapping=identity):
            outputs = self._episodes(layer(self._examples(inputs)))
        rank = outputs.shape.rank
        if layer.scale:
            outputs = outputs * self._per_channel(self.value(layer.gamma, outputs.dtype), rank)
        if layer.center:
            outputs = outputs + self._per_channel(self.value(layer.beta, outputs.dtype), rank)
        return outputs

