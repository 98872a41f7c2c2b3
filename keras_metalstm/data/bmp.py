"""Colour-palette BMP files, in-graph: TensorFlow's BMP decoder returns an 8-bit BMP's palette indices as grey
levels, right only when the palette is the grey ramp 0..255. `apply_bmp_palette` looks the indices up in the file's
palette, so a colour-palette BMP decodes to its colours everywhere the package decodes images (loaders, adapt,
predict and the exported `predict_encoded` signature).

The fields read are those of the BITMAPINFOHEADER family (header size 40 or more): bits per pixel at byte 28, the
number of palette entries at byte 46 (0: 2^bits), the palette (blue, green, red, reserved) after the header. A
palette whose entries are all grey gives one channel, as the decoder's own output has; any other gives RGB.
"""

import tensorflow as tf

_FILE_HEADER = 14  # "BM", file size, reserved, pixel offset; the info header starts here
_SMALLEST_HEADER = 40  # BITMAPINFOHEADER; the OS/2 header (12 bytes) has 3-byte palette entries and is left alone
_SHORTEST_FILE = _FILE_HEADER + _SMALLEST_HEADER


def _little_endian(contents, offset, dtype, size):
    return tf.io.decode_raw(tf.strings.substr(contents, offset, size), dtype, little_endian=True)[0]


def is_palette_bmp(contents) -> tf.Tensor:
    """True for an 8-bit BMP with an info header of 40 bytes or more (a scalar string tensor of the file)."""
    contents = tf.convert_to_tensor(contents, tf.string)
    # The first bytes, padded with zeros for a shorter file: no branch (a tf.cond per image slows a loader's
    # decoding by several per cent).
    head = tf.strings.join([tf.strings.substr(contents, 0, _SHORTEST_FILE), tf.constant(bytes(_SHORTEST_FILE))])
    header_size = _little_endian(head, _FILE_HEADER, tf.int32, 4)
    bits = _little_endian(head, 28, tf.uint16, 2)
    is_bmp = tf.equal(tf.strings.substr(head, 0, 2), "BM") & (tf.strings.length(contents) >= _SHORTEST_FILE)
    return is_bmp & (header_size >= _SMALLEST_HEADER) & (bits == 8)


def apply_bmp_palette(contents, decoded) -> tf.Tensor:
    """`decoded` (H, W, C) uint8, TensorFlow's decoding of the file `contents`, with an 8-bit BMP's indices replaced
    by their palette colours: (H, W, 1) for a grey palette, (H, W, 3) otherwise. Other files pass unchanged."""
    contents = tf.convert_to_tensor(contents, tf.string)

    def with_palette():
        header_size = _little_endian(contents, _FILE_HEADER, tf.int32, 4)
        entries = _little_endian(contents, 46, tf.int32, 4)
        entries = tf.where((entries <= 0) | (entries > 256), 256, entries)
        raw = tf.strings.substr(contents, _FILE_HEADER + header_size, 4 * entries)
        palette = tf.reshape(tf.io.decode_raw(raw, tf.uint8), (-1, 4))[:, 2::-1]  # (blue, green, red) -> RGB
        # An index past a short palette reads as black, as image viewers show it.
        palette = tf.pad(palette, [[0, 256 - tf.shape(palette)[0]], [0, 0]])
        grey = tf.reduce_all((palette[:, 0] == palette[:, 1]) & (palette[:, 1] == palette[:, 2]))
        indices = tf.cast(decoded[..., 0], tf.int32)
        return tf.cond(
            grey,
            lambda: tf.gather(palette[:, :1], indices),
            lambda: tf.gather(palette, indices),
        )

    return tf.cond(is_palette_bmp(contents), with_palette, lambda: decoded)


def unreadable_bmp_reason(contents: bytes) -> str | None:
    """Why TensorFlow cannot decode this BMP file's bytes (its bit depth), or None for a depth it reads (8, 24, 32)
    and for other files: TensorFlow's own message ("channels ... was 0") does not say."""
    if len(contents) < _SHORTEST_FILE or contents[:2] != b"BM":
        return None
    bits = int.from_bytes(contents[28:30], "little")
    if bits in (8, 24, 32):
        return None
    return f"a {bits}-bit BMP, which TensorFlow does not decode (it reads 8-, 24- and 32-bit BMPs): save it as PNG"
