"""The learner of a run as a setting: a built-in name, a saved `.keras` model, or the user's factory function.

`metalstm train --learner SPEC` takes one of

    conv4 | resnet12              a built-in learner (keras_metalstm.learners), sized by --filters
    PATH.keras                    a saved Keras model whose architecture is the learner (loaded with safe_mode)
    package.module:function       function(input_shape, num_classes) -> keras.Model, importable from the current
                                  directory or PYTHONPATH

A run directory keeps the learner's architecture as its Keras config (`learner.json`), deserialised with
`safe_mode=True`, so evaluation, adaptation, export and resume work on a machine without the user's module. A
custom layer or model class registered with `keras.saving.register_keras_serializable` is imported from the module
Keras recorded for it (`import_custom_class_modules`) before a config or `.keras` file is deserialised: the new
process of every command would not know the class otherwise.
`check_learner` runs the learner once on an episode-shaped batch and turns every way a model can be unfit into
one message naming the problem and the fix.

The setting itself is parsed by `keras_metalstm.config.normalise_learner_spec` (no TensorFlow there).
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import sys
import zipfile
from pathlib import Path

import numpy as np

from keras_metalstm.config import BUILT_IN_LEARNERS, ConfigError, atomic_write_text, first_line

ARCHITECTURE_FILE = "learner.json"


class LearnerError(ConfigError):
    """The learner cannot be built, loaded or adapted by the meta-learner; the message says why and what to do."""


def learner_kind(spec: str) -> str:
    """"built-in", "file" or "factory" for a normalised spec."""
    if spec in BUILT_IN_LEARNERS:
        return "built-in"
    return "file" if spec.endswith(".keras") else "factory"


# ----------------------------------------------------------------------------------------------- building
def build_learner(spec: str, image_shape, n_way: int, filters: int = 32):
    """A learner model for `spec` taking `image_shape` images and returning `n_way` logits (not yet checked:
    see `check_learner`). A `.keras` learner is returned with the file's weights, or, saved with another number
    of classes, as a freshly initialised copy with an `n_way` output layer."""
    kind = learner_kind(spec)
    if kind == "built-in":
        from keras_metalstm import learners

        return learners.BUILT_IN[spec](input_shape=tuple(image_shape), num_classes=int(n_way), filters=filters)
    if kind == "file":
        model = load_learner_file(spec)
        shape = getattr(model, "output_shape", None)
        if isinstance(shape, tuple) and len(shape) == 2 and shape[-1] != n_way:
            # A classifier saved with another number of classes: the same architecture with an N-way head.
            return fresh_copy(model, num_classes=n_way)
        return model
    return _call_factory(spec, tuple(int(v) for v in image_shape), int(n_way))


def load_learner_file(path):
    """The Keras model saved at `path` (safe_mode=True), or LearnerError saying why it cannot be loaded."""
    import keras

    import keras_metalstm  # noqa: F401 (registers the package's classes for models that contain them)

    path = Path(path)
    if not path.is_file():
        raise LearnerError(f"learner file {path} does not exist; pass a .keras file saved with model.save()")
    import_custom_class_modules(keras_file_config(path))
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as error:  # noqa: BLE001 - keras raises many types for a bad file
        raise LearnerError(f"cannot load the learner file {path}: {first_line(error)}") from None


def _with_current_directory_on_path():
    # A console script's sys.path lacks the current directory, where a user's model module usually lives.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def _call_factory(spec: str, image_shape, n_way: int):
    module_name, _, function_name = spec.partition(":")
    _with_current_directory_on_path()
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 - ImportError, or an error raised by the module itself
        raise LearnerError(
            f"cannot import {module_name!r} for --learner {spec}: {first_line(error)}. The module must be "
            "importable from the current directory or PYTHONPATH"
        ) from None
    factory = getattr(module, function_name, None)
    if not callable(factory):
        raise LearnerError(f"module {module_name!r} has no function {function_name!r} (--learner {spec})")
    try:
        model = factory(image_shape, n_way)
    except Exception as error:  # noqa: BLE001 - the user's code: report it, do not crash
        raise LearnerError(
            f"the learner factory {spec} failed when called as {function_name}({image_shape}, {n_way}): "
            f"{type(error).__name__}: {first_line(error)}"
        ) from None
    return model


def fresh_copy(learner, num_classes: int | None = None):
    """A freshly initialised model of `learner`'s architecture (its Keras config), optionally with an output
    layer of `num_classes` units: the classifier the baselines pre-train on all meta-train classes.

    Only a functional or Sequential model whose output layer is a Dense layer can change its number of classes.
    """
    config = architecture_config(learner)
    image_shape = learner_image_shape(learner)
    if num_classes is not None and num_classes != learner_num_classes(learner, image_shape):
        output = _output_layer_config(config)
        output["config"]["units"] = int(num_classes)
    return model_from_architecture(config, image_shape)


def _output_layer_config(config):
    layers = config.get("config", {}).get("layers")
    outputs = config.get("config", {}).get("output_layers")
    entry = None
    if isinstance(layers, list) and layers:
        if outputs:  # functional: [[layer name, node, tensor]]
            names = [outputs] if isinstance(outputs[0], str) else outputs
            if len(names) == 1:
                entry = next((layer for layer in layers if layer["config"].get("name") == names[0][0]), None)
        elif config.get("class_name") == "Sequential":
            entry = layers[-1]
    if entry is None or entry.get("class_name") != "Dense":
        raise LearnerError(
            "cannot change the learner's number of classes: only a functional or Sequential model whose output "
            "layer is a Dense layer can (a saved learner is given N outputs, and the baselines pre-train it with "
            "one output per meta-train class)"
        )
    return entry


# ------------------------------------------------------------------------------------------- architecture
def architecture_config(learner) -> dict:
    """The learner's architecture as a JSON-compatible Keras config. A Normalization layer's statistics from
    `adapt()`, which Keras keeps in weights, not in the config, are written into its config as its mean and
    variance: they are part of the function the learner computes, not of theta."""
    import keras

    config = json.loads(json.dumps(keras.saving.serialize_keras_object(learner)))
    adapted = {
        layer.name: layer
        for layer in learner._flatten_layers(include_self=False)
        if isinstance(layer, keras.layers.Normalization) and layer.built and layer.input_mean is None
    }
    for entry in _layer_configs(config):
        layer = adapted.get(entry.get("config", {}).get("name"))
        if entry.get("class_name") == "Normalization" and layer is not None:
            entry["config"]["mean"] = np.asarray(layer.adapt_mean).tolist()
            entry["config"]["variance"] = np.asarray(layer.adapt_variance).tolist()
    return config


def _layer_configs(config):
    """Every layer entry ({"class_name", "config"}) of a Keras config, nested models' included."""
    if isinstance(config, dict):
        if "class_name" in config and isinstance(config.get("config"), dict):
            yield config
        for value in config.values():
            yield from _layer_configs(value)
    elif isinstance(config, list):
        for item in config:
            yield from _layer_configs(item)


def check_weights_survive_rebuilding(learner, rebuilt) -> None:
    """LearnerError naming the layers whose non-trainable weights `rebuilt` (the learner made again from its
    architecture, as every command that loads a run makes it) does not reproduce: weights set after the layers were
    made (loaded into a frozen layer, assigned by hand), which a run, storing the architecture and theta_0, would
    lose. Batch-norm moving statistics (reset every episode), random seed states and Normalization statistics
    (in the architecture, `architecture_config`) do not count."""
    import keras

    def kept(model):
        skipped = set()
        for layer in model._flatten_layers(include_self=False):
            if isinstance(layer, keras.layers.BatchNormalization):
                skipped |= {id(layer.moving_mean), id(layer.moving_variance)}
            elif isinstance(layer, keras.layers.Normalization):
                skipped |= {id(variable) for variable in layer.variables}
        return [
            variable
            for variable in model.non_trainable_variables
            if id(variable) not in skipped and "seed_generator" not in variable.path
        ]

    built, made_again = kept(learner), kept(rebuilt)
    lost = sorted(
        {
            mine.path.split("/")[0]
            for mine, theirs in zip(built, made_again, strict=False)
            if tuple(mine.shape) != tuple(theirs.shape)
            or not np.array_equal(np.asarray(mine.value), np.asarray(theirs.value))
        }
    )
    if lost or len(built) != len(made_again):
        raise LearnerError(
            f"the learner's non-trainable weights in {', '.join(lost) or 'its layers'} are not made by its layers "
            "from their config (a frozen layer given weights after it was made?): a run keeps the learner's "
            "architecture and theta_0, its trainable weights, and would lose them. Make those layers trainable "
            "(theta_0 then starts from their weights with --theta0-init pretrained and a saved .keras learner), or "
            "have the layer make them itself"
        )


def custom_class_modules(config) -> list[str]:
    """The modules that define the registered custom classes (`keras.saving.register_keras_serializable`) a Keras
    config names, in order: what has to be imported before the config can be deserialised."""
    modules = []
    if isinstance(config, dict):
        module = config.get("module")
        if config.get("registered_name") and isinstance(module, str) and module.split(".")[0] not in _OWN_PACKAGES:
            modules.append(module)
        children = config.values()
    elif isinstance(config, list):
        children = config
    else:
        return modules
    for child in children:
        modules += [module for module in custom_class_modules(child) if module not in modules]
    return modules


# Packages whose classes are registered by importing keras_metalstm; "__main__" cannot be imported again.
_OWN_PACKAGES = ("keras", "keras_metalstm", "__main__")


def keras_file_config(path) -> dict | None:
    """The model config stored in a `.keras` file (a zip archive's config.json), or None if it has none."""
    try:
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read("config.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):  # not a Keras archive: the loader says so
        return None


def import_custom_class_modules(config) -> None:
    """Imports the modules of the custom classes in a Keras config, from the current directory or PYTHONPATH, so
    that their registration runs before deserialisation (as `--learner module:function` imported the factory's
    module in training). A module that cannot be imported is left for the deserialiser to report."""
    _with_current_directory_on_path()
    for module in custom_class_modules(config):
        if module not in sys.modules:
            try:
                importlib.import_module(module)
            except Exception:  # noqa: BLE001 - reported by the deserialiser as an unknown class
                continue


def model_from_architecture(config: dict, image_shape=None):
    """A freshly initialised, built model from `architecture_config`'s output (safe_mode=True)."""
    import keras
    import numpy as np

    import keras_metalstm  # noqa: F401 (registers the package's classes)

    import_custom_class_modules(config)
    try:
        # Keras consumes the config it deserialises: give it a copy, the caller's may be stored or used again.
        model = keras.saving.deserialize_keras_object(_with_input_shape(config, image_shape), safe_mode=True)
    except Exception as error:  # noqa: BLE001 - unknown class, refused lambda, bad config ...
        raise LearnerError(
            f"cannot rebuild the learner from its Keras config: {first_line(error)}. A custom layer or model "
            "class must be registered with @keras.saving.register_keras_serializable() in a module importable "
            "from the current directory or PYTHONPATH (it is imported by the name Keras recorded); Lambda "
            "layers cannot be loaded safely (write a small layer class instead)"
        ) from None
    if not model.built and image_shape is not None:
        model(np.zeros((1, *image_shape), "float32"))
    return model


def _with_input_shape(config: dict, image_shape) -> dict:
    """A copy of a functional or Sequential model's config whose input layer, declared for images of any size
    (e.g. (None, None, C) in a fully convolutional model), takes `image_shape`: the same layers and weights, with
    the fixed shape that an adapted learner's serving signature and its ONNX graph are built on."""
    config = copy.deepcopy(config)
    layers = config.get("config", {}).get("layers") if image_shape is not None else None
    inputs = [layer for layer in layers or [] if layer.get("class_name") == "InputLayer"]
    shape = inputs[0].get("config", {}).get("batch_shape") if len(inputs) == 1 else None
    if isinstance(shape, list) and len(shape) == len(image_shape) + 1 and None in shape[1:]:
        fixed = [size if declared is None else declared for declared, size in zip(shape[1:], image_shape, strict=True)]
        inputs[0]["config"]["batch_shape"] = [shape[0], *(int(size) for size in fixed)]
    return config


def save_architecture(architecture: dict, run_dir) -> Path:
    """Write an `architecture_config` to RUN_DIR/learner.json atomically."""
    path = Path(run_dir) / ARCHITECTURE_FILE
    atomic_write_text(path, json.dumps(architecture, indent=1) + "\n")
    return path


def read_architecture(run_dir) -> dict | None:
    """The architecture stored in RUN_DIR/learner.json, or None for a run that predates it (its learner is then
    the built-in conv4 of its config)."""
    path = Path(run_dir) / ARCHITECTURE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise LearnerError(f"{path} is not valid JSON ({error}); restore it from a copy of the run") from None


# ----------------------------------------------------------------------------------------------- checking
def check_learner(learner, image_shape, n_way: int, batch: int = 5) -> None:
    """Run `learner` once on `batch` episode-shaped images as the meta-learner will; LearnerError naming the
    problem and its fix if it is not a model mapping (H, W, C) images in [0, 1] to `n_way` logits that can run
    as a pure function of its weights."""
    import keras
    import numpy as np
    import tensorflow as tf

    image_shape = tuple(int(v) for v in image_shape)
    if not isinstance(learner, keras.Model):
        raise LearnerError(
            f"the learner must be a keras.Model, got {type(learner).__name__}: return the model (e.g. "
            "keras.Model(inputs, logits)) from the factory"
        )
    declared = learner_image_shape(learner)
    if declared is not None and (
        not isinstance(declared, tuple)
        or len(declared) != len(image_shape)
        or any(d is not None and d != e for d, e in zip(declared, image_shape, strict=True))
    ):
        raise LearnerError(
            f"the learner takes images of shape {declared} but the episodes have {image_shape}: build it for the "
            f"data (keras.Input(shape={image_shape}); a factory receives input_shape for this)"
        )
    input_dtypes = {str(tensor.dtype) for tensor in getattr(learner, "inputs", None) or []}
    if any(not dtype.startswith(("float", "bfloat")) for dtype in input_dtypes):
        raise LearnerError(
            f"the learner's input is {', '.join(sorted(input_dtypes))} but the meta-learner feeds it float32 images "
            "in [0, 1], which that dtype would truncate to 0 and 1: declare a float input (keras.Input(shape) with "
            "no dtype) and drop any Rescaling(1/255) at the input"
        )
    images = np.random.default_rng(0).random((batch, *image_shape), dtype=np.float32)
    try:
        outputs = learner(images, training=False)
    except Exception as error:  # noqa: BLE001 - anything the user's model raises
        raise LearnerError(
            f"the learner fails on a batch of {batch} images of shape {image_shape}: {first_line(error)}"
        ) from None
    if not learner.trainable_variables:
        raise LearnerError("the learner has no trainable weights: the meta-learner has nothing to adapt")
    if isinstance(outputs, (list, tuple, dict)) or tuple(outputs.shape) != (batch, n_way):
        shape = [tuple(o.shape) for o in outputs] if isinstance(outputs, (list, tuple)) else _shape(outputs)
        raise LearnerError(
            f"the learner returns {shape} for {batch} images; the meta-learner needs one tensor of {n_way} "
            f"logits per image, ({batch}, {n_way}): end the model with Dense({n_way}) after flattening or pooling "
            "(a factory receives num_classes for this)"
        )
    outputs = np.asarray(outputs)
    if _ends_in_softmax(learner) or (
        np.all(outputs >= 0) and np.allclose(outputs.sum(axis=-1), 1.0, atol=1e-5)
    ):
        raise LearnerError(
            "the learner returns probabilities (its outputs sum to 1, a softmax); the meta-learner needs logits: "
            "remove the final softmax (Dense(num_classes) with no activation)"
        )
    _check_variables_are_keras(learner)
    from keras_metalstm.learner_function import LearnerFunction

    function = LearnerFunction(learner)
    labels = np.arange(batch, dtype=np.int32) % n_way
    try:
        loss, gradient, _ = tf.function(function.loss_and_gradient)(
            function.initial_theta(), function.initial_state(), images, labels
        )
    except Exception as error:  # noqa: BLE001 - anything the user's model raises when run statelessly
        raise LearnerError(
            "the learner cannot run as a function of its weights, as the meta-learner runs it (a "
            f"keras.StatelessScope in a tf.function): {first_line(error)}. Keep every piece of state in weights "
            "created in build() with add_weight"
        ) from None
    if not np.all(np.isfinite(gradient.numpy())) or not np.isfinite(float(loss)):
        raise LearnerError("the learner's loss or gradient is not finite on images in [0, 1]")


def learner_image_shape(learner):
    """The image shape (H, W, C) a built learner takes: its declared input shape, or for a subclassed model the
    shape it was built or first called with; None when neither is known (a subclassed model never called)."""
    try:
        shape = learner.input_shape
    except (AttributeError, ValueError):  # a subclassed model: Keras records the shape of its first call
        shapes = list((getattr(learner, "_build_shapes_dict", None) or {}).values())
        shape = shapes[0] if len(shapes) == 1 else None
    return tuple(shape[1:]) if isinstance(shape, (tuple, list)) else shape


def learner_num_classes(learner, image_shape) -> int:
    """N, the number of logits a built learner returns per image: its declared output shape, or for a subclassed
    model the width of its output on one blank image of `image_shape` (run in inference mode: no state moves)."""
    try:
        return int(learner.output_shape[-1])
    except (AttributeError, ValueError):
        import numpy as np

        return int(learner(np.zeros((1, *image_shape), "float32"), training=False).shape[-1])


def _shape(outputs):
    return tuple(getattr(outputs, "shape", ()))


def _ends_in_softmax(learner) -> bool:
    import keras

    last = learner.layers[-1] if getattr(learner, "layers", None) else None
    if isinstance(last, keras.layers.Softmax):
        return True
    activation = getattr(last, "activation", None)
    return getattr(activation, "__name__", "") == "softmax"


def _check_variables_are_keras(learner) -> None:
    """A raw tf.Variable inside a layer is state the meta-learner cannot see: it would be read or written in
    place instead of following each episode's parameters."""
    import keras
    import tensorflow as tf

    for layer in learner._flatten_layers():
        for name, value in vars(layer).items():
            if isinstance(value, tf.Variable) and not isinstance(value, keras.Variable):
                raise LearnerError(
                    f"layer {layer.name!r} holds a tf.Variable ({name!r}), which the meta-learner cannot run "
                    "statelessly: create it with self.add_weight(...) in build()"
                )
