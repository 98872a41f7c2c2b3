"""Learner models the meta-learner can adapt; any Keras model mapping images to logits works, these are defaults."""

import keras


def conv4(input_shape=(84, 84, 3), num_classes=5, filters=32, bn_epsilon=1e-3, name="conv4"):
    """The paper's learner: 4 x [Conv 3x3 (same) -> BatchNorm -> ReLU -> MaxPool 2x2], flatten, Dense(N).

    84x84x3 inputs with 32 filters and 5 classes give 32,901 parameters (BN gamma/beta included: they are part
    of theta and adapted by the meta-learner; 28,485 at 28x28x1). Returns a built functional keras.Model
    returning logits.
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


RESNET12_WIDTH_RATIOS = (1.0, 2.5, 5.0, 10.0)


def resnet12(input_shape=(84, 84, 3), num_classes=5, filters=64, bn_epsilon=1e-3, name="resnet12"):
    """The ResNet-12 of few-shot learning: four residual blocks, global average pooling, Dense(N).

    Each block is 3 x [Conv 3x3 (same) -> BatchNorm -> LeakyReLU(0.1)] (no activation after the third BatchNorm),
    plus a 1x1 convolution and BatchNorm on the shortcut, the sum, LeakyReLU(0.1) and MaxPool 2x2. The block
    widths are `filters` x (1, 2.5, 5, 10): filters=64 is the usual 64-160-320-640, 12,427,525 trainable
    parameters at 84x84x3 and 5 classes (each one a coordinate of the meta-learner's LSTM: an accelerator's
    size); filters=16 gives 16-40-80-160 and 779,461. Convolutions have no bias (BatchNorm follows each).
    Returns a built functional keras.Model returning logits.
    """
    images = keras.Input(shape=tuple(input_shape), name="images")
    features = images
    for block, ratio in enumerate(RESNET12_WIDTH_RATIOS, start=1):
        width = max(1, int(round(filters * ratio)))
        prefix = f"block{block}"
        shortcut = keras.layers.Conv2D(width, 1, use_bias=False, name=f"{prefix}_shortcut_conv")(features)
        shortcut = keras.layers.BatchNormalization(epsilon=bn_epsilon, name=f"{prefix}_shortcut_bn")(shortcut)
        for layer in range(1, 4):
            features = keras.layers.Conv2D(
                width, 3, padding="same", use_bias=False, name=f"{prefix}_conv{layer}"
            )(features)
            features = keras.layers.BatchNormalization(epsilon=bn_epsilon, name=f"{prefix}_bn{layer}")(features)
            if layer < 3:
                features = keras.layers.LeakyReLU(0.1, name=f"{prefix}_relu{layer}")(features)
        features = keras.layers.Add(name=f"{prefix}_add")([features, shortcut])
        features = keras.layers.LeakyReLU(0.1, name=f"{prefix}_out")(features)
        features = keras.layers.MaxPooling2D(2, name=f"{prefix}_pool")(features)
    features = keras.layers.GlobalAveragePooling2D(name="features")(features)
    logits = keras.layers.Dense(num_classes, name="logits")(features)
    return keras.Model(images, logits, name=name)


# The learners `metalstm train --learner NAME` builds: NAME(input_shape, num_classes, filters).
BUILT_IN = {"conv4": conv4, "resnet12": resnet12}
# Both halve the image four times (2x2 max pooling): a side under 16 pools away to nothing.
BUILT_IN_MIN_SIDE = 16
