"""A learner's architecture as a run keeps it: the Keras config in RUN_DIR/learner.json, from which every command
rebuilds the learner (`model_from_architecture`, with `safe_mode=True`), and what that config must carry.

Keras' config leaves out two things a learner's function depends on, and `architecture_config` /
`model_from_architecture` put them back: an adapted Normalization layer's statistics (Keras keeps them in weights)
and, for a model declared for images of any size, the run's image shape. Other non-trainable weights given to a
layer after it was made would be lost, and `check_weights_survive_rebuilding` refuses them by name. A registered
custom class is imported from the module Keras recorded for it (`import_custom_class_modules`), from the current
directory or PYTHONPATH, before a config or `.keras` file is deserialised.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import re
import sys
import zipfile
from pathlib import Path

import numpy as np

from keras_metalstm.config import ConfigError, atomic_write_text, first_line

ARCHITECTURE_FILE = "learner.json"


class LearnerError(ConfigError):
    """The learner cannot be built, loaded or adapted by the meta-learner; the message says why and what to do."""


def with_current_directory_on_path():
    """Puts the current directory on sys.path: a console script's lacks it, and a user's model module usually lives
    there."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def architecture_config(learner) -> dict:
    """The learner's architecture as a JSON-compatible Keras config. A Normalization layer's statistics from
    `adapt()`, which Keras keeps in weights, not in the config, are written into its config as its mean and
    variance: they are part of the function the learner computes, not of theta."""
    import keras

    try:
        config = json.loads(json.dumps(keras.saving.serialize_keras_object(learner)))
    except NotImplementedError:  # Keras cannot record a subclass's __init__ arguments by itself
        raise LearnerError(
            f"the learner ({type(learner).__name__}) cannot be written as a Keras config, and a run keeps only "
            "that: give its class (and any custom layer's) a get_config() returning every argument of its "
            "__init__, and register it with @keras.saving.register_keras_serializable()"
        ) from None
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


def frozen_weights(model) -> list:
    """The non-trainable weights a learner keeps as they are in every episode (frozen layers'): not batch-norm
    moving statistics (reset every episode, unless the layer is frozen), random seed states, or Normalization
    statistics (in the architecture, `architecture_config`)."""
    import keras

    skipped = set()
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable:  # a frozen one keeps them
            skipped |= {id(layer.moving_mean), id(layer.moving_variance)}
        elif isinstance(layer, keras.layers.Normalization):
            skipped |= {id(variable) for variable in layer.variables}
    return [
        variable
        for variable in model.non_trainable_variables
        if id(variable) not in skipped and "seed_generator" not in variable.path
    ]


def check_weights_survive_rebuilding(learner, rebuilt, from_file: bool = False) -> None:
    """LearnerError when `rebuilt` (the learner made again from its architecture, as every command that loads a run
    makes it) has other trainable weights than `learner` (a get_config leaving out an argument), or naming the
    layers whose non-trainable weights it does not reproduce: weights set after the layers were
    made (loaded into a frozen layer, assigned by hand), which a run, storing the architecture and theta_0, would
    lose (`from_file`: the learner was loaded from a `.keras` file, whose weights are its own); see
    `frozen_weights` for which count."""
    given = [(variable.path, tuple(variable.shape)) for variable in learner.trainable_variables]
    made = [tuple(variable.shape) for variable in rebuilt.trainable_variables]
    if [shape for _, shape in given] != made:
        differences = (
            f"{path} {shape} against {other}"
            for (path, shape), other in zip(given, made, strict=False)
            if shape != other
        )
        first = next(differences, f"{len(given)} trainable weights against {len(made)}")
        raise LearnerError(
            f"the learner made again from its Keras config is not the one given ({first}): a run keeps only the "
            "config, so the get_config() of a custom model or layer must return every argument of its __init__"
        )
    built, made_again = frozen_weights(learner), frozen_weights(rebuilt)
    lost = sorted(
        {
            mine.path.split("/")[0]
            for mine, theirs in zip(built, made_again, strict=False)
            if tuple(mine.shape) != tuple(theirs.shape)
            or not np.array_equal(np.asarray(mine.value), np.asarray(theirs.value))
        }
    )
    if lost or len(built) != len(made_again):
        where = ", ".join(lost) or "its layers"
        cause = (
            f"the learner file's non-trainable weights in {where} (a frozen layer's) are its own, not what the "
            "layers make from their config"
            if from_file
            else f"the learner's non-trainable weights in {where} are not made by its layers from their config (a "
            "frozen layer given weights after it was made?)"
        )
        raise LearnerError(
            f"{cause}: a run keeps the learner's architecture and theta_0, its trainable weights, and would lose "
            "them. Make those layers trainable (theta_0 then starts from their weights with --theta0-init "
            "pretrained and a saved .keras learner), or have the layer make them itself"
        )


def _nested_dicts(config):
    """Every dict in a Keras config (nested dicts and lists), in order: the serialised objects among them."""
    if isinstance(config, dict):
        yield config
        children = config.values()
    elif isinstance(config, list):
        children = config
    else:
        return
    for child in children:
        yield from _nested_dicts(child)


def custom_class_modules(config) -> list[str]:
    """The modules that define the registered custom classes (`keras.saving.register_keras_serializable`) a Keras
    config names, in order: what has to be imported before the config can be deserialised."""
    modules = (
        entry["module"]
        for entry in _nested_dicts(config)
        if entry.get("registered_name")
        and isinstance(entry.get("module"), str)
        and entry["module"].split(".")[0] not in _OWN_PACKAGES
    )
    return list(dict.fromkeys(modules))


def unregistered_names(config) -> list[str]:
    """The custom classes and functions a Keras config names that are not registered with
    `keras.saving.register_keras_serializable`: Keras records only their bare names, and a file holding the config
    loads only where they are passed as `custom_objects`."""
    names = []
    for entry in _nested_dicts(config):
        # a function is recorded as {"class_name": "function", "config": its registered name or its own}
        name = entry.get("config" if entry.get("class_name") == "function" else "registered_name")
        if isinstance(name, str) and (entry.get("module") or "").split(".")[0] != "keras" and not _loadable(name):
            names.append(name)
    return list(dict.fromkeys(names))


def _loadable(name: str) -> bool:
    """Whether Keras' deserialiser finds a class or function by the name a config records for it."""
    import keras

    try:
        return keras.saving.get_registered_object(name) is not None or keras.activations.get(name) is not None
    except ValueError:  # not an activation's name either
        return False


# Packages whose classes are registered by importing keras_metalstm; "__main__" cannot be imported again.
_OWN_PACKAGES = ("keras", "keras_metalstm", "__main__")


def keras_file_config(path) -> dict | None:
    """The model config stored in a `.keras` file (a zip archive's config.json), or None if it has none."""
    try:
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read("config.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):  # not a Keras archive: the loader says so
        return None


def import_custom_class_modules(config) -> str:
    """Imports the modules of the custom classes in a Keras config, from the current directory or PYTHONPATH, so
    that their registration runs before deserialisation (as `--learner module:function` imported the factory's
    module in training). Returns "" or, for the modules that cannot be imported, a clause for the deserialiser's
    message that names them, why, and the fix."""
    with_current_directory_on_path()
    failed = []
    for module in custom_class_modules(config):
        if module not in sys.modules:
            try:
                importlib.import_module(module)
            except Exception as error:  # noqa: BLE001 - any failure of the user's module is reported with its name
                failed.append(f"{module} ({first_line(error, 150)})")
    if not failed:
        return ""
    return (
        f"; the module(s) defining its custom classes could not be imported: {', '.join(failed)}: run from the "
        "folder that holds them, or add it to PYTHONPATH"
    )


def model_from_architecture(config: dict, image_shape=None):
    """A freshly initialised, built model from `architecture_config`'s output (safe_mode=True)."""
    import keras
    import numpy as np

    import keras_metalstm  # noqa: F401 (registers the package's classes)

    unimported = import_custom_class_modules(config)
    try:
        # Keras consumes the config it deserialises: give it a copy, the caller's may be stored or used again.
        model = keras.saving.deserialize_keras_object(_with_input_shape(config, image_shape), safe_mode=True)
    except Exception as error:  # noqa: BLE001 - unknown class, refused lambda, bad config ...
        raise LearnerError(
            f"cannot rebuild the learner from its Keras config: {deserialisation_error_text(error)}{unimported}. "
            "A custom layer or "
            "model class must be registered with @keras.saving.register_keras_serializable() in a module "
            "importable from the current directory or PYTHONPATH (it is imported by the name Keras recorded), and "
            "its get_config() must return every argument of its __init__; Lambda layers cannot be loaded safely "
            "(write a small layer class instead)"
        ) from None
    if not model.built and image_shape is not None:
        model(np.zeros((1, *image_shape), "float32"))
    return model


def deserialisation_error_text(error) -> str:
    """The first line of Keras' error, and the class's own error Keras appends at the end of its long text (e.g.
    `__init__() missing 1 required positional argument`, for an argument get_config left out)."""
    causes = re.findall(r"(?:Error|Exception) encountered(?: during deserialization)?: (.+)", str(error))
    # Keras' advice on from_config and its dump of the whole config would bury the cause.
    first = first_line(error).split(" Please ensure that components")[0]
    return first + (f" ({causes[-1].split(' Full object config')[0].strip()})" if causes else "")


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
