"""Mini-ImageNet loader, 84x84x3, from either of its two common distributions.

Split csv files and images (Ravi & Larochelle 2017, twitter/meta-learning-lstm): ``train.csv``, ``val.csv``,
``test.csv`` with the header ``filename,label`` and rows like ``n0153282900000005.jpg,n01532829``, and an
``images/`` folder holding every file the csv files name (64 / 16 / 20 classes x 600 images). Images of another
size (the original ImageNet files) or grey JPEGs are converted to ``image_size`` x ``image_size`` x 3 by the
package's rule (``convert_images``: antialiased bilinear resize, grey repeated to RGB).

A folder split already, ``train/<class>/*.jpg``, ``val/<class>/*.jpg``, ``test/<class>/*.jpg`` (as other
distributions and scripts lay it out), read as an image folder (``image_folder_splits``) at 84x84x3.

Pickled arrays, used when the folder has no csv files: ``mini-imagenet-cache-train.pkl``, ``-val.pkl``,
``-test.pkl``, each a dict of ``image_data`` (uint8 (n, 84, 84, 3)) and ``class_dict`` ({class: [indices into
image_data]}). A pickle is a program: these are read by an unpickler that builds dicts, lists, strings, numbers
and NumPy arrays only, and refuses anything else a file asks for.

A class is a WordNet id (the label).
"""

from __future__ import annotations

import csv
import os
import pickle
from pathlib import Path

import numpy as np

from keras_metalstm.data.dataset import ClassIndexedDataset, DatasetSplits
from keras_metalstm.data.errors import DataError
from keras_metalstm.data.folder import image_folder_splits, split_folders
from keras_metalstm.data.images import convert_dataset, decode_image_files

MINIIMAGENET_CSV_FILES = {"train": "train.csv", "val": "val.csv", "test": "test.csv"}
MINIIMAGENET_PICKLE_FILES = {split: f"mini-imagenet-cache-{split}.pkl" for split in ("train", "val", "test")}
MINIIMAGENET_IMAGE_SIZE = 84


def read_split_csv(csv_path: str | os.PathLike) -> list[tuple[int, str, str]]:
    """Rows (line number, filename, label) of a ``filename,label`` csv file; DataError if malformed."""
    csv_path = Path(csv_path)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise DataError(f"Mini-ImageNet split file not found: {csv_path}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"cannot read Mini-ImageNet split file {csv_path}: {error}") from None
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        raise DataError(
            f"{csv_path} must start with the header 'filename,label', got {rows[0] if rows else 'nothing'}"
        )
    out = []
    for line, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise DataError(f"{csv_path} line {line}: expected 'filename,label', got {','.join(row)!r}")
        out.append((line, row[0].strip(), row[1].strip()))
    if not out:
        raise DataError(f"{csv_path} names no images")
    return out


def load_miniimagenet(
    data_dir: str | os.PathLike,
    image_size: int = MINIIMAGENET_IMAGE_SIZE,
    images_dir: str | os.PathLike | None = None,
) -> DatasetSplits:
    """Mini-ImageNet (train, val, test) from ``data_dir/{train,val,test}.csv`` and ``images_dir``
    (default ``data_dir/images``), or, in a folder without the csv files, from its three cache files
    (`load_miniimagenet_pickles`) or its split folders; images uint8 (image_size, image_size, 3)."""
    data_dir = Path(data_dir)
    images_dir = data_dir / "images" if images_dir is None else Path(images_dir)
    if not data_dir.is_dir():
        raise DataError(f"Mini-ImageNet data directory not found: {data_dir}")
    has_csv = any((data_dir / name).is_file() for name in MINIIMAGENET_CSV_FILES.values())
    if not has_csv and any((data_dir / name).is_file() for name in MINIIMAGENET_PICKLE_FILES.values()):
        return load_miniimagenet_pickles(data_dir, image_size)
    if not has_csv and split_folders(data_dir):
        return image_folder_splits(data_dir, image_shape=(int(image_size), int(image_size), 3))
    if not has_csv:
        raise DataError(
            f"{data_dir} holds neither Mini-ImageNet's split files (train.csv, val.csv, test.csv and images/), its "
            "cache files (mini-imagenet-cache-train.pkl, -val.pkl, -test.pkl) nor train/, val/ and test/ folders of "
            "class folders: point --data-dir at the folder holding one of them"
        )
    if not images_dir.is_dir():
        raise DataError(
            f"Mini-ImageNet image folder not found: {images_dir}; the images go in an images/ folder beside the "
            "csv files (in Python, load_miniimagenet(images_dir=...) takes another folder)"
        )
    tables = {s: read_split_csv(data_dir / f) for s, f in MINIIMAGENET_CSV_FILES.items()}

    owner: dict[str, str] = {}
    listed: dict[str, tuple[str, int]] = {}  # file -> (split, line) where it was first listed
    for split_name, rows in tables.items():
        for line, name, label in rows:
            if owner.setdefault(label, split_name) != split_name:
                raise DataError(
                    f"class {label!r} is in both {owner[label]}.csv and {split_name}.csv "
                    f"(line {line}); a class may be in one split only"
                )
            # An image listed twice would be its own query (or, across splits, a test image seen in training).
            first_split, first_line = listed.setdefault(name, (split_name, line))
            if (first_split, first_line) != (split_name, line):
                raise DataError(
                    f"{name!r} is listed twice: {first_split}.csv line {first_line} and {split_name}.csv line "
                    f"{line}; an image may be listed once only: remove the second line"
                )
        missing = [(line, name) for line, name, _ in rows if not (images_dir / name).is_file()]
        if missing:
            line, name = missing[0]
            more = f" ({len(missing) - 1} more files are missing)" if len(missing) > 1 else ""
            raise DataError(
                f"{data_dir / MINIIMAGENET_CSV_FILES[split_name]} line {line} names {name!r}, which is "
                f"not in {images_dir}{more}; restore the image or fix the csv file"
            )

    target = (int(image_size), int(image_size), 3)
    splits = []
    for split_name, rows in tables.items():
        by_label: dict[str, list[str]] = {}
        for _, name, label in rows:
            by_label.setdefault(label, []).append(name)
        files = [name for names in by_label.values() for name in names]
        images, _ = decode_image_files(
            [str(images_dir / f) for f in files], target, names=[str(images_dir / f) for f in files], cache=True
        )
        splits.append(
            ClassIndexedDataset(
                images,
                [len(v) for v in by_label.values()],
                list(by_label),
                sources=files,
                name=f"miniimagenet/{split_name}",
            )
        )
    return DatasetSplits(*splits)


class _ArrayUnpickler(pickle.Unpickler):
    """Builds containers, strings, numbers and NumPy arrays only (what the cache files hold; protocol 2 writes byte
    strings as _codecs.encode calls)."""

    _ALLOWED = {
        (module, name)
        for package in ("numpy.core", "numpy._core")
        for module, name in ((f"{package}.multiarray", "_reconstruct"), (f"{package}.multiarray", "scalar"),
                             (f"{package}.numeric", "_frombuffer"))
    } | {("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, which a Mini-ImageNet cache file never holds")
        return super().find_class(module, name)


def _read_cache_file(path: Path) -> tuple[np.ndarray, dict]:
    """(image_data, class_dict) of one mini-imagenet-cache pickle; DataError saying what is wrong."""
    try:
        with open(path, "rb") as handle:
            # latin1: the files written by Python 2 hold NumPy arrays as byte strings
            contents = _ArrayUnpickler(handle, encoding="latin1").load()
    except FileNotFoundError:
        raise DataError(f"Mini-ImageNet cache file not found: {path} (the three splits come together)") from None
    except Exception as error:  # noqa: BLE001 - pickle raises many types for a bad or hostile file
        raise DataError(f"cannot read Mini-ImageNet cache file {path}: {error}") from None
    if isinstance(contents, dict):
        contents = {key.decode() if isinstance(key, bytes) else key: value for key, value in contents.items()}
    if not isinstance(contents, dict) or not {"image_data", "class_dict"} <= set(contents):
        raise DataError(f"{path} is not a Mini-ImageNet cache file: expected a dict of image_data and class_dict")
    images, classes = np.asarray(contents["image_data"]), contents["class_dict"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or not isinstance(classes, dict):
        raise DataError(
            f"{path}: image_data must be uint8 (n, H, W, 3) and class_dict a dict of index lists, got "
            f"{images.dtype} {images.shape} and {type(classes).__name__}"
        )
    return images, classes


def _image_indices(path, name, listed, count: int) -> np.ndarray:
    """class_dict's indices of class `name` as int64, each naming one of the `count` images of image_data."""
    given = np.asarray(listed).ravel()
    indices = given.astype(np.int64)
    if given.dtype.kind not in "iu" and not np.array_equal(given, indices):
        raise DataError(f"{path}: class_dict[{name!r}] holds indices that are not whole numbers: {given[:3].tolist()}")
    outside = indices[(indices < 0) | (indices >= count)]
    if outside.size:
        raise DataError(
            f"{path}: class_dict[{name!r}] names image {int(outside[0])}, but image_data holds images 0..{count - 1}"
        )
    return indices


def load_miniimagenet_pickles(data_dir: str | os.PathLike, image_size: int = MINIIMAGENET_IMAGE_SIZE) -> DatasetSplits:
    """Mini-ImageNet (train, val, test) from ``data_dir/mini-imagenet-cache-{train,val,test}.pkl`` (see the module
    docstring), images uint8 (image_size, image_size, 3)."""
    data_dir = Path(data_dir)
    owner: dict[str, str] = {}
    splits = []
    for split_name, file_name in MINIIMAGENET_PICKLE_FILES.items():
        path = data_dir / file_name
        images, classes = _read_cache_file(path)
        names = [key.decode() if isinstance(key, bytes) else str(key) for key in classes]
        for name in names:
            if owner.setdefault(name, split_name) != split_name:
                raise DataError(f"class {name!r} is in both {MINIIMAGENET_PICKLE_FILES[owner[name]]} and {file_name}")
        indices = [
            _image_indices(path, name, classes[key], len(images)) for name, key in zip(names, classes, strict=True)
        ]
        flat = np.concatenate(indices) if indices else np.zeros(0, np.int64)
        repeated = np.flatnonzero(np.bincount(flat, minlength=len(images)) > 1)
        if repeated.size:  # every class would hold the shared images: a broken cache, not a data set
            raise DataError(
                f"{path}: class_dict lists image {int(repeated[0])} more than once ({repeated.size} image(s) so): "
                "each image belongs to one class"
            )
        data = ClassIndexedDataset(
            images[flat],
            [len(index) for index in indices],
            names,
            sources=[f"{file_name}[{int(i)}]" for i in flat],
            name=f"miniimagenet/{split_name}",
        )
        target = (int(image_size), int(image_size), 3)
        splits.append(data if data.image_shape == target else convert_dataset(data, target))
    return DatasetSplits(*splits)
