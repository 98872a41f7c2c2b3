"""Prediction with any exported form: an adapted `.keras` file, a SavedModel version folder or an `.onnx` file.

All predictors take float32 images (batch, H, W, C) in [0, 1] (the training scale) and return a dict with
``logits``, ``probabilities``, ``class_ids`` and ``class_names`` (NumPy arrays); `keras_metalstm.export.inputs`
turns image files and ``.npy`` arrays into that input.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from pathlib import Path

import numpy as np

from keras_metalstm.config import CONFIG_FILE_NAME, first_line
from keras_metalstm.export.errors import ExportError
from keras_metalstm.export.files import versions
from keras_metalstm.export.inputs import check_images

# TensorFlow's oneDNN CPU kernel for a convolution fused with a residual add gives wrong outputs or crashes when
# a model is called from several threads at once (docs/serving.md): the TensorFlow predictors take this lock, so
# one call runs at a time (each still uses every core). ONNX Runtime sessions are safe to share between threads.
_TENSORFLOW_CALLS = threading.Lock()


class Predictor:
    """Common interface; subclasses set ``kind``, ``path``, ``image_shape``, ``class_names``, ``_run``.
    `predict` may be called from several threads."""

    kind = ""
    _calls = contextlib.nullcontext()
    # Images per model call: a folder of thousands of images in one call would hold every image's activations
    # at once (50,000 84x84 images: 45 GB for conv4's first layer alone).
    batch_size = 256

    def predict(self, images):
        images = check_images(images, self.image_shape)
        chunks = []
        for start in range(0, len(images), self.batch_size) or [0]:
            with self._calls:
                chunks.append(self._run(images[start : start + self.batch_size]))
        outputs = {key: np.concatenate([np.asarray(chunk[key]) for chunk in chunks]) for key in chunks[0]}
        names = outputs.get("class_names")
        if names is None:
            names = np.array([self.class_names[i] for i in outputs["class_ids"]], dtype=object)
        outputs["class_names"] = np.array(
            [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names], dtype=object
        )
        outputs["class_ids"] = outputs["class_ids"].astype(np.int64)
        return outputs

    def predict_inputs(self, inputs, progress=None):
        """`prediction_records` for an `ImageInputs`, read and predicted ``batch_size`` images at a time (memory
        does not grow with the number of images); ``progress(n)`` is called after each batch of n images."""
        records = []
        for images, names in inputs.batches(self.batch_size):
            records.extend(prediction_records(names, self.predict(images)))
            if progress is not None:
                progress(len(names))
        return records


class KerasPredictor(Predictor):
    kind = "keras"
    _calls = _TENSORFLOW_CALLS

    def __init__(self, adapted, path=None):
        self.model = adapted
        self.path = path
        self.image_shape = tuple(adapted.image_shape)
        self.class_names = list(adapted.class_names)

    def _run(self, images):
        # predict_on_batch: the compiled predict function without predict()'s per-call tf.data set-up.
        logits = np.asarray(self.model.predict_on_batch(images))
        return _from_logits(logits)


def _load_savedmodel(path):
    import tensorflow as tf

    try:
        return tf.saved_model.load(str(path))
    except Exception as error:  # noqa: BLE001 - a truncated or corrupt saved_model.pb, missing variables ...
        raise ExportError(
            f"cannot load the SavedModel {path}: {first_line(error)}. The export is damaged: export it again "
            "(metalstm export)"
        ) from None


def _load_signature(path, name, image_input, fix):
    """(loaded SavedModel, its signature `name`, the image shape of that signature's input `image_input`);
    ExportError naming the signatures it has and `fix` when it has no `name`."""
    loaded = _load_savedmodel(path)
    if name not in loaded.signatures:
        raise ExportError(f"{path} has no {name} signature (signatures: {list(loaded.signatures)}): {fix}")
    signature = loaded.signatures[name]
    spec = signature.structured_input_signature[1][image_input]
    return loaded, signature, tuple(int(v) for v in spec.shape[1:])


class SavedModelPredictor(Predictor):
    kind = "savedmodel"
    _calls = _TENSORFLOW_CALLS

    def __init__(self, path):
        from keras_metalstm.export.savedmodel import read_metadata

        self.path = Path(path)
        self._loaded, self.signature, self.image_shape = _load_signature(
            self.path,
            "serving_default",
            "images",
            "a meta-learner SavedModel adapts in serving: give it a support set (--support DIR, one sub-folder "
            "per class), or export an adapted learner to predict.",
        )
        self.class_names = read_metadata(self.path).get("class_names", [])

    def _run(self, images):
        import tensorflow as tf

        return {key: value.numpy() for key, value in self.signature(images=tf.constant(images)).items()}


class AdaptInServingPredictor(Predictor):
    """A meta-learner's adapt-in-serving SavedModel (`export_meta`) with a support set: every `predict` adapts
    to the support set inside the SavedModel's graph (as TensorFlow Serving runs it) and classifies the images;
    class names are the support folder's."""

    kind = "adapt-in-serving savedmodel"
    _calls = _TENSORFLOW_CALLS

    def __init__(self, path, support_dir):
        from keras_metalstm.export.adapted import load_support_folder, warn_if_unbalanced
        from keras_metalstm.export.savedmodel import read_metadata

        self.path = Path(path)
        self._loaded, self.signature, self.image_shape = _load_signature(
            self.path,
            "adapt_and_predict",
            "query_images",
            "it classifies without a support set (a support set is only for a meta-learner's adapt-in-serving "
            "SavedModel): leave --support out.",
        )
        images, labels, self.class_names = load_support_folder(
            support_dir, self.image_shape, read_metadata(self.path).get("n_way")
        )
        warn_if_unbalanced(np.bincount(labels, minlength=len(self.class_names)), self.class_names)
        self.support = {"support_images": images, "support_labels": labels}

    def _run(self, images):
        import tensorflow as tf

        inputs = {key: tf.constant(value) for key, value in {**self.support, "query_images": images}.items()}
        return {key: value.numpy() for key, value in self.signature(**inputs).items()}


class OnnxPredictor(Predictor):
    kind = "onnx"

    def __init__(self, path, threads=None):
        try:
            import onnxruntime as ort
        except ImportError as error:
            raise ExportError(
                "ONNX prediction needs onnxruntime, which keras-metalstm installs; it is missing or broken here "
                f"({error}): reinstall keras-metalstm."
            ) from error
        from keras_metalstm.export.onnx_format import onnx_metadata

        self.path = Path(path)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # noqa: BLE001 - onnxruntime's InvalidProtobuf, Fail ... for a bad file
            raise ExportError(
                f"cannot load the ONNX model {self.path}: {first_line(error)}. The file is damaged or not an "
                "ONNX model: export it again (metalstm export --format onnx)"
            ) from None
        inputs = self.session.get_inputs()
        if [i.name for i in inputs] != ["images"]:
            raise ExportError(
                f"{self.path} is not a keras-metalstm export: inputs {[i.name for i in inputs]}."
            )
        self.image_shape = tuple(int(v) for v in inputs[0].shape[1:])
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.class_names = onnx_metadata(self.session).get("class_names", [])

    def _run(self, images):
        return dict(
            zip(self.output_names, self.session.run(self.output_names, {"images": images}), strict=True)
        )


def _from_logits(logits):
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return {
        "logits": logits,
        "probabilities": shifted / shifted.sum(axis=-1, keepdims=True),
        "class_ids": logits.argmax(axis=-1).astype(np.int64),
    }


def resolve_model_path(path):
    """A SavedModel folder, `.onnx` or `.keras` file from ``path``; a TF-Serving model folder resolves to its
    newest version. Returns (kind, resolved path)."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".onnx":
            return "onnx", path
        if path.suffix == ".keras":
            return "keras", path
        raise ExportError(f"{path}: expected a SavedModel folder, an .onnx file or an adapted .keras file.")
    if not path.is_dir():
        raise ExportError(f"model {path} not found.")
    if (path / "saved_model.pb").is_file():
        return "savedmodel", path
    if (path / "model.onnx").is_file():
        return "onnx", path / "model.onnx"
    found = versions(path)
    if found:
        return resolve_model_path(path / str(found[-1]))
    run_hint = (
        f" {path} is a training run: adapt it to your classes first (metalstm adapt {path} --support DIR --out "
        f"task.keras) and predict with task.keras or its export, or export the run (metalstm export {path}) and "
        "predict with --support DIR."
        if (path / CONFIG_FILE_NAME).is_file()
        else ""
    )
    raise ExportError(
        f"{path} holds no saved_model.pb, model.onnx or version folders: pass the NAME/<version> folder written "
        f"by `metalstm export`, or an .onnx file.{run_hint}"
    )


def load_predictor(path, threads=None, support=None):
    """A Predictor for a SavedModel version folder (or its model folder: newest version), `.onnx` or `.keras`;
    with `support` (a folder of one sub-folder of images per class), for a meta-learner's adapt-in-serving
    SavedModel, adapting to that support set."""
    kind, resolved = resolve_model_path(path)
    if support is not None:
        if kind != "savedmodel":
            raise ExportError(
                f"{resolved} is an adapted learner ({kind}): a support set is only for a meta-learner's "
                "adapt-in-serving SavedModel; leave --support out."
            )
        return AdaptInServingPredictor(resolved, support)
    if kind == "onnx":
        return OnnxPredictor(resolved, threads=threads)
    if kind == "savedmodel":
        return SavedModelPredictor(resolved)
    from keras_metalstm.export.adapted import load_adapted

    return KerasPredictor(load_adapted(resolved), path=resolved)


@dataclasses.dataclass(frozen=True)
class Accuracy:
    """How many predictions were right, per true class ({name: (right, images)}), and in all."""

    per_class: dict

    @property
    def right(self):
        return sum(right for right, _ in self.per_class.values())

    @property
    def images(self):
        return sum(images for _, images in self.per_class.values())

    @property
    def share(self):
        return self.right / self.images

    def summary(self):
        classes = ", ".join(f"{name} {right}/{images}" for name, (right, images) in self.per_class.items())
        return f"accuracy {self.share:.2%} ({self.right} of {self.images} images): {classes}"


def accuracy(records, labels):
    """The `Accuracy` of `prediction_records` against ``labels`` (one true class name per record); each record
    gains its "label"."""
    per_class = {}
    for record, label in zip(records, labels, strict=True):
        record["label"] = label
        right, images = per_class.get(label, (0, 0))
        per_class[label] = (right + (record["class_name"] == label), images + 1)
    return Accuracy(per_class)


def prediction_records(names, outputs):
    """JSON-ready rows {"image", "class_name", "probability", "logits"}."""
    records = []
    for i, name in enumerate(names):
        class_id = int(outputs["class_ids"][i])
        records.append(
            {
                "image": name,
                "class_name": str(outputs["class_names"][i]),
                "probability": float(outputs["probabilities"][i][class_id]),
                "logits": [float(v) for v in outputs["logits"][i]],
            }
        )
    return records
