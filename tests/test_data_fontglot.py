"""The built-in fontglot data set: packaged file, contents, the fixed split, look-alike groups, rotations."""

import hashlib
from pathlib import Path

import numpy as np
import pytest

import keras_metalstm.data as data
from keras_metalstm.data import DataError, fontglot_path, fontglot_splits, load_dataset, load_fontglot
from keras_metalstm.data.fontglot import FONTGLOT_LOOKALIKE_GROUPS, find_lookalike_groups


@pytest.fixture(scope="module")
def fontglot():
    return load_fontglot()


@pytest.fixture(scope="module")
def splits():
    return fontglot_splits()


def test_file_ships_inside_the_package_with_its_notes():
    path = fontglot_path()
    assert path.parent == Path(data.__file__).parent and path.name == "fontglot-28.npz"
    assert (path.parent / "FONTGLOT.md").is_file()
    assert "Debian" in (path.parent / "FONTGLOT.md").read_text()


def test_contents(fontglot):
    assert fontglot.num_classes == 1384 and fontglot.num_images == 1384 * 20
    assert fontglot.image_shape == (28, 28, 1) and fontglot.images.dtype == np.uint8
    assert fontglot.class_names[0] == "U+0041 LATIN CAPITAL LETTER A"
    sources = fontglot.sources_of("U+0041 LATIN CAPITAL LETTER A")
    assert len(sources) == 20 and all(s.endswith((".ttf", ".otf", ".ttc")) for s in sources)
    # white glyph on black: border pixels dark, some pixels fully lit
    assert fontglot.images[:, 0, :, 0].mean() < 10 and fontglot.images.max() == 255


def test_fixed_split_sizes_and_disjointness(splits):
    assert [s.num_classes for s in splits] == [886, 221, 277]
    names = [set(s.class_names) for s in splits]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert len(set.union(*names)) == 1384


def test_fixed_split_is_the_documented_one(splits):
    # changing the seed, the fractions, the groups or the hashing changes these digests (FONTGLOT.md documents
    # the split; a change must be deliberate)
    digests = [hashlib.sha256("\n".join(s.class_names).encode()).hexdigest()[:16] for s in splits]
    assert digests == ["c496713bc37455e5", "8952384bd68222a4", "69adc4cd34b04efa"]
    assert load_dataset("fontglot").class_names() == splits.class_names()


def test_lookalike_letters_share_a_split(splits):
    where = {n: i for i, s in enumerate(splits) for n in s.class_names}
    by_codepoint = {int(n[2:].split(" ")[0], 16): n for n in where}
    latin_a, greek_alpha, cyrillic_a = 0x41, 0x391, 0x410
    assert where[by_codepoint[latin_a]] == where[by_codepoint[greek_alpha]] == where[by_codepoint[cyrillic_a]]
    for group in FONTGLOT_LOOKALIKE_GROUPS:
        assert len({where[by_codepoint[c]] for c in group}) == 1


def test_lookalike_groups_are_reproducible_from_the_data():
    with np.load(fontglot_path()) as npz:
        groups = find_lookalike_groups(npz["images"], npz["fonts"], npz["codepoints"])
    assert groups == FONTGLOT_LOOKALIKE_GROUPS
    assert len(groups) == 73 and sum(len(g) for g in groups) == 206


def test_rotations_add_three_classes_in_the_same_split(splits):
    rotated = fontglot_splits(rotations=True)
    assert [s.num_classes for s in rotated] == [4 * 886, 4 * 221, 4 * 277]
    for plain, turned in zip(splits, rotated, strict=True):
        assert {n.split("/rot")[0] for n in turned.class_names} == set(plain.class_names)
    name = splits.val.class_names[0]
    np.testing.assert_array_equal(rotated.val[f"{name}/rot180"], splits.val[name][:, ::-1, ::-1])


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="fontglot file not found"):
        load_fontglot(tmp_path)
