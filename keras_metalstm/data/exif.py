"""A JPEG's EXIF orientation, in-graph: a phone stores a portrait photo as landscape pixels plus a tag saying how
to turn them, which image viewers apply and TensorFlow's decoder does not. `apply_exif_orientation` turns the
decoded pixels upright as the viewer shows them (as Pillow's `ImageOps.exif_transpose`), wherever the package
decodes images: loaders, adapt, predict and the exported signatures on files.

The tag (0x0112, values 1-8) is read from the first image file directory of the APP1 "Exif" segment, in either
byte order, when that segment is the file's first or second (where cameras, phones and editors write it); a file
without it, or with a value outside 1-8, is left as decoded.
"""

import tensorflow as tf

_TIFF_BYTES = 4096  # of the TIFF header and the first directory that are read
_MAX_ENTRIES = 64
_ORIENTATION_TAG = 0x0112


def _unsigned(data, offsets, size, little_endian):
    """The `size`-byte unsigned integers (int64) at `offsets` of the uint8 vector `data`, in either byte order."""
    offsets = tf.clip_by_value(tf.cast(offsets, tf.int64), 0, _TIFF_BYTES - size)
    parts = [tf.cast(tf.gather(data, offsets + index), tf.int64) for index in range(size)]
    little = sum(part * 256**index for index, part in enumerate(parts))
    big = sum(part * 256 ** (size - 1 - index) for index, part in enumerate(parts))
    return tf.where(little_endian, little, big)


def _bytes_at(contents, position, size):
    """`size` bytes of `contents` from `position` (fewer at its end; none past it, where substr would fail)."""
    return tf.strings.substr(contents, tf.minimum(position, tf.strings.length(contents)), size)


def _exif_marker(contents):
    """(whether `contents` is a JPEG whose first or second segment is the "Exif" APP1 segment, where its TIFF header
    starts). Cameras and phones write it first, some editors after a JFIF APP0 segment; a search of the file's
    head (`tf.strings.split`) would double the time of decoding a small JPEG."""
    exif = b"Exif\x00\x00"
    is_jpeg = tf.equal(_bytes_at(contents, 0, 2), b"\xff\xd8")
    first = tf.equal(_bytes_at(contents, 6, 6), exif)  # SOI, APP1 marker and length, then "Exif"
    # After a first segment of length L (its 2-byte big-endian length field at byte 4): its marker, length, "Exif".
    length_field = tf.strings.join([_bytes_at(contents, 4, 2), tf.constant(bytes(2))])
    length = tf.io.decode_raw(tf.strings.substr(length_field, 0, 2), tf.uint16, little_endian=False)[0]
    second_at = 8 + tf.cast(length, tf.int32)
    second = tf.equal(_bytes_at(contents, second_at, 6), exif)
    return is_jpeg & (first | second), tf.where(first, 12, second_at + 6)


def _orientation_at(contents, start):
    """The orientation tag's value in the TIFF header at byte `start` of `contents`, 1 if none or out of range."""
    tiff = tf.strings.join([_bytes_at(contents, start, _TIFF_BYTES), tf.constant(bytes(_TIFF_BYTES))])
    data = tf.io.decode_raw(tf.strings.substr(tiff, 0, _TIFF_BYTES), tf.uint8)
    little_endian = tf.equal(tf.strings.substr(tiff, 0, 2), "II")
    directory = _unsigned(data, [4], 4, little_endian)[0]
    count = tf.minimum(_unsigned(data, [directory], 2, little_endian)[0], _MAX_ENTRIES)
    entries = directory + 2 + 12 * tf.range(_MAX_ENTRIES, dtype=tf.int64)
    tags = _unsigned(data, entries, 2, little_endian)
    values = _unsigned(data, entries + 8, 2, little_endian)  # a SHORT value sits in the entry's first two bytes
    match = (tags == _ORIENTATION_TAG) & (tf.range(_MAX_ENTRIES, dtype=tf.int64) < count)
    orientation = tf.reduce_max(tf.where(match, values, 0))
    valid = (orientation >= 1) & (orientation <= 8) & (directory < _TIFF_BYTES)
    return tf.where(valid, tf.cast(orientation, tf.int32), 1)


def exif_orientation(contents) -> tf.Tensor:
    """The EXIF orientation (int32 scalar, 1-8) of the JPEG file `contents` (a scalar string tensor); 1 for any
    other file and for a JPEG without a readable one."""
    contents = tf.convert_to_tensor(contents, tf.string)
    found, start = _exif_marker(contents)
    return tf.cond(found, lambda: _orientation_at(contents, start), lambda: tf.constant(1))


def orient(image, orientation) -> tf.Tensor:
    """`image` (H, W, C) turned as EXIF `orientation` (1-8) asks: mirrored and/or rotated to its upright view."""

    def transposed():
        # A gather, not tf.transpose: a Transpose of uint8 (or of a cast of it, which the graph optimiser reorders)
        # makes TensorFlow's oneDNN rewrite log an error line ("oneDNN supports DT_UINT8 only on ...") for every
        # graph holding it, executed or not.
        height, width = tf.shape(image)[0], tf.shape(image)[1]
        pixels = tf.reshape(image, [height * width, -1])
        index = tf.range(height * width)  # output pixel (w, h) at w * height + h is input pixel (h, w)
        return tf.reshape(tf.gather(pixels, (index % height) * width + index // height), [width, height, -1])

    branches = [
        lambda: image,  # 1: as stored
        lambda: tf.reverse(image, [1]),  # 2: mirrored left-right
        lambda: tf.reverse(image, [0, 1]),  # 3: upside down
        lambda: tf.reverse(image, [0]),  # 4: mirrored top-bottom
        transposed,  # 5: mirrored along the main diagonal
        lambda: tf.reverse(transposed(), [1]),  # 6: stored turned 90 degrees anticlockwise
        lambda: tf.reverse(transposed(), [0, 1]),  # 7: mirrored along the other diagonal
        lambda: tf.reverse(transposed(), [0]),  # 8: stored turned 90 degrees clockwise
    ]
    return tf.switch_case(tf.cast(orientation, tf.int32) - 1, branches)


def apply_exif_orientation(contents, decoded) -> tf.Tensor:
    """`decoded` (H, W, C), TensorFlow's decoding of the file `contents`, turned upright by its EXIF orientation."""
    contents = tf.convert_to_tensor(contents, tf.string)
    found, start = _exif_marker(contents)
    # One branch for the files without the marker, most of a data set's: parsing costs ~60 small ops per image.
    return tf.cond(found, lambda: orient(decoded, _orientation_at(contents, start)), lambda: decoded)
