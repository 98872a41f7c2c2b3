"""BMP files TensorFlow's decoder reads with the wrong colours, put right in-graph (`apply_bmp_colours`), so they
decode to their colours everywhere the package decodes images (loaders, adapt, predict and the exported
`predict_encoded` signature):

* an 8-bit BMP: the decoder returns its palette indices as grey levels, right only when the palette is the grey
  ramp 0..255; they are looked up in the file's palette. A palette whose entries are all grey gives one channel,
  as the decoder's own output has; any other gives RGB.
* a 32-bit BMP with channel masks (BI_BITFIELDS): the decoder takes its bytes as blue, green, red, alpha whatever
  the masks say; a file whose masks put them in other bytes (red first, say) gets its channels back in place,
  and one whose masks are not whole bytes (10 bits a channel) is refused (InvalidArgumentError in a graph).

The fields read are those of the BITMAPINFOHEADER family (header size 40 or more): bits per pixel at byte 28,
compression at byte 30, the number of palette entries at byte 46 (0: 2^bits), the palette (blue, green, red,
reserved) or the red, green and blue masks right after those 40 bytes.
"""

import numpy as np
import tensorflow as tf

_FILE_HEADER = 14  # "BM", file size, reserved, pixel offset; the info header starts here
_SMALLEST_HEADER = 40  # BITMAPINFOHEADER; the OS/2 header (12 bytes) has 3-byte palette entries and is left alone
_SHORTEST_FILE = _FILE_HEADER + _SMALLEST_HEADER
_MASKS = _SHORTEST_FILE  # the red, green and blue masks, 4 bytes each, in every header of the family
_BI_RLE8, _BI_RLE4, _BI_BITFIELDS, _BI_ALPHABITFIELDS = 1, 2, 3, 6
_DECODER_CHANNEL = (2, 1, 0, 3)  # the channel it puts each byte in
MASKS_NOT_BYTES = (
    "a 32-bit BMP whose channel masks are not whole bytes (e.g. 10 bits a channel), which TensorFlow does not "
    "decode: save it as PNG"
)


def _little_endian(contents, offset, dtype, size):
    return tf.io.decode_raw(tf.strings.substr(contents, offset, size), dtype, little_endian=True)[0]


def _bmp_kind(contents) -> tf.Tensor:
    """0 for a file the decoder reads right, 1 for an 8-bit BMP (palette), 2 for a 32-bit BMP with channel masks (a
    scalar string tensor of the file, in-graph)."""
    # The first bytes, padded with zeros for a shorter file: no branch (a tf.cond per image slows a loader's
    # decoding by several per cent).
    head = tf.strings.join([tf.strings.substr(contents, 0, _SHORTEST_FILE), tf.constant(bytes(_SHORTEST_FILE))])
    header_size = _little_endian(head, _FILE_HEADER, tf.int32, 4)
    bits = _little_endian(head, 28, tf.uint16, 2)
    compression = _little_endian(head, 30, tf.int32, 4)
    is_bmp = tf.equal(tf.strings.substr(head, 0, 2), "BM") & (tf.strings.length(contents) >= _SHORTEST_FILE)
    is_bmp &= header_size >= _SMALLEST_HEADER
    bitfields = (bits == 32) & ((compression == _BI_BITFIELDS) | (compression == _BI_ALPHABITFIELDS))
    return tf.where(is_bmp & (bits == 8), 1, tf.where(is_bmp & bitfields, 2, 0))


def _mask_bytes(masks) -> tf.Tensor:
    """The byte (0-3) each of the red, green and blue masks (int32: decode_raw reads no uint32) selects, -1 for a
    mask that is not one whole byte."""
    whole_bytes = tf.constant(np.array([0xFF << (8 * index) for index in range(4)], np.uint32).view(np.int32))
    matches = tf.equal(masks[:, None], whole_bytes[None, :])
    byte = tf.argmax(tf.cast(matches, tf.int32), axis=1, output_type=tf.int32)
    return tf.where(tf.reduce_any(matches, axis=1), byte, -1)


def apply_bmp_colours(contents, decoded) -> tf.Tensor:
    """`decoded` (H, W, C) uint8, TensorFlow's decoding of the file `contents`, with a BMP's colours put right (see
    the module docstring); other files pass unchanged."""
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
        colours = tf.cond(
            grey,
            lambda: tf.gather(palette[:, :1], indices),
            lambda: tf.gather(palette, indices),
        )
        return colours, tf.constant(True)

    def with_masks():
        rgb = _mask_bytes(tf.io.decode_raw(tf.strings.substr(contents, _MASKS, 12), tf.int32, little_endian=True))
        alpha = 6 - tf.reduce_sum(rgb)  # the byte left
        # The decoder put file byte b in its channel _DECODER_CHANNEL[b] (bytes 0, 1, 2, 3 as blue, green, red, alpha).
        bytes_read = tf.clip_by_value(tf.concat([rgb, [alpha]], axis=0), 0, 3)  # in range for any masks
        channels = tf.gather(tf.constant(_DECODER_CHANNEL), bytes_read)
        # Masks of parts of bytes (10 bits a channel), or two on one byte: no byte order gives their colours.
        whole_distinct_bytes = tf.reduce_all(rgb >= 0) & (tf.reduce_max(tf.reduce_sum(tf.one_hot(rgb, 4), 0)) <= 1)
        return tf.gather(decoded, channels, axis=-1), whole_distinct_bytes

    colours, readable = tf.switch_case(
        _bmp_kind(contents), [lambda: (decoded, tf.constant(True)), with_palette, with_masks]
    )
    # Outside the branches: a stateful Assert in one made tf.data log an "unknown attribute" line for the pipeline.
    with tf.control_dependencies([tf.debugging.Assert(readable, [MASKS_NOT_BYTES])]):
        return tf.identity(colours)


def unreadable_bmp_reason(contents: bytes) -> str | None:
    """Why TensorFlow cannot decode this BMP file's bytes (its compression or bit depth), or None for a depth it
    reads (8, 24, 32) and for other files: TensorFlow's own messages ("channels ... was 0", "Input size should
    match") do not say."""
    if len(contents) < _SHORTEST_FILE or contents[:2] != b"BM":
        return None
    if int.from_bytes(contents[30:34], "little") in (_BI_RLE8, _BI_RLE4):
        return "a run-length compressed BMP, which TensorFlow does not decode: save it as PNG"
    bits = int.from_bytes(contents[28:30], "little")
    compression = int.from_bytes(contents[30:34], "little")
    if bits == 32 and compression in (_BI_BITFIELDS, _BI_ALPHABITFIELDS) and len(contents) >= _MASKS + 12:
        masks = [int.from_bytes(contents[start : start + 4], "little") for start in range(_MASKS, _MASKS + 12, 4)]
        whole_bytes = [0xFF << (8 * byte) for byte in range(4)]
        if not all(mask in whole_bytes for mask in masks) or len(set(masks)) < 3:
            return MASKS_NOT_BYTES
    if bits in (8, 24, 32):
        return None
    return f"a {bits}-bit BMP, which TensorFlow does not decode (it reads 8-, 24- and 32-bit BMPs): save it as PNG"
