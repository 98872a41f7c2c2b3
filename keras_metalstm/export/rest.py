"""TensorFlow Serving's REST request format, run in-process against a loaded signature.

`rest_predict(signature, body)` takes the JSON body of ``POST /v1/models/NAME[/versions/V]:predict`` in either
form: row (``{"instances": [...]}``: one entry per example, a dict of named inputs or, for a one-input signature,
the bare value) or columnar (``{"inputs": {...}}`` or a bare value). ``{"b64": "..."}`` objects are decoded
to bytes, as TensorFlow Serving does. The reply is ``{"predictions": [...]}`` (row) or ``{"outputs": {...}}``
(columnar), with strings decoded as UTF-8. Handy to test a request before deploying it.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import tensorflow as tf

from keras_metalstm.export.errors import ExportError


def _decode_b64(value):
    if isinstance(value, dict):
        if set(value) == {"b64"}:
            return base64.b64decode(value["b64"])
        return {key: _decode_b64(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_decode_b64(item) for item in value]
    return value


def _tensor(value, spec):
    try:
        if spec.dtype == tf.string:  # not through NumPy: its fixed-width bytes drop a file's trailing zero bytes
            return tf.constant(value, dtype=tf.string)
        array = np.asarray(value)
        if array.size == 0 and spec.shape.rank:  # an empty batch, []: its examples' shape is the signature's
            array = array.reshape([0, *(dim or 0 for dim in spec.shape[1:])])
        return tf.constant(array, dtype=spec.dtype)
    except (ValueError, TypeError) as error:
        raise ExportError(f"input {spec.name!r}: cannot convert to {spec.dtype.name}: {error}") from error


def _jsonable(array):
    array = np.asarray(array)
    if array.dtype.kind in ("S", "O"):
        return np.vectorize(lambda b: b.decode("utf-8") if isinstance(b, bytes) else str(b), otypes=[object])(
            array
        ).tolist()
    return array.tolist()


def rest_predict(signature, body):
    """Runs a TensorFlow Serving REST predict body (dict or JSON string) through ``signature``."""
    if isinstance(body, (str, bytes)):
        body = json.loads(body)
    specs = signature.structured_input_signature[1]
    names = sorted(specs)
    if "instances" in body:
        instances = _decode_b64(body["instances"])
        if len(names) == 1 and not (instances and isinstance(instances[0], dict)):
            columns = {names[0]: instances}
        else:
            columns = {name: [instance[name] for instance in instances] for name in names}
        row = True
    elif "inputs" in body:
        inputs = _decode_b64(body["inputs"])
        columns = inputs if isinstance(inputs, dict) else {names[0]: inputs}
        row = False
    else:
        raise ExportError('a predict request needs "instances" (row format) or "inputs" (columnar format).')
    missing = sorted(set(names) - set(columns))
    if missing:
        raise ExportError(f"the request misses input(s) {missing}; the signature takes {names}.")
    outputs = signature(**{name: _tensor(columns[name], specs[name]) for name in names})
    outputs = {key: _jsonable(value.numpy()) for key, value in outputs.items()}
    if not row:
        return {"outputs": outputs}
    count = len(next(iter(outputs.values())))
    return {"predictions": [{key: value[i] for key, value in outputs.items()} for i in range(count)]}
