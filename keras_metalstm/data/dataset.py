"""A class-indexed image data set (class name -> images) and its class-disjoint meta-train/val/test split.

``ClassIndexedDataset`` is a read-only mapping from class name to a uint8 array (n, H, W, C) of that class's
images, stored as one contiguous array, class after class, which is what the episode sampler indexes. It knows its
``image_shape`` (H, W, C) and per-image provenance (``sources``: a file or font per image).

Splitting (``ClassIndexedDataset.split``) is by class, never by image, so no class is in two splits:

* deterministic from a seed: classes are ordered by ``sha256(f"{seed}:{key}")`` (independent of numpy and of
  the order classes were read in) and cut into ``round(f_train * n)`` meta-train, ``round(f_val * n)`` meta-val
  and the rest meta-test classes. Optional ``groups`` keep look-alike classes together: a whole group goes to
  one split (keyed by its smallest member name), so fractions are then approximate;
* or read from a split file: JSON ``{"train": [...], "val": [...], "test": [...]}`` of class names
  (``DatasetSplits.save`` writes one). Classes the file does not name are left out.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from keras_metalstm.data.errors import DataError

SPLIT_NAMES = ("train", "val", "test")
DEFAULT_SPLIT_FRACTIONS = (0.64, 0.16, 0.20)
ROTATION_ANGLES = (90, 180, 270)


class ClassIndexedDataset(Mapping):
    """Images grouped by class: ``dataset[class_name]`` is a read-only uint8 array (n, H, W, C).

    Args:
        images: uint8 (num_images, H, W, C), class after class (all of class 0, then all of class 1, ...).
        class_sizes: number of images of each class, in that order (sum = num_images).
        class_names: one unique name per class.
        sources: optional per-image provenance (file path, font file ...), one string per image.
        name: what messages call this data set (e.g. "fontglot/train").
        image_shape: needed only when there are no images (an empty split).
    """

    def __init__(
        self,
        images: np.ndarray,
        class_sizes: Sequence[int],
        class_names: Sequence[str],
        sources: Sequence[str] | None = None,
        name: str = "dataset",
        image_shape: Sequence[int] | None = None,
    ):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise DataError(f"{name}: images must be uint8 (n, H, W, C), got {images.dtype} {images.shape}")
        if images.shape[-1] not in (1, 3):
            raise DataError(f"{name}: images must have 1 (grey) or 3 (RGB) channels, got {images.shape[-1]}")
        given = np.asarray(class_sizes).reshape(-1)
        sizes = given.astype(np.int64)
        if given.dtype.kind not in "iub" and not np.array_equal(given, sizes) or (sizes < 0).any():
            raise DataError(f"{name}: class sizes must be whole numbers >= 0 (images per class), got {given.tolist()}")
        names = tuple(str(n) for n in class_names)
        if len(names) != len(sizes):
            raise DataError(f"{name}: {len(names)} class names for {len(sizes)} class sizes")
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})[:5]
            raise DataError(f"{name}: class names must be unique, repeated: {dup}")
        if int(sizes.sum()) != len(images):
            raise DataError(
                f"{name}: class sizes sum to {int(sizes.sum())} but there are {len(images)} images"
            )
        if sources is not None:
            sources = np.asarray([str(s) for s in sources], dtype=object)
            if len(sources) != len(images):
                raise DataError(f"{name}: {len(sources)} sources for {len(images)} images")
        if len(images) == 0 and image_shape is not None:
            images = np.zeros((0, *image_shape), dtype=np.uint8)
        images = images.view()  # read-only view; the caller's array keeps its flags
        images.setflags(write=False)
        self._images = images
        self._sizes = sizes
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._names = names
        self._index = {n: i for i, n in enumerate(names)}
        self._sources = sources
        self.name = name

    @classmethod
    def from_class_arrays(
        cls,
        class_images: Mapping[str, np.ndarray],
        sources: Mapping[str, Sequence[str]] | None = None,
        name: str = "dataset",
    ) -> ClassIndexedDataset:
        """Build from ``{class_name: uint8 array (n, H, W, C) or (n, H, W)}``; all images must share one shape."""
        arrays, shape, first = [], None, None
        for class_name, array in class_images.items():
            array = np.asarray(array)
            if array.ndim == 3:
                array = array[..., None]
            if array.ndim != 4 or array.dtype != np.uint8:
                raise DataError(
                    f"{name}: class {class_name!r} must be uint8 (n, H, W[, C]), got "
                    f"{array.dtype} {array.shape}"
                )
            if shape is None:
                shape, first = array.shape[1:], class_name
            elif array.shape[1:] != shape:
                raise DataError(
                    f"{name}: class {class_name!r} has images of shape {array.shape[1:]} but class "
                    f"{first!r} has {shape}; convert them to one shape first (convert_images)"
                )
            arrays.append(array)
        if not arrays:
            raise DataError(f"{name}: no classes")
        flat_sources = None
        if sources is not None:
            flat_sources = [s for class_name in class_images for s in sources[class_name]]
        return cls(np.concatenate(arrays), [len(a) for a in arrays], list(class_images), flat_sources, name)

    # Mapping interface: class name -> images.
    def __getitem__(self, class_name: str) -> np.ndarray:
        i = self._class_index(class_name)
        return self._images[self._starts[i] : self._starts[i + 1]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return (
            f"ClassIndexedDataset({self.name!r}: {self.num_classes} classes, {self.num_images} images "
            f"of shape {self.image_shape})"
        )

    def _class_index(self, class_name: str) -> int:
        try:
            return self._index[class_name]
        except KeyError:
            raise KeyError(f"{self.name}: no class {class_name!r}") from None

    @property
    def class_names(self) -> tuple[str, ...]:
        return self._names

    @property
    def num_classes(self) -> int:
        return len(self._names)

    @property
    def num_images(self) -> int:
        return len(self._images)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every image."""
        return tuple(int(v) for v in self._images.shape[1:])

    @property
    def images(self) -> np.ndarray:
        """All images, uint8 (num_images, H, W, C), class after class (read-only)."""
        return self._images

    @property
    def class_sizes(self) -> np.ndarray:
        """Number of images per class, in ``class_names`` order."""
        return self._sizes.copy()

    @property
    def class_starts(self) -> np.ndarray:
        """Index in ``images`` of each class's first image, plus ``num_images`` at the end."""
        return self._starts.copy()

    @property
    def sources(self) -> np.ndarray | None:
        """Per-image provenance (file path, font file ...) aligned with ``images``, or None."""
        return None if self._sources is None else self._sources.copy()

    def sources_of(self, class_name: str) -> list[str]:
        """Provenance of the images of one class (empty if the data set has none)."""
        if self._sources is None:
            return []
        i = self._class_index(class_name)
        return list(self._sources[self._starts[i] : self._starts[i + 1]])

    def subset(self, class_names: Iterable[str], name: str | None = None) -> ClassIndexedDataset:
        """The data set restricted to ``class_names`` (in that order)."""
        class_names = list(class_names)
        missing = [c for c in class_names if c not in self._index]
        if missing:
            raise DataError(f"{self.name}: {len(missing)} unknown class(es), e.g. {missing[:5]}")
        rows = [
            np.arange(self._starts[self._index[c]], self._starts[self._index[c] + 1]) for c in class_names
        ]
        rows = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        return ClassIndexedDataset(
            self._images[rows],
            [self._sizes[self._index[c]] for c in class_names],
            class_names,
            None if self._sources is None else self._sources[rows],
            name or self.name,
            image_shape=self.image_shape,
        )

    def with_min_images(self, min_images: int) -> ClassIndexedDataset:
        """Drop the classes with fewer than ``min_images`` images (e.g. K + Q for episodes)."""
        return self.subset([c for c, n in zip(self._names, self._sizes, strict=True) if n >= min_images])

    def with_rotations(self, angles: Sequence[int] = ROTATION_ANGLES) -> ClassIndexedDataset:
        """Add each class rotated by ``angles`` (multiples of 90 degrees, counter-clockwise) as new classes.

        Class ``c`` is followed by ``c/rot090``, ``c/rot180``, ``c/rot270``. Rotate each split separately (as
        ``DatasetSplits.with_rotations`` does) and a rotated class stays in its source's split.
        """
        angles = [int(a) for a in angles]
        if any(a % 90 or not 0 < a < 360 for a in angles) or len(set(angles)) != len(angles):
            raise DataError(f"rotation angles must be distinct values among 90, 180, 270, got {angles}")
        height, width, _ = self.image_shape
        if height != width and any(a in (90, 270) for a in angles):
            raise DataError(f"{self.name}: 90/270-degree rotations need square images, got {height}x{width}")
        parts, sizes, names, sources = [], [], [], []
        for i, class_name in enumerate(self._names):
            block = self._images[self._starts[i] : self._starts[i + 1]]
            block_sources = (
                None if self._sources is None else self._sources[self._starts[i] : self._starts[i + 1]]
            )
            for angle in [0, *angles]:
                parts.append(np.rot90(block, k=angle // 90, axes=(1, 2)) if angle else block)
                sizes.append(len(block))
                names.append(class_name if angle == 0 else f"{class_name}/rot{angle:03d}")
                if block_sources is not None:
                    sources.append(block_sources)
        images = np.concatenate(parts) if parts else self._images
        return ClassIndexedDataset(
            images,
            sizes,
            names,
            np.concatenate(sources) if sources else None,
            self.name,
            image_shape=self.image_shape,
        )

    def split(
        self,
        fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
        seed: int = 0,
        *,
        split_file: str | os.PathLike | None = None,
        groups: Iterable[Iterable[str]] | None = None,
    ) -> DatasetSplits:
        """Three class-disjoint data sets (train, val, test): from ``split_file`` if given, else seeded."""
        if split_file is not None:
            assignment = read_split_file(split_file, known_classes=self._index)
        else:
            assignment = dict(
                zip(SPLIT_NAMES, split_classes(self._names, fractions, seed, groups), strict=True)
            )
        return self.split_as(assignment)

    def split_as(self, assignment: dict[str, Sequence[str]]) -> DatasetSplits:
        """(train, val, test) of the classes ``assignment`` gives each split name (a missing split: no classes)."""
        return DatasetSplits(*(self.subset(assignment.get(s, ()), name=f"{self.name}/{s}") for s in SPLIT_NAMES))


class DatasetSplits(NamedTuple):
    """Class-disjoint meta-train / meta-validation / meta-test data sets."""

    train: ClassIndexedDataset
    val: ClassIndexedDataset
    test: ClassIndexedDataset

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.train.image_shape

    def class_names(self) -> dict[str, list[str]]:
        return {s: list(getattr(self, s).class_names) for s in SPLIT_NAMES}

    def describe(self) -> str:
        """How the classes are split, e.g. "30 classes split 19 train / 5 val / 6 test, images 28x28x1"."""
        counts = " / ".join(f"{getattr(self, s).num_classes} {s}" for s in SPLIT_NAMES)
        total = sum(part.num_classes for part in self)
        return f"{total} classes split {counts}, images {'x'.join(map(str, self.image_shape))}"

    def regrouped(self, assignment: Mapping[str, Sequence[str]]) -> DatasetSplits:
        """The classes of all three splits divided as ``assignment`` says (``{"train": [...], ...}``); a class it
        does not name is left out, a class it names that no split has is a DataError."""
        known = {name: part for part in self for name in part.class_names}
        missing = [name for split in SPLIT_NAMES for name in assignment.get(split, ()) if name not in known]
        if missing:
            raise DataError(f"{len(missing)} class(es) are not in the data set, e.g. {missing[:5]}")
        sources = None
        if all(part.sources is not None for part in self):
            sources = {name: part.sources_of(name) for name, part in known.items()}
        whole = ClassIndexedDataset.from_class_arrays(
            {name: part[name] for name, part in known.items()}, sources, name=self.train.name.rsplit("/", 1)[0]
        )
        return whole.split_as(assignment)

    def with_min_images(self, min_images: int) -> DatasetSplits:
        """Each split without its classes of fewer than ``min_images`` images."""
        return DatasetSplits(*(d.with_min_images(min_images) for d in self))

    def with_rotations(self, angles: Sequence[int] = ROTATION_ANGLES) -> DatasetSplits:
        """Each split with its own classes' rotations added (a rotated class stays in its source's split)."""
        return DatasetSplits(*(d.with_rotations(angles) for d in self))

    def save(self, path: str | os.PathLike) -> None:
        """Write the split as a JSON split file that ``split(split_file=path)`` reads back."""
        write_split_file(path, self.class_names())

    def summary(self) -> str:
        return ", ".join(
            f"{s}: {d.num_classes} classes / {d.num_images} images"
            for s, d in zip(SPLIT_NAMES, self, strict=True)
        )


def split_classes(
    class_names: Sequence[str],
    fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    seed: int = 0,
    groups: Iterable[Iterable[str]] | None = None,
) -> tuple[list[str], list[str], list[str]]:
    """Deterministic class-disjoint (train, val, test) lists of class names; see the module docstring.

    Each list keeps the order of ``class_names``. ``groups`` (iterables of class names; classes not in any group
    are their own group) are never separated.
    """
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise DataError(
            f"split fractions must be three non-negative numbers (train, val, test) summing to 1, "
            f"got {fractions}"
        )
    names = list(class_names)
    parent = {n: n for n in names}  # union-find: overlapping groups merge

    def root(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for group in groups or ():
        members = [m for m in group if m in parent]
        for m in members[1:]:
            a, b = root(members[0]), root(m)
            parent[max(a, b)] = min(a, b)
    group_of = {n: root(n) for n in names}
    total = len(names)
    n_train = round(fractions[0] * total)
    n_val = min(round(fractions[1] * total), total - n_train)
    members_of: dict[str, list[str]] = {}
    for n in names:
        members_of.setdefault(group_of[n], []).append(n)
    order = seeded_order(members_of, seed)
    where, counts = {}, [0, 0, 0]
    for key in order:
        part = 0 if counts[0] < n_train else 1 if counts[1] < n_val else 2
        counts[part] += len(members_of[key])
        for m in members_of[key]:
            where[m] = part
    return tuple([n for n in names if where[n] == part] for part in range(3))


def seeded_order(keys: Iterable[str], seed: int) -> list[str]:
    """``keys`` ordered by ``sha256(f"{seed}:{key}")``: a seeded shuffle independent of input order and numpy."""
    return sorted(keys, key=lambda key: hashlib.sha256(f"{seed}:{key}".encode()).hexdigest())


def read_split_file(
    path: str | os.PathLike, known_classes: Iterable[str] | None = None
) -> dict[str, list[str]]:
    """Read a JSON split file ``{"train": [...], "val": [...], "test": [...]}`` and check it.

    Raises a DataError for a missing or malformed file, a class in two splits, or (given ``known_classes``) a
    class name the data set does not have.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8-sig") as f:
            content = json.load(f)
    except FileNotFoundError:
        raise DataError(f"split file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"split file {path} is not readable JSON: {error}") from None
    expected = (
        f'split file {path} must be JSON {{"train": [...], "val": [...], "test": [...]}} with lists of class names'
    )
    if not isinstance(content, dict):
        raise DataError(f"{expected}, got a JSON {type(content).__name__}")
    if set(content) != set(SPLIT_NAMES):
        raise DataError(f"{expected}, got keys {sorted(content)}")
    for split_name in SPLIT_NAMES:
        names = content[split_name]
        if not isinstance(names, list) or not all(isinstance(c, str) for c in names):
            raise DataError(f"{expected}; its {split_name!r} is not a list of strings: {str(names)[:80]}")
    if known_classes is not None:
        content = _spelled_as_known(content, set(known_classes))
    seen: dict[str, str] = {}
    for split_name in SPLIT_NAMES:
        for c in content[split_name]:
            if c in seen:
                where = (
                    f"twice in {split_name!r}" if seen[c] == split_name else f"in both {seen[c]!r} and {split_name!r}"
                )
                raise DataError(f"split file {path}: class {c!r} is {where}; a class may be listed once only")
            seen[c] = split_name
    if known_classes is not None:
        known = set(known_classes)
        missing = [c for c in seen if c not in known]
        if missing:
            rotated = [c for c in missing if re.fullmatch(r".+/rot\d{3}", c) and c.rsplit("/", 1)[0] in known]
            hint = (
                f"; rotated classes such as {rotated[0]!r} are not named in a split file (Vinyals' Omniglot lists "
                "name each rotation): list each class once without its '/rotNNN' and add rotations=True "
                "(--rotations)"
                if rotated
                else "; fix the file or the data directory"
            )
            raise DataError(
                f"split file {path} names {len(missing)} class(es) the data set does not have, e.g. "
                f"{missing[:5]} (in split {seen[missing[0]]!r}){hint}"
            )
    return {s: list(content[s]) for s in SPLIT_NAMES}


def composed(name: str) -> str:
    """A class name in Unicode's composed form (NFC). macOS writes folder names decomposed (NFD), most editors
    compose them, and both print alike: names are matched in this form."""
    return unicodedata.normalize("NFC", name)


def _spelled_as_known(content: dict, known: set[str]) -> dict[str, list[str]]:
    """The split file's class names as the data set spells them where the two differ only in Unicode normal form."""
    by_composed = {composed(name): name for name in known}

    def spelled(name):
        return name if name in known else by_composed.get(composed(name), name)

    return {split_name: [spelled(name) for name in content[split_name]] for split_name in SPLIT_NAMES}


def split_file_text(assignment: Mapping[str, Sequence[str]]) -> str:
    """``{"train": [...], "val": [...], "test": [...]}`` as the JSON text of a split file."""
    return json.dumps({s: list(assignment[s]) for s in SPLIT_NAMES}, indent=1, ensure_ascii=False) + "\n"


def write_split_file(path: str | os.PathLike, assignment: Mapping[str, Sequence[str]]) -> None:
    """Write ``{"train": [...], "val": [...], "test": [...]}`` as JSON."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(split_file_text(assignment))
