"""The built-in fontglot-28 data set (1,384 letters x 20 typefaces, 28x28) and its fixed class split.

fontglot-28.npz ships inside the package (see FONTGLOT.md for provenance and licences). Images are white glyphs
on black (kept as they are), uint8 (28, 28, 1). A class is one Unicode letter, named like
``"U+0041 LATIN CAPITAL LETTER A"``; ``dataset.sources`` gives the font file behind every image (relative to
/usr/share/fonts on the Debian machine that built it).

The fixed split (``fontglot_splits``): ``split_classes`` with seed ``FONTGLOT_SPLIT_SEED`` = 2017 and fractions
64 / 16 / 20 %, keeping each group of ``FONTGLOT_LOOKALIKE_GROUPS`` in one split. Those groups are letters that
are drawn with the same glyph in the fonts that have both, e.g. Latin A, Greek Alpha and Cyrillic A: a purely
random class split would put "the same" class in meta-train and meta-test. Result: 886 / 221 / 277 classes.
``rotations=True`` adds each class rotated by 90, 180 and 270 degrees as three new classes in the same split.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from keras_metalstm.data.dataset import ClassIndexedDataset, DatasetSplits, split_classes
from keras_metalstm.data.errors import DataError

FONTGLOT_FILE = "fontglot-28.npz"
FONTGLOT_SPLIT_SEED = 2017
FONTGLOT_SPLIT_FRACTIONS = (0.64, 0.16, 0.20)
FONTGLOT_IMAGE_SHAPE = (28, 28, 1)

# Look-alike letter groups (code points), from find_lookalike_groups() on fontglot-28.npz; kept in one split.
# fmt: off
FONTGLOT_LOOKALIKE_GROUPS = (
    (0x0041, 0x0391, 0x0410), (0x0042, 0x0243, 0x0392, 0x0412), (0x0043, 0x03FE, 0x0421, 0x04A8),
    (0x0044, 0x00D0, 0x0110, 0x0189), (0x0045, 0x0395, 0x0415), (0x0046, 0x03DC),
    (0x0048, 0x0397, 0x041D, 0x04A2, 0x2C67), (0x0049, 0x0197, 0x0399, 0x0406, 0x04C0, 0x04CF),
    (0x004A, 0x0408), (0x004B, 0x039A, 0xA740, 0xA742, 0xA744), (0x004D, 0x039C, 0x03FA, 0x041C),
    (0x004E, 0x039D), (0x004F, 0x0298, 0x039F, 0x041E), (0x0050, 0x03A1, 0x0420, 0x048E), (0x0051, 0x051A),
    (0x0053, 0x0405), (0x0054, 0x01AC, 0x03A4, 0x0422), (0x0057, 0x051C), (0x0058, 0x03A7, 0x0425),
    (0x005A, 0x0396), (0x0061, 0x0430), (0x0063, 0x0441), (0x0065, 0x0435), (0x0068, 0x0127, 0x04BB),
    (0x0069, 0x0456), (0x006A, 0x03F3, 0x0458), (0x006F, 0x03BF, 0x043E), (0x0070, 0x0440),
    (0x0071, 0x051B, 0xA757), (0x0073, 0x0455), (0x0077, 0x026F, 0x051D, 0x0E1C), (0x0078, 0x0445, 0x04FF),
    (0x0111, 0x0501, 0x1D6D), (0x0138, 0x051F), (0x018F, 0x04D8), (0x019F, 0x0398, 0x0472, 0x04E8),
    (0x01B7, 0x04E0), (0x01DD, 0x0259, 0x04D9), (0x025B, 0x0511), (0x0275, 0x0473, 0x04E9), (0x0292, 0x04E1),
    (0x0299, 0x0432, 0x1D03), (0x029C, 0x043D), (0x0376, 0x0418, 0x0438), (0x037B, 0x1D10, 0x2184),
    (0x037D, 0xA73F), (0x0393, 0x0413), (0x041A, 0x051E), (0x0433, 0x1D26), (0x0442, 0x1D1B), (0x04C7, 0xA726),
    (0x0527, 0x2C68), (0x0629, 0x06C3), (0x062C, 0x062D, 0xA787), (0x0636, 0x06FB), (0x0637, 0x0638),
    (0x0643, 0x06AC), (0x0647, 0x06C1, 0x06D5), (0x0649, 0x06CC), (0x0684, 0x0686), (0x0C20, 0x0C30),
    (0x0C25, 0x0C27),
    (0x1000, 0x1010, 0x1011, 0x1018, 0x101A, 0x101C, 0x101F, 0x1078, 0x107B,
     0xAA60, 0xAA64, 0xAA66, 0xAA67, 0xAA68, 0xAA69, 0xAA6A),
    (0x1002, 0x1050), (0x1006, 0x1080), (0x1013, 0x1019), (0x1015, 0x1051), (0x1022, 0xAA61, 0xAA63),
    (0x1079, 0xAA6E), (0x1D05, 0x1D06), (0x1D18, 0x1D29), (0xA739, 0xA73B), (0xA741, 0xA743, 0xA745),
)
# fmt: on


def fontglot_path(data_dir: str | os.PathLike | None = None) -> Path:
    """The fontglot-28.npz to read: the packaged copy, or ``data_dir`` (the file, or a folder holding it)."""
    if data_dir is None:
        path = Path(__file__).resolve().parent / FONTGLOT_FILE
    else:
        path = Path(data_dir)
        if path.is_dir():
            path = path / FONTGLOT_FILE
    if not path.is_file():
        raise DataError(
            f"fontglot file not found: {path} (it ships with the package; reinstall keras-metalstm "
            f"or pass the folder that holds {FONTGLOT_FILE})"
        )
    return path


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in ("images", "codepoints", "char_names", "fonts")}
    except (OSError, ValueError, KeyError) as error:
        raise DataError(
            f"{path} is not a readable fontglot file ({error}); reinstall keras-metalstm"
        ) from None
    if arrays["images"].ndim != 4 or arrays["images"].shape[2:] != (28, 28):
        raise DataError(f"{path}: images must be (classes, 20, 28, 28), got {arrays['images'].shape}")
    return arrays


def class_name(codepoint: int, unicode_name: str) -> str:
    """The class name of a letter: ``"U+0041 LATIN CAPITAL LETTER A"``."""
    return f"U+{int(codepoint):04X} {unicode_name}"


def load_fontglot(data_dir: str | os.PathLike | None = None) -> ClassIndexedDataset:
    """All 1,384 fontglot classes (20 images each, uint8 28x28x1, white on black), sources = font files."""
    arrays = _read_npz(fontglot_path(data_dir))
    images = arrays["images"]
    num_classes, per_class = images.shape[:2]
    names = [class_name(c, n) for c, n in zip(arrays["codepoints"], arrays["char_names"], strict=True)]
    return ClassIndexedDataset(
        images.reshape(num_classes * per_class, 28, 28, 1),
        [per_class] * num_classes,
        names,
        sources=arrays["fonts"].reshape(-1),
        name="fontglot",
    )


def fontglot_splits(
    rotations: bool = False,
    data_dir: str | os.PathLike | None = None,
    seed: int = FONTGLOT_SPLIT_SEED,
    fractions=FONTGLOT_SPLIT_FRACTIONS,
) -> DatasetSplits:
    """The fixed fontglot split (train, val, test) = 886 / 221 / 277 classes, x4 with ``rotations``."""
    dataset = load_fontglot(data_dir)
    by_codepoint = {int(name[2:].split(" ", 1)[0], 16): name for name in dataset.class_names}
    groups = [[by_codepoint[c] for c in group if c in by_codepoint] for group in FONTGLOT_LOOKALIKE_GROUPS]
    train, val, test = split_classes(dataset.class_names, fractions, seed, groups)
    splits = DatasetSplits(
        dataset.subset(train, name="fontglot/train"),
        dataset.subset(val, name="fontglot/val"),
        dataset.subset(test, name="fontglot/test"),
    )
    return splits.with_rotations() if rotations else splits


def find_lookalike_groups(
    images: np.ndarray, fonts: np.ndarray, codepoints: np.ndarray, iou: float = 0.9, min_shared: int = 2
) -> tuple[tuple[int, ...], ...]:
    """Groups of letters drawn with the same glyph: how FONTGLOT_LOOKALIKE_GROUPS was computed.

    Two classes are look-alikes when at least ``min_shared`` fonts have both and, in at least half of those fonts,
    their glyphs binarised at > 127 overlap with IoU >= ``iou``. Groups are the connected components (size >= 2),
    as sorted tuples of code points, sorted. Exact integer arithmetic, so the result is reproducible.
    """
    num_classes, per_class = fonts.shape
    bits = (images.reshape(num_classes * per_class, -1) > 127).astype(np.float32)
    area = bits.sum(axis=1)
    font_ids = np.unique(fonts.reshape(-1), return_inverse=True)[1]
    shared = np.zeros((num_classes, num_classes), np.int32)
    coincide = np.zeros((num_classes, num_classes), np.int32)
    order = np.argsort(font_ids, kind="stable")
    bounds = np.searchsorted(font_ids[order], np.arange(font_ids.max() + 2))
    for f in range(font_ids.max() + 1):
        rows = order[bounds[f] : bounds[f + 1]]
        if len(rows) < 2:
            continue
        classes = rows // per_class
        inter = bits[rows] @ bits[rows].T  # exact: integer counts < 2**24
        union = area[rows][:, None] + area[rows][None, :] - inter
        block = np.ix_(classes, classes)
        shared[block] += 1
        coincide[block] += inter >= iou * np.maximum(union, 1)
    np.fill_diagonal(shared, 0)
    linked = (shared >= min_shared) & (2 * coincide >= shared)
    parent = list(range(num_classes))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in zip(*np.nonzero(linked), strict=True):
        parent[root(a)] = root(b)
    members: dict[int, list[int]] = {}
    for i in range(num_classes):
        members.setdefault(root(i), []).append(int(codepoints[i]))
    return tuple(sorted(tuple(sorted(m)) for m in members.values() if len(m) > 1))
