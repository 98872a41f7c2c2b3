"""The network every baseline starts from: the learner's architecture (conv4, or the user's model, with one output per
meta-train class) trained as an ordinary classifier on all images of all meta-train classes (`pretrain_classifier`:
Adam, cross-entropy, a fixed number of epochs, seeded), and its penultimate features (the input of its output layer,
which must be a Dense layer with a bias and no activation) as a pure function of weights and images
(`PretrainedFeatures`). Also the source of theta_0 for meta-training runs that start from that classifier."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PretrainConfig:
    epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 1e-3
    seed: int = 0


def pretrain_classifier(
    train_dataset, learner, config: PretrainConfig | None = None, verbose=0, on_epoch=None, should_stop=None
):
    """A freshly initialised model of `learner`'s architecture, with one output per meta-train class, trained as a
    classifier on every meta-train image; returns (model, final training accuracy). `on_epoch(epoch, accuracy)`
    is called after every epoch (from 1). When `should_stop()` turns true (a stop signal), training ends after the
    current batch and StopRequested is raised: a half-trained classifier is not returned."""
    import keras
    import tensorflow as tf

    from keras_metalstm.learner_spec import fresh_copy

    config = config or PretrainConfig()
    keras.utils.set_random_seed(int(config.seed))
    labels = np.repeat(np.arange(train_dataset.num_classes, dtype=np.int32), train_dataset.class_sizes)
    model = fresh_copy(learner, num_classes=train_dataset.num_classes)
    data = (
        tf.data.Dataset.from_tensor_slices((train_dataset.images, labels))
        .shuffle(len(labels), seed=int(config.seed), reshuffle_each_iteration=True)
        .batch(int(config.batch_size))
        .map(lambda x, y: (tf.cast(x, tf.float32) * (1.0 / 255.0), y))  # as the episode pipeline scales
        .prefetch(2)
    )
    model.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    # shuffle=False: the data set shuffles itself (Keras would warn that it ignores the flag).
    stopped = should_stop or (lambda: False)
    callbacks = [_stop_when(stopped)]
    if on_epoch is not None:  # not for an epoch a stop cut short
        callbacks.append(
            keras.callbacks.LambdaCallback(
                on_epoch_end=lambda epoch, logs: None if stopped() else on_epoch(epoch + 1, logs["accuracy"])
            )
        )
    history = model.fit(data, epochs=int(config.epochs), verbose=verbose, shuffle=False, callbacks=callbacks)
    if stopped():
        from keras_metalstm.stop_signals import StopRequested

        raise StopRequested("pre-training stopped by a signal")
    return model, float(history.history["accuracy"][-1])


def _stop_when(should_stop):
    """A Keras callback ending `fit` after the batch at which `should_stop()` turns true."""
    import keras

    class StopWhen(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if should_stop():
                self.model.stop_training = True

    return StopWhen()


def output_layer(model):
    """The layer whose output is the model's output (a functional or Sequential model)."""
    return model.outputs[0]._keras_history.operation


def feature_model(pretrained):
    """The pre-trained network up to its penultimate features (the input of its output layer)."""
    import keras

    return keras.Model(pretrained.inputs, output_layer(pretrained).input, name="features")


def check_output_layer(pretrained) -> None:
    """LearnerError unless the network (a functional or Sequential model) ends in a Dense layer with a bias and no
    activation (the layer the fine-tunes replace)."""
    import keras

    if not getattr(pretrained, "outputs", None):
        ends = f"is a subclassed {type(pretrained).__name__}, whose output layer cannot be found and replaced"
    else:
        head = output_layer(pretrained)
        ends = f"ends in {type(head).__name__} {head.name!r}"
        if isinstance(head, keras.layers.Dense):
            if head.activation.__name__ == "linear" and head.use_bias:
                return
            ends += " without a bias" if head.activation.__name__ == "linear" else f" with {head.activation.__name__}"
    from keras_metalstm.learner_spec import LearnerError

    raise LearnerError(
        f"the baselines replace the learner's output layer by a new N-way Dense layer with a bias and no activation "
        f"(in a functional or Sequential model); this learner {ends}"
    )


class PretrainedFeatures:
    """The pre-trained network's penultimate features as a pure function of (weights, state, images)."""

    def __init__(self, pretrained, batchnorm_momentum: float | None = None):
        """`batchnorm_momentum` (Keras' convention) replaces the momentum of every batch-norm layer in training-
        mode calls: the authors' Torch network averaged its running statistics at its own rate."""
        import keras
        import tensorflow as tf

        check_output_layer(pretrained)
        model = feature_model(pretrained)
        self.body = [tf.convert_to_tensor(v.value) for v in model.trainable_variables]
        self.state = [tf.convert_to_tensor(v.value) for v in model.non_trainable_variables]
        if batchnorm_momentum is not None:
            # A copy of the structure, nested models included (the weights are passed to every call), whose
            # batch-norm layers average at the given rate; the pre-trained network's own layers are left as they are.
            model = keras.models.clone_model(model, recursive=True)
            for layer in model._flatten_layers():
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.momentum = float(batchnorm_momentum)
        self.model = model
        self.dim = int(model.output.shape[-1])

    def __call__(self, images, body=None, state=None, training=False):
        """(features, new state): `training=True` runs batch norm on the batch's statistics and moves the
        running averages."""
        body = self.body if body is None else body
        state = self.state if state is None else state
        return self.model.stateless_call(body, state, images, training=training)
