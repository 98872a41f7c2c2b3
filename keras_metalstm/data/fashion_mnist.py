"""Fashion-MNIST loader: a real image data set of another domain, for cross-domain evaluation only.

Users adapt a meta-learner to their own images, never to the meta-training domain; Fashion-MNIST (Xiao et al.
2017: 10 classes of Zalando product photos, 28x28 grey) measures that. Its standard files, the four IDX files
gzipped as distributed (or unzipped, without `.gz`, as some copies ship them):

    train-images-idx3-ubyte.gz   train-labels-idx1-ubyte.gz   (60,000 images)
    t10k-images-idx3-ubyte.gz    t10k-labels-idx1-ubyte.gz    (10,000 images)

Debian packages them (`apt-get install dataset-fashion-mnist` puts them in /usr/share/datasets/fashion-mnist).
IDX: a big-endian header, magic 0x00000803 (unsigned bytes, 3 dimensions) then n, rows, cols for images, magic
0x00000801 then n for labels, then the bytes. Its own train/test split is by image, not class, so every class
goes to the test split (train and val are empty): evaluate with `--dataset fashion_mnist --data-dir DIR`.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from keras_metalstm.data.dataset import ClassIndexedDataset, DatasetSplits
from keras_metalstm.data.errors import DataError

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "t10k": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IDX_UNSIGNED_BYTE = 0x08


def read_idx(path: str | os.PathLike, dimensions: int) -> np.ndarray:
    """The uint8 array of an IDX file of unsigned bytes with `dimensions` dimensions, gzipped (`.gz`) or not;
    DataError if the file is not one."""
    path = Path(path)
    zipped = path.suffix == ".gz"
    try:
        with (gzip.open(path, "rb") if zipped else open(path, "rb")) as f:
            data = f.read()
    except FileNotFoundError:
        raise DataError(f"Fashion-MNIST file not found: {path}") from None
    except (OSError, EOFError) as error:
        raise DataError(f"cannot read {path} as a{' gzipped' if zipped else 'n'} IDX file: {error}") from None
    header = 4 + 4 * dimensions
    if len(data) < header or data[:2] != b"\0\0" or data[2] != IDX_UNSIGNED_BYTE or data[3] != dimensions:
        raise DataError(
            f"{path} is not an IDX file of unsigned bytes with {dimensions} dimension(s) "
            f"(magic 0x0000080{dimensions})"
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dimensions))
    if len(data) - header != int(np.prod(shape)):
        raise DataError(
            f"{path}: the header announces {shape}, but the file holds {len(data) - header} bytes"
        )
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def _gzipped_or_not(path: Path) -> Path:
    """`path` (a `.gz` file), or the unzipped file beside it when only that is there."""
    unzipped = path.with_suffix("")
    return unzipped if not path.exists() and unzipped.is_file() else path


def load_fashion_mnist(
    data_dir: str | os.PathLike, files: tuple[str, ...] = ("train", "t10k")
) -> DatasetSplits:
    """Fashion-MNIST from the standard files in `data_dir` (`files`: "train", "t10k" or both), every class in
    the test split, images uint8 (28, 28, 1) grouped by class."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(
            f"Fashion-MNIST directory not found: {data_dir} (on Debian: apt-get install dataset-fashion-mnist, "
            f"then --data-dir {DEBIAN_FASHION_MNIST_DIR})"
        )
    unknown = sorted(set(files) - set(FASHION_MNIST_FILES))
    if unknown or not files:
        raise DataError(f"unknown Fashion-MNIST file set(s) {unknown}; choose from train, t10k")
    images, labels = [], []
    for name in files:
        image_file, label_file = (_gzipped_or_not(data_dir / f) for f in FASHION_MNIST_FILES[name])
        these_images, these_labels = read_idx(image_file, 3), read_idx(label_file, 1)
        if len(these_images) != len(these_labels):
            raise DataError(
                f"{image_file} has {len(these_images)} images but {label_file} {len(these_labels)} labels"
            )
        if these_labels.size and these_labels.max() >= len(FASHION_MNIST_CLASSES):
            raise DataError(f"{label_file} has label {these_labels.max()}; Fashion-MNIST's are 0 to 9")
        images.append(these_images)
        labels.append(these_labels)
    images, labels = np.concatenate(images), np.concatenate(labels)
    order = np.argsort(labels, kind="stable")  # class after class, each in file order
    sizes = np.bincount(labels, minlength=len(FASHION_MNIST_CLASSES))
    present = sizes > 0
    shape = (*images.shape[1:], 1)
    test = ClassIndexedDataset(
        images[order][..., np.newaxis],
        sizes[present],
        [c for c, kept in zip(FASHION_MNIST_CLASSES, present, strict=True) if kept],
        name="fashion_mnist/test",
    )
    empty = {"class_sizes": [], "class_names": [], "image_shape": shape}
    return DatasetSplits(
        ClassIndexedDataset(np.zeros((0, *shape), np.uint8), name="fashion_mnist/train", **empty),
        ClassIndexedDataset(np.zeros((0, *shape), np.uint8), name="fashion_mnist/val", **empty),
        test,
    )
