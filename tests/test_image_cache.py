"""The disk cache of decoded image files (keras_metalstm.data.cache) through the image-folder loader: decoded
once, read back while the files are unchanged, replaced when one changes, never a failure."""

import os
import warnings

import numpy as np
import pytest
from PIL import Image

from keras_metalstm.data import cache, decode_image_files, load_image_folder, reading_progress

SHAPE = (28, 28, 1)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(cache.CACHE_ENV, str(folder))
    monkeypatch.setattr(cache, "MIN_CACHED_FILES", 10)
    return folder


def write_classes(root, extension, size, seed):
    """Three classes of four random grey images each, root/<ant|bee|cat>/<i>.<extension>."""
    rng = np.random.default_rng(seed)
    for name in ("ant", "bee", "cat"):
        (root / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(root / name / f"{i}.{extension}")
    return root


@pytest.fixture
def image_root(tmp_path):
    return write_classes(tmp_path / "images", "png", (32, 30), seed=0)


def load(root, shape=SHAPE):
    """(the loaded images, how many files were decoded)."""
    decoded = []

    class Counter:
        def update(self, count):
            decoded.append(count)

        def close(self):
            pass

    with reading_progress(lambda total: Counter()):
        dataset = load_image_folder(root, image_shape=shape)
    return dataset.images, sum(decoded)


def uncached(root, shape=SHAPE):
    files = sorted(str(f) for f in root.glob("*/*.png"))
    return decode_image_files(files, shape)[0]


def entries(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_a_folder_is_decoded_once_then_read_back_while_its_files_are_unchanged(cache_dir, image_root):
    first, decoded_first = load(image_root)
    second, decoded_second = load(image_root)
    assert (decoded_first, decoded_second) == (12, 0)
    np.testing.assert_array_equal(second, first)
    np.testing.assert_array_equal(first, uncached(image_root))
    assert len(entries(cache_dir)) == 1


def test_a_changed_file_is_decoded_again_and_its_new_entry_replaces_the_old(cache_dir, image_root):
    before, _ = load(image_root)
    changed = image_root / "bee" / "2.png"
    Image.fromarray(np.full((32, 30), 7, np.uint8)).save(changed)
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    after, decoded = load(image_root)
    assert decoded == 12 and not np.array_equal(after, before)
    np.testing.assert_array_equal(after, uncached(image_root))
    assert len(entries(cache_dir)) == 1
    # Another target shape of the same files is another entry beside it.
    resized, decoded = load(image_root, (20, 20, 1))
    assert decoded == 12 and resized.shape == (12, 20, 20, 1) and len(entries(cache_dir)) == 2


def test_swapped_class_folders_are_decoded_again_though_every_file_keeps_its_size_and_time(cache_dir, tmp_path):
    """Files of one size (BMP) with one modification time, as an archive unpacks them: swapping two misnamed class
    folders changes no path's size or time, only which file is behind it."""
    root = write_classes(tmp_path / "bmp", "bmp", (28, 28), seed=1)
    for image in root.glob("*/*.bmp"):
        os.utime(image, ns=(10**18, 10**18))
    before, _ = load(root)
    (root / "ant").rename(root / "swap")
    (root / "bee").rename(root / "ant")
    (root / "swap").rename(root / "bee")
    after, decoded = load(root)
    assert decoded == 12
    np.testing.assert_array_equal(after[:4], before[4:8])  # "ant" now holds the former bee images


def test_no_entry_for_few_files_or_with_the_cache_turned_off(cache_dir, image_root, monkeypatch):
    monkeypatch.setattr(cache, "MIN_CACHED_FILES", 13)
    assert load(image_root)[1] == 12 and load(image_root)[1] == 12 and entries(cache_dir) == []
    monkeypatch.setattr(cache, "MIN_CACHED_FILES", 10)
    monkeypatch.setenv(cache.CACHE_ENV, "")
    assert cache.cache_folder() is None
    assert load(image_root)[1] == 12 and load(image_root)[1] == 12 and entries(cache_dir) == []


def test_a_damaged_entry_is_a_warning_and_is_written_again(cache_dir, image_root):
    expected, _ = load(image_root)
    (entry,) = cache_dir.iterdir()
    entry.write_bytes(entry.read_bytes()[:100])
    with pytest.warns(RuntimeWarning, match="unreadable image cache entry"):
        images, decoded = load(image_root)
    assert decoded == 12
    np.testing.assert_array_equal(images, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load(image_root)[1] == 0


def test_a_cache_that_cannot_be_written_is_a_warning_not_a_failure(tmp_path, image_root, monkeypatch):
    (tmp_path / "a_file").write_text("not a folder")
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "a_file" / "cache"))
    monkeypatch.setattr(cache, "MIN_CACHED_FILES", 10)
    with pytest.warns(RuntimeWarning, match="could not write the decoded images.*KERAS_METALSTM_CACHE_DIR"):
        images, decoded = load(image_root)
    assert decoded == 12
    np.testing.assert_array_equal(images, uncached(image_root))


def test_the_default_folder_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.delenv(cache.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache.cache_folder() == tmp_path / "keras-metalstm"
