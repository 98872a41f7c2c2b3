"""One image-conversion rule, in-graph, shared by the loaders, training and serving.

The rule (``CONVERSION_RULE``), applied by :func:`convert_images` to reach a target shape (H, W, C), after
:func:`decode_image` has turned a JPEG upright by its EXIF orientation (as image viewers show it):

* channels: grey -> RGB by repeating the grey channel; RGB -> grey by ITU-R BT.601 luminance
  ``0.299 R + 0.587 G + 0.114 B``; an alpha channel is dropped (grey+alpha -> grey, RGBA -> RGB) before that;
* size: bilinear resize to (H, W) with antialiasing (``tf.image.resize(method="bilinear", antialias=True)``),
  the aspect ratio is not kept; an image already H x W is left unchanged;
* values: uint8 (and uint16) images are scaled to float32 in [0, 1]; float images must be in [0, 1] already.

Loaders store the converted images as uint8 (``round(255 * x)``); the episode pipeline divides by 255 again, so a
model sees the same numbers in training and behind an exported serving signature that calls the same function.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from keras_metalstm.data.bmp import apply_bmp_colours, unreadable_bmp_reason
from keras_metalstm.data.cache import cached_decode
from keras_metalstm.data.errors import DataError, tensorflow_error_text
from keras_metalstm.data.exif import apply_exif_orientation
from keras_metalstm.data.pipelines import without_autotune_thread
from keras_metalstm.data.progress import reading
from keras_metalstm.data.webp import refuse_animated_webp, unreadable_webp_reason

CONVERSION_RULE = (
    "a JPEG turned upright by its EXIF orientation; channels: grey->RGB by repeating the grey channel, "
    "RGB->grey by luminance 0.299 R + 0.587 G + 0.114 B, "
    "alpha dropped; size: bilinear resize (antialiased) to H x W, aspect ratio not kept; "
    "values scaled to [0, 1]"
)

_LUMINANCE = (0.299, 0.587, 0.114)

# TensorFlow's image decoder reads WebP from 2.20 on, the release that added tf.io.decode_webp (2.16-2.19 refuse it).
READS_WEBP = hasattr(tf.io, "decode_webp")
# The formats `decode_image` reads with the installed TensorFlow, for messages.
READ_FORMATS = "PNG, JPEG, GIF, BMP" + (" and WebP" if READS_WEBP else "")


def check_image_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    """Return ``shape`` as a tuple (H, W, C) of positive ints with C in {1, 3}, or raise a DataError."""
    try:
        height, width, channels = (int(v) for v in shape)
    except (TypeError, ValueError):
        raise DataError(f"image shape must be (height, width, channels), got {shape!r}") from None
    if height < 1 or width < 1 or channels not in (1, 3):
        raise DataError(f"image shape must be (H, W, C) with H, W >= 1 and C in {{1, 3}}, got {tuple(shape)}")
    return height, width, channels


def _to_rgb_or_grey(images: tf.Tensor, channels: int) -> tf.Tensor:
    """Drop alpha: (.., 1|2|3|4) -> grey (1) or RGB (3), for a statically known channel count."""
    if channels in (1, 3):
        return images
    if channels == 2:
        return images[..., :1]
    if channels == 4:
        return images[..., :3]
    raise DataError(f"images must have 1, 2, 3 or 4 channels (grey, grey+alpha, RGB, RGBA), got {channels}")


def _convert_channels(images: tf.Tensor, target_channels: int) -> tf.Tensor:
    """Float images with 1-4 channels (static or dynamic count) -> ``target_channels`` (1 or 3) by the rule."""

    def from_grey(grey):
        return grey if target_channels == 1 else tf.tile(grey, [1] * (grey.shape.rank - 1) + [3])

    def from_rgb(rgb):
        if target_channels == 3:
            return rgb
        weights = tf.constant(_LUMINANCE, dtype=rgb.dtype)
        return tf.reduce_sum(rgb * weights, axis=-1, keepdims=True)

    channels = images.shape[-1]
    if channels is not None:
        images = _to_rgb_or_grey(images, channels)
        return from_grey(images) if images.shape[-1] == 1 else from_rgb(images)
    # Dynamic channel count (a decoded file of unknown type): pick the branch in-graph.
    count = tf.shape(images)[-1]
    tf.debugging.assert_less_equal(count, 4, message="images must have 1, 2, 3 or 4 channels")
    branch = tf.gather(tf.constant([0, 0, 0, 1, 1]), count)  # 1 or 2 channels -> grey; 3 or 4 -> RGB
    out = tf.switch_case(
        branch,
        [lambda: from_grey(images[..., :1]), lambda: from_rgb(images[..., :3])],
    )
    return tf.ensure_shape(out, images.shape[:-1].concatenate([target_channels]))


def convert_images(images, target_shape: Sequence[int], antialias: bool = True) -> tf.Tensor:
    """Convert images (h, w, c) or (n, h, w, c) to ``target_shape`` (H, W, C) as float32 in [0, 1].

    Works eagerly and inside a ``tf.function`` / ``tf.data`` map on tensors whose h, w, c are only known at run
    time. uint8 input is divided by 255, uint16 by 65535; float input must be in [0, 1] (checked eagerly); other
    integer types are refused. See ``CONVERSION_RULE``.
    ``antialias=False`` gives plain bilinear sampling (identical for images already H x W).
    """
    height, width, channels = check_image_shape(target_shape)
    images = tf.convert_to_tensor(images)
    if images.shape.rank not in (3, 4):
        raise DataError(f"images must be (h, w, c) or (n, h, w, c), got shape {images.shape}")
    if 0 in tuple(images.shape[-3:-1]):
        raise DataError(f"images of shape {tuple(images.shape)} have no pixels to convert")
    if images.dtype in (tf.uint8, tf.uint16):
        # A product with 1/255 (1/65535), not a division: TensorFlow's graph optimiser turns a division by a
        # constant into that product, so a division would round differently eagerly and in a traced function (a
        # served signature), and round(255 x) of a few pixels would differ by one level between the two.
        images = tf.cast(images, tf.float32) * (1.0 / images.dtype.max)
    elif images.dtype.is_floating:
        _check_unit_range(images)
        images = tf.cast(images, tf.float32)
    else:
        # Another integer type has no scale to read off it: 0..255 from np.array of ints (int64), 0..65535 from
        # Pillow's 16-bit PNGs (int32). Clipped to [0, 1], either came out a white image.
        raise DataError(
            f"images must be uint8 (0..255), uint16 (0..65535) or float in [0, 1], got dtype {images.dtype.name}: "
            "convert them first (e.g. images.astype(np.uint8) for 0..255 values)"
        )
    images = _convert_channels(images, channels)
    static_hw = tuple(images.shape[-3:-1])
    if static_hw != (height, width):
        resized = tf.image.resize(images, (height, width), method="bilinear", antialias=antialias)
        if None in static_hw:  # unknown size: resize only when it differs, so H x W input stays exact
            same = tf.reduce_all(tf.equal(tf.shape(images)[-3:-1], [height, width]))
            images = tf.cond(same, lambda: tf.reshape(images, tf.shape(resized)), lambda: resized)
        else:
            images = resized
    return tf.clip_by_value(images, 0.0, 1.0)


def _check_unit_range(images: tf.Tensor) -> None:
    """Eagerly, a DataError for float images outside [0, 1] (0..255 floats would be clipped to a white image);
    inside a traced function the values are unknown and the rule's clip applies."""
    if tf.executing_eagerly() and tf.size(images) > 0:
        low, high = float(tf.reduce_min(images)), float(tf.reduce_max(images))
        if not (0.0 <= low and high <= 1.0):  # NaN fails both comparisons
            raise DataError(
                f"float images must be in [0, 1], got values {low:.4g}..{high:.4g}: divide 0..255 values by 255 "
                "(or give them as uint8)"
            )


def decode_image(contents) -> tf.Tensor:
    """One encoded PNG, JPEG, GIF (its first frame), BMP or, with TensorFlow 2.20 or later, WebP (a scalar string
    tensor) as uint8 (h, w, c), c its own channel count (1-4). In-graph; a colour-palette BMP, or one whose channel
    masks are not in the usual order, gets its colours (`keras_metalstm.data.bmp`), a JPEG is turned upright by its
    EXIF orientation (`keras_metalstm.data.exif`), an animated WebP fails with InvalidArgumentError before the
    decoder can crash the process (`keras_metalstm.data.webp`)."""
    with tf.control_dependencies([refuse_animated_webp(contents)]):
        decoded = tf.io.decode_image(contents, channels=0, dtype=tf.uint8, expand_animations=False)
    return apply_exif_orientation(contents, apply_bmp_colours(contents, decoded))


def decode_image_bytes(contents, target_shape: Sequence[int], antialias: bool = True) -> tf.Tensor:
    """Decode one encoded image (a scalar string tensor, a format `decode_image` reads) and convert it to float32
    (H, W, C) in [0, 1].

    In-graph (usable in ``tf.data`` and in a serving signature); the conversion is :func:`convert_images`.
    """
    return convert_images(decode_image(contents), target_shape, antialias=antialias)


def to_uint8(images: tf.Tensor) -> tf.Tensor:
    """float32 images in [0, 1] -> uint8 by ``round(255 * x)``, the storage format of the loaders."""
    return tf.cast(tf.round(tf.clip_by_value(images, 0.0, 1.0) * 255.0), tf.uint8)


def _explain_unreadable(name: str, source, from_bytes: bool) -> str:
    """Re-read one failed file eagerly to say why it failed."""
    try:
        contents = source if from_bytes else tf.io.read_file(source)
        data = contents.numpy() if hasattr(contents, "numpy") else contents
        if len(data) == 0:
            return f"{name}: empty file"
        if reason := unreadable_bmp_reason(data) or unreadable_webp_reason(data):
            return f"{name}: {reason}"
        decode_image(contents)
    except tf.errors.OpError as error:
        return f"{name}: {tensorflow_error_text(error)}"
    return f"{name}: could not be decoded"


def decode_image_files(
    sources: Sequence,
    target_shape: Sequence[int] | None,
    names: Sequence[str] | None = None,
    from_bytes: bool = False,
    batch_size: int = 256,
    cache: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode many image files in parallel (tf.data, AUTOTUNE) into one uint8 array (n, H, W, C).

    ``sources`` are file paths, or encoded bytes when ``from_bytes``; ``names`` are what errors call them
    (default: the paths). Every image is converted to ``target_shape`` by :func:`convert_images`. With
    ``target_shape=None`` the first file's own shape is the target and any file of another shape is refused
    (DataError naming both files and the rule). Returns ``(images, native_shapes)``, native_shapes (n, 3) being
    each file's shape before conversion. An unreadable, truncated or non-image file raises a DataError naming it.
    With ``cache``, a list of files is decoded once and read back from the disk cache while the files are
    unchanged (`keras_metalstm.data.cache`).
    """
    if cache and not from_bytes:
        return cached_decode(
            [str(s) for s in sources],
            target_shape,
            lambda: decode_image_files(sources, target_shape, names, batch_size=batch_size),
            decoder=f"tensorflow {tf.__version__}; {CONVERSION_RULE}",
        )
    count = len(sources)
    names = [str(s) for s in sources] if names is None else [str(n) for n in names]
    if len(names) != count:
        raise ValueError("names must match sources one to one")
    if count == 0:
        raise DataError("no image files to read")

    if target_shape is None:  # refuse mixed shapes later; the first readable file fixes the target
        first = _decode_native(sources[0], names[0], from_bytes)
        target_shape = _canonical_shape(first.shape)
        refuse_mixed = True
    else:
        refuse_mixed = False
    target_shape = check_image_shape(target_shape)

    def decode(index, source):
        contents = source if from_bytes else tf.io.read_file(source)
        raw = decode_image(contents)
        channels, alpha = tf.shape(raw)[-1], raw[..., -1]  # the last channel is alpha with 2 or 4 of them
        alpha_varies = ((channels == 2) | (channels == 4)) & (tf.reduce_min(alpha) != tf.reduce_max(alpha))
        return index, to_uint8(convert_images(raw, target_shape)), tf.shape(raw), alpha_varies

    slices = (tf.range(count, dtype=tf.int64), tf.constant(list(sources), dtype=tf.string))
    pipeline = without_autotune_thread(
        tf.data.Dataset.from_tensor_slices(slices)
        .map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .ignore_errors()
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )
    images = np.zeros((count, *target_shape), dtype=np.uint8)
    native = np.zeros((count, 3), dtype=np.int64)
    seen, alpha_varies = np.zeros(count, dtype=bool), np.zeros(count, dtype=bool)
    with reading(count) as progress:
        for index, batch, shapes, varies in pipeline.as_numpy_iterator():
            images[index] = batch
            native[index] = shapes
            alpha_varies[index] = varies
            seen[index] = True
            if progress is not None:
                progress.update(len(index))

    if not seen.all():
        bad = np.flatnonzero(~seen)
        reasons = [_explain_unreadable(names[i], sources[i], from_bytes) for i in bad[:5]]
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise DataError(
            f"{len(bad)} unreadable image file(s){more}: "
            + "; ".join(reasons).rstrip(".")
            + f". Replace or delete them ({READ_FORMATS} are read)."
        )
    _warn_if_blank_without_alpha(images, alpha_varies, names)
    if refuse_mixed:
        canonical = np.array([_canonical_shape(s) for s in native])
        differs = np.flatnonzero((canonical != np.array(target_shape)).any(axis=1))
        if len(differs):
            i = differs[0]
            raise DataError(
                f"images have mixed shapes: {names[0]} is {_fmt(target_shape)} but {names[i]} is "
                f"{_fmt(native[i])} ({len(differs)} file(s) differ from the first). Give an image shape to "
                f"convert every image (metalstm train --image-shape H,W,C; image_shape=(H, W, C) in the "
                f"library) by the rule: {CONVERSION_RULE}."
            )
    return images, native


def _warn_if_blank_without_alpha(images: np.ndarray, alpha_varies: np.ndarray, names: Sequence[str]) -> None:
    """One RuntimeWarning for images whose alpha channel varies but that are one flat colour once it is dropped: a
    drawing held only in its transparency (strokes of the background's colour on a transparent background) is
    gone. An image flat in its colours and its alpha alike (an opaque white page) was flat to begin with."""
    if not alpha_varies.any():
        return
    flat = images.reshape(len(images), -1)
    blank = np.flatnonzero(alpha_varies & (flat.min(axis=1) == flat.max(axis=1)))
    if len(blank):
        warnings.warn(
            f"{len(blank)} image(s) with a varying alpha channel are one flat colour once it is dropped (e.g. "
            f"{names[blank[0]]}): their drawing is only in the transparency. Flatten them onto a background first "
            "(e.g. Pillow: Image.alpha_composite(white, image).convert('RGB')).",
            RuntimeWarning,
            stacklevel=3,
        )


def _decode_native(source, name: str, from_bytes: bool) -> np.ndarray:
    try:
        contents = source if from_bytes else tf.io.read_file(source)
        return decode_image(contents).numpy()
    except tf.errors.OpError:
        raise DataError(f"unreadable image file: {_explain_unreadable(name, source, from_bytes)}") from None


def _canonical_shape(shape) -> tuple[int, int, int]:
    """Native (h, w, c) with alpha dropped: grey+alpha counts as grey, RGBA as RGB."""
    height, width, channels = (int(v) for v in shape)
    return height, width, {1: 1, 2: 1, 3: 3, 4: 3}.get(channels, channels)


def _fmt(shape) -> str:
    return "x".join(str(int(v)) for v in shape)


def convert_dataset(data, target_shape: Sequence[int], chunk: int = 2048):
    """A ClassIndexedDataset with every image of `data` converted to `target_shape` (H, W, C) by
    :func:`convert_images` and stored as uint8 again (chunked: a large set never sits in memory as floats)."""
    from keras_metalstm.data.dataset import ClassIndexedDataset

    target = check_image_shape(target_shape)
    if data.num_images:
        images = np.concatenate(
            [
                to_uint8(convert_images(data.images[i : i + chunk], target)).numpy()
                for i in range(0, data.num_images, chunk)
            ]
        )
    else:
        images = np.zeros((0, *target), np.uint8)
    return ClassIndexedDataset(images, data.class_sizes, data.class_names, name=f"{data.name} as {target}")
