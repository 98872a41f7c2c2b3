"""Omniglot loader on generated fixtures in the standard layout: folders and the .zip files."""

import json
import shutil
import zipfile

import numpy as np
import pytest
from PIL import Image, ImageDraw

from keras_metalstm.data import DataError, load_dataset, load_omniglot, omniglot_splits

ALPHABETS = {
    "images_background": {"Alphabet_of_the_Magi": 3, "Latin": 2},
    "images_evaluation": {"Angelic": 4, "Tengwar": 3},
}
DRAWERS = 20


def make_omniglot(root, zipped=False):
    """<part>/<Alphabet>/character<NN>/<id>_<drawer>.png, 105x105 1-bit black strokes on white."""
    rng = np.random.default_rng(0)
    char_id = 0
    for part, alphabets in ALPHABETS.items():
        for alphabet, characters in alphabets.items():
            for c in range(1, characters + 1):
                char_id += 1
                folder = root / part / alphabet / f"character{c:02d}"
                folder.mkdir(parents=True)
                for drawer in range(1, DRAWERS + 1):
                    image = Image.new("L", (105, 105), 255)
                    draw = ImageDraw.Draw(image)
                    points = [tuple(int(v) for v in p) for p in rng.integers(15, 90, (4, 2))]
                    draw.line(points, fill=0, width=6)
                    image.convert("1").save(folder / f"{char_id:04d}_{drawer:02d}.png")
        if zipped:
            with zipfile.ZipFile(root / f"{part}.zip", "w") as archive:
                for path in sorted((root / part).rglob("*")):
                    archive.write(path, path.relative_to(root).as_posix())
            shutil.rmtree(root / part)
    return root


@pytest.fixture(scope="module")
def omniglot_dir(tmp_path_factory):
    return make_omniglot(tmp_path_factory.mktemp("omniglot"))


@pytest.fixture(scope="module")
def omniglot_zip_dir(tmp_path_factory):
    return make_omniglot(tmp_path_factory.mktemp("omniglot_zip"), zipped=True)


def test_fixture_is_in_the_standard_format(omniglot_dir):
    image = Image.open(omniglot_dir / "images_background" / "Latin" / "character01" / "0004_01.png")
    assert image.size == (105, 105) and image.mode == "1"


def test_load_omniglot_reads_resizes_and_inverts(omniglot_dir):
    dataset = load_omniglot(omniglot_dir)
    assert dataset.num_classes == 12 and dataset.image_shape == (28, 28, 1)
    assert dataset.class_sizes.tolist() == [DRAWERS] * 12
    assert "Angelic/character04" in dataset and "Alphabet_of_the_Magi/character01" in dataset
    assert dataset.sources_of("Latin/character02")[0] == "images_background/Latin/character02/0005_01.png"
    images = dataset.images
    # inverted: background black (0) in the corners, strokes bright
    assert images[:, 0, 0, 0].max() == 0 and images.max() == 255
    assert images.mean() < 80
    original = load_omniglot(omniglot_dir, invert=False, image_size=14)
    assert original.image_shape == (14, 14, 1) and original.images[:, 0, 0, 0].min() == 255


def test_zip_files_give_the_same_data_as_folders(omniglot_dir, omniglot_zip_dir):
    assert not (omniglot_zip_dir / "images_background").exists()
    from_folders = load_omniglot(omniglot_dir)
    from_zips = load_omniglot(omniglot_zip_dir)
    assert from_zips.class_names == from_folders.class_names
    np.testing.assert_array_equal(from_zips.images, from_folders.images)
    assert from_zips.sources_of("Angelic/character01")[0].startswith(
        "images_evaluation.zip:images_evaluation/"
    )


def test_numbered_split_with_rotations(omniglot_dir):
    splits = omniglot_splits(omniglot_dir, split=8, num_val=2, rotations=True)
    base = [{n.split("/rot")[0] for n in s.class_names} for s in splits]
    assert [len(b) for b in base] == [6, 2, 4]
    assert [s.num_classes for s in splits] == [24, 8, 16]
    assert not (base[0] & base[1] or base[0] & base[2] or base[1] & base[2])
    for split, names in zip(splits, base, strict=True):  # every rotation of a character in its split
        assert {f"{n}/rot{a:03d}" for n in names for a in (90, 180, 270)} <= set(split.class_names)
    again = omniglot_splits(omniglot_dir, split=8, num_val=2, rotations=False)
    assert [set(s.class_names) for s in again] == base
    no_val = omniglot_splits(omniglot_dir, split=8, num_val=0, rotations=False)
    assert no_val.train.num_classes == 8 and no_val.val.num_classes == 0


def test_background_split_tests_on_the_evaluation_alphabets(omniglot_dir):
    splits = omniglot_splits(omniglot_dir, split="background", num_val=1, rotations=False)
    assert {n.split("/")[0] for n in splits.test.class_names} == {"Angelic", "Tengwar"}
    assert splits.train.num_classes == 4 and splits.val.num_classes == 1
    assert {n.split("/")[0] for n in splits.train.class_names + splits.val.class_names} <= {
        "Alphabet_of_the_Magi",
        "Latin",
    }


def test_default_1200_split_needs_the_full_set(omniglot_dir):
    with pytest.raises(DataError, match=r"needs more than 1200, found 12 in .*For a part of Omniglot, give your "
                                        r"own split \(--split-file"):
        load_dataset("omniglot", omniglot_dir)


def test_missing_part_is_named(tmp_path):
    (tmp_path / "images_background" / "A" / "character01").mkdir(parents=True)
    with pytest.raises(DataError, match="'images_evaluation' not found.*images_evaluation.zip"):
        load_omniglot(tmp_path, parts=("images_evaluation",))


def test_a_part_unzipped_into_a_folder_of_its_own_name_is_named(omniglot_dir, tmp_path):
    nested = tmp_path / "nested"
    for part in ALPHABETS:
        shutil.copytree(omniglot_dir / part, nested / part / part)
    with pytest.raises(DataError, match=r"holds only a folder images_background/ .*move the alphabet folders"):
        load_omniglot(nested)


def test_empty_character_folder_is_named(tmp_path):
    (tmp_path / "images_background" / "A" / "character01").mkdir(parents=True)
    with pytest.raises(DataError, match="character01 holds no .png image"):
        load_omniglot(tmp_path, parts=("images_background",))
    (tmp_path / "images_evaluation").mkdir()
    with pytest.raises(DataError, match="'images_evaluation' at .* is empty"):
        load_omniglot(tmp_path, parts=("images_evaluation",))


def test_truncated_png_is_named(tmp_path):
    root = make_omniglot(tmp_path)
    victim = root / "images_evaluation" / "Tengwar" / "character02" / "0011_07.png"
    victim.write_bytes(victim.read_bytes()[:60])
    with pytest.raises(DataError, match=r"unreadable image file.*Tengwar/character02/0011_07\.png"):
        load_omniglot(root)


def test_corrupt_zip_is_named(tmp_path):
    (tmp_path / "images_background.zip").write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(DataError, match="cannot read Omniglot zip file .*images_background.zip"):
        load_omniglot(tmp_path, parts=("images_background",))


def test_a_runs_settings_reach_the_loader(omniglot_dir, tmp_path):
    from keras_metalstm.config import RunConfig
    from keras_metalstm.runs import load_splits

    names = load_omniglot(omniglot_dir).class_names
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps({"train": names[:6], "val": names[6:8], "test": names[8:]}))
    settings = {"dataset": "omniglot", "data_dir": str(omniglot_dir), "split_file": str(split_file)}
    # --no-rotations (the run's default) must not fall back on the loader's own default, which adds them
    plain = load_splits(RunConfig(**settings))
    assert [part.num_classes for part in plain] == [6, 2, 4]
    rotated = load_splits(RunConfig(**settings, rotations=True))
    assert [part.num_classes for part in rotated] == [24, 8, 16]
    # --image-shape 84,84,1 decodes the 105x105 originals at 84, not the 28x28 default resized again
    large = load_splits(RunConfig(**settings, image_shape=(84, 84, 1)))
    direct = load_omniglot(omniglot_dir, image_size=84)
    np.testing.assert_array_equal(large.train[names[0]], direct[names[0]])
