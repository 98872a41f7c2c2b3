"""Animated WebP files, refused before TensorFlow's decoder sees them: TensorFlow 2.20-2.21's WebP decoder corrupts
the process's memory on an animated file and the process aborts ("free(): corrupted unsorted chunks"), whether
the frames are expanded or not. A file one user drops in a class folder, or one request to an exported
`predict_encoded` signature, would end the training run or the model server without a message.

An animated WebP is a RIFF "WEBP" file whose first chunk is the extended header "VP8X" with the animation flag
(0x02 of the flags byte at offset 20); still WebP files, with or without that header, are read as before.
"""

import tensorflow as tf

_HEADER = 21  # "RIFF", size, "WEBP", "VP8X", chunk size, flags
ANIMATED_WEBP = "an animated WebP, which TensorFlow cannot decode (its decoder crashes): save its first frame as PNG"


def is_animated_webp(contents) -> tf.Tensor:
    """True for an animated WebP file (a scalar string tensor of the file's bytes), in-graph."""
    contents = tf.convert_to_tensor(contents, tf.string)
    # The first bytes, padded with zeros for a shorter file: substr past the end would fail.
    head = tf.strings.join([tf.strings.substr(contents, 0, _HEADER), tf.constant(bytes(_HEADER))])
    extended = (
        tf.equal(tf.strings.substr(head, 0, 4), "RIFF")
        & tf.equal(tf.strings.substr(head, 8, 4), "WEBP")
        & tf.equal(tf.strings.substr(head, 12, 4), "VP8X")
    )
    flags = tf.io.decode_raw(tf.strings.substr(head, 20, 1), tf.uint8)[0]
    return extended & tf.not_equal(tf.bitwise.bitwise_and(flags, 2), 0)


def refuse_animated_webp(contents):
    """An op that fails (InvalidArgumentError with `ANIMATED_WEBP`) for an animated WebP: the decoder must run after
    it (a control dependency in a graph; eagerly it raises at once)."""
    return tf.debugging.Assert(tf.logical_not(is_animated_webp(contents)), [ANIMATED_WEBP])


def unreadable_webp_reason(contents: bytes) -> str | None:
    """`ANIMATED_WEBP` for an animated WebP file's bytes, None for any other file."""
    if len(contents) < _HEADER or contents[:4] != b"RIFF" or contents[8:16] != b"WEBPVP8X":
        return None
    return ANIMATED_WEBP if contents[20] & 2 else None
