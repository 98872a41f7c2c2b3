"""``load_dataset(name, data_dir, **options)``: one entry point from a data-set name to its three splits.

Used by the command line (``--dataset fontglot|omniglot|miniimagenet|folder|fashion_mnist --data-dir PATH``).
"""

from __future__ import annotations

import inspect
import os

from keras_metalstm.data.dataset import DatasetSplits
from keras_metalstm.data.errors import DataError
from keras_metalstm.data.fashion_mnist import load_fashion_mnist
from keras_metalstm.data.folder import image_folder_splits
from keras_metalstm.data.fontglot import fontglot_splits
from keras_metalstm.data.miniimagenet import load_miniimagenet
from keras_metalstm.data.omniglot import omniglot_splits
from keras_metalstm.paths import refuse_url

_LOADERS = {
    "fontglot": fontglot_splits,
    "omniglot": omniglot_splits,
    "miniimagenet": load_miniimagenet,
    "folder": image_folder_splits,
    "fashion_mnist": load_fashion_mnist,
}
_ALIASES = {
    "mini-imagenet": "miniimagenet",
    "mini_imagenet": "miniimagenet",
    "image-folder": "folder",
    "imagefolder": "folder",
    "fashion-mnist": "fashion_mnist",
    "fashionmnist": "fashion_mnist",
}
_DIR_ARGUMENT = {
    "fontglot": "data_dir",
    "omniglot": "data_dir",
    "miniimagenet": "data_dir",
    "folder": "root",
    "fashion_mnist": "data_dir",
}
DATASET_NAMES = tuple(_LOADERS)


def dataset_options(name: str) -> dict[str, object]:
    """The options ``load_dataset(name, ...)`` accepts, with their defaults."""
    name = _canonical(name)
    skip = _DIR_ARGUMENT[name]
    return {
        p.name: p.default for p in inspect.signature(_LOADERS[name]).parameters.values() if p.name != skip
    }


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, **options) -> DatasetSplits:
    """Load data set ``name`` (fontglot, omniglot, miniimagenet, folder, fashion_mnist) as class-disjoint
    (train, val, test).

    ``data_dir`` is optional for fontglot (packaged) and required for the others. ``options`` go to the loader:
    fontglot: rotations, seed, fractions; omniglot: split, num_val, rotations, seed, split_file, image_size,
    invert; miniimagenet: image_size, images_dir; folder: image_shape, fractions, seed, split_file, rotations;
    fashion_mnist: files (every class in the test split: a cross-domain evaluation set).
    """
    name = _canonical(name)
    accepted = dataset_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise DataError(f"unknown option(s) {unknown} for data set {name!r}; it accepts {sorted(accepted)}")
    if data_dir is None and name != "fontglot":
        raise DataError(
            f"data set {name!r} needs a data directory (--data-dir PATH); only fontglot is built in"
        )
    refuse_url(data_dir, "the data directory", DataError)
    if data_dir is not None:
        options[_DIR_ARGUMENT[name]] = data_dir
    return _LOADERS[name](**options)


def _canonical(name: str) -> str:
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _LOADERS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    return key
