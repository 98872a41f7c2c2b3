"""The conversion rule (convert_images), in-graph decoding and the parallel file decoder's errors."""

import io
import struct
import warnings

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from keras_metalstm.data import (
    CONVERSION_RULE,
    DataError,
    convert_images,
    decode_image_bytes,
    decode_image_files,
    load_image_folder,
    reading_progress,
)
from keras_metalstm.data.images import READS_WEBP, decode_image, to_uint8


def encode(array, fmt="PNG", mode=None):
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    image.save(buffer, fmt)
    return buffer.getvalue()


def test_grey_to_rgb_repeats_and_rgb_to_grey_uses_luminance():
    grey = np.array([[[0], [51]], [[102], [255]]], np.uint8)
    rgb = convert_images(grey, (2, 2, 3)).numpy()
    np.testing.assert_allclose(rgb, np.repeat(grey / 255.0, 3, axis=-1), atol=1e-6)
    colour = np.zeros((1, 3, 3), np.uint8)
    colour[0, 0] = [255, 0, 0]
    colour[0, 1] = [0, 255, 0]
    colour[0, 2] = [0, 0, 255]
    np.testing.assert_allclose(
        convert_images(colour, (1, 3, 1)).numpy()[0, :, 0], [0.299, 0.587, 0.114], atol=1e-6
    )


def test_alpha_is_dropped_and_floats_pass_through():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = 7
    np.testing.assert_allclose(convert_images(rgba, (2, 2, 3)).numpy()[..., 0], 1.0)
    grey_alpha = np.full((2, 2, 2), 200, np.uint8)
    grey_alpha[..., 1] = 0
    np.testing.assert_allclose(convert_images(grey_alpha, (2, 2, 1)).numpy(), 200 / 255, atol=1e-6)
    floats = np.random.default_rng(0).random((3, 4, 4, 1)).astype(np.float32)
    np.testing.assert_allclose(convert_images(floats, (4, 4, 1)).numpy(), floats, atol=1e-7)


def test_sixteen_bit_images_are_scaled_and_values_without_a_known_scale_are_refused():
    """Integer images other than uint8 were cast unscaled and clipped: 0..255 int64 (np.array of ints) or 16-bit
    pixels came out a white image, as did float images on 0..255."""
    levels = np.random.default_rng(2).integers(0, 256, (4, 4, 1), dtype=np.uint8)
    sixteen = levels.astype(np.uint16) * 257  # the same levels on 0..65535
    np.testing.assert_allclose(convert_images(sixteen, (4, 4, 1)).numpy(), levels / 255, atol=1e-6)
    for dtype in (np.int64, np.int32, np.uint32):
        with pytest.raises(DataError, match=rf"uint8 \(0\.\.255\), uint16 .*got dtype {np.dtype(dtype).name}"):
            convert_images(levels.astype(dtype), (4, 4, 1))
    for values in (levels.astype(np.float32), np.full((4, 4, 1), np.nan, np.float32)):
        with pytest.raises(DataError, match=r"float images must be in \[0, 1\], got values .*divide 0\.\.255"):
            convert_images(values, (4, 4, 1))
    with pytest.raises(DataError, match=r"images of shape \(1, 0, 4, 1\) have no pixels to convert"):
        convert_images(np.zeros((1, 0, 4, 1), np.uint8), (4, 4, 1))
    # inside a traced function (a serving signature) the values are unknown: the rule clips them
    clipped = tf.function(lambda images: convert_images(images, (4, 4, 1)))(levels.astype(np.float32))
    assert clipped.numpy().min() >= 0 and clipped.numpy().max() <= 1


def test_resize_is_bilinear_and_keeps_a_constant_image_constant():
    image = np.full((105, 105, 1), 128, np.uint8)
    out = convert_images(image, (28, 28, 1)).numpy()
    assert out.shape == (28, 28, 1)
    np.testing.assert_allclose(out, 128 / 255, atol=1e-5)
    # a left/right split image keeps its halves (antialiased, aspect ratio not kept)
    half = np.zeros((50, 100, 3), np.uint8)
    half[:, 50:] = 255
    resized = convert_images(half, (10, 10, 3)).numpy()
    assert resized[:, :4].max() < 0.01 and resized[:, 6:].min() > 0.99


def test_convert_images_works_in_graph_on_unknown_shapes():
    @tf.function(input_signature=[tf.TensorSpec([None, None, None], tf.uint8)])
    def to_rgb_28(images):
        return convert_images(images, (28, 28, 3))

    out = to_rgb_28(tf.fill([56, 56, 1], tf.constant(255, tf.uint8)))
    assert out.shape == (28, 28, 3)
    np.testing.assert_allclose(out.numpy(), 1.0)
    already = np.random.default_rng(1).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    np.testing.assert_allclose(to_rgb_28(already).numpy(), already / 255.0, atol=1e-6)  # exact: no resize


def test_decode_image_bytes_png_and_jpeg_agree_with_convert_images():
    rng = np.random.default_rng(2)
    array = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    from_png = decode_image_bytes(tf.constant(encode(array)), (20, 20, 1)).numpy()
    np.testing.assert_allclose(from_png, convert_images(array, (20, 20, 1)).numpy(), atol=1e-6)
    smooth = np.tile(np.linspace(0, 255, 30, dtype=np.uint8)[None, :, None], (40, 1, 3))
    from_jpeg = decode_image_bytes(tf.constant(encode(smooth, "JPEG")), (40, 30, 3)).numpy()
    np.testing.assert_allclose(from_jpeg, smooth / 255.0, atol=0.03)


def _bmp_with_palette(indices, palette):
    """An 8-bit BMP of `indices` (h, w) whose palette holds `palette` (n, 3) RGB, written by Pillow."""
    image = Image.fromarray(indices, "P")
    image.putpalette(palette.reshape(-1).tolist())
    buffer = io.BytesIO()
    image.save(buffer, "BMP")
    return buffer.getvalue()


def test_a_colour_palette_bmp_decodes_to_its_colours_in_and_out_of_graphs():
    """TensorFlow's decoder returns an 8-bit BMP's palette indices as grey levels; the package looks them up. Checked
    against Pillow's decoding, eagerly and in a traced function (as the exported predict_encoded runs it)."""
    rng = np.random.default_rng(4)
    palette = rng.integers(0, 256, (200, 3), dtype=np.uint8)
    indices = rng.integers(0, 200, (12, 9), dtype=np.uint8)
    contents = _bmp_with_palette(indices, palette)
    colours = np.asarray(Image.open(io.BytesIO(contents)).convert("RGB"))
    np.testing.assert_array_equal(colours, palette[indices])  # the fixture: Pillow reads back what it wrote
    graph = tf.function(lambda data: decode_image_bytes(data, (12, 9, 3)))
    for decoded in (decode_image_bytes(tf.constant(contents), (12, 9, 3)), graph(tf.constant(contents))):
        np.testing.assert_array_equal(np.round(decoded.numpy() * 255).astype(np.uint8), colours)
    grey = decode_image_bytes(tf.constant(contents), (12, 9, 1)).numpy()[..., 0]
    np.testing.assert_allclose(grey, colours @ np.array([0.299, 0.587, 0.114]) / 255, atol=1e-5)


def _bmp_with_masks(pixels, masks, header_size):
    """A bottom-up 32-bit BI_BITFIELDS BMP of `pixels` (h, w, 4) RGBA whose masks (red, green, blue[, alpha]) pick
    each channel's byte; a 40-byte header is followed by the three colour masks, a longer one holds them."""
    height, width, _ = pixels.shape
    position = {0xFF << (8 * byte): byte for byte in range(4)}
    alpha_byte = 6 - sum(position[mask] for mask in masks[:3])
    order = [position[mask] for mask in masks[:3]] + [alpha_byte]  # the byte of red, green, blue and alpha
    stored = np.zeros_like(pixels)
    stored[..., order] = pixels
    data = stored[::-1].tobytes()
    masks_field = struct.pack(f"<{len(masks)}I", *masks)
    header = struct.pack("<IiiHHIIiiII", header_size, width, height, 1, 32, 3, len(data), 2835, 2835, 0, 0)
    header += masks_field[: header_size - 40] if header_size > 40 else b""
    header += bytes(header_size - len(header))
    extra = masks_field if header_size == 40 else b""
    offset = 14 + header_size + len(extra)
    return b"BM" + struct.pack("<IHHI", offset + len(data), 0, 0, offset) + header + extra + data


def test_a_32_bit_bmp_decodes_to_its_colours_whatever_byte_order_its_masks_give():
    """TensorFlow's decoder reads a 32-bit BMP's bytes as blue, green, red, alpha and ignores its masks: a file with
    red in the first byte came out with red and blue swapped. Checked against Pillow, eagerly and traced."""
    rgba = np.random.default_rng(6).integers(0, 256, (5, 4, 4), dtype=np.uint8)
    red_first = (0x000000FF, 0x0000FF00, 0x00FF0000, 0xFF000000)
    usual = (0x00FF0000, 0x0000FF00, 0x000000FF, 0xFF000000)
    traced = tf.function(lambda data: decode_image_bytes(data, (5, 4, 3)))
    for masks, header_size in ((red_first, 40), (red_first, 56), (red_first, 124), (usual, 40), (usual, 108)):
        contents = _bmp_with_masks(rgba, masks, header_size)
        if header_size > 40:  # the fixture, where Pillow reads the layout (not red first without an alpha mask)
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(contents)).convert("RGB")), rgba[..., :3])
        for decoded in (decode_image_bytes(tf.constant(contents), (5, 4, 3)), traced(tf.constant(contents))):
            np.testing.assert_array_equal(
                np.round(decoded.numpy() * 255).astype(np.uint8), rgba[..., :3], err_msg=f"{header_size}: {masks}"
            )

def test_a_32_bit_bmp_whose_masks_are_not_whole_bytes_is_refused_by_name(tmp_path):
    """10 bits a channel: TensorFlow read the bytes as blue, green, red and gave wrong colours without a word."""
    rgba = np.random.default_rng(7).integers(0, 256, (5, 4, 4), dtype=np.uint8)
    contents = bytearray(_bmp_with_masks(rgba, (0x00FF0000, 0x0000FF00, 0x000000FF, 0xFF000000), 56))
    contents[54:70] = struct.pack("<4I", 0x3FF00000, 0x000FFC00, 0x000003FF, 0xC0000000)
    (tmp_path / "ten_bits.bmp").write_bytes(bytes(contents))
    with pytest.raises(DataError, match=r"ten_bits\.bmp: a 32-bit BMP whose channel masks are not whole bytes"):
        decode_image_files([str(tmp_path / "ten_bits.bmp")], (5, 4, 3))
    with pytest.raises(tf.errors.InvalidArgumentError, match="channel masks are not whole bytes"):
        tf.function(decode_image)(tf.constant(bytes(contents)))  # as predict_encoded runs it


def test_a_grey_palette_bmp_stays_one_channel_with_its_palettes_levels(tmp_path):
    """A grey ramp (Pillow's "L" BMP) reads as before; an inverted grey palette gives its levels, still grey."""
    rng = np.random.default_rng(5)
    levels = rng.integers(0, 256, (10, 7), dtype=np.uint8)
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
    (tmp_path / "ramp.bmp").write_bytes(encode(levels, "BMP"))
    (tmp_path / "inverted.bmp").write_bytes(_bmp_with_palette(levels, ramp[::-1]))
    images, native = decode_image_files([str(tmp_path / "ramp.bmp"), str(tmp_path / "inverted.bmp")], None)
    assert native.tolist() == [[10, 7, 1], [10, 7, 1]]
    np.testing.assert_array_equal(images[0, ..., 0], levels)
    np.testing.assert_array_equal(images[1, ..., 0], 255 - levels)


def test_a_bmp_of_a_bit_depth_tensorflow_cannot_read_is_named_with_the_fix(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.eye(8, dtype=bool)).save(buffer, "BMP")  # 1 bit per pixel
    (tmp_path / "mono.bmp").write_bytes(buffer.getvalue())
    with pytest.raises(DataError, match=r"mono.bmp: a 1-bit BMP, which TensorFlow does not decode .*save it as PNG"):
        decode_image_files([str(tmp_path / "mono.bmp")], (8, 8, 1))
    # a 4x4 8-bit BMP, run-length compressed (BI_RLE8): four runs of 4 pixels of colour 1, then end of bitmap
    palette, runs = bytes([0, 0, 255, 0, 0, 255, 0, 0]), b"\x04\x01\x00\x00" * 4 + b"\x00\x01"
    offset = 14 + 40 + len(palette)
    header = struct.pack("<IiiHHIIiiII", 40, 4, 4, 1, 8, 1, len(runs), 2835, 2835, 2, 0)
    rle = b"BM" + struct.pack("<IHHI", offset + len(runs), 0, 0, offset) + header + palette + runs
    assert np.asarray(Image.open(io.BytesIO(rle)).convert("RGB"))[0, 0].tolist() == [0, 255, 0]  # the fixture
    (tmp_path / "rle.bmp").write_bytes(rle)
    with pytest.raises(DataError, match=r"rle.bmp: a run-length compressed BMP, which TensorFlow does not decode"):
        decode_image_files([str(tmp_path / "rle.bmp")], (8, 8, 1))


@pytest.mark.skipif(not READS_WEBP, reason="this TensorFlow does not decode WebP")
def test_an_animated_webp_is_named_with_the_fix_before_the_decoder_can_crash_the_process(tmp_path):
    """TensorFlow's WebP decoder corrupts the heap on an animated file (the process aborts, no message), expanded
    or not; a still WebP with the same extended header (here for its EXIF block) is read as before."""
    frames = [np.full((7, 9, 3), level, np.uint8) for level in (40, 200)]
    pictures = [Image.fromarray(frame) for frame in frames]
    pictures[0].save(tmp_path / "animated.webp", save_all=True, append_images=pictures[1:], duration=100)
    still = np.random.default_rng(8).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    exif = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x00"
    Image.fromarray(still).save(tmp_path / "still.webp", lossless=True, exif=exif)
    assert (tmp_path / "still.webp").read_bytes()[12:16] == b"VP8X"  # the fixture: the header the check reads
    message = r"animated\.webp: an animated WebP, which TensorFlow cannot decode .*: save its first frame as PNG"
    with pytest.raises(DataError, match=message):
        decode_image_files([str(tmp_path / "still.webp"), str(tmp_path / "animated.webp")], (7, 9, 3))
    served = tf.function(lambda contents: decode_image_bytes(contents, (7, 9, 3)))  # as predict_encoded runs it
    with pytest.raises(tf.errors.InvalidArgumentError, match="an animated WebP"):
        served(tf.constant((tmp_path / "animated.webp").read_bytes()))
    images, _ = decode_image_files([str(tmp_path / "still.webp")], (7, 9, 3))
    np.testing.assert_array_equal(images[0], still)


def test_the_rule_gives_the_same_uint8_images_eagerly_and_in_a_traced_function():
    """A served signature converts in a traced function, the loaders and `metalstm predict` may not: both must
    store the same uint8 values. (A division by 255 was rewritten as a product by the graph optimiser and rounded
    a pixel in every few hundred to the other level.)"""
    rng = np.random.default_rng(8)
    traced = tf.function(
        lambda raw: to_uint8(convert_images(raw, (28, 28, 1))),
        input_signature=[tf.TensorSpec([None, None, None], tf.uint8)],
    )
    for height, width, channels in [(28, 30, 1), (32, 30, 1), (61, 50, 3), (40, 33, 4), (30, 28, 2)] * 4:
        raw = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
        eager = to_uint8(convert_images(raw, (28, 28, 1))).numpy()
        np.testing.assert_array_equal(traced(tf.constant(raw)).numpy(), eager)


def _jpeg_with_orientation(pixels, orientation, byte_order, exif_first):
    """A JPEG of `pixels` whose EXIF says `orientation`, its directory written in `byte_order` ("II" or "MM"), the
    EXIF segment after Pillow's JFIF segment or, as phones write it, first."""
    big = byte_order == "MM"

    def number(value, size):
        return value.to_bytes(size, "big" if big else "little")

    # TIFF header, a directory of one SHORT entry (a 2-byte value padded to 4), no next directory.
    entry = number(0x0112, 2) + number(3, 2) + number(1, 4) + number(orientation, 2) + bytes(2)
    exif = b"Exif\x00\x00" + byte_order.encode() + number(42, 2) + number(8, 4) + number(1, 2) + entry + bytes(4)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=100, subsampling=0, exif=exif)  # 4:4:4, no chroma resampling
    contents = buffer.getvalue()
    assert contents[2:4] == b"\xff\xe0" and contents[24:30] == b"Exif\x00\x00"  # JFIF (16 bytes), then EXIF
    return contents[:2] + contents[20:] if exif_first else contents


@pytest.mark.parametrize("byte_order, exif_first", [("II", False), ("MM", False), ("II", True), ("MM", True)])
def test_a_jpeg_is_turned_upright_by_its_exif_orientation_as_pillow_turns_it(byte_order, exif_first):
    """Phones store a portrait photo as landscape pixels and an orientation tag; every orientation is turned as
    Pillow's exif_transpose turns it (what an image viewer shows), eagerly and in a traced function."""
    from PIL import ImageOps

    from keras_metalstm.data.images import decode_image

    blocks = np.random.default_rng(9).integers(0, 256, (3, 5, 3), dtype=np.uint8)
    pixels = np.kron(blocks, np.ones((8, 8, 1), np.uint8))  # 24 x 40, 8x8 blocks: JPEG keeps them
    traced = tf.function(decode_image, input_signature=[tf.TensorSpec([], tf.string)])
    for orientation in range(1, 9):
        contents = _jpeg_with_orientation(pixels, orientation, byte_order, exif_first)
        upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(contents))))
        for decoded in (decode_image(tf.constant(contents)), traced(tf.constant(contents))):
            assert decoded.shape == upright.shape, orientation
            assert np.abs(decoded.numpy().astype(int) - upright).max() <= 3, orientation  # two JPEG decoders


def test_decode_image_files_reads_in_order_and_reports_native_shapes(tmp_path, monkeypatch):
    from keras_metalstm.data import images as images_module

    pipelines = []  # the decoding pipeline, to check that it runs without tf.data's autotuning thread
    shipped = images_module.without_autotune_thread

    def recorded(dataset):
        pipelines.append(shipped(dataset))
        return pipelines[-1]

    monkeypatch.setattr(images_module, "without_autotune_thread", recorded)
    paths = []
    for i, size in enumerate([(10, 10), (20, 12), (10, 10)]):
        path = tmp_path / f"{i}.png"
        path.write_bytes(encode(np.full(size, 60 * i, np.uint8)))
        paths.append(str(path))
    images, native = decode_image_files(paths, (8, 8, 1))
    assert images.dtype == np.uint8 and images.shape == (3, 8, 8, 1)
    assert [int(images[i].mean()) for i in range(3)] == [0, 60, 120]
    assert native.tolist() == [[10, 10, 1], [20, 12, 1], [10, 10, 1]]
    assert [pipeline.options().autotune.enabled for pipeline in pipelines] == [False]


class RecordedProgress:
    readings = []

    def __init__(self, total):
        self.total, self.updates, self.closed = total, [], False
        self.readings.append(self)

    def update(self, count):
        self.updates.append(count)

    def close(self):
        self.closed = True


def test_reading_progress_reports_every_file_of_a_loader_inside_the_block_only(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for index in range(300):  # more than one decoded batch of 256
            (tmp_path / name / f"{index}.png").write_bytes(encode(np.full((4, 4), index % 256, np.uint8)))
    RecordedProgress.readings = []
    with reading_progress(RecordedProgress):
        load_image_folder(tmp_path)
    load_image_folder(tmp_path)  # outside the block: nobody asked
    [reading] = RecordedProgress.readings
    assert reading.total == 600 and sum(reading.updates) == 600 and len(reading.updates) > 1 and reading.closed


def test_images_whose_drawing_is_only_in_their_transparency_are_warned_of(tmp_path):
    """'Alpha dropped' turns black strokes on a transparent black background into a black square: said once."""
    strokes = np.zeros((8, 8, 4), np.uint8)
    strokes[2:6, 3, 3] = 255  # only the alpha channel draws the bar
    Image.fromarray(strokes, "RGBA").save(tmp_path / "signature.png")
    drawn = strokes.copy()
    drawn[..., 3], drawn[2:6, 3, :3] = 255, 200  # an opaque image with the bar in its colours
    Image.fromarray(drawn, "RGBA").save(tmp_path / "opaque.png")
    for alpha in (255, 0):  # an opaque white page and a fully transparent one: flat before alpha is dropped
        Image.fromarray(np.full((8, 8, 4), (255, 255, 255, alpha), np.uint8), "RGBA").save(tmp_path / f"{alpha}.png")
    flat_already = [str(tmp_path / name) for name in ("opaque.png", "255.png", "0.png")]
    with pytest.warns(RuntimeWarning, match=r"1 image\(s\) with a varying alpha channel are one flat colour .*"
                                             r"signature\.png"):
        decode_image_files([str(tmp_path / "signature.png"), *flat_already], (8, 8, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decode_image_files(flat_already, (8, 8, 1))


def test_mixed_shapes_are_refused_without_a_target_with_the_rule_in_the_message(tmp_path):
    (tmp_path / "a.png").write_bytes(encode(np.zeros((10, 10), np.uint8)))
    (tmp_path / "b.png").write_bytes(encode(np.zeros((12, 10), np.uint8)))
    with pytest.raises(DataError) as info:
        decode_image_files([str(tmp_path / "a.png"), str(tmp_path / "b.png")], None)
    message = str(info.value)
    assert "a.png is 10x10x1" in message and "b.png is 12x10x1" in message and CONVERSION_RULE in message


def test_truncated_and_non_image_files_are_named(tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(encode(np.zeros((10, 10), np.uint8)))
    data = encode(np.random.default_rng(3).integers(0, 256, (30, 30, 3), dtype=np.uint8), "JPEG")
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("not an image")
    paths = [str(good), str(tmp_path / "cut.jpg"), str(tmp_path / "text.png")]
    with pytest.raises(DataError) as info:
        decode_image_files(paths, (10, 10, 1))
    message = str(info.value)
    assert "2 unreadable image file(s)" in message
    assert "cut.jpg" in message and "text.png" in message and "good.png" not in message


def test_bad_target_shape_is_refused():
    with pytest.raises(DataError, match="C in"):
        convert_images(np.zeros((4, 4, 1), np.uint8), (4, 4, 2))
