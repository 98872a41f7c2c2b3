"""Omniglot loader: the standard images_background/ and images_evaluation/ folders (or their .zip files).

On-disk format (github.com/brendenlake/omniglot, python/): ``<part>/<Alphabet>/character<NN>/<id>_<NN>.png``,
105x105 black strokes on a white background, for part ``images_background`` (30 alphabets, 964 characters) and
``images_evaluation`` (20 alphabets, 659 characters); either as folders or as ``<part>.zip`` holding the folder.

Images are resized to ``image_size`` x ``image_size`` (28 by default) by the package's conversion rule
(antialiased bilinear, ``convert_images``) and, by default, INVERTED (``invert=True``): strokes 1 (white) on a 0
(black) background, the same polarity as fontglot, so models and numbers carry over between the two. Pass
``invert=False`` to keep Omniglot's own black-on-white. A class is one character, named
``"<Alphabet>/character<NN>"``; ``dataset.sources`` gives each image's file.

Splits (``omniglot_splits``): ``split=1200`` (default) is the common character split of Vinyals et al. (2016):
1,200 characters of the 1,623 for meta-training, the other 423 for meta-testing, with 90/180/270-degree rotations
as extra classes (4,800 / 1,692). The 1,200 are divided into ``1200 - num_val`` meta-train and ``num_val``
meta-val characters (default 172, the sizes of Vinyals' split files: 1,028 / 172 / 423); ``num_val=0`` keeps all
1,200 for meta-training and leaves meta-val empty. Which characters: a seeded order (``seeded_order``, seed
``OMNIGLOT_SPLIT_SEED`` = 0), not Vinyals' exact lists; pass ``split_file`` (JSON of character names) for those.
``split="background"``: Lake's split, meta-test = images_evaluation, meta-train/val = images_background.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from keras_metalstm.data.dataset import ClassIndexedDataset, DatasetSplits, read_split_file, seeded_order
from keras_metalstm.data.errors import DataError
from keras_metalstm.data.folder import is_hidden
from keras_metalstm.data.images import decode_image_files

OMNIGLOT_PARTS = ("images_background", "images_evaluation")
OMNIGLOT_SPLIT_SEED = 0
OMNIGLOT_TRAIN_CHARACTERS = 1200
OMNIGLOT_VAL_CHARACTERS = 172


def _list_folder(data_dir: Path, part: str) -> list[tuple[str, str, str]]:
    """(class name, display name, path) of every PNG under ``data_dir/part/<Alphabet>/<character>/``."""
    entries = []
    root = data_dir / part
    alphabets = sorted(p for p in root.iterdir() if p.is_dir() and not is_hidden(p.name))
    if [p.name for p in alphabets] == [part]:
        raise DataError(
            f"Omniglot part {root} holds only a folder {part}/ (unzipped into a folder of its own name?): move the "
            f"alphabet folders of {root / part} up into {root}"
        )
    for alphabet in alphabets:
        for character in sorted(p for p in alphabet.iterdir() if p.is_dir() and not is_hidden(p.name)):
            files = sorted(
                f for f in character.iterdir() if f.suffix.lower() == ".png" and not is_hidden(f.name)
            )
            if not files:
                raise DataError(
                    f"Omniglot character folder {character} holds no .png image; remove it or restore "
                    f"its images"
                )
            for f in files:
                entries.append(
                    (
                        f"{alphabet.name}/{character.name}",
                        f"{part}/{alphabet.name}/{character.name}/{f.name}",
                        str(f),
                    )
                )
    return entries


def _list_zip(zip_path: Path, part: str) -> list[tuple[str, str, bytes]]:
    """(class name, display name, bytes) of every PNG in ``part.zip`` (members ``[part/]<A>/<c>/<f>.png``)."""
    entries, folders = [], set()
    try:
        with zipfile.ZipFile(zip_path) as archive:
            for info in sorted(archive.infolist(), key=lambda i: i.filename):
                parts = [p for p in info.filename.split("/") if p]
                if any(is_hidden(p) for p in parts):
                    continue
                if parts and parts[0] == part:
                    parts = parts[1:]
                if info.is_dir() or len(parts) != 3:
                    if info.is_dir() and len(parts) == 2:
                        folders.add("/".join(parts))
                    continue
                if not parts[2].lower().endswith(".png"):
                    continue
                entries.append(
                    (f"{parts[0]}/{parts[1]}", f"{zip_path.name}:{info.filename}", archive.read(info))
                )
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise DataError(f"cannot read Omniglot zip file {zip_path}: {error}; download it again") from None
    empty = sorted(folders - {e[0] for e in entries})
    if empty:
        raise DataError(f"Omniglot character folder {part}/{empty[0]} in {zip_path} holds no .png image")
    return entries


def load_omniglot(
    data_dir: str | os.PathLike,
    image_size: int = 28,
    invert: bool = True,
    parts: tuple[str, ...] = OMNIGLOT_PARTS,
) -> ClassIndexedDataset:
    """All Omniglot characters of ``parts`` as one data set, uint8 (image_size, image_size, 1); see module doc."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"Omniglot data directory not found: {data_dir}")
    target = (int(image_size), int(image_size), 1)
    arrays, class_of, display = [], [], []
    for part in parts:
        folder, archive = data_dir / part, data_dir / f"{part}.zip"
        if folder.is_dir():
            entries = _list_folder(data_dir, part)
            from_bytes = False
        elif archive.is_file():
            entries = _list_zip(archive, part)
            from_bytes = True
        else:
            raise DataError(
                f"Omniglot part {part!r} not found: neither the folder {folder} nor {archive} exists; "
                f"the data directory must hold {' and '.join(parts)} (folders or .zip files)"
            )
        if not entries:
            raise DataError(
                f"Omniglot part {part!r} at {folder if folder.is_dir() else archive} is empty: "
                f"expected <Alphabet>/character<NN>/*.png inside"
            )
        images, _ = decode_image_files(
            [e[2] for e in entries], target, names=[e[1] for e in entries], from_bytes=from_bytes, cache=True
        )
        arrays.append(images)
        class_of += [e[0] for e in entries]
        display += [e[1] for e in entries]
    images = np.concatenate(arrays)
    if invert:
        images = 255 - images
    # Entries are grouped by class already (sorted listing); check the same character is not in two parts.
    order, sizes = [], []
    for c in class_of:
        if order and order[-1] == c:
            sizes[-1] += 1
        else:
            if c in order:
                raise DataError(f"Omniglot character {c!r} appears in two parts; the parts must be disjoint")
            order.append(c)
            sizes.append(1)
    return ClassIndexedDataset(images, sizes, order, sources=display, name="omniglot")


def omniglot_splits(
    data_dir: str | os.PathLike,
    split: int | str = OMNIGLOT_TRAIN_CHARACTERS,
    num_val: int = OMNIGLOT_VAL_CHARACTERS,
    rotations: bool = True,
    seed: int = OMNIGLOT_SPLIT_SEED,
    split_file: str | os.PathLike | None = None,
    image_size: int = 28,
    invert: bool = True,
) -> DatasetSplits:
    """Class-disjoint Omniglot (train, val, test); defaults: 1,028 / 172 / 423 characters, x4 with rotations."""
    dataset = load_omniglot(data_dir, image_size=image_size, invert=invert)
    names = dataset.class_names
    if split_file is not None:
        assignment = read_split_file(split_file, known_classes=names)
        train, val, test = (assignment[s] for s in ("train", "val", "test"))
    else:
        if split == "background":
            part_of = {c: dataset.sources_of(c)[0].split("/")[0].split(".zip")[0] for c in names}
            pool = [c for c in names if part_of[c] == OMNIGLOT_PARTS[0]]
            test = [c for c in names if part_of[c] != OMNIGLOT_PARTS[0]]
            pool = seeded_order(pool, seed)
        elif isinstance(split, int) and not isinstance(split, bool):
            if not 0 < split < len(names):
                raise DataError(
                    f"Omniglot's character split of Vinyals et al. puts {split} characters in meta-training and "
                    f"needs more than {split}, found {len(names)} in {data_dir}: are both images_background and "
                    "images_evaluation whole there? For a part of Omniglot, give your own split (--split-file, "
                    "or split_file= in Python)"
                )
            order = seeded_order(names, seed)
            pool, test = order[:split], order[split:]
        else:
            raise DataError(
                f"Omniglot split must be a number of meta-train characters (1200) or 'background', "
                f"got {split!r}"
            )
        if not 0 <= num_val < len(pool):
            raise DataError(
                f"num_val={num_val} must be >= 0 and less than the {len(pool)} meta-train characters"
            )
        val_set = set(pool[len(pool) - num_val :])
        keep = set(pool)
        train = [c for c in names if c in keep and c not in val_set]
        val = [c for c in names if c in val_set]
        test_set = set(test)
        test = [c for c in names if c in test_set]
    splits = DatasetSplits(
        *(
            dataset.subset(c, name=f"omniglot/{s}")
            for s, c in (("train", train), ("val", val), ("test", test))
        )
    )
    return splits.with_rotations() if rotations else splits
