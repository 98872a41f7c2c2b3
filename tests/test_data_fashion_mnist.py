"""The Fashion-MNIST loader on tiny files written here in the standard format (gzipped IDX, as distributed and as
Debian's dataset-fashion-mnist installs them), and its errors."""

import gzip
import struct

import numpy as np
import pytest

from keras_metalstm.data import DataError, load_dataset
from keras_metalstm.data.fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_FILES


def write_idx(path, array):
    """A gzipped IDX file of unsigned bytes: magic 0x0000 08 <dimensions>, the sizes (big-endian), the bytes."""
    array = np.asarray(array, np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


@pytest.fixture
def fashion_dir(tmp_path):
    """train: 6 images of classes 3, 0, 3, 9, 0, 3; t10k: 2 images of classes 9, 3; image i is filled with i."""
    labels = {"train": [3, 0, 3, 9, 0, 3], "t10k": [9, 3]}
    first = 0
    for name, (image_file, label_file) in FASHION_MNIST_FILES.items():
        count = len(labels[name])
        images = np.arange(first, first + count, dtype=np.uint8)[:, None, None] * np.ones((1, 28, 28), np.uint8)
        write_idx(tmp_path / image_file, images)
        write_idx(tmp_path / label_file, labels[name])
        first += count
    return tmp_path


def test_fashion_mnist_classes_go_to_the_test_split_grouped_by_class(fashion_dir):
    splits = load_dataset("fashion_mnist", fashion_dir)
    assert splits.train.num_classes == splits.val.num_classes == 0
    assert splits.image_shape == (28, 28, 1)
    test = splits.test
    assert test.class_names == ("T-shirt/top", "Dress", "Ankle boot")  # classes 0, 3, 9: the ones present
    assert test.image_shape == (28, 28, 1) and test.images.dtype == np.uint8
    # each image's fill value is its position in the files (train, then t10k), kept in file order per class
    assert [int(v) for v in test["T-shirt/top"][:, 0, 0, 0]] == [1, 4]
    assert [int(v) for v in test["Dress"][:, 0, 0, 0]] == [0, 2, 5, 7]
    assert [int(v) for v in test["Ankle boot"][:, 0, 0, 0]] == [3, 6]
    assert FASHION_MNIST_CLASSES[3] == "Dress" and len(FASHION_MNIST_CLASSES) == 10
    only_test_file = load_dataset("fashion-mnist", fashion_dir, files=("t10k",)).test
    assert only_test_file.class_names == ("Dress", "Ankle boot") and only_test_file.num_images == 2


def test_unzipped_idx_files_are_read_as_the_gzipped_ones(fashion_dir):
    zipped = load_dataset("fashion_mnist", fashion_dir).test
    for path in fashion_dir.glob("*-ubyte.gz"):
        with gzip.open(path, "rb") as source:
            path.with_suffix("").write_bytes(source.read())
        path.unlink()
    unzipped = load_dataset("fashion_mnist", fashion_dir).test
    assert unzipped.class_names == zipped.class_names
    np.testing.assert_array_equal(unzipped.images, zipped.images)


def test_fashion_mnist_errors_name_the_problem(fashion_dir, tmp_path_factory):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion_mnist", fashion_dir / "nowhere")
    with pytest.raises(DataError, match="unknown Fashion-MNIST file set"):
        load_dataset("fashion_mnist", fashion_dir, files=("validation",))
    (fashion_dir / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="file not found: .*t10k-labels-idx1-ubyte.gz"):
        load_dataset("fashion_mnist", fashion_dir)
    write_idx(fashion_dir / "t10k-labels-idx1-ubyte.gz", [[9, 3]])  # two dimensions: not a label file
    with pytest.raises(DataError, match="not an IDX file of unsigned bytes with 1 dimension"):
        load_dataset("fashion_mnist", fashion_dir)
    write_idx(fashion_dir / "t10k-labels-idx1-ubyte.gz", [9, 3, 3])
    with pytest.raises(DataError, match="has 2 images but .* 3 labels"):
        load_dataset("fashion_mnist", fashion_dir)
    write_idx(fashion_dir / "t10k-labels-idx1-ubyte.gz", [9, 10])
    with pytest.raises(DataError, match="label 10"):
        load_dataset("fashion_mnist", fashion_dir)
    with gzip.open(fashion_dir / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + struct.pack(">I", 5) + bytes([1, 2]))  # announces 5, holds 2
    with pytest.raises(DataError, match=r"announces \(5,\), but the file holds 2 bytes"):
        load_dataset("fashion_mnist", fashion_dir)
    (fashion_dir / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="cannot read .* as a gzipped IDX file"):
        load_dataset("fashion_mnist", fashion_dir)
