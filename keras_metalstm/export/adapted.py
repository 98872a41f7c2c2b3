"""Adapting a meta-learner to a new task and the `.keras` file of the adapted learner.

The adapted learner travels as ONE `.keras` file: `AdaptedLearner` is a registered-serializable Keras model that
wraps the adapted copy of the learner (theta_T and the support set's batch-norm statistics) and carries the class
names, the input spec and provenance in its config. A JSON sidecar could be lost or mismatched when files are
copied; a wrapper keeps weights and metadata in one archive that `keras.saving.load_model` restores (after
``import keras_metalstm.export``, which registers the class; `load_adapted` does that).

Input scale (the same as training): float32 images (batch, H, W, C) with values in [0, 1], converted from image
files by the package's rule (`keras_metalstm.data.CONVERSION_RULE`) and rounded to uint8 (``round(255 x)``)
before dividing by 255 -- exactly how the episode pipeline prepares training data.
"""

from __future__ import annotations

import logging
import os
import random
import warnings
import zipfile
from pathlib import Path

import keras
import numpy as np

from keras_metalstm.data import CONVERSION_RULE, load_image_folder
from keras_metalstm.export.errors import ExportError
from keras_metalstm.export.files import atomic_path, check_target
from keras_metalstm.export.inputs import inner_steps_of
from keras_metalstm.learner_architecture import (
    deserialisation_error_text,
    import_custom_class_modules,
    keras_file_config,
)
from keras_metalstm.learner_function import refresh_derived_tensors, variable_dtype
from keras_metalstm.learner_spec import learner_image_shape, learner_num_classes

INPUT_SCALE = (
    "float32 (batch, H, W, C) in [0, 1]: image files converted by the package's rule and stored as uint8 "
    "round(255 x), then divided by 255, as in training"
)


@keras.saving.register_keras_serializable(package="keras_metalstm")
class AdaptedLearner(keras.Model):
    """A learner adapted to one task, with the task's class names and the input spec.

    Args:
        learner: the adapted keras.Model (images -> logits), e.g. from `MetaLearner.adapt`.
        class_names: one name per output class, in label order.
        image_shape: (H, W, C) the learner takes (default: the learner's input shape).
        info: JSON-serialisable provenance (inner steps, shots, meta-learner source...).

    Calling it always runs the learner in inference mode: its batch-norm layers normalise with the statistics
    gathered from the support set, as the meta-learner's test mode does, so a prediction never depends on the
    other images of the batch.
    """

    def __init__(self, learner, class_names, image_shape=None, info=None, **kwargs):
        # Images reach the learner in full precision, whatever the global policy (`in_variable_precision`).
        kwargs["dtype"] = variable_dtype(kwargs.get("dtype"))
        super().__init__(**kwargs)
        self.learner = learner
        self.class_names = tuple(str(name) for name in class_names)
        shape = image_shape if image_shape is not None else learner_image_shape(learner)
        self.image_shape = tuple(int(v) for v in shape)
        self.info = dict(info or {})
        outputs = learner_num_classes(learner, self.image_shape)
        if outputs != len(self.class_names):
            raise ExportError(
                f"the learner has {outputs} outputs but {len(self.class_names)} class names were given: "
                "give one name per class, in label order."
            )
        self.built = True

    @property
    def num_classes(self):
        return len(self.class_names)

    def call(self, images, training=False):
        return self.learner(images, training=False)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "learner": keras.saving.serialize_keras_object(self.learner),
                "class_names": list(self.class_names),
                "image_shape": list(self.image_shape),
                "info": self.info,
            }
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["learner"] = keras.saving.deserialize_keras_object(
            config["learner"], custom_objects=custom_objects
        )
        return cls(**config)


def in_variable_precision(learner, image_shape):
    """`learner`, or, if any of its layers computes in a mixed-precision policy (bfloat16 or float16 on float32
    variables), a copy with the same weights that computes in its variables' dtype: what a server runs (ONNX
    Runtime and TensorFlow Serving on a CPU have no bfloat16 convolutions), and what the parity check compares."""
    if all(
        layer.dtype_policy.compute_dtype == layer.dtype_policy.variable_dtype for layer in learner._flatten_layers()
    ):
        return learner
    config = _variable_dtype_policies(keras.saving.serialize_keras_object(learner))
    previous = keras.config.dtype_policy()
    # A subclassed model creates its layers under the global policy, not from its config.
    keras.config.set_dtype_policy(previous.variable_dtype)
    try:
        copy = keras.saving.deserialize_keras_object(config)
        copy(np.zeros((1, *image_shape), copy.compute_dtype), training=False)
    finally:
        keras.config.set_dtype_policy(previous)
    copy.set_weights(learner.get_weights())
    refresh_derived_tensors(copy)
    return copy


def meta_in_variable_precision(meta):
    """`meta`, or, if its learner computes in a mixed-precision policy, a copy with the same meta-parameters whose
    learner computes in its variables' dtype (`in_variable_precision`): what an adapt-in-serving export runs."""
    learner = in_variable_precision(meta.learner, meta_image_shape(meta))
    if learner is meta.learner:
        return meta
    settings = {key: value for key, value in meta.get_config().items() if key != "learner"}
    copy = type(meta)(learner, **settings)
    copy.set_weights(meta.get_weights())
    return copy


def _variable_dtype_policies(config):
    """A Keras config with every dtype policy replaced by its variable dtype ("mixed_bfloat16" -> "float32")."""
    if isinstance(config, list):
        return [_variable_dtype_policies(item) for item in config]
    if not isinstance(config, dict):
        return config
    if config.get("class_name") == "DTypePolicy":
        return keras.dtype_policies.get(config["config"]["name"]).variable_dtype
    return {key: _variable_dtype_policies(value) for key, value in config.items()}


def meta_image_shape(meta, images=None):
    """(H, W, C) of the meta-learner's learner; for a learner declared for images of any size, that of `images`
    (a batch) where given."""
    shape = learner_image_shape(meta.learner)
    given = np.shape(images)[1:] if images is not None else ()
    if shape is not None and len(shape) == 3 and len(given) == 3:
        shape = tuple(size if declared is None else declared for declared, size in zip(shape, given, strict=True))
    if shape is None or None in shape or len(shape) != 3:
        raise ExportError(
            f"the learner must take images of a fixed shape (H, W, C); its input shape is {shape}: declare it "
            "(keras.Input(shape=(H, W, C)))."
        )
    return tuple(int(v) for v in shape)


def meta_n_way(meta, images=None):
    """N: the number of classes the meta-learner's learner outputs (see `meta_image_shape` for `images`)."""
    return learner_num_classes(meta.learner, meta_image_shape(meta, images))


def load_support_folder(root, image_shape, n_way=None):
    """A support set from ``root/<class>/*`` images (``IMAGE_EXTENSIONS``; one sub-folder per class, names sorted).

    Returns ``(images float32 (n, H, W, C) in [0, 1], labels int32 (n,), class_names)``; every image converted
    to ``image_shape`` by the package's rule and rounded to uint8 first, as the training data were. Raises
    ExportError if the folder has another number of classes than ``n_way``, DataError for unreadable images.
    """
    root = Path(root)
    dataset = load_image_folder(root, image_shape=image_shape)
    names = list(dataset.class_names)
    if n_way is not None and len(names) != n_way:
        raise ExportError(
            f"the support folder {root} has {len(names)} class folder(s) ({', '.join(names)}) but the "
            f"meta-learner is {n_way}-way: give it exactly {n_way} sub-folders, one per class, each holding a "
            "few labelled images."
        )
    images = dataset.images.astype(np.float32) * np.float32(1.0 / 255.0)
    labels = np.repeat(np.arange(len(names), dtype=np.int32), dataset.class_sizes)
    return images, labels, names


def warn_if_unbalanced(shots, class_names):
    """A warning naming each class's count when the support set's classes have unequal numbers of images."""
    if len(set(np.asarray(shots).tolist())) > 1:
        counts = ", ".join(f"{name} {int(count)}" for name, count in zip(class_names, shots, strict=True))
        warnings.warn(
            f"keras_metalstm: the support set is unbalanced ({counts} images): the meta-learner was meta-trained "
            "on episodes with the same number of images per class, and the support loss it adapts with weighs "
            "each class by its image count. Give every class the same number of images (the K of its training) "
            "for the task it learned to adapt to.",
            RuntimeWarning,
            stacklevel=3,
        )


def warn_if_other_shots(shots, trained_k_shot):
    """A warning when every class has the same number of images, but not the K the meta-learner was trained on."""
    counts = set(np.asarray(shots).tolist())
    if trained_k_shot is not None and len(counts) == 1 and counts != {trained_k_shot}:
        shots_given = counts.pop()
        warnings.warn(
            f"keras_metalstm: the support set has {shots_given} images per class, and the meta-learner was "
            f"meta-trained on {trained_k_shot}-shot episodes: it adapts, but its update rule and its measured "
            f"accuracy are for {trained_k_shot}-shot tasks. Give each class {trained_k_shot} image(s), or use a "
            f"meta-learner trained for {shots_given}-shot tasks.",
            RuntimeWarning,
            stacklevel=3,
        )


def adapt(meta, support_images, support_labels, class_names, inner_steps=None, info=None):
    """Runs the meta-learner's inner loop on one support set (test-mode batch-norm statistics).

    Returns an `AdaptedLearner` whose logits equal the meta-learner's test-mode query logits for this task.
    `info` is kept in its metadata; its `trained_k_shot` (`presets.load_path_or_preset` gives it for a run or a
    preset) makes a balanced support set of another size warn.
    """
    n_way = meta_n_way(meta, support_images)
    if len(class_names) != n_way:
        raise ExportError(
            f"{len(class_names)} classes given but the meta-learner is {n_way}-way: adapt it on exactly {n_way} "
            "classes."
        )
    labels = np.asarray(support_labels)
    if labels.size and (labels.min() < 0 or labels.max() >= n_way):
        raise ExportError(f"support labels must be in 0..{n_way - 1}, got {labels.min()}..{labels.max()}.")
    missing = sorted(set(range(n_way)) - set(labels.tolist()))
    if missing:
        raise ExportError(
            f"classes {[class_names[i] for i in missing]} have no support image: give every class at least one."
        )
    shots = np.bincount(labels, minlength=n_way)
    warn_if_unbalanced(shots, class_names)
    warn_if_other_shots(shots, (info or {}).get("trained_k_shot"))
    steps = inner_steps_of(meta, inner_steps)
    learner = meta.adapt(support_images, labels, inner_steps=steps)
    details = {
        "inner_steps": steps,
        "n_way": n_way,
        "shots_per_class": [int(s) for s in shots],
        "input_scale": INPUT_SCALE,
        "conversion_rule": CONVERSION_RULE,
    }
    details.update(info or {})
    shape = meta_image_shape(meta, support_images)
    learner = in_variable_precision(learner, shape)
    return AdaptedLearner(learner, class_names, shape, info=details, name="adapted_learner")


def adapt_folder(meta, support_dir, inner_steps=None, info=None):
    """`adapt` on an image folder (see `load_support_folder`)."""
    images, labels, names = load_support_folder(support_dir, meta_image_shape(meta), n_way=meta_n_way(meta))
    details = {"support_dir": str(support_dir)}
    details.update(info or {})
    return adapt(meta, images, labels, names, inner_steps=inner_steps, info=details)


def check_adapted_path(path, force=False) -> None:
    """ExportError now if `save_adapted` could not write `path` (another suffix than .keras, an existing file
    without `force`, a folder that cannot be written), so a caller can say so before adapting."""
    if Path(path).suffix != ".keras":
        raise ExportError(
            f"the adapted learner is saved as a .keras file; got {path}: use a name ending in .keras."
        )
    check_target(path, force)


def save_adapted(adapted, path, force=False):
    """Saves an AdaptedLearner to a `.keras` file atomically (temporary file, then rename)."""
    check_adapted_path(path, force)
    with atomic_path(path, force=force, suffix=".keras") as tmp:  # given as it is: a URL is refused there
        adapted.save(tmp)
    return Path(path)


def load_adapted(path):
    """Loads an AdaptedLearner `.keras` file; ExportError if it is something else."""
    model = _load_keras(path)
    if not isinstance(model, AdaptedLearner):
        raise ExportError(
            f"{path} holds a {type(model).__name__}, not an adapted learner: create one with "
            "`metalstm adapt RUN_DIR --support DIR --out FILE.keras`."
        )
    return model


def _load_keras(path):
    # The package imports its names lazily: this import is what registers MetaLearner and its layers with Keras.
    import keras_metalstm.meta_learner  # noqa: F401

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"model file {path} not found.")
    if not zipfile.is_zipfile(path):
        raise ExportError(
            f"{path} is not a Keras model file (a .keras file is a zip archive; this one is truncated or of "
            "another format): save it again with model.save()"
        )
    unimported = import_custom_class_modules(keras_file_config(path))
    # Random layers (Dropout, augmentation) take their seed generators' seeds from Python's `random` as they are
    # built. A meta-learner's config keeps its learner's (learner_seeds); for a file written before it did, a fixed
    # seed makes the meta-learner adapt to the same model on every load, as one loaded from its run folder does.
    outside = random.getstate()
    random.seed(0)
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as error:  # noqa: BLE001 - keras raises many types for a bad file
        raise ExportError(
            f"cannot load {path} as a Keras model: {deserialisation_error_text(error)}{unimported}"
        ) from error
    finally:
        random.setstate(outside)


def load_meta_learner(source):
    """A MetaLearner from a `.keras` file or a training run folder.

    For a run folder, the run directory's loader (`keras_metalstm.runs.load_meta_learner`: best checkpoint,
    else the latest) is used; a folder without a run config falls back to its `.keras` file (best first).
    """
    from keras_metalstm.meta_learner import MetaLearner

    source = Path(source)
    if source.is_dir():
        meta = _load_run(source)
    else:
        meta = _load_keras(source)
    if not isinstance(meta, MetaLearner):
        raise ExportError(
            f"{source} holds a {type(meta).__name__}, not a meta-learner: pass a training run folder "
            "(metalstm train --run-dir) or a saved MetaLearner .keras file."
        )
    return meta


def _load_run(run_dir):
    from keras_metalstm.config import CONFIG_FILE_NAME
    from keras_metalstm.runs import checkpoint_kind
    from keras_metalstm.runs import load_meta_learner as load_run

    if (Path(run_dir) / CONFIG_FILE_NAME).is_file():  # the best (or latest) checkpoint of a training run
        if checkpoint_kind(run_dir) == "latest":
            logging.getLogger(__name__).info(
                "%s has no best checkpoint yet (no validation ran, or it is still training): its latest checkpoint "
                "is used",
                run_dir,
            )
        return load_run(run_dir)[1]
    candidates = sorted(
        Path(run_dir).rglob("*.keras"),
        key=lambda p: ("best" not in p.name, -os.path.getmtime(p)),
    )
    if not candidates:
        raise ExportError(
            f"no meta-learner found in {run_dir}: pass the folder of a `metalstm train --run-dir` run or a "
            "MetaLearner .keras file."
        )
    return _load_keras(candidates[0])


def load_exportable(source):
    """An AdaptedLearner (adapted `.keras` file) or a MetaLearner (run folder or meta-learner `.keras` file)."""
    from keras_metalstm.meta_learner import MetaLearner

    source = Path(source)
    if source.is_dir():
        return load_meta_learner(source)
    model = _load_keras(source)
    if not isinstance(model, (AdaptedLearner, MetaLearner)):
        raise ExportError(
            f"{source} holds a {type(model).__name__}: export takes an adapted learner (`metalstm adapt`) or a "
            "meta-learner (a run folder or its .keras file)."
        )
    return model
