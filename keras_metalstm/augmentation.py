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
    """What is done to each image (the module's doc); `parse` and `str` convert from and to the text form."""

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
            elif name in ("translate", "brightness"):
                raise ValueError(f"augmentation {name!r} needs a value, {name}=0.1 say: use {_FORMS}")
            else:
                raise ValueError(f"unknown augmentation {part!r} in {text!r}: use {_FORMS}, e.g. flip,translate=0.1")
        augmentation = cls(**settings)
        return augmentation if augmentation != cls() else None

    def check_image_shape(self, image_shape) -> None:
        """ValueError when `translate` moves images of `image_shape` (H, W, C) by no pixel: the shift is a whole
        number of pixels, round(translate x size), and would silently be none."""
        largest = max(image_shape[:2])
        if self.translate and round(self.translate * largest) == 0:
            raise ValueError(
                f"translate={self.translate:g} shifts {image_shape[0]}x{image_shape[1]} images by "
                f"round({self.translate:g} x {largest}) = 0 pixels: use translate > {0.5 / largest:.3g} (one pixel) "
                "or leave it out"
            )

    def __str__(self) -> str:
        parts = ["flip"] if self.flip else []
        parts += [f"{name}={getattr(self, name):g}" for name in ("translate", "brightness") if getattr(self, name)]
        return ",".join(parts)

    def __call__(self, images, key):
        """uint8 images (n, H, W, C), augmented as a pure function of ``key`` (a stateless seed, shape (2,))."""
        import tensorflow as tf

        brightness_key, flip_key, row_key, column_key = tf.unstack(tf.random.experimental.stateless_split(key, 4))
        count = tf.shape(images)[0]
        if self.brightness:
            deltas = tf.random.stateless_uniform([count], brightness_key, -self.brightness, self.brightness)
            shifted = tf.cast(images, tf.float32) + 255.0 * deltas[:, None, None, None]
            images = tf.cast(tf.clip_by_value(tf.round(shifted), 0.0, 255.0), tf.uint8)
        mirrored = tf.random.stateless_uniform([count], flip_key) < 0.5 if self.flip else None
        # The flip and the shift move pixels: one gather per axis reads each output pixel from where it comes.
        images = _moved(images, 1, None, self.translate, row_key)
        return _moved(images, 2, mirrored, self.translate, column_key)


def _moved(images, axis, mirrored, fraction, key):
    """``images`` mirrored along ``axis`` where ``mirrored`` (None: nowhere), then shifted along it by whole pixels
    up to ``fraction`` of its size, each image by its own offset, the uncovered border zero."""
    import tensorflow as tf

    size = images.shape[axis]
    margin = int(round(fraction * size))
    if mirrored is None and margin == 0:
        return images
    count = tf.shape(images)[0]
    positions = tf.tile(tf.range(size)[None, :], [count, 1])  # output pixel p reads pixel positions[p]
    if mirrored is not None:
        positions = tf.where(mirrored[:, None], size - 1 - positions, positions)
    if margin:
        # Shifted by +offset, output pixel p shows what was at p - offset: in the mirrored image, that is
        # pixel size - 1 - p + offset of the original. Padding with `margin` zeros puts the border's reads there.
        offsets = tf.random.stateless_uniform([count, 1], key, -margin, margin + 1, tf.int32)
        toward = offsets if mirrored is None else tf.where(mirrored[:, None], -offsets, offsets)
        positions = positions - toward + margin
        padding = [[0, 0]] * 4
        padding[axis] = [margin, margin]
        images = tf.pad(images, padding)
    return tf.gather(images, positions, axis=axis, batch_dims=1)
