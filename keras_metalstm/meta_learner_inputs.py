"""Checks of what a `MetaLearner` is given: its settings, a batch of episodes, one task's support set.

Each check raises a ValueError naming the problem and the fix before TensorFlow sees the input, so a user gets
that message instead of an error from deep inside a traced graph.
"""

import math
import numbers

import numpy as np
import tensorflow as tf

from keras_metalstm.config import EPISODE_BATCHING, QUERY_STATISTICS
from keras_metalstm.data.episodes import EPISODE_KEYS
from keras_metalstm.distribute import episodes_per_replica
from keras_metalstm.learner_spec import learner_image_shape, learner_num_classes

MODES = ("train", "test")


def check_adaptation_settings(inner_steps, query_statistics) -> None:
    """Raises ValueError unless `inner_steps` T >= 1 and `query_statistics` is one of QUERY_STATISTICS: what a
    meta-learner is built with, or changed to for an evaluation."""
    check_inner_steps(inner_steps)
    if query_statistics not in QUERY_STATISTICS:
        raise ValueError(f"query_statistics must be one of {QUERY_STATISTICS}, got {query_statistics!r}.")


def check_meta_learner_settings(inner_steps, hidden_units, p, bn_momentum, query_statistics, episode_batching):
    """Raises ValueError naming the first of a MetaLearner's constructor settings that is out of its range."""
    check_adaptation_settings(inner_steps, query_statistics)
    if episode_batching not in EPISODE_BATCHING:
        raise ValueError(f"episode_batching must be one of {EPISODE_BATCHING}, got {episode_batching!r}.")
    if isinstance(hidden_units, bool) or not float(hidden_units).is_integer() or int(hidden_units) < 1:
        raise ValueError(f"hidden_units must be a whole number of at least 1, got {hidden_units!r}.")
    if not float(p) > 0:
        raise ValueError(f"p, the gradient preprocessing's constant, must be positive (the paper's: 10), got {p!r}.")
    if bn_momentum is not None and not 0 <= float(bn_momentum) <= 1:
        raise ValueError(f"bn_momentum must lie in [0, 1] (the old value's weight) or be None, got {bn_momentum!r}.")


def check_switches(**switches) -> None:
    """Each of a MetaLearner's on/off settings is True or False (bool("no") would be True)."""
    for name, value in switches.items():
        if not isinstance(value, (bool, np.bool_)) and value not in (0, 1):
            raise ValueError(f"{name} must be True or False, got {value!r}.")


def check_mode(mode) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be 'train' or 'test', got {mode!r}.")


def check_episodes(learner, episodes, labelled=False) -> None:
    """A batch of episodes for the query logits needs the support set and the query images (`labelled`: and the
    query labels, to train or evaluate on), each with a leading episode axis: (B, examples, H, W, C) float images
    and (B, examples) integer labels, one per image, the same B for every key and at least one example per set.
    Static shapes only, so it holds inside a traced function too."""
    needed = EPISODE_KEYS if labelled else EPISODE_KEYS[:3]
    missing = [key for key in needed if key not in episodes]
    if missing:
        raise ValueError(f"An episode batch needs the keys {list(needed)}; missing: {missing}.")
    not_arrays = [key for key in needed if not hasattr(episodes[key], "dtype")]
    if not_arrays:
        raise ValueError(f"{not_arrays} must be NumPy arrays or tensors, not {type(episodes[not_arrays[0]]).__name__}.")
    image_shape = learner_image_shape(learner)
    shapes = {key: tf.TensorShape(episodes[key].shape) for key in needed}
    for key in needed:
        shape, dtype = shapes[key], tf.as_dtype(episodes[key].dtype)
        if key.endswith("images"):
            if image_shape is not None and shape.rank is not None and shape.rank != len(image_shape) + 2:
                raise ValueError(
                    f"{key} must be a batch of episodes of shape (episodes, examples, *{image_shape}), got shape "
                    f"{tuple(shape)}: batch one episode as episode_dataset does (or add a first axis of 1)."
                )
            if image_shape is not None and shape.rank is not None and not _fits(shape[2:], image_shape):
                raise ValueError(
                    f"{key} hold images of shape {tuple(shape[2:])} but the learner takes {image_shape}: "
                    "resize or convert them first."
                )
            if not dtype.is_floating:
                raise ValueError(
                    f"{key} are {dtype.name} but the learner takes floating-point images on the training scale "
                    "(float32 in [0, 1] for the package's data): convert them first (e.g. divide uint8 by 255)."
                )
        elif (shape.rank is not None and shape.rank != 2) or not dtype.is_integer:
            raise ValueError(
                f"{key} must be (episodes, examples) integer labels, got shape {tuple(shape)} of {dtype.name}."
            )
    _check_episode_axes(shapes)


def _check_episode_axes(shapes) -> None:
    """The keys of a batch agree: one episode count B, a label per image, and a set of at least one example."""
    counts = {key: shape[0] for key, shape in shapes.items() if shape.rank and shape[0] is not None}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{key} {count}" for key, count in counts.items())
        raise ValueError(
            f"The keys of an episode batch hold different numbers of episodes ({listed}): batch them together."
        )
    for images, labels in (("support_images", "support_labels"), ("query_images", "query_labels")):
        examples = {key: shapes[key][1] for key in (images, labels) if key in shapes and (shapes[key].rank or 0) > 1}
        if None not in examples.values() and len(set(examples.values())) > 1:
            raise ValueError(
                f"{labels} hold {examples[labels]} labels per episode for {examples[images]} images in {images}: "
                "give one label per image."
            )
        if 0 in examples.values():
            raise ValueError(
                f"An episode's {images.split('_')[0]} set is empty ({images} of shape {tuple(shapes[images])}): "
                "give every episode at least one example."
            )


def check_clip_norm(clip_norm):
    """The meta-gradient's clip as a float, None (or 0) for no clip; ValueError for a negative or non-finite one,
    which would reverse or poison every update."""
    if clip_norm is None or (not isinstance(clip_norm, bool) and clip_norm == 0):
        return None
    if isinstance(clip_norm, bool) or not math.isfinite(float(clip_norm)) or float(clip_norm) < 0:
        raise ValueError(
            f"clip_norm must be a positive number (or None for no clip), got {clip_norm!r}: a negative one "
            "reverses the meta-gradient, a NaN one makes it NaN."
        )
    return float(clip_norm)


def check_learning_rate(learning_rate) -> None:
    """ValueError for a learning rate given as a number that is not positive and finite (a schedule is Keras')."""
    if isinstance(learning_rate, numbers.Real) and not (math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(
            f"learning_rate must be a positive number, got {learning_rate!r}: a negative one climbs the meta-loss, "
            "a NaN one makes every meta-parameter NaN."
        )


def _fits(shape, expected) -> bool:
    return all(got is None or want is None or got == want for got, want in zip(shape, expected, strict=True))


def static_batch_size(tensor, name) -> int:
    """The number of episodes B of a stacked episode tensor, which the inner loop needs to know when traced."""
    batch = tensor.shape[0]
    if batch is None:
        raise ValueError(
            f"{name} needs a static number of episodes (its first axis): batch the episode dataset with "
            "drop_remainder=True."
        )
    return batch


def check_episode_values(learner, episodes) -> None:
    """An eager batch of episodes for a learner of N outputs: every label lies in 0..N-1, every episode's support
    set has N classes (fewer would leave logits no class of the task owns, which an adapted model can predict), and
    every image value is finite (one NaN makes the meta-gradient NaN, and the update every meta-parameter). The
    values are read, so this runs outside traced functions only."""
    num_classes = learner_num_classes(learner, learner_image_shape(learner))
    labels = {key: np.asarray(episodes[key]) for key in ("support_labels", "query_labels")}
    for key, values in labels.items():
        fix = "an N-way episode needs a learner that ends with N outputs, classes numbered from 0"
        _check_label_range(key, values, num_classes, fix)
    for support, query in zip(labels["support_labels"], labels["query_labels"], strict=True):
        classes = np.unique(support)
        if len(classes) == num_classes:
            continue
        if set(np.unique(query)) <= set(classes.tolist()) and classes.tolist() == list(range(len(classes))):
            raise ValueError(
                f"the learner has {num_classes} outputs but an episode's support set has {len(classes)} classes: an "
                f"N-way episode needs a learner that ends with N outputs (e.g. Dense({len(classes)}))."
            )
        missing = sorted(set(range(num_classes)) - set(classes.tolist()))
        raise ValueError(
            f"an episode's support set has no example of class(es) {missing} of the learner's {num_classes}: every "
            "episode's support set needs each of its N classes (numbered 0..N-1) at least once."
        )
    for key in ("support_images", "query_images"):
        _check_finite(key, episodes[key])


def _check_finite(name, images) -> None:
    """ValueError unless every value of the float tensor or array `images` is finite (counted on its device)."""
    not_finite = int(tf.size(images)) - int(tf.math.count_nonzero(tf.math.is_finite(images)))
    if not_finite:
        raise ValueError(
            f"{name} hold {not_finite} NaN or infinite value(s): images must be finite numbers on the training "
            "scale; find where the NaN comes from (a division by a zero range, a failed decode) or drop those images."
        )


def check_support(learner, dtype, support_images, support_labels):
    """One task's support set for `learner` as tensors: images (examples, *image shape) in `dtype`, labels int32
    in 0..N-1 for the learner's N outputs, every class among them (checked, with the images' finiteness, when the
    values are known, as in eager calls)."""
    support_images = tf.convert_to_tensor(support_images)
    if not support_images.dtype.is_floating:
        raise ValueError(
            f"support_images are {support_images.dtype.name}; the meta-learner takes float images on the scale it "
            "was meta-trained on (the package's data sets: [0, 1], i.e. uint8 images divided by 255)."
        )
    support_images = tf.cast(support_images, dtype)
    support_labels = tf.convert_to_tensor(support_labels)
    expected = learner_image_shape(learner)
    rank = 4 if expected is None else len(expected) + 1
    if support_images.shape.rank != rank:
        per_image = "height, width, channels" if expected is None else f"*{expected}"
        raise ValueError(
            f"support_images must be one task's images of shape (examples, {per_image}), got "
            f"shape {tuple(support_images.shape)}."
        )
    if expected and None not in expected and tuple(support_images.shape[1:]) != expected:
        raise ValueError(
            f"support_images have shape {tuple(support_images.shape[1:])} per image but the learner "
            f"expects {expected}: resize/convert the images first."
        )
    if support_images.shape[0] == 0:
        raise ValueError("support_images is empty: a task needs at least one labelled image per class.")
    if support_labels.shape != (support_images.shape[0],):
        raise ValueError(
            f"support_labels must hold one integer label per support image: got shape "
            f"{tuple(support_labels.shape)} for {support_images.shape[0]} images."
        )
    if not support_labels.dtype.is_integer:
        raise ValueError(f"support_labels must be integers, got {support_labels.dtype.name}.")
    if tf.executing_eagerly():
        num_classes = learner_num_classes(learner, expected)
        labels = np.asarray(support_labels)
        _check_label_range("support_labels", labels, num_classes, "number the classes from 0")
        missing = sorted(set(range(num_classes)) - set(labels.tolist()))
        if missing:
            raise ValueError(
                f"support_labels hold no example of class(es) {missing} of the learner's {num_classes} outputs: give "
                "every class at least one support image (the adapted model would predict classes it never saw), or "
                "adapt a learner with as many outputs as the task has classes."
            )
        _check_finite("support_images", support_images)
    return support_images, tf.cast(support_labels, tf.int32)


def _check_label_range(name, labels, num_classes, fix) -> None:
    """ValueError, ending with `fix`, unless the label array `labels` lies in 0..num_classes - 1."""
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"{name} must lie in 0..{num_classes - 1} (the learner's {num_classes} outputs), got {low}..{high}: {fix}."
        )


def check_inner_steps(inner_steps) -> int:
    """T, the number of inner steps, as a whole number >= 1 (int() would make 2.7 steps 2)."""
    if isinstance(inner_steps, bool) or not float(inner_steps).is_integer() or int(inner_steps) < 1:
        raise ValueError(f"inner_steps must be a whole number of at least 1, got {inner_steps!r}.")
    return int(inner_steps)


def check_replica_batches(data, replicas: int) -> None:
    """`fit`/`evaluate` on a tf.data.Dataset of episode batches under several replicas: Keras splits each batch of
    B episodes over them, and a B that is not a multiple of their number failed deep inside TensorFlow ("Inputs to
    operation AddN ... must have the same size and shape"). A batch of unknown size is left to Keras."""
    if replicas <= 1 or not isinstance(data, tf.data.Dataset) or not isinstance(data.element_spec, dict):
        return
    spec = data.element_spec.get("support_images")
    batch = None if spec is None or spec.shape.rank is None else spec.shape[0]
    if batch is not None:
        episodes_per_replica(batch, replicas, "Batch the dataset accordingly (episode_dataset(..., batch_size={})).")


def check_first_batch(learner, data) -> None:
    """`fit`/`evaluate` data: a tf.data.Dataset of episode batches (dicts of EPISODE_KEYS), whose first batch is
    checked as `MetaTrainer.train_step` checks each of its batches (keys, axes, labels in 0..N-1, N classes per
    support set, finite images) before Keras traces a step. Labels out of range would otherwise fail deep inside
    the traced step on a CPU, and on a GPU or TPU make the loss NaN or a wrong number without an error. A dict of
    arrays or a dataset of tuples is refused with the fix; other data (generators, distributed datasets) is left
    to the traced step's checks."""
    make = (
        "fit and evaluate take a tf.data.Dataset of episode batches, each a dict of "
        f"{', '.join(EPISODE_KEYS)} (keras_metalstm.data.episode_dataset makes one)"
    )
    if isinstance(data, dict):
        raise ValueError(
            f"{make}; Keras would cut a dict of arrays into batches of unknown size: give "
            "tf.data.Dataset.from_tensor_slices(episodes).batch(B, drop_remainder=True)"
        )
    if not isinstance(data, tf.data.Dataset):
        return
    if not isinstance(data.element_spec, dict):
        raise ValueError(f"{make}; got elements of {type(data.element_spec).__name__}: map them to such dicts")
    first = next(iter(data.take(1)), None)
    if first is not None:
        check_episodes(learner, first, labelled=True)
        check_episode_values(learner, first)


def check_jit_fit_replicas(replicas: int) -> None:
    """`fit` after compile(jit_compile=True) under a strategy of several replicas: Keras would compile its whole
    step, the cross-replica sum and other devices' variables included, which TensorFlow refuses deep inside
    ("Trying to access resource ... located in device")."""
    if replicas > 1:
        raise ValueError(
            f"fit after compile(jit_compile=True) cannot run under a strategy of {replicas} replicas: Keras would "
            "compile the whole step, the cross-replica sum included, with XLA. Train with "
            "keras_metalstm.MetaTrainer(meta, jit_compile=True), which compiles each replica's meta-gradient with "
            "XLA, or compile without jit_compile."
        )


def check_eager_adapt() -> None:
    """`adapt` makes a Keras model, which TensorFlow cannot do inside a tf.function after its first call ("only
    supports singleton tf.Variables created on the first call")."""
    if not tf.executing_eagerly():
        raise RuntimeError(
            "MetaLearner.adapt returns a new Keras model and runs eagerly only, not inside a tf.function: there, call "
            "meta.inner_loop(support_images, support_labels) and meta.query_logits(theta, states, query_images, "
            "'test'), or export the meta-learner's adapt_and_predict (keras_metalstm.export.export_meta)"
        )
