"""ONNX export of an adapted learner (tf2onnx, opsets 13..18).

Same named input ``images`` (float32 (batch, H, W, C) in [0, 1], dynamic batch) and outputs ``logits``,
``probabilities``, ``class_ids`` (int64) and ``class_names`` (string) as the SavedModel's ``serving_default``;
the class names, image shape and input scale are also in the model's metadata (``metadata_props``). There is no
encoded-image input (the antialiased resize op has no ONNX equivalent): clients resize with the package's rule
(`keras_metalstm.data.convert_images`; `metalstm predict` does). The meta-learner's adapt-in-serving cannot be
exported to ONNX, which has no gradient operators.

`tf2onnx.convert.from_keras` fails on Keras 3 models (it looks up `model.output_names`, which Keras 3 names
after its symbolic tensors: KeyError 'keras_tensor_N'); the supported path, used here, is
`tf2onnx.convert.from_function` on a tf.function with an input signature.

tf2onnx leaves a TensorFlow op it has no rule for in the graph as it is, and the model then fails to load. Two such
ops come from Keras activations: Erfc, in the exact GELU (`activation="gelu"`), written here as 1 - Erf, and
Expm1, in CELU, as Exp - 1. Any other op ONNX cannot express stops the export with its name and the alternatives.
"""

from __future__ import annotations

import contextlib
import json
import logging

import numpy as np
import tensorflow as tf
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

from keras_metalstm.export.errors import ExportError
from keras_metalstm.export.savedmodel import ClassifierModule

OPSETS = tuple(range(13, 19))
DEFAULT_OPSET = 17


def _check_opset(opset):
    if int(opset) not in OPSETS:
        raise ExportError(f"ONNX opset must be between {OPSETS[0]} and {OPSETS[-1]}, got {opset}.")
    return int(opset)


def to_onnx(adapted, opset=DEFAULT_OPSET):
    """The ONNX ModelProto of an AdaptedLearner (see the module docstring)."""
    try:
        import tf2onnx
    except ImportError as error:
        raise ExportError(
            "ONNX export needs tf2onnx, onnx and onnxruntime, which keras-metalstm installs; they are missing "
            f"or broken here ({error}): reinstall keras-metalstm."
        ) from error
    opset = _check_opset(opset)
    module = ClassifierModule(adapted)
    spec = module.serving_default.input_signature
    # tf2onnx makes every captured tensor that is not a variable an input of the model (a Keras Normalization
    # layer captures its mean and variance so): the frozen function captures nothing, its weights are constants.
    concrete = tf.function(module._classify).get_concrete_function(*spec)
    frozen = convert_variables_to_constants_v2(concrete)
    function = tf.function(
        lambda images: tf.nest.pack_sequence_as(concrete.structured_outputs, frozen(images)), input_signature=spec
    )
    with _tf2onnx_quiet():
        model, _ = tf2onnx.convert.from_function(
            function, input_signature=spec, opset=opset, custom_op_handlers=dict(_REWRITTEN_OPS)  # tf2onnx adds to it
        )
    _check_every_op_is_onnx(model, opset)
    _name_batch_axis(model)
    for key, value in {
        "class_names": json.dumps(list(adapted.class_names), ensure_ascii=False),
        "image_shape": json.dumps(list(adapted.image_shape)),
        "input_scale": adapted.info.get("input_scale", ""),
        "producer": "keras_metalstm",
    }.items():
        model.metadata_props.add(key=key, value=value)
    model.doc_string = (
        "keras-metalstm adapted learner: images float32 (batch, H, W, C) in [0, 1] -> class scores"
    )
    return model


@contextlib.contextmanager
def _tf2onnx_quiet():
    """tf2onnx logs each op it cannot convert ("Tensorflow op [...] is not supported") and carries on;
    `_check_every_op_is_onnx` names those ops in its own error with the fix, so the user reads one message, not
    tf2onnx's lines before it. Its exceptions still propagate."""
    tf2onnx_logger = logging.getLogger("tf2onnx")
    level = tf2onnx_logger.level
    tf2onnx_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        tf2onnx_logger.setLevel(level)


def _one_and(onnx_op, one_minus):
    """A tf2onnx handler for a TensorFlow op that ONNX lacks, from the ONNX op `onnx_op` and the constant 1:
    1 - onnx_op(x) if `one_minus`, else onnx_op(x) - 1."""

    def handler(graph, node, name, args):
        from tf2onnx import utils

        node.type = onnx_op
        dtype = utils.map_onnx_to_numpy_type(graph.get_dtype(node.output[0]))
        one = graph.make_const(utils.make_name(f"{name}_one"), np.ones((), dtype)).output[0]
        operands = [one, node.output[0]] if one_minus else [node.output[0], one]
        graph.insert_new_node_on_output("Sub", node.output[0], name=utils.make_name(f"{name}_sub"), inputs=operands)

    return handler


# TensorFlow ops of Keras activations that tf2onnx leaves unconverted: Erfc (exact GELU) and Expm1 (CELU).
_REWRITTEN_OPS = {"Erfc": (_one_and("Erf", one_minus=True), []), "Expm1": (_one_and("Exp", one_minus=False), [])}


def _check_every_op_is_onnx(model, opset):
    """ExportError naming the TensorFlow ops tf2onnx could not convert (left in the graph, the model would not
    load)."""
    import onnx

    unknown = sorted(
        {
            node.op_type
            for node in model.graph.node
            if node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type, max_inclusive_version=opset)
        }
    )
    if unknown:
        raise ExportError(
            f"the learner uses TensorFlow ops that ONNX opset {opset} cannot express: {', '.join(unknown)}. Export "
            "it as a SavedModel only (--format savedmodel, for TensorFlow Serving), or build the learner from "
            "layers whose ops ONNX has."
        )


def _name_batch_axis(model):
    """Call the dynamic first axis of every input and output 'batch' (tf2onnx names it unk__N)."""
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"


def write_onnx(adapted, path, opset=DEFAULT_OPSET):
    """Writes the ONNX model to ``path`` (the caller makes it atomic)."""
    model = to_onnx(adapted, opset)
    with open(path, "wb") as handle:
        handle.write(model.SerializeToString())
    return path


def onnx_metadata(session):
    """{key: value} of an onnxruntime session's model metadata (JSON values decoded)."""
    props = dict(session.get_modelmeta().custom_metadata_map)
    for key in ("class_names", "image_shape"):
        if key in props:
            props[key] = json.loads(props[key])
    return props
