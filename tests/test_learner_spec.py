"""The learner as a run setting: parsing the spec, the built-in resnet12, architecture round trips, resizing the
output layer for the baselines, and the penultimate features the nearest-neighbour baseline uses."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import as_tensors, random_episodes

import keras_metalstm as km
from keras_metalstm.config import ConfigError, RunConfig, normalise_learner_spec
from keras_metalstm.learner_architecture import (
    architecture_config,
    check_weights_survive_rebuilding,
    custom_class_modules,
    model_from_architecture,
)
from keras_metalstm.learner_spec import (
    LearnerError,
    check_learner,
    fresh_copy,
    learner_image_shape,
    learner_num_classes,
)
from keras_metalstm.pretraining import feature_model


def test_learner_specs_are_normalised_or_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert normalise_learner_spec("ResNet12") == "resnet12"
    assert normalise_learner_spec(" conv4 ") == "conv4"
    assert normalise_learner_spec("models/net.keras") == str(tmp_path / "models" / "net.keras")
    assert normalise_learner_spec("my_pkg.models:Build_Net") == "my_pkg.models:Build_Net"  # case kept
    for bad in ("conv5", "module:", ":function", "my module:f", "pkg.:f", "m:f-g", "net.h5"):
        with pytest.raises(ConfigError, match="unknown learner"):
            normalise_learner_spec(bad)
    assert RunConfig(learner="pkg.mod:fn").learner == "pkg.mod:fn"
    with pytest.raises(ConfigError, match="unknown learner"):
        RunConfig(learner="vgg")


def trainable_size(model):
    return sum(int(np.prod(v.shape)) for v in model.trainable_variables)


def test_resnet12_widths_and_parameter_counts_are_as_documented():
    standard = km.learners.resnet12(input_shape=(84, 84, 3), num_classes=5, filters=64)
    widths = [layer.filters for layer in standard.layers if layer.name.endswith("_conv1")]
    assert widths == [64, 160, 320, 640]
    assert trainable_size(standard) == 12_427_525
    assert trainable_size(km.learners.resnet12(input_shape=(84, 84, 3), num_classes=5, filters=16)) == 779_461
    assert trainable_size(km.learners.conv4(input_shape=(84, 84, 3), num_classes=5)) == 32_901
    assert trainable_size(km.learners.conv4(input_shape=(28, 28, 1), num_classes=5)) == 28_485
    adds = [layer for layer in standard.layers if isinstance(layer, keras.layers.Add)]
    assert len(adds) == 4  # four residual blocks


def test_resnet12_meta_gradient_reaches_every_meta_parameter():
    keras.utils.set_random_seed(1)
    learner = km.learners.resnet12(input_shape=(28, 28, 1), num_classes=5, filters=2)
    meta = km.MetaLearner(learner, inner_steps=2, hidden_units=4)
    _, _, gradients = meta.meta_gradients(as_tensors(random_episodes(batch=1, seed=4)))
    assert len(gradients) == 8
    for variable, gradient in zip(meta.trainable_variables, gradients, strict=True):
        assert float(tf.norm(gradient)) > 0.0, variable.path
    theta0_gradient = gradients[0].numpy()
    assert theta0_gradient.shape == (trainable_size(learner),)
    # every learner weight of theta_0 gets a gradient: each conv, BN and the head take part in the query loss
    sizes = [int(np.prod(v.shape)) for v in learner.trainable_variables]
    for variable, piece in zip(learner.trainable_variables, np.split(theta0_gradient, np.cumsum(sizes)[:-1]),
                               strict=True):
        assert np.any(piece != 0.0), variable.path


def functional_learner(num_classes=5):
    images = keras.Input((28, 28, 1))
    features = keras.layers.Conv2D(3, 3, strides=2, name="conv")(images)
    features = keras.layers.Flatten(name="flat")(features)
    return keras.Model(images, keras.layers.Dense(num_classes, name="head")(features), name="mine")


def sequential_learner(num_classes=5):
    return keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(6),
                             keras.layers.Dense(num_classes)])


@pytest.mark.parametrize("build", [functional_learner, sequential_learner])
def test_fresh_copy_changes_only_the_number_of_classes_and_reinitialises(build):
    keras.utils.set_random_seed(2)
    learner = build()
    copy = fresh_copy(learner, num_classes=11)
    assert copy.output_shape == (None, 11)
    shapes = [tuple(v.shape) for v in learner.trainable_variables]
    copied = [tuple(v.shape) for v in copy.trainable_variables]
    assert copied[:-2] == shapes[:-2] and copied[-2] == (shapes[-2][0], 11) and copied[-1] == (11,)
    assert not np.allclose(copy.trainable_variables[0].numpy(), learner.trainable_variables[0].numpy())
    assert learner.output_shape == (None, 5)  # the original is untouched


def test_fresh_copy_of_a_model_whose_head_cannot_be_resized_is_refused():
    images = keras.Input((28, 28, 1))
    logits = keras.layers.Conv2D(5, 28, name="conv_head")(images)
    learner = keras.Model(images, keras.layers.Flatten()(logits))
    with pytest.raises(LearnerError, match="cannot change the learner's number of classes"):
        fresh_copy(learner, num_classes=9)


def test_architecture_round_trip_is_repeatable_and_safe():
    learner = functional_learner()
    architecture = architecture_config(learner)
    first = model_from_architecture(architecture, (28, 28, 1))
    second = model_from_architecture(architecture, (28, 28, 1))  # the stored config is not consumed
    assert first.name == second.name == "mine"
    assert [layer.get_config() for layer in first.layers] == [layer.get_config() for layer in learner.layers]
    images = keras.Input((28, 28, 1))
    risky = keras.Model(images, keras.layers.Dense(5)(keras.layers.Lambda(lambda x: x)(
        keras.layers.Flatten()(images))))
    with pytest.raises(LearnerError, match="Lambda layers cannot be loaded safely"):
        model_from_architecture(architecture_config(risky))


@pytest.mark.parametrize("frozen", [False, True])
def test_a_frozen_batch_norms_pretrained_statistics_are_weights_a_run_would_lose(frozen):
    images = keras.Input((6, 6, 1))
    normalisation = keras.layers.BatchNormalization(name="pretrained_bn")
    learner = keras.Model(images, keras.layers.Dense(3)(keras.layers.Flatten()(normalisation(images))))
    normalisation.moving_mean.assign([0.5])
    normalisation.trainable = not frozen
    rebuilt = model_from_architecture(architecture_config(learner), (6, 6, 1))
    if frozen:  # kept in every episode, so a run that stores only the architecture and theta_0 would lose them
        with pytest.raises(LearnerError, match="pretrained_bn"):
            check_weights_survive_rebuilding(learner, rebuilt)
    else:  # restarted every episode: nothing to keep
        check_weights_survive_rebuilding(learner, rebuilt)


def fully_convolutional_learner(channels=1):
    """A learner declared for images of any size, as fully convolutional Keras models often are."""
    images = keras.Input((None, None, channels))
    features = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(images))
    return keras.Model(images, keras.layers.Dense(5)(features))


def test_a_learner_declared_for_images_of_any_size_is_rebuilt_for_the_runs_image_shape():
    """What a run loads from its learner.json (training, evaluate, adapt, export): the same layers and weight
    shapes on a fixed input shape; without one, adapting and exporting it failed after a full training run."""
    learner = fully_convolutional_learner()
    architecture = architecture_config(learner)
    rebuilt = model_from_architecture(architecture, (12, 10, 1))
    assert rebuilt.input_shape == (None, 12, 10, 1)
    assert [w.shape for w in rebuilt.weights] == [w.shape for w in learner.weights]
    assert architecture_config(learner) == architecture  # the stored config itself is left as it was
    assert model_from_architecture(architecture).input_shape == (None, None, None, 1)


def test_a_normalization_layers_adapted_statistics_are_part_of_the_architecture():
    """Keras keeps them in weights, not in the config: a run, which rebuilds its learner from the architecture,
    normalised with mean 0 and variance 1 instead."""
    rng = np.random.default_rng(0)
    normalization = keras.layers.Normalization()
    normalization.adapt(0.5 + 0.1 * rng.random((32, 12, 12, 2), dtype=np.float32))
    images = keras.Input((12, 12, 2))
    inner = keras.Sequential([normalization, keras.layers.Conv2D(3, 3)], name="block")
    learner = keras.Model(images, keras.layers.Dense(5)(keras.layers.Flatten()(inner(images))))
    rebuilt = model_from_architecture(architecture_config(learner), (12, 12, 2))
    for copied, original in zip(rebuilt.trainable_variables, learner.trainable_variables, strict=True):
        copied.assign(original)
    batch = rng.random((4, 12, 12, 2), dtype=np.float32)
    np.testing.assert_allclose(rebuilt(batch).numpy(), learner(batch).numpy(), rtol=1e-5, atol=1e-5)
    check_weights_survive_rebuilding(learner, rebuilt)  # nothing lost


def test_check_learner_accepts_a_subclassed_model_that_was_never_called():
    @keras.saving.register_keras_serializable(package="tests_spec")
    class Small(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.flat = keras.layers.Flatten()
            self.head = keras.layers.Dense(3)

        def call(self, images):
            return self.head(self.flat(images))

    check_learner(Small(), (28, 28, 1), 3)  # builds it by calling it; raises nothing
    with pytest.raises(LearnerError, match="needs one tensor of 4 logits"):
        check_learner(Small(), (28, 28, 1), 4)


def flat_learner(*head):
    images = keras.Input((6, 6, 1))
    outputs = images
    for layer in (keras.layers.Flatten(), *head):
        outputs = layer(outputs)
    return keras.Model(images, outputs)


@pytest.mark.parametrize(
    "head, message",
    [
        ([keras.layers.Dense(3, activation="sigmoid")], "last layer applies sigmoid, which bounds its outputs"),
        ([keras.layers.Dense(3), keras.layers.Activation("tanh")], "last layer applies tanh"),
        ([keras.layers.Dense(3), keras.layers.ReLU()], "last layer applies relu"),
        ([keras.layers.Dense(3), keras.layers.Softmax()], "returns probabilities"),
    ],
)
def test_a_learner_whose_last_layer_bounds_its_logits_is_refused(head, message):
    with pytest.raises(LearnerError, match=message):
        check_learner(flat_learner(*head), (6, 6, 1), 3)


def test_a_learner_ending_in_log_softmax_or_no_activation_gives_logits():
    check_learner(flat_learner(keras.layers.Dense(3)), (6, 6, 1), 3)
    check_learner(flat_learner(keras.layers.Dense(3, activation="log_softmax")), (6, 6, 1), 3)


@pytest.mark.parametrize(
    "squash, message",
    [
        (keras.ops.softmax, "returns probabilities"),
        (keras.activations.softmax, "returns probabilities"),
        (keras.ops.sigmoid, "last layer applies sigmoid"),
        (keras.ops.tanh, "last layer applies tanh"),
    ],
)
def test_a_keras_op_that_squashes_the_output_is_refused_by_the_meta_learner_itself(squash, message):
    """A functional model ending in keras.ops.softmax(...) records an operation, not a layer, after its last layer:
    MetaLearner accepted it and meta-trained on probabilities (only `metalstm train` ran the learner and saw)."""
    images = keras.Input((6, 6, 1))
    logits = keras.layers.Dense(3)(keras.layers.Flatten()(images))
    with pytest.raises(LearnerError, match=message):
        km.MetaLearner(keras.Model(images, squash(logits)), inner_steps=1)
    km.MetaLearner(keras.Model(images, keras.ops.log_softmax(logits)), inner_steps=1)  # logits of the same softmax
    km.MetaLearner(keras.Model(images, keras.ops.add(logits, 1.0)), inner_steps=1)


def test_the_modules_of_registered_custom_classes_are_found_anywhere_in_a_config():
    config = {
        "module": "keras.src.models.functional", "class_name": "Functional", "registered_name": "Functional",
        "config": {"layers": [
            {"module": "keras.layers", "class_name": "Dense", "registered_name": None},
            {"module": "my_pkg.blocks", "class_name": "Block", "registered_name": "my_pkg>Block",
             "config": {"inner": {"module": "my_pkg.norms", "registered_name": "my_pkg>Norm"}}},
            {"module": "my_pkg.blocks", "class_name": "Other", "registered_name": "my_pkg>Other"},
            {"module": "unregistered", "class_name": "Plain", "registered_name": None},
            {"module": "keras_metalstm.meta_learner", "registered_name": "keras_metalstm>MetaLearner"},
            {"module": "__main__", "registered_name": "notebook>Net"},
        ]},
    }
    assert custom_class_modules(config) == ["my_pkg.blocks", "my_pkg.norms"]


def test_a_subclassed_models_image_shape_and_classes_come_from_its_first_call():
    @keras.saving.register_keras_serializable(package="tests_spec")
    class Pooled(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.head = keras.layers.Dense(3)

        def call(self, images):
            return self.head(keras.ops.mean(images, axis=(1, 2)))

    model = Pooled()
    assert learner_image_shape(model) is None  # never called: unknown
    model(np.zeros((2, 12, 10, 2), "float32"))
    assert learner_image_shape(model) == (12, 10, 2)
    assert learner_num_classes(model, (12, 10, 2)) == 3
    functional = km.learners.conv4(input_shape=(28, 28, 1), num_classes=4, filters=2)
    assert learner_image_shape(functional) == (28, 28, 1) and learner_num_classes(functional, None) == 4
    meta = km.MetaLearner(model, inner_steps=1)
    with pytest.raises(ValueError, match=r"the learner expects \(12, 10, 2\)"):
        meta.adapt(np.zeros((3, 28, 28, 1), "float32"), np.arange(3))


def test_nearest_neighbour_features_are_the_input_of_the_output_layer():
    keras.utils.set_random_seed(3)
    learner = km.learners.conv4(input_shape=(28, 28, 1), num_classes=5, filters=4)
    images = np.random.default_rng(0).random((3, 28, 28, 1), dtype=np.float32)
    flatten = keras.Model(learner.inputs, learner.get_layer("flatten").output)
    np.testing.assert_array_equal(feature_model(learner)(images).numpy(), flatten(images).numpy())
    mine = functional_learner()
    expected = keras.Model(mine.inputs, mine.get_layer("flat").output)(images).numpy()
    np.testing.assert_array_equal(feature_model(mine)(images).numpy(), expected)
