"""A learner of your own for `metalstm train --learner gn_conv4:build` (run from this folder, or put it on PYTHONPATH).

conv4 with GroupNormalization instead of BatchNormalization: no batch statistics, so a query image's logits never
depend on the other images, in training and in serving alike.
"""

import keras


def build(input_shape, num_classes):
    images = keras.Input(shape=input_shape)
    features = images
    for block in range(4):
        features = keras.layers.Conv2D(32, 3, padding="same", name=f"conv{block + 1}")(features)
        features = keras.layers.GroupNormalization(groups=8, name=f"gn{block + 1}")(features)
        features = keras.layers.ReLU()(features)
        features = keras.layers.MaxPooling2D(2)(features)
    features = keras.layers.Flatten()(features)
    return keras.Model(images, keras.layers.Dense(num_classes, name="logits")(features), name="gn_conv4")
