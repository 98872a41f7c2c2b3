"""Learner models the meta-learner can adapt; any Keras model mapping images to logits works, these are defaults."""

import keras


def conv4(input_shape=(84, 84, 3), num_classes=5, filters=32, bn_epsilon=1e-3, name="conv4"):
    """The paper's learner: 4 x [Conv 3x3 (same) -> BatchNorm -> ReLU -> MaxPool 2x2], flatten, Dense(N).

    84x84x3 inputs with 32 filters and 5 classes give 32,901 parameters (BN gamma/beta included: they are part
    of theta and adapted by the meta-learner). Returns a built functional keras.Model returning logits.
    """
    images = keras.Input(shape=tuple(input_shape), name="images")
    features = images
    for block in range(4):
        features = keras.layers.Conv2D(filters, 3, padding="same", name=f"conv{block + 1}")(features)
        features = keras.layers.BatchNormalization(epsilon=bn_epsilon, name=f"bn{block + 1}")(features)
        features = keras.layers.ReLU(name=f"relu{block + 1}")(features)
        features = keras.layers.MaxPooling2D(2, name=f"pool{block + 1}")(features)
    features = keras.layers.Flatten(name="flatten")(features)
    logits = keras.layers.Dense(num_classes, name="logits")(features)
    return keras.Model(images, logits, name=name)
