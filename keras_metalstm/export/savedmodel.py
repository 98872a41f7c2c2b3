"""SavedModels for TensorFlow Serving: an adapted learner's classifier and the meta-learner's adapt-in-serving.

Adapted learner, signatures (`NAME/<version>/`, TensorFlow Serving's layout):

* ``serving_default``: input ``images`` float32 (batch, H, W, C) in [0, 1] (the training scale, see
  `keras_metalstm.export.adapted.INPUT_SCALE`); outputs ``logits`` float32 (batch, N), ``probabilities`` float32
  (batch, N), ``class_ids`` int64 (batch,), ``class_names`` string (batch,).
* ``predict_encoded``: input ``image_bytes`` string (batch,), each an encoded PNG/JPEG/GIF/BMP file (TensorFlow
  Serving's REST form ``{"b64": "..."}``); decoded, converted (`keras_metalstm.data.CONVERSION_RULE`),
  rounded to uint8 and divided by 255 inside the graph exactly as the training data were; same outputs.

Meta-learner (adapt-in-serving), signature ``adapt_and_predict``: inputs ``support_images`` float32
(N*K, H, W, C), ``support_labels`` int32 (N*K,) in 0..N-1, ``query_images`` float32 (batch, H, W, C); outputs
``logits``, ``probabilities``, ``class_ids`` (the support label the query is given). One task per request (the
episode axis is fixed to 1 inside), any number of support and query images, the inner loop's T fixed at export.
``adapt_and_predict_encoded``: the same on files, ``support_image_bytes`` string (N*K,), ``support_labels``,
``query_image_bytes`` string (batch,), decoded and converted as ``predict_encoded`` does (for a client without
the conversion rule; over REST in the columnar form, as support and queries differ in number).
The ``*_encoded`` signatures exist for learners on 1 (grey) or 3 (RGB) channels, what image files decode to; a
learner on other channels (2, 4, a stack of bands) is served on arrays only.
The inner loop's gradients are ordinary ops of the saved graph, so TensorFlow Serving runs it with no Python.
ONNX cannot express it (no gradient operators), so there is no ONNX form of the meta-learner.
"""

from __future__ import annotations

import json
from pathlib import Path

import tensorflow as tf

from keras_metalstm.data import decode_image_bytes
from keras_metalstm.data.images import to_uint8
from keras_metalstm.export.adapted import INPUT_SCALE, meta_image_shape, meta_n_way
from keras_metalstm.export.inputs import inner_steps_of
from keras_metalstm.ops import fused_kernels

METADATA_FILE = "assets.extra/keras_metalstm.json"
SIGNATURE_OUTPUTS = ("logits", "probabilities", "class_ids", "class_names")
ENCODED_CHANNELS = (1, 3)  # what image files decode to


def takes_image_files(image_shape) -> bool:
    """Whether a model on `image_shape` images gets the signatures on encoded image files."""
    return image_shape[-1] in ENCODED_CHANNELS


def _outputs(logits, class_names=None):
    class_ids = tf.argmax(logits, axis=-1, output_type=tf.int64)
    outputs = {
        "logits": tf.identity(logits, name="logits"),
        "probabilities": tf.nn.softmax(logits, axis=-1),
        "class_ids": class_ids,
    }
    if class_names is not None:
        # A constant created inside the function: a graph constant (not a captured input) for every exporter.
        outputs["class_names"] = tf.gather(tf.constant(list(class_names), dtype=tf.string), class_ids)
    return outputs


def decode_for_serving(image_bytes, image_shape):
    """Encoded images (string (batch,)) -> float32 (batch, H, W, C) prepared exactly as the training data."""
    shape = tuple(image_shape)

    def one(contents):
        images = decode_image_bytes(contents, shape)
        # The loaders store uint8 round(255 x); the episode pipeline multiplies by 1/255 (the same op here).
        return tf.cast(to_uint8(images), tf.float32) * (1.0 / 255.0)

    return tf.map_fn(one, image_bytes, fn_output_signature=tf.TensorSpec(shape, tf.float32))


class ClassifierModule(tf.Module):
    """The serving functions of an AdaptedLearner (see the module docstring)."""

    def __init__(self, adapted):
        super().__init__(name="adapted_classifier")
        self.learner = adapted.learner
        # Keras does not expose a layer's random seed state (augmentation, noise) to TensorFlow's checkpoint
        # tracking; a SavedModel must reach every variable the traced functions capture.
        self.learner_variables = list(adapted.learner.variables)
        self.class_names = list(adapted.class_names)
        self.image_shape = tuple(adapted.image_shape)
        spec = tf.TensorSpec([None, *self.image_shape], tf.float32, name="images")
        self.serving_default = tf.function(self._classify, input_signature=[spec])
        if takes_image_files(self.image_shape):
            self.predict_encoded = tf.function(
                self._classify_encoded, input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")]
            )

    def _classify(self, images):
        return _outputs(self.learner(images, training=False), self.class_names)

    def _classify_encoded(self, image_bytes):
        return self._classify(decode_for_serving(image_bytes, self.image_shape))

    def signatures(self):
        return {name: getattr(self, name) for name in ("serving_default", "predict_encoded") if hasattr(self, name)}


class AdaptInServingModule(tf.Module):
    """The ``adapt_and_predict`` function of a MetaLearner (see the module docstring)."""

    def __init__(self, meta, inner_steps=None):
        super().__init__(name="meta_learner")
        self.meta = meta
        self.inner_steps = inner_steps_of(meta, inner_steps)
        self.n_way = meta_n_way(meta)
        self.image_shape = meta_image_shape(meta)
        image_spec = [None, *self.image_shape]
        self.adapt_and_predict = tf.function(
            self._adapt_and_predict,
            input_signature=[
                tf.TensorSpec(image_spec, tf.float32, name="support_images"),
                tf.TensorSpec([None], tf.int32, name="support_labels"),
                tf.TensorSpec(image_spec, tf.float32, name="query_images"),
            ],
        )
        if takes_image_files(self.image_shape):
            self.adapt_and_predict_encoded = tf.function(
                self._adapt_and_predict_encoded,
                input_signature=[
                    tf.TensorSpec([None], tf.string, name="support_image_bytes"),
                    tf.TensorSpec([None], tf.int32, name="support_labels"),
                    tf.TensorSpec([None], tf.string, name="query_image_bytes"),
                ],
            )

    def _adapt_and_predict(self, support_images, support_labels, query_images):
        checks = [
            tf.debugging.assert_equal(
                tf.shape(support_labels)[0],
                tf.shape(support_images)[0],
                message="support_labels needs one label per support image",
            ),
            tf.debugging.assert_non_negative(support_labels, message="support_labels must be >= 0"),
            tf.debugging.assert_less(
                support_labels, self.n_way, message=f"support_labels must be < n_way = {self.n_way}"
            ),
            # An empty support set adapts to NaN; a class without images gets logits from theta_0 alone.
            tf.debugging.assert_positive(
                tf.math.bincount(tf.cast(support_labels, tf.int32), minlength=self.n_way, maxlength=self.n_way),
                message=f"every class 0..{self.n_way - 1} needs at least one support image",
            ),
        ]
        with tf.control_dependencies(checks):
            support_images = tf.identity(support_images)
        # Stock TensorFlow ops only: TensorFlow Serving has no copy of our fused CPU kernel.
        with fused_kernels.disabled():
            theta, states = self.meta.inner_loop(
                support_images[tf.newaxis], support_labels[tf.newaxis], inner_steps=self.inner_steps
            )
        logits = self.meta.query_logits(theta, states, query_images[tf.newaxis], mode="test")[0]
        return _outputs(logits)

    def _adapt_and_predict_encoded(self, support_image_bytes, support_labels, query_image_bytes):
        return self._adapt_and_predict(
            decode_for_serving(support_image_bytes, self.image_shape),
            support_labels,
            decode_for_serving(query_image_bytes, self.image_shape),
        )

    def signatures(self):
        names = ("adapt_and_predict", "adapt_and_predict_encoded")
        return {name: getattr(self, name) for name in names if hasattr(self, name)}


def adapted_metadata(adapted, module):
    return {
        "kind": "adapted_learner",
        "class_names": list(adapted.class_names),
        "image_shape": list(adapted.image_shape),
        "input": "images",
        "input_scale": INPUT_SCALE,
        "outputs": list(SIGNATURE_OUTPUTS),
        "signatures": list(module.signatures()),
        "info": adapted.info,
    }


def meta_metadata(module):
    return {
        "kind": "meta_learner",
        "n_way": module.n_way,
        "inner_steps": module.inner_steps,
        "image_shape": list(module.image_shape),
        "input_scale": INPUT_SCALE,
        "signatures": list(module.signatures()),
    }


def write_savedmodel(module, directory, metadata):
    """tf.saved_model.save of a serving module into ``directory`` (plus its JSON metadata in assets.extra)."""
    directory = Path(directory)
    tf.saved_model.save(module, str(directory), signatures=module.signatures())
    meta_path = directory / METADATA_FILE
    meta_path.parent.mkdir(parents=True, exist_ok=True)
    meta_path.write_text(json.dumps(metadata, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return directory


def read_metadata(directory):
    """The JSON metadata written beside a SavedModel ({} if absent)."""
    path = Path(directory) / METADATA_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
