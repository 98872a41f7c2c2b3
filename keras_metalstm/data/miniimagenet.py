"""Mini-ImageNet loader: Ravi & Larochelle's split csv files plus an image directory, 84x84x3.

On-disk format (Ravi & Larochelle 2017, twitter/meta-learning-lstm): ``train.csv``, ``val.csv``, ``test.csv``
with the header ``filename,label`` and rows like ``n0153282900000005.jpg,n01532829``, and an ``images/`` folder
holding every file the csv files name (64 / 16 / 20 classes x 600 images). Images of another size (the original
ImageNet files) or grey JPEGs are converted to ``image_size`` x ``image_size`` x 3 by the package's rule
(``convert_images``: antialiased bilinear resize, grey repeated to RGB). A class is a WordNet id (the label).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from keras_metalstm.data.dataset import ClassIndexedDataset, DatasetSplits
from keras_metalstm.data.errors import DataError
from keras_metalstm.data.images import decode_image_files

MINIIMAGENET_CSV_FILES = {"train": "train.csv", "val": "val.csv", "test": "test.csv"}
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
    (default ``data_dir/images``), images uint8 (image_size, image_size, 3)."""
    data_dir = Path(data_dir)
    images_dir = data_dir / "images" if images_dir is None else Path(images_dir)
    if not data_dir.is_dir():
        raise DataError(f"Mini-ImageNet data directory not found: {data_dir}")
    if not images_dir.is_dir():
        raise DataError(
            f"Mini-ImageNet image folder not found: {images_dir} (pass images_dir=... if it is elsewhere)"
        )
    tables = {s: read_split_csv(data_dir / f) for s, f in MINIIMAGENET_CSV_FILES.items()}

    owner: dict[str, str] = {}
    for split_name, rows in tables.items():
        for line, _, label in rows:
            if owner.setdefault(label, split_name) != split_name:
                raise DataError(
                    f"class {label!r} is in both {owner[label]}.csv and {split_name}.csv "
                    f"(line {line}); a class may be in one split only"
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
            [str(images_dir / f) for f in files], target, names=[str(images_dir / f) for f in files]
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
