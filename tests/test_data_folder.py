"""Image-folder loader (root/<class>/*.png|jpg|jpeg|bmp|gif|webp) on generated fixtures, with its split option."""

import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from keras_metalstm.data import (
    CONVERSION_RULE,
    IMAGE_EXTENSIONS,
    DataError,
    image_files,
    image_folder_splits,
    load_dataset,
    load_image_folder,
)
from keras_metalstm.data.folder import UNREAD_IMAGE_EXTENSIONS
from keras_metalstm.data.images import READS_WEBP

READ_EXTENSIONS = re.escape("/".join(IMAGE_EXTENSIONS))


def make_folder(root, num_classes=10, per_class=3, size=(16, 16), mode="RGB"):
    """Class k's images are flat with value 10*k; extensions .png, .jpg and .JPEG mixed."""
    for k in range(num_classes):
        folder = root / f"class_{k}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            value = 10 * k
            image = Image.new(mode, size, value if mode == "L" else (value, value, value))
            extension = [".png", ".jpg", ".JPEG"][i % 3]
            image.save(
                folder / f"img{i}{extension}", format="PNG" if extension == ".png" else "JPEG", quality=95
            )
        (folder / "notes.txt").write_text("ignored")
    return root


def test_loads_classes_from_sub_folders(tmp_path):
    root = make_folder(tmp_path / "data")
    (root / ".hidden").mkdir()
    dataset = load_image_folder(root)
    assert dataset.num_classes == 10 and dataset.image_shape == (16, 16, 3)
    assert dataset.class_sizes.tolist() == [3] * 10  # .txt ignored, .JPEG counted
    for k in range(10):
        np.testing.assert_allclose(dataset[f"class_{k}"].mean(), 10 * k, atol=2)
    assert dataset.sources_of("class_3") == ["class_3/img0.png", "class_3/img1.jpg", "class_3/img2.JPEG"]


def test_mixed_sizes_are_refused_or_converted(tmp_path):
    root = make_folder(tmp_path / "data", num_classes=3)
    Image.new("RGB", (20, 16), (255, 255, 255)).save(root / "class_1" / "wide.png")
    with pytest.raises(DataError) as info:
        load_image_folder(root)
    assert "class_1/wide.png is 16x20x3" in str(info.value) and CONVERSION_RULE in str(info.value)
    dataset = load_image_folder(root, image_shape=(8, 8, 1))
    assert dataset.image_shape == (8, 8, 1) and dataset.class_sizes.tolist() == [3, 4, 3]
    assert dataset["class_1"].max() == 255


def test_mixed_channels_are_refused_or_converted(tmp_path):
    root = make_folder(tmp_path / "data", num_classes=3)
    Image.new("L", (16, 16), 128).save(root / "class_2" / "grey.png")
    with pytest.raises(DataError, match="grey.png is 16x16x1"):
        load_image_folder(root)
    dataset = load_image_folder(root, image_shape=(16, 16, 3))
    grey = dataset["class_2"][0]  # sorted: grey.png comes before img*
    assert dataset.sources_of("class_2")[0] == "class_2/grey.png"
    assert (grey == 128).all()


def test_empty_folders_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty: expected one sub-folder per class"):
        load_image_folder(tmp_path / "empty")
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("L", (4, 4)).save(flat / "a.png")
    with pytest.raises(DataError, match="found 1 image.*directly in it"):
        load_image_folder(flat)
    root = make_folder(tmp_path / "data", num_classes=2)
    (root / "class_9").mkdir()
    (root / "class_9" / "readme.md").write_text("x")
    with pytest.raises(DataError, match=f"class_9 holds no {READ_EXTENSIONS} image; add images or remove"):
        load_image_folder(root)
    for index in range(3):
        Image.new("L", (4, 4)).save(root / "class_9" / f"{index}.tif")
    with pytest.raises(DataError, match=r"class_9 holds no .*; it holds 3 .tif file\(s\), a format not read "
                                        rf"\({READ_EXTENSIONS} are\): convert them to PNG"):
        load_image_folder(root)
    for path in (root / "class_9").glob("*.tif"):
        path.unlink()
    (root / "class_9" / "letter_a").mkdir()  # a hierarchy, as Omniglot's alphabet/character folders
    Image.new("L", (4, 4)).save(root / "class_9" / "letter_a" / "0.png")
    with pytest.raises(DataError, match=r"class_9 holds no .*; it holds 1 folder\(s\) of images \(letter_a\) but "
                                        r"the classes must be the immediate sub-folders of .*: move those folders up"):
        load_image_folder(root)
    # the data directory given one level too high: its only folder holds the classes
    one_up = tmp_path / "one_up"
    make_folder(one_up / "dataset", num_classes=2)
    with pytest.raises(DataError, match=r"dataset holds no .*; it holds 2 folder\(s\) of images \(class_0, class_1\): "
                                        r"if those are the classes, give .*one_up/dataset as the data directory"):
        load_image_folder(one_up)
    with pytest.raises(DataError, match="image folder not found"):
        load_image_folder(tmp_path / "nowhere")
    (tmp_path / "an_image.png").write_bytes(b"")  # an image given where its folder's folder was meant
    with pytest.raises(DataError, match=r"an_image.png is a file: give the folder that holds one sub-folder of images "
                                        r"per class"):
        load_image_folder(tmp_path / "an_image.png")


def test_jpeg_files_named_jfif_or_jpe_are_read_as_jpeg(tmp_path):
    """Windows and browsers save some JPEG downloads as .jfif (or .jpe, .pjpeg, .pjp); they were left out without a
    word, and a class of only them was refused as empty."""
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    for name, suffix in (("jfif", ".JFIF"), ("jpe", ".jpe"), ("pjpeg", ".pjpeg"), ("pjp", ".pjp"), ("jpg", ".jpg")):
        (tmp_path / "data" / name).mkdir(parents=True)
        for index in range(2):
            Image.fromarray(pixels).save(tmp_path / "data" / name / f"{index}{suffix}", format="JPEG", quality=95)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left out
        dataset = load_image_folder(tmp_path / "data")
    assert dataset.class_sizes.tolist() == [2] * 5
    for name in ("jfif", "jpe", "pjpeg", "pjp"):
        np.testing.assert_array_equal(dataset[name], dataset["jpg"])


def test_bmp_and_gif_files_are_classes_images_too(tmp_path):
    """Beside PNG and JPEG, a folder's BMP (colour palette included) and GIF files are read, as Pillow reads them."""
    rng = np.random.default_rng(6)
    expected = {}
    for name, (suffix, mode) in {"bitmaps": (".bmp", "RGB"), "palette": (".bmp", "P"), "gifs": (".gif", "P")}.items():
        (tmp_path / "data" / name).mkdir(parents=True)
        for index in range(2):
            image = Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)).convert(mode)
            image.save(tmp_path / "data" / name / f"{index}{suffix}")
            expected[name, index] = np.asarray(image.convert("RGB"))
    dataset = load_image_folder(tmp_path / "data")
    assert list(dataset.class_names) == ["bitmaps", "gifs", "palette"]
    for name in dataset.class_names:
        for index in range(2):
            np.testing.assert_array_equal(dataset[name][index], expected[name, index])


def test_webp_files_are_read_where_tensorflow_reads_them_and_named_where_it_does_not(tmp_path):
    """TensorFlow 2.20 and later decode WebP (lossless ones pixel for pixel, an alpha channel dropped as for PNG);
    READS_WEBP says whether the installed one does, and the folder loader reads or names WebP files accordingly."""
    rng = np.random.default_rng(7)
    pixels = {index: rng.integers(0, 256, (6, 5, 4), dtype=np.uint8) for index in range(2)}
    (tmp_path / "data" / "webps").mkdir(parents=True)
    Image.fromarray(pixels[0][..., :3]).save(tmp_path / "data" / "webps" / "0.webp", lossless=True)
    Image.fromarray(pixels[1]).save(tmp_path / "data" / "webps" / "1.WEBP", format="WEBP", lossless=True)
    try:
        tf.io.decode_image((tmp_path / "data" / "webps" / "0.webp").read_bytes(), expand_animations=False)
        decoded = True
    except tf.errors.InvalidArgumentError:
        decoded = False
    assert READS_WEBP is decoded
    assert (".webp" in IMAGE_EXTENSIONS) is READS_WEBP and (".webp" in UNREAD_IMAGE_EXTENSIONS) is not READS_WEBP
    (tmp_path / "data" / "pngs").mkdir()
    Image.fromarray(pixels[0][..., :3]).save(tmp_path / "data" / "pngs" / "0.png")
    if not READS_WEBP:
        with pytest.raises(DataError, match=r"webps holds no .*; it holds 2 .webp file\(s\), a format not read"):
            load_image_folder(tmp_path / "data")
        return
    dataset = load_image_folder(tmp_path / "data")
    assert list(dataset.class_names) == ["pngs", "webps"]
    for index in range(2):
        np.testing.assert_array_equal(dataset["webps"][index], pixels[index][..., :3])


def test_a_folder_split_already_keeps_its_splits(tmp_path):
    """root/train|validation|test/<class>/*: each split holds its own folders' classes, not a seeded share."""
    root = tmp_path / "data"
    for split, first, count in (("train", 0, 6), ("validation", 6, 2), ("test", 8, 3)):
        classes = make_folder(tmp_path / split, num_classes=first + count)
        (root / split).mkdir(parents=True)
        for k in range(first, first + count):  # class k keeps its value 10*k
            (classes / f"class_{k}").rename(root / split / f"class_{k}")
    expected = [sorted(f"class_{k}" for k in range(first, first + count)) for first, count in ((0, 6), (6, 2), (8, 3))]
    for splits in (image_folder_splits(root), load_dataset("folder", root)):
        assert [sorted(part.class_names) for part in splits] == expected
        np.testing.assert_allclose(splits.test["class_9"].mean(), 90, atol=2)
        assert splits.val.sources_of("class_7")[0] == "validation/class_7/img0.png"
    with pytest.raises(DataError, match="split into .* folders already: leave out the split file"):
        image_folder_splits(root, split_file=tmp_path / "split.json")
    with pytest.raises(DataError, match=r"is split into .* folders of classes: read it with image_folder_splits"):
        load_image_folder(root)
    make_folder(root / "extra", num_classes=1)  # a stray folder beside the splits: which one, not "move up"
    with pytest.raises(DataError, match=r"looks split into train/val/test .* but it also holds extra: a folder split"):
        image_folder_splits(root)
    shutil.rmtree(root / "extra")
    Image.new("RGB", (16, 16)).save(root / "test" / "stray.png")  # an image beside the test split's classes
    with pytest.raises(DataError, match=r"looks split into .* but 1 image\(s\) lie directly in a split folder "
                                        r"\(test/stray\.png\): .* move them into their class folders"):
        image_folder_splits(root)
    (root / "test" / "stray.png").unlink()
    (root / "test" / "class_2").mkdir()
    Image.new("RGB", (16, 16)).save(root / "test" / "class_2" / "0.png")
    with pytest.raises(DataError, match=r"class 'class_2' is in two splits of .* \(train and test\)"):
        image_folder_splits(root)


def test_classes_named_after_splits_are_classes(tmp_path):
    """A folder of classes called train and test (images directly inside) is not a split folder."""
    root = tmp_path / "data"
    for name in ("train", "test"):
        (root / name).mkdir(parents=True)
        for index in range(3):
            Image.new("L", (8, 8), 40 * index).save(root / name / f"{index}.png")
    assert list(load_image_folder(root).class_names) == ["test", "train"]


def test_a_class_folder_reached_twice_through_a_link_is_refused(tmp_path):
    """A linked class folder would be a second class of the same images, which a split may put on both sides."""
    root = make_folder(tmp_path / "data", num_classes=3)
    (root / "linked").symlink_to(root / "class_1", target_is_directory=True)
    with pytest.raises(DataError, match=r"class folders .*class_1 and .*linked are one folder .*remove the link"):
        load_image_folder(root)
    split_root = tmp_path / "split"
    make_folder(split_root / "train", num_classes=2)
    (split_root / "test" / "class_8").mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(split_root / "test" / "class_8" / "0.png")
    (split_root / "test" / "class_9").symlink_to(split_root / "train" / "class_0", target_is_directory=True)
    with pytest.raises(DataError, match=r"class folders .*train/class_0 and .*test/class_9 are one folder"):
        image_folder_splits(split_root)


def test_a_link_whose_target_is_gone_is_refused_by_name(tmp_path):
    """A class folder or image linked from a drive that is not mounted would otherwise just be missing."""
    root = make_folder(tmp_path / "data", num_classes=3)
    assert load_image_folder(root).num_classes == 3
    (root / "class_9").symlink_to(tmp_path / "unmounted" / "class_9", target_is_directory=True)
    with pytest.raises(DataError, match=r"class_9 is a link to .*unmounted/class_9, which does not exist"):
        load_image_folder(root)
    (root / "class_9").unlink()
    (root / "class_0" / "linked.png").symlink_to(tmp_path / "unmounted" / "0.png")
    with pytest.raises(DataError, match=r"linked.png is a link to .*unmounted/0.png, which does not exist"):
        load_image_folder(root)
    with pytest.raises(DataError, match="which does not exist: restore its target"):
        image_files(root / "class_0")


def test_a_macs_resource_fork_folder_is_skipped_like_hidden_files(tmp_path):
    """A zip made on a Mac unpacks a __MACOSX folder of '._' files beside the classes: not a class."""
    root = make_folder(tmp_path / "data", num_classes=3)
    (root / "__MACOSX" / "class_0").mkdir(parents=True)
    (root / "__MACOSX" / "class_0" / "._img0.png").write_bytes(b"\0\5")
    assert list(load_image_folder(root).class_names) == ["class_0", "class_1", "class_2"]


def test_unreadable_image_is_named(tmp_path):
    root = make_folder(tmp_path / "data", num_classes=2)
    (root / "class_0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match=r"unreadable image file.*class_0/broken\.png"):
        load_image_folder(root)


def test_split_option_seeded_and_from_file(tmp_path):
    root = make_folder(tmp_path / "data", num_classes=25, per_class=1)
    splits = image_folder_splits(root, fractions=(0.6, 0.2, 0.2), seed=5)
    names = [set(s.class_names) for s in splits]
    assert [len(n) for n in names] == [15, 5, 5] and len(set.union(*names)) == 25
    assert (
        load_dataset("folder", root, fractions=(0.6, 0.2, 0.2), seed=5).class_names() == splits.class_names()
    )
    path = tmp_path / "split.json"
    splits.save(path)
    from_file = image_folder_splits(root, split_file=path)
    assert from_file.class_names() == splits.class_names()
    for split in from_file:  # images follow their class
        for name in split.class_names:
            np.testing.assert_allclose(split[name].mean(), 10 * int(name.split("_")[1]), atol=2)
    # Folders the file does not name are not read: an empty one, one of unreadable files.
    (root / "zz_empty").mkdir()
    (root / "zz_broken").mkdir()
    (root / "zz_broken" / "a.png").write_bytes(b"not a png")
    assert image_folder_splits(root, split_file=path).class_names() == splits.class_names()


def test_a_split_file_names_a_folder_in_the_other_unicode_form(tmp_path):
    """A folder copied from a Mac keeps its names decomposed (NFD); a split file typed elsewhere composes them
    (NFC). They print alike, so the file's name reads the folder, and the class keeps the folder's spelling."""
    import json

    root = make_folder(tmp_path / "data", num_classes=6, per_class=1)
    decomposed = "cafe\u0301"
    (root / "class_0").rename(root / decomposed)
    named = ["caf\u00e9", *(f"class_{i}" for i in range(1, 6))]
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"train": named[:4], "val": named[4:5], "test": named[5:]}), encoding="utf-8")
    splits = image_folder_splits(root, split_file=path)
    assert list(splits.train.class_names) == [decomposed, *named[1:4]]
    assert splits.train[decomposed].shape[0] == 1


def save_png_at(path: bytes, value=0):
    """A 16x16 RGB PNG at a bytes path (a name that need not be UTF-8); skip where the file system refuses it."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as out:
            Image.new("RGB", (16, 16), (value, value, value)).save(out, format="PNG")
    except OSError as error:  # macOS (APFS, HFS+) and some network file systems take UTF-8 names only
        pytest.skip(reason=f"the file system refuses a name that is not UTF-8: {error}")


def test_names_that_are_not_utf8_are_refused_by_name(tmp_path):
    """A Latin-1 name (from a Windows archive) is listed with surrogate escapes, which TensorFlow cannot convert to a
    string tensor: the loader, adapt's support folder and predict's folders refuse it by name, printably."""
    root = make_folder(tmp_path / "data", num_classes=3)
    save_png_at(os.fsencode(root / "class_1") + b"/caf\xe9.png")
    save_png_at(os.fsencode(root / "class_1") + b"/na\xefve.png")
    with open(os.fsencode(root / "class_0") + b"/r\xe9sum\xe9.txt", "wb") as out:  # not an image: ignored
        out.write(b"x")
    file_message = r"the file path .*/class_1/caf\\xe9\.png is not valid UTF-8 .*rename it"
    for load in (load_image_folder, image_folder_splits, lambda root: load_dataset("folder", root)):
        with pytest.raises(DataError, match=file_message) as info:
            load(root)
        str(info.value).encode("utf-8")  # prints anywhere: no lone surrogate in the message
    with pytest.raises(DataError, match=file_message):  # the listing of predict's folders
        image_files(root / "class_1")
    for name in (b"caf\xe9.png", b"na\xefve.png"):
        os.unlink(os.fsencode(root / "class_1") + b"/" + name)
    assert load_image_folder(root).class_sizes.tolist() == [3, 3, 3]

    save_png_at(os.fsencode(root) + b"/cl\xe9ss_3/0.png")
    class_message = r"the class folder path .*/data/cl\\xe9ss_3 is not valid UTF-8.*rename it"
    with pytest.raises(DataError, match=class_message):
        load_image_folder(root)
    os.rename(os.fsencode(root) + b"/cl\xe9ss_3", os.fsencode(root / "class_3"))
    os.rename(os.fsencode(root), os.fsencode(tmp_path) + b"/d\xe4ta")
    root = os.fsdecode(os.fsencode(tmp_path) + b"/d\xe4ta")
    with pytest.raises(DataError, match=r"the folder path .*/d\\xe4ta is not valid UTF-8"):
        load_image_folder(root)
    with pytest.raises(DataError, match=r"the folder path .*/d\\xe4ta/class_0 is not valid UTF-8"):
        image_files(Path(root) / "class_0")


def left_out_warnings(caught):
    return [str(w.message) for w in caught if "left out" in str(w.message)]


def left_out_warning_of_three_classes(root):
    """The one left-out warning of loading `root`, whose three classes keep their three images each."""
    with pytest.warns(RuntimeWarning) as caught:
        dataset = load_image_folder(root)
    assert dataset.class_sizes.tolist() == [3, 3, 3]
    [message] = left_out_warnings(caught)
    return message


def test_images_the_load_leaves_out_are_named_in_one_warning(tmp_path):
    """Images in a sub-folder of a class folder and files of a format not read beside readable images are left out
    of their class: one warning per load says how many, shows one, and says what to do."""
    root = make_folder(tmp_path / "data", num_classes=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_image_folder(root)  # notes.txt beside the images is expected: no warning
    assert left_out_warnings(caught) == []
    for path in (root / "class_1" / "more" / "n0.png", root / "class_1" / "more" / "deeper" / "n1.jpg"):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16)).save(path)
    (root / "class_2" / "x.tif").write_bytes(b"II*\x00")
    (root / "class_2" / "y.HEIC").write_bytes(b"heic")
    (root / "class_0" / ".thumbnails").mkdir()  # hidden: expected, not counted
    Image.new("RGB", (16, 16)).save(root / "class_0" / ".thumbnails" / "t.png")
    (root / "class_0" / ".x.tif").write_bytes(b"II*\x00")
    (root / "class_0" / "labels").mkdir()
    (root / "class_0" / "labels" / "boxes.csv").write_text("x")
    message = left_out_warning_of_three_classes(root)
    assert re.search(
        r"left out 2 image file\(s\) in 2 sub-folder\(s\) of class folders \(e\.g\. class_1/more/deeper/n1\.jpg\).*"
        r"move them up into their class folder; and 2 file\(s\) of a format not read \(\.heic, \.tif; e\.g\. "
        r"class_2/x\.tif\): convert them to PNG",
        message,
    ), message

    split_root = tmp_path / "split"
    (split_root / "test").mkdir(parents=True)
    (root / "class_2").rename(split_root / "test" / "class_2")
    root.rename(split_root / "train")
    with pytest.warns(RuntimeWarning) as caught:
        splits = image_folder_splits(split_root)
    assert [list(part.class_names) for part in splits if part.num_classes] == [["class_0", "class_1"], ["class_2"]]
    [message] = left_out_warnings(caught)  # one for the whole load, not one a split
    assert re.search(r"left out 2 image file.*train/class_1/more/deeper/n1\.jpg.*2 file.*test/class_2/x\.tif", message)


def test_images_beside_the_class_folders_are_named_as_in_no_class(tmp_path):
    """A stray image in the root (an adapt --support folder's too: it is read the same way) belongs to no class."""
    root = make_folder(tmp_path / "data", num_classes=3)
    (root / "README.txt").write_text("not an image: expected, not counted")
    Image.new("RGB", (16, 16)).save(root / "stray.png")
    (root / "scan.tif").write_bytes(b"II*\x00")
    message = left_out_warning_of_three_classes(root)
    assert re.search(
        r"left out 2 image file\(s\) beside the class folders \(e\.g\. scan\.tif\), in no class: move each into "
        r"its class's folder\.$",
        message,
    ), message
