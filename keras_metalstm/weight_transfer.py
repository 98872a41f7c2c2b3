"""Weights of a trained model mapped onto a learner of the same architecture: where theta_0 starts when a run
begins from a pre-trained classifier, whose output layer may have another number of classes."""

import keras
import numpy as np

from keras_metalstm.learner_architecture import frozen_weights


def weights_for_learner(learner, source):
    """The values of `learner`'s trainable weights taken from `source`, matched by position, and the paths of the
    learner weights that start at zero instead.

    Only the output layer's weights may differ in shape (many classes vs N): they start at zero, a new N-way layer
    as in the fine-tune baseline. Anything else that differs is a ValueError naming the weight.
    """
    learner_variables = learner.trainable_variables
    source_variables = source.trainable_variables
    if len(source_variables) != len(learner_variables):
        raise ValueError(
            f"Cannot initialise theta_0 from {source.name!r}: it has {len(source_variables)} trainable "
            f"weights, the learner {len(learner_variables)}. Use a model of the learner's architecture "
            "(only the output layer's size may differ)."
        )
    output_weights = {id(variable) for variable in output_layer_weights(learner)}
    values, zeroed = [], []
    for mine, theirs in zip(learner_variables, source_variables, strict=True):
        if tuple(mine.shape) == tuple(theirs.shape):
            values.append(theirs.value)
        elif id(mine) in output_weights:
            values.append(keras.ops.zeros(mine.shape, mine.dtype))
            zeroed.append(mine.path)
        else:
            raise ValueError(
                f"Cannot initialise theta_0 from {source.name!r}: its weight {theirs.path!r} has shape "
                f"{tuple(theirs.shape)}, the learner's {mine.path!r} {tuple(mine.shape)}. Only the output "
                "layer may differ: use a model of the learner's architecture."
            )
    changed = [
        mine.path
        for mine, theirs in zip(frozen_weights(learner), frozen_weights(source), strict=False)
        if tuple(mine.shape) == tuple(theirs.shape) and not np.array_equal(np.asarray(mine.value), theirs.value)
    ]
    if changed:
        raise ValueError(
            f"Cannot initialise theta_0 from {source.name!r}: its frozen weights differ from the learner's "
            f"({', '.join(changed[:3])}), and theta_0 holds the trainable ones only. Give the learner those weights "
            "before making the meta-learner (learner.get_layer(name).set_weights(...)), or make them trainable."
        )
    return values, zeroed


def output_layer_weights(model):
    """The trainable weights of the layer that owns the model's last trainable weight (its output layer)."""
    last = model.trainable_variables[-1]
    for layer in reversed(model._flatten_layers(include_self=False)):
        if any(variable is last for variable in layer.trainable_variables):
            return layer.trainable_variables
    return [last]
