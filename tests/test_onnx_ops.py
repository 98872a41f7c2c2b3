"""Which learners' ops reach ONNX: every Keras activation exports with SavedModel/ONNX parity (the two whose
TensorFlow ops tf2onnx leaves unconverted included), so do the random augmentation and noise layers and Normalization
layers, and an op ONNX cannot express stops the export by name."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_metalstm import export

N_WAY = 5
CLASSES = ["zeta", "alpha", "gamma", "delta", "beta"]


def _adapted_around(*layers, branches=None):
    """An AdaptedLearner of 12x12x1 images: `layers` in a chain, then one branch per `branches` layer, merged."""
    keras.utils.set_random_seed(0)
    images = keras.Input((12, 12, 1))
    features = images
    for layer in layers:
        features = layer(features)
    if branches:
        features = keras.layers.Concatenate()([branch(features) for branch in branches])
    logits = keras.layers.Dense(N_WAY)(keras.layers.Flatten()(features))
    return export.AdaptedLearner(keras.Model(images, logits), CLASSES, (12, 12, 1))


def test_every_keras_activation_exports_to_onnx_with_parity(tmp_path):
    """One branch per activation Keras names (but `threshold`, which needs arguments, and glu). Among them, the
    exact GELU runs TensorFlow's Erfc and CELU its Expm1, which tf2onnx leaves unconverted (the model would not
    load)."""
    import onnx

    names = [name for name in dir(keras.activations) if callable(getattr(keras.activations, name))]
    names = [name for name in names if not name.startswith("_") and name not in ("get", "serialize", "deserialize")]
    assert {"gelu", "celu", "mish", "selu"} <= set(names)
    # glu halves the channels but Keras infers a layer's output shape as if it did not: a model with it in a layer
    # before a Dense layer fails when called (Keras 3.15), so it is no learner activation.
    usable = [name for name in names if name not in ("threshold", "glu")]
    activations = [keras.layers.Activation(name) for name in usable]
    adapted = _adapted_around(keras.layers.Conv2D(4, 3, strides=2), branches=activations)
    result = export.export_adapted(adapted, tmp_path / "task", format="both")
    assert result.parity.ok, result.parity.summary()
    operators = {node.op_type for node in onnx.load(str(result.path / "model.onnx")).graph.node}
    assert {"Erf", "Exp"} <= operators and not {"Erfc", "Expm1"} & operators


def test_a_learner_with_augmentation_and_noise_layers_exports_with_parity(tmp_path):
    """Keras keeps these layers' random seed state out of TensorFlow's object tracking, and a SavedModel of a
    function that captures it could not be written ("captures tensor ... not reachable from root")."""
    layers = keras.layers
    random_layers = [
        layers.RandomFlip("horizontal"),
        layers.RandomTranslation(0.1, 0.1),
        layers.RandomBrightness(0.1),
        layers.GaussianNoise(0.1),
        layers.Conv2D(4, 3),
        layers.Dropout(0.2),
    ]
    adapted = _adapted_around(*random_layers)
    assert any("seed_generator" in variable.path for variable in adapted.learner.non_trainable_variables)
    result = export.export_adapted(adapted, tmp_path / "task", format="both")
    assert result.parity.ok, result.parity.summary()


def test_normalization_layers_statistics_are_constants_of_the_onnx_model(tmp_path):
    """Keras' Normalization layer captures its mean and variance as tensors that are not variables, which tf2onnx
    made extra inputs of the model (the export then failed its own input check)."""
    import onnx

    adapted_statistics = keras.layers.Normalization()
    adapted_statistics.adapt(np.random.default_rng(0).random((16, 12, 12, 1), dtype=np.float32))
    given_statistics = keras.layers.Normalization(mean=0.5, variance=0.08)
    adapted = _adapted_around(adapted_statistics, keras.layers.Conv2D(4, 3), given_statistics)
    result = export.export_adapted(adapted, tmp_path / "task", format="both")
    assert result.parity.ok, result.parity.summary()
    assert [value.name for value in onnx.load(str(result.path / "model.onnx")).graph.input] == ["images"]


def test_an_op_onnx_cannot_express_is_named_once_and_nothing_is_written(tmp_path, caplog):
    @keras.saving.register_keras_serializable(package="tests_export")
    class LogGamma(keras.layers.Layer):
        def call(self, inputs):
            return tf.math.lgamma(1.5 + tf.nn.relu(inputs))

    adapted = _adapted_around(keras.layers.Conv2D(2, 3), LogGamma())
    with pytest.raises(export.ExportError, match=r"ONNX opset 17 cannot express: Lgamma\. .*--format savedmodel"):
        export.export_adapted(adapted, tmp_path / "task", format="both")
    assert not (tmp_path / "task" / "1").exists()
    # tf2onnx's own lines about the op (on stderr, before the ExportError, outside pytest)
    assert not [record.getMessage() for record in caplog.records if record.name.startswith("tf2onnx")]
