"""Runs any Keras learner model as a pure function of a flat parameter vector theta.

The meta-learner treats the learner's trainable weights as one vector (its cell state). This module owns the
correspondence: theta is `learner.trainable_variables`, each flattened, concatenated in that order, and the
learner is evaluated in a `keras.StatelessScope`, so its own variables are never read for the forward pass nor
written (its batch-normalisation moving statistics included). Non-trainable state (batch-norm moving
statistics, dropout seeds) is passed in and returned explicitly; a fresh per-episode copy comes from
`initial_state`, with batch-norm statistics reset so nothing leaks from one task into the next.
"""

import contextlib
import functools
import math
import warnings

import keras
import tensorflow as tf

from keras_metalstm import xla_ops
from keras_metalstm.batch_norm_calls import (
    fused_training_call,
    rectified_pool_chains,
    twice_differentiable_moments,
)


def _batchnorm_layers(model):
    """The batch-norm layers whose statistics each episode starts afresh. A frozen one (trainable=False) is left
    out: Keras normalises with its moving statistics even in training, and they are kept, pre-trained ones too.
    `_flatten_layers` is the one walk Keras itself uses to reach every nested layer, subclassed and functional
    alike; `model.layers` stops at the first level of a subclassed model."""
    return [
        layer
        for layer in model._flatten_layers()
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
    ]


def _xla_cpu_forms(model):
    """(layer, attribute, replacement) for every layer of `model` that `xla_ops` has a CPU form of: the `call` of
    stride-1 undilated ungrouped channels-last Conv2D layers with "same" or "valid" padding, and of channels-last
    MaxPooling2D layers over disjoint windows. Subclasses are left alone. (Batch normalisation takes its CPU form in
    `batch_norm_calls.fused_training_call`.)"""
    forms = []
    for layer in model._flatten_layers():
        if (
            type(layer) is keras.layers.Conv2D
            and tuple(layer.strides) == (1, 1)
            and tuple(layer.dilation_rate) == (1, 1)
            and layer.groups == 1
            and layer.data_format == "channels_last"
        ):
            padding = xla_ops.same_padding(layer.kernel_size) if layer.padding == "same" else ((0, 0), (0, 0))
            forms.append((layer, "call", functools.partial(xla_ops.conv2d_layer_call, layer, padding)))
        elif (
            type(layer) is keras.layers.MaxPooling2D
            and layer.data_format == "channels_last"
            and layer.padding == "valid"
            and tuple(layer.strides) == tuple(layer.pool_size)
        ):
            forms.append((layer, "call", functools.partial(xla_ops.max_pool, pool_size=tuple(layer.pool_size))))
    return forms


def _layers_with(learner, kind):
    """Names of the learner's layers with a weight `kind` ("regularizer", "constraint") set: Keras adds a
    regularizer's loss to a model's training loss and applies a constraint after each optimizer step; the
    meta-learner's inner loop does neither."""
    return [
        layer.name
        for layer in learner._flatten_layers(include_self=False)
        if any(name.endswith(kind) and value is not None for name, value in vars(layer).items())
    ]


class LearnerFunction:
    """A Keras learner seen as `logits, state = f(theta, state, images, training)`.

    Args:
        learner: a built keras.Model mapping images to logits.
        bn_momentum: Keras-convention momentum (weight of the OLD value) used for every BatchNormalization
            layer's moving statistics while the meta-learner runs the learner; None keeps each layer's own.
        random_layer_seeds: seed states to set on the learner's random layers (`random_layer_seeds()`), or None.
    """

    def __init__(self, learner, bn_momentum=None, random_layer_seeds=None):
        if not isinstance(learner, keras.Model):
            raise TypeError(
                f"The learner must be a keras.Model mapping images to logits, got {type(learner).__name__}."
            )
        if not learner.built or not learner.trainable_variables:
            raise ValueError(
                "The learner has no trainable weights yet: build it first (give it a keras.Input or call it "
                "once on a batch of images) so the meta-learner knows its parameter vector."
            )
        self.learner = learner
        self.bn_momentum = bn_momentum
        self.shapes = [tuple(variable.shape) for variable in learner.trainable_variables]
        self.sizes = [math.prod(shape) for shape in self.shapes]
        self.num_parameters = sum(self.sizes)
        self._batchnorm = _batchnorm_layers(learner)
        # (layer, attribute, replacement): set on the layers while the learner is traced (`_layer_overrides`).
        self._overrides = [(layer, "_moments", twice_differentiable_moments(layer)) for layer in self._batchnorm]
        training_calls = {
            id(layer): call for layer in self._batchnorm if (call := fused_training_call(layer)) is not None
        }
        self._chains = rectified_pool_chains(learner, training_calls)
        chained = {id(chain.normalization) for chain in self._chains}
        self._overrides += [
            (layer, "call", training_calls[id(layer)])
            for layer in self._batchnorm
            if id(layer) in training_calls and id(layer) not in chained
        ]
        self._xla_cpu_forms = _xla_cpu_forms(learner)
        # The random layers' (Dropout, augmentation) seed states: (seed, counter) pairs, by position in the state.
        self._seed_states = [
            index
            for index, variable in enumerate(learner.non_trainable_variables)
            if variable.path.endswith("seed_generator_state")
        ]
        if random_layer_seeds is not None:
            self._restore_random_layer_seeds(random_layer_seeds)
        self._reset_values = None  # read on first use (`_episode_start_values`)
        ignored = {
            "regularizers": ("are not part of the inner loop's loss, the support set's cross-entropy (the paper's)",
                             _layers_with(learner, "regularizer")),
            "constraints": ("are not applied to the inner loop's updates", _layers_with(learner, "constraint")),
        }
        for kind, (what, layers) in ignored.items():
            if layers:
                warnings.warn(
                    f"keras_metalstm: the {kind} of the learner's layers {', '.join(layers)} {what}; the "
                    "meta-learner's forget gate learns its own shrinkage of the weights. Remove them to silence "
                    "this warning.",
                    RuntimeWarning,
                    stacklevel=1,  # one place for every learner function made of it: Python reports it once
                )

    def random_layer_seeds(self) -> list[list[int]]:
        """The (seed, counter) state of each of the learner's random layers (Dropout, augmentation), in its order.
        Keras draws a layer's seed from Python's `random` when it is built without one, and a `.keras` file does
        not keep it: a meta-learner's config keeps these, so that a loaded one draws the masks it drew before. The
        values every episode starts from (read on first use), whatever the learner itself has drawn since."""
        start = self._episode_start_values()
        return [[int(value) for value in start[index].numpy()] for index in self._seed_states]

    def _restore_random_layer_seeds(self, seeds) -> None:
        if len(seeds) != len(self._seed_states):
            raise ValueError(
                f"learner_seeds holds {len(seeds)} seed states but the learner has {len(self._seed_states)} random "
                "layers (Dropout, augmentation): give the learner the meta-learner was saved with."
            )
        for index, seed in zip(self._seed_states, seeds, strict=True):
            self.learner.non_trainable_variables[index].assign(seed)

    def _episode_start_values(self):
        """Initial non-trainable values: batch-norm statistics at their initialisers, the rest (a frozen layer's
        weights, a Normalization layer's statistics) as they are when first needed, read eagerly outside any traced
        function: keras.saving.load_model makes a meta-learner, and so this function, before it loads the learner's
        weights."""
        if self._reset_values is None:
            resets = {}
            with tf.init_scope():
                for layer in self._batchnorm:
                    for variable, initializer in (
                        (layer.moving_mean, layer.moving_mean_initializer),
                        (layer.moving_variance, layer.moving_variance_initializer),
                    ):
                        resets[id(variable)] = initializer(variable.shape, dtype=variable.dtype)
                self._reset_values = [
                    tf.convert_to_tensor(resets.get(id(variable), variable.value))
                    for variable in self.learner.non_trainable_variables
                ]
        return self._reset_values

    def flatten(self, tensors):
        """Concatenates per-variable tensors (in `trainable_variables` order) into one vector."""
        return tf.concat([tf.reshape(tensor, [-1]) for tensor in tensors], axis=0)

    def unflatten(self, theta):
        """Splits a flat vector back into tensors shaped like the learner's trainable variables."""
        pieces = tf.split(theta, self.sizes)
        return [tf.reshape(piece, shape) for piece, shape in zip(pieces, self.shapes, strict=True)]

    def materialise(self, theta, state):
        """A standalone copy of the learner holding the flat parameter vector `theta` and non-trainable `state`."""
        model = keras.models.clone_model(self.learner)
        for variable, value in zip(model.trainable_variables, self.unflatten(theta), strict=True):
            variable.assign(value)
        for variable, value in zip(model.non_trainable_variables, state, strict=True):
            variable.assign(value)
        refresh_derived_tensors(model)
        return model

    def initial_theta(self):
        """The learner's current weights as a flat vector (theta_0's initial value)."""
        return self.flatten([variable.value for variable in self.learner.trainable_variables])

    def initial_state(self):
        """The non-trainable state every episode starts from (batch-norm statistics reset)."""
        return list(self._episode_start_values())

    def stacked_initial_state(self, episodes, support_images=None):
        """`initial_state` for `episodes` episodes, stacked on a first axis. With the episodes' `support_images`
        each episode's random layers (Dropout, augmentation) draw from a stream of their own, seeded by the
        support set (`episode_seeds`); without, every episode draws the same masks at each inner step."""
        states = [
            tf.tile(value[tf.newaxis], [episodes] + [1] * value.shape.rank) for value in self._episode_start_values()
        ]
        if support_images is not None and self._seed_states:
            seeds = episode_seeds(support_images)
            for index in self._seed_states:
                offset = tf.stack([tf.cast(seeds, states[index].dtype), tf.zeros_like(states[index][:, 1])], axis=1)
                states[index] = states[index] + offset
        return states

    @contextlib.contextmanager
    def _layer_overrides(self, momentum):
        # All are read while the call is traced, so overriding them for the duration of the call changes the
        # traced computation without touching any variable of the user's learner.
        overrides = self._overrides + [override for chain in self._chains for override in chain.overrides()]
        if xla_ops.cpu_forms_active():
            # XLA runs no custom op, so a chain's pooling takes its XLA form instead (one override per attribute).
            replaced = {(id(layer), attribute) for layer, attribute, _ in self._xla_cpu_forms}
            overrides = [override for override in overrides if (id(override[0]), override[1]) not in replaced]
            overrides += self._xla_cpu_forms
        saved_momenta = [layer.momentum for layer in self._batchnorm]
        try:
            if momentum is not None:
                for layer in self._batchnorm:
                    layer.momentum = momentum
            for layer, attribute, replacement in overrides:
                setattr(layer, attribute, replacement)
            yield
        finally:
            for layer, saved_momentum in zip(self._batchnorm, saved_momenta, strict=True):
                layer.momentum = saved_momentum
            for layer, attribute, _ in overrides:
                delattr(layer, attribute)

    def __call__(self, theta, state, images, training, momentum=None):
        """Logits (in theta's dtype) of the learner with parameters `theta` and non-trainable `state` on `images`.

        With training=True batch-norm layers normalise with the batch's statistics and the returned state holds
        their updated moving statistics (momentum: this call's Keras-convention momentum, default the
        function's `bn_momentum`); with training=False they normalise with the moving statistics in `state`.
        """
        # Like `stateless_call`, but through `__call__`, which hands `training` to every nested layer even when
        # a user's subclassed `call` has no `training` argument of its own.
        variables = self.learner.trainable_variables + self.learner.non_trainable_variables
        mapping = list(zip(variables, self.unflatten(theta) + list(state), strict=True))
        momentum = self.bn_momentum if momentum is None else momentum
        with self._layer_overrides(momentum), keras.StatelessScope(state_mapping=mapping) as scope:
            logits = self.learner(images, training=training)
        # In theta's dtype: a learner under a mixed-precision policy returns bfloat16 or float16 logits, and the
        # losses and the meta-learner work in theta's.
        logits = tf.cast(logits, theta.dtype)
        return logits, [scope.get_current_value(variable) for variable in self.learner.non_trainable_variables]

    def batch_statistics(self, theta, images):
        """The state whose batch-norm statistics are exactly those of `images` under `theta` (biased moments,
        as a training-mode call normalises with), differentiable w.r.t. theta; the rest of the state as
        `initial_state`. Running the learner in inference mode with this state normalises any batch the way
        a training-mode call normalises `images`."""
        _, state = self(theta, self.initial_state(), images, training=True, momentum=0.0)
        return state

    def loss_and_accuracy(self, theta, images, labels):
        """Mean cross-entropy and accuracy on (images, labels) with parameters `theta`, normalised as the inner
        loop's support passes are (training mode: batch-norm layers use the batch's own statistics)."""
        logits, _ = self(theta, self.initial_state(), images, training=True)
        return cross_entropy(labels, logits), accuracy(labels, logits)

    def loss_and_gradient(self, theta, state, images, labels, divide_by_batch=False):
        """Mean cross-entropy on (images, labels), its gradient w.r.t. theta, and the updated state.

        `divide_by_batch` reproduces the authors' code, which divides the gradient of the mean loss by the
        batch size once more.
        """
        with tf.GradientTape() as tape:
            tape.watch(theta)
            logits, state = self(theta, state, images, training=True)
            loss = cross_entropy(labels, logits)
        gradient = tape.gradient(loss, theta)
        if divide_by_batch:
            gradient = gradient / tf.cast(tf.shape(labels)[-1], gradient.dtype)
        return loss, gradient, state


def episode_seeds(support_images):
    """(B,) int64 seeds of B episodes from their (B, N*K, H, W, C) support images: distinct for distinct support
    sets, the same for the same one (a task adapts reproducibly), with no random state to keep in step across
    replicas or steps. The images' float32 bit patterns are summed, so the sum cannot overflow."""
    bits = tf.bitcast(tf.cast(support_images, tf.float32), tf.int32)
    return tf.reduce_sum(tf.cast(bits, tf.int64), axis=list(range(1, support_images.shape.rank)))


def refresh_derived_tensors(model):
    """Has the layers of `model` that keep tensors computed from their weights (an adapted Normalization layer's
    mean and variance) recompute them, as Keras does when it loads a model: needed after the weights are assigned
    any other way."""
    for layer in model._flatten_layers(include_self=False):
        if layer.built and callable(getattr(layer, "finalize_state", None)):
            layer.finalize_state()


def variable_dtype(dtype=None):
    """The variable dtype of the dtype policy `dtype` (default: Keras' global policy): "float32" for
    "mixed_bfloat16". Models of this package that compute in it keep full precision under a mixed policy."""
    return keras.dtype_policies.get(dtype or keras.config.dtype_policy()).variable_dtype


def accuracy(labels, logits):
    """Fraction of the examples whose largest logit is their label (over the last axis of `labels`)."""
    correct = tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), tf.cast(labels, tf.int32))
    return tf.reduce_mean(tf.cast(correct, logits.dtype), axis=-1)


def cross_entropy(labels, logits):
    """Mean sparse categorical cross-entropy on logits (over the last axis of `labels`: one value per episode
    for a batch of episodes)."""
    return tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(labels, tf.int32), logits=logits), axis=-1
    )
