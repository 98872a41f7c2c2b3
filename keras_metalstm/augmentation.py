"""Augmentation of meta-training episodes in the input pipeline, keyed on the episode.

Keras's augmentation layers inside a learner draw from a stateful seed generator (a resumed run would see other
images than an uninterrupted one) and two of their image transforms have no XLA kernel (`--xla`, any TPU). This
runs in the tf.data pipeline on the host instead, with stateless random ops keyed on the episode's seed, so
episode ``e`` of seed ``s`` stays a pure function of ``(s, e)``, augmented images included, and the compiled
step on the accelerator never sees it.

A setting is text, ``"flip,translate=0.1,brightness=0.2"`` (any subset, any order):

* ``flip``: each image mirrored left-right with probability 1/2;
* ``translate=F``: each image shifted by a whole number of pixels, uniform in [-F, F] of its height and width
  independently, the uncovered border zero (black);
* ``brightness=B``: a value uniform in [-B, B] added to each image (pixel values in [0, 1]), then clipped.

Applied in the order brightness, flip, translate, to every image of a meta-training episode, support and query
alike; validation and test episodes are never augmented. The setting is read without TensorFlow (a run's
configuration checks it); TensorFlow is imported when images are augmented.
"""

from __future__ import annotations

import dataclasses

_FORMS = "flip, translate=F (0 < F < 0.5) and brightness=B (0 < B <= 1)"


@dataclasses.dataclass(frozen=True)
class Augmentation:
    flip: bool = False
    translate: float = 0.0
    brightness: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.translate < 0.5:
            raise ValueError(f"translate must lie in [0, 0.5) (a fraction of the image size), got {self.translate}")
        if not 0.0 <= self.brightness <= 1.0:
            raise ValueError(f"brightness must lie in [0, 1] (pixel values are in [0, 1]), got {self.brightness}")

    @classmethod
    def parse(cls, text: str | None) -> Augmentation | None:
        """An Augmentation from its text form; None for no augmentation (None, "" or "none")."""
        if text is None or str(text).strip().lower() in ("", "none"):
            return None
        settings = {}
        for part in str(text).lower().replace(" ", "").split(","):
            name, equals, value = part.partition("=")
            if name == "flip" and not equals:
                settings["flip"] = True
            elif name in ("translate", "brightness") and equals:
                try:
                    settings[name] = float(value)
                except ValueError:
                    raise ValueError(f"augmentation {part!r}: {value!r} is not a number") from None
            else:
                raise ValueError(f"unknown augmentation {part!r} in {text!r}: use {_FORMS}, e.g. flip,translate=0.1")
        augmentation = cls(**settings)
        return augmentation if augmentation != cls() else None

    def __str__(self) -> str:
        parts = ["flip"] if self.flip else []
        parts += [f"{name}={getattr(self, name):g}" for name in ("translate", "brightness") if getattr(self, name)]
        return ",".join(parts)

    def __call__(self, images, key):
        """uint8 images (n, H, W, C), augmented as a pure function of ``key`` (a stateless seed, shape (2,))."""
        import tensorflow as tf

        brightness_key, flip_key, translate_key = tf.unstack(tf.random.experimental.stateless_split(key, 3))
        count = tf.shape(images)[0]
        if self.brightness:
            deltas = tf.random.stateless_uniform([count], brightness_key, -self.brightness, self.brightness)
            shifted = tf.cast(images, tf.float32) + 255.0 * deltas[:, None, None, None]
            images = tf.cast(tf.clip_by_value(tf.round(shifted), 0.0, 255.0), tf.uint8)
        if self.flip:
            mirrored = tf.random.stateless_uniform([count], flip_key) < 0.5
            images = tf.where(mirrored[:, None, None, None], tf.reverse(images, axis=[2]), images)
        if self.translate:
            images = _translated(images, self.translate, translate_key)
        return images


def _translated(images, fraction, key):
    """Each image shifted by its own whole-pixel offsets, the uncovered border zero."""
    import tensorflow as tf

    height, width = images.shape[1], images.shape[2]
    row_key, column_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
    for axis, size, axis_key in ((1, height, row_key), (2, width, column_key)):
        margin = int(round(fraction * size))
        if margin == 0:
            continue
        offsets = tf.random.stateless_uniform([tf.shape(images)[0]], axis_key, -margin, margin + 1, tf.int32)
        padding = [[0, 0]] * 4
        padding[axis] = [margin, margin]
        padded = tf.pad(images, padding)
        # Output position p reads padded position p + margin - offset: the content moves by +offset.
        positions = (margin - offsets)[:, None] + tf.range(size)[None, :]
        images = tf.gather(padded, positions, axis=axis, batch_dims=1)
    return images
