"""The learner of a run as a setting: a built-in name, a saved `.keras` model, or the user's factory function.

`metalstm train --learner SPEC` takes one of

    conv4 | resnet12              a built-in learner (keras_metalstm.learners), sized by --filters
    PATH.keras                    a saved Keras model whose architecture is the learner (loaded with safe_mode)
    package.module:function       function(input_shape, num_classes) -> keras.Model, importable from the current
                                  directory or PYTHONPATH

A run directory keeps the learner's architecture as its Keras config (`learner.json`, see
`keras_metalstm.learner_architecture`), deserialised with `safe_mode=True`, so evaluation, adaptation, export and
resume work on a machine without the user's module; a registered custom class is imported from the module Keras
recorded for it, as the new process of every command would not know the class otherwise.
`check_learner` runs the learner once on an episode-shaped batch and turns every way a model can be unfit into
one message naming the problem and the fix.

The setting itself is parsed by `keras_metalstm.config.normalise_learner_spec` (no TensorFlow there).
"""

from __future__ import annotations

import contextlib
import importlib
from pathlib import Path

import numpy as np

from keras_metalstm.config import BUILT_IN_LEARNERS, first_line
from keras_metalstm.learner_architecture import (
    LearnerError,
    architecture_config,
    import_custom_class_modules,
    keras_file_config,
    model_from_architecture,
    with_current_directory_on_path,
)


def learner_kind(spec: str) -> str:
    """"built-in", "file" or "factory" for a normalised spec."""
    if spec in BUILT_IN_LEARNERS:
        return "built-in"
    return "file" if spec.endswith(".keras") else "factory"


# ----------------------------------------------------------------------------------------------- building
def build_learner(spec: str, image_shape, n_way: int, filters: int = 32, dtype_policy: str | None = None):
    """A learner model for `spec` taking `image_shape` images and returning `n_way` logits (not yet checked:
    see `check_learner`). A `.keras` learner is returned with the file's weights, or, saved with another number
    of classes, as a freshly initialised copy with an `n_way` output layer. With `dtype_policy` (a Keras policy
    name such as "mixed_bfloat16") every layer is made with that policy; LearnerError if some layer keeps its
    own (a saved model's layers, or a factory's that set their dtype)."""
    with _global_dtype_policy(dtype_policy):
        learner = _build(spec, image_shape, n_way, filters)
    if dtype_policy is not None:
        _check_dtype_policy(learner, dtype_policy)
    return learner


def _build(spec, image_shape, n_way, filters):
    kind = learner_kind(spec)
    if kind == "built-in":
        from keras_metalstm import learners

        height, width, channels = image_shape
        if min(height, width) < learners.BUILT_IN_MIN_SIDE:
            side = learners.BUILT_IN_MIN_SIDE
            raise LearnerError(
                f"the built-in learner {spec} halves the image four times (2x2 max pooling) and needs images of at "
                f"least {side}x{side}, got {height}x{width}: give --image-shape {side},{side},{channels} or larger "
                "(the paper's: 28,28,1 and 84,84,3), or a learner of your own (--learner)"
            )
        return learners.BUILT_IN[spec](input_shape=tuple(image_shape), num_classes=int(n_way), filters=filters)
    if kind == "file":
        model = load_learner_file(spec)
        shape = getattr(model, "output_shape", None)
        if isinstance(shape, tuple) and len(shape) == 2 and shape[-1] != n_way:
            # A classifier saved with another number of classes: the same architecture with an N-way head.
            return fresh_copy(model, num_classes=n_way)
        return model
    return _call_factory(spec, tuple(int(v) for v in image_shape), int(n_way))


@contextlib.contextmanager
def _global_dtype_policy(policy):
    """Keras' global dtype policy set to `policy` (None: left alone) inside, restored after: the meta-learner
    made later keeps its own float32."""
    import keras

    if policy is None:
        yield
        return
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _check_dtype_policy(learner, policy):
    import keras

    others = sorted(
        {
            f"{layer.name} ({layer.dtype_policy.name})"
            for layer in learner._flatten_layers(include_self=False)
            if not isinstance(layer, keras.layers.InputLayer) and layer.dtype_policy.name != policy
        }
    )
    if others:
        raise LearnerError(
            f"dtype policy {policy} (--dtype-policy) was asked for, but {len(others)} of the learner's layers keep "
            f"their own: {', '.join(others[:5])}{' ...' if len(others) > 5 else ''}. A saved model's layers and "
            "a factory's that set their dtype are not changed by it: leave --dtype-policy out and build the "
            f"learner with {policy} (keras.config.set_dtype_policy before building, or dtype= on its layers)"
        )


def load_learner_file(path):
    """The Keras model saved at `path` (safe_mode=True), or LearnerError saying why it cannot be loaded."""
    import keras

    import keras_metalstm  # noqa: F401 (registers the package's classes for models that contain them)

    path = Path(path)
    if not path.is_file():
        raise LearnerError(f"learner file {path} does not exist; pass a .keras file saved with model.save()")
    unimported = import_custom_class_modules(keras_file_config(path))
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as error:  # noqa: BLE001 - keras raises many types for a bad file
        raise LearnerError(f"cannot load the learner file {path}: {first_line(error)}{unimported}") from None


def _call_factory(spec: str, image_shape, n_way: int):
    module_name, _, function_name = spec.partition(":")
    with_current_directory_on_path()
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


def check_classes_can_change(architecture) -> None:
    """LearnerError unless a model of `architecture` (its Keras config) can be given another number of classes,
    as the classifier pre-trained for theta_0 and the baselines is (one output per meta-train class)."""
    _output_layer_config(architecture)


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


# ----------------------------------------------------------------------------------------------- checking
PROBABILITIES = (
    "the learner returns probabilities (its outputs sum to 1, a softmax); the meta-learner needs logits: remove the "
    "final softmax (Dense(num_classes) with no activation)"
)


def check_learner_form(learner) -> None:
    """LearnerError unless `learner`, as declared (nothing is run), can be a learner: a keras.Model with float
    inputs, no Lambda layer, and one output that is not squashed by a final activation. What every MetaLearner
    checks; a run checks more (`check_learner`)."""
    import keras

    if not isinstance(learner, keras.Model):
        raise LearnerError(
            f"the learner must be a keras.Model, got {type(learner).__name__}: return the model (e.g. "
            "keras.Model(inputs, logits)) from the factory"
        )
    input_dtypes = {str(tensor.dtype) for tensor in getattr(learner, "inputs", None) or []}
    if any(not dtype.startswith(("float", "bfloat")) for dtype in input_dtypes):
        raise LearnerError(
            f"the learner's input is {', '.join(sorted(input_dtypes))} but the meta-learner feeds it float32 images "
            "in [0, 1], which that dtype would truncate to 0 and 1: declare a float input (keras.Input(shape) with "
            "no dtype) and drop any Rescaling(1/255) at the input"
        )
    layers = learner._flatten_layers(include_self=False)
    lambdas = [layer.name for layer in layers if type(layer) is keras.layers.Lambda]
    if lambdas:
        raise LearnerError(
            f"the learner holds Lambda layers ({', '.join(lambdas)}): Lambda layers cannot be loaded safely, and "
            "adapt() and every export copy the learner; write a small layer class instead (a keras.layers.Layer "
            "subclass registered with @keras.saving.register_keras_serializable())"
        )
    outputs = getattr(learner, "outputs", None) or []
    if len(outputs) > 1:
        raise LearnerError(
            f"the learner has {len(outputs)} outputs; the meta-learner needs one tensor of logits per image: "
            "return only the classifier's output"
        )
    activation = _final_activation(learner)
    if activation == "softmax":
        raise LearnerError(PROBABILITIES)
    if activation is not None:
        raise LearnerError(
            f"the learner's last layer applies {activation}, which bounds its outputs, but the meta-learner reads "
            "them as the logits of a softmax cross-entropy, which must be free to grow: remove the final "
            "activation (Dense(num_classes) with no activation)"
        )


def check_learner(learner, image_shape, n_way: int, batch: int = 5) -> None:
    """Run `learner` once on `batch` episode-shaped images as the meta-learner will; LearnerError naming the
    problem and its fix if it is not a model mapping (H, W, C) images in [0, 1] to `n_way` logits that can run
    as a pure function of its weights."""
    import tensorflow as tf

    image_shape = tuple(int(v) for v in image_shape)
    check_learner_form(learner)
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
    if np.all(outputs >= 0) and np.allclose(outputs.sum(axis=-1), 1.0, atol=1e-5):
        raise LearnerError(PROBABILITIES)
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


# Keras ops that squash a functional model's output when called on it after its last layer (keras.ops.softmax(x)):
# the class of the operation the model's graph records, and the activation's name.
_SQUASHING_OPS = {
    "Softmax": "softmax", "Sigmoid": "sigmoid", "HardSigmoid": "hard_sigmoid", "Tanh": "tanh", "Relu": "relu",
    "Relu6": "relu6", "Softsign": "softsign", "Softplus": "softplus",
}


def _final_activation(learner) -> str | None:
    """The name of the activation the learner's last layer, or a Keras op called after it, applies to its outputs;
    None for none, or for a log-softmax, whose outputs are logits of the same softmax."""
    import keras

    outputs = getattr(learner, "outputs", None) or []
    history = getattr(outputs[0], "_keras_history", None) if len(outputs) == 1 else None
    if history and type(history[0]).__name__ in _SQUASHING_OPS and not isinstance(history[0], keras.layers.Layer):
        return _SQUASHING_OPS[type(history[0]).__name__]
    last = learner.layers[-1] if getattr(learner, "layers", None) else None
    if isinstance(last, keras.layers.Softmax):
        return "softmax"
    if isinstance(last, keras.layers.ReLU):
        return "relu"
    name = getattr(getattr(last, "activation", None), "__name__", "linear")
    return None if name in ("linear", "log_softmax") else name


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
