"""ClassIndexedDataset, seeded and file-based class splits, rotations."""

import json
import re

import numpy as np
import pytest

from keras_metalstm.data import ClassIndexedDataset, DataError, DatasetSplits, read_split_file, split_classes


def make_dataset(num_classes=50, per_class=3, shape=(4, 4, 1)):
    rng = np.random.default_rng(0)
    arrays = {
        f"c{c:03d}": rng.integers(0, 256, (per_class, *shape), dtype=np.uint8) for c in range(num_classes)
    }
    sources = {name: [f"{name}/{i}.png" for i in range(per_class)] for name in arrays}
    return ClassIndexedDataset.from_class_arrays(arrays, sources=sources, name="toy"), arrays


def test_mapping_from_class_name_to_images():
    dataset, arrays = make_dataset(5, 3)
    assert len(dataset) == 5 and list(dataset) == list(arrays)
    assert dataset.image_shape == (4, 4, 1) and dataset.num_images == 15
    np.testing.assert_array_equal(dataset["c003"], arrays["c003"])
    assert dataset.sources_of("c003") == ["c003/0.png", "c003/1.png", "c003/2.png"]
    assert dataset.class_sizes.tolist() == [3] * 5
    with pytest.raises(KeyError, match="c999"):
        dataset["c999"]
    with pytest.raises(ValueError):
        dataset["c001"][0, 0, 0, 0] = 1  # read-only


def test_from_class_arrays_refuses_mixed_shapes():
    with pytest.raises(DataError, match="class 'b' has images of shape"):
        ClassIndexedDataset.from_class_arrays(
            {"a": np.zeros((2, 4, 4, 1), np.uint8), "b": np.zeros((2, 5, 4, 1), np.uint8)}
        )


def test_seeded_split_is_disjoint_complete_and_deterministic():
    dataset, _ = make_dataset(50)
    splits = dataset.split((0.64, 0.16, 0.20), seed=3)
    names = [set(s.class_names) for s in splits]
    assert [len(n) for n in names] == [32, 8, 10]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert set.union(*names) == set(dataset.class_names)
    again = dataset.split((0.64, 0.16, 0.20), seed=3)
    assert again.class_names() == splits.class_names()
    assert dataset.split(seed=4).class_names() != splits.class_names()
    # the images follow their class
    name = splits.test.class_names[0]
    np.testing.assert_array_equal(splits.test[name], dataset[name])


def test_split_does_not_depend_on_class_order():
    names = [f"k{i}" for i in range(30)]
    a = split_classes(names, seed=9)
    b = split_classes(list(reversed(names)), seed=9)
    assert [sorted(x) for x in a] == [sorted(x) for x in b]


def test_groups_stay_in_one_split():
    names = [f"k{i:02d}" for i in range(40)]
    groups = [[f"k{i:02d}" for i in range(g, g + 4)] for g in range(0, 40, 4)]
    for seed in range(5):
        parts = split_classes(names, (0.5, 0.25, 0.25), seed=seed, groups=groups)
        where = {n: p for p, part in enumerate(parts) for n in part}
        for group in groups:
            assert len({where[n] for n in group}) == 1


def test_class_sizes_that_are_not_counts_are_refused():
    images = np.zeros((12, 4, 4, 1), np.uint8)
    for sizes in ([-1, 13], [6.5, 5.5]):  # both "summed to" 12 or 11 and were named by their sum only
        with pytest.raises(DataError, match=rf"class sizes must be whole numbers >= 0 .*got {re.escape(str(sizes))}"):
            ClassIndexedDataset(images, sizes, ["a", "b"])
    assert ClassIndexedDataset(images, np.array([6.0, 6.0]), ["a", "b"]).class_sizes.tolist() == [6, 6]


def test_bad_fractions_are_refused():
    with pytest.raises(DataError, match="summing to 1"):
        split_classes(["a", "b"], (0.5, 0.5, 0.5))


def test_split_file_names_match_folders_in_either_unicode_form(tmp_path):
    """macOS writes folder names decomposed (NFD), most editors compose them (NFC): the two print alike, so a split
    file's name matches the data set's class in the other form, spelled as the data set spells it."""
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"train": [decomposed], "val": ["tea"], "test": []}), encoding="utf-8")
    assert read_split_file(path, known_classes=[composed, "tea"]) == {"train": [composed], "val": ["tea"], "test": []}
    assert read_split_file(path, known_classes=[decomposed, "tea"])["train"] == [decomposed]
    assert read_split_file(path)["train"] == [decomposed]  # nothing to match: kept as written
    path.write_text(json.dumps({"train": [decomposed], "val": [composed], "test": []}), encoding="utf-8")
    with pytest.raises(DataError, match="is in both 'train' and 'val'"):  # one class, written twice
        read_split_file(path, known_classes=[composed])


def test_split_file_round_trip_and_errors(tmp_path):
    dataset, _ = make_dataset(20)
    splits = dataset.split(seed=1)
    path = tmp_path / "split.json"
    splits.save(path)
    assert dataset.split(split_file=path).class_names() == splits.class_names()
    # as Windows' Notepad saves it, with a byte-order mark
    (tmp_path / "bom.json").write_text(path.read_text(), encoding="utf-8-sig")
    assert dataset.split(split_file=tmp_path / "bom.json").class_names() == splits.class_names()

    with pytest.raises(DataError, match="split file not found"):
        dataset.split(split_file=tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not readable JSON"):
        dataset.split(split_file=tmp_path / "bad.json")
    (tmp_path / "unknown.json").write_text(json.dumps({"train": ["c000", "nope"], "val": [], "test": []}))
    with pytest.raises(DataError, match=r"does not have.*'nope'.*'train'"):
        dataset.split(split_file=tmp_path / "unknown.json")
    (tmp_path / "twice.json").write_text(json.dumps({"train": ["c000"], "val": ["c000"], "test": []}))
    with pytest.raises(DataError, match="'c000' is in both 'train' and 'val'"):
        read_split_file(tmp_path / "twice.json")
    (tmp_path / "keys.json").write_text(json.dumps({"training": []}))
    with pytest.raises(DataError, match=r"must be JSON.*got keys \['training'\]"):
        read_split_file(tmp_path / "keys.json")
    # each message says what is wrong: the file's type, the split whose value is not names, a name listed twice
    (tmp_path / "list.json").write_text(json.dumps(["c000"]))
    with pytest.raises(DataError, match="must be JSON.*got a JSON list"):
        read_split_file(tmp_path / "list.json")
    (tmp_path / "values.json").write_text(json.dumps({"train": ["c000"], "val": "c001", "test": []}))
    with pytest.raises(DataError, match="its 'val' is not a list of strings: c001"):
        read_split_file(tmp_path / "values.json")
    (tmp_path / "repeated.json").write_text(json.dumps({"train": ["c000", "c000"], "val": [], "test": []}))
    with pytest.raises(DataError, match="'c000' is twice in 'train'"):
        read_split_file(tmp_path / "repeated.json")
    # a list naming rotations (as Vinyals' Omniglot lists do) gets the way to ask for them
    (tmp_path / "rotations.json").write_text(json.dumps({"train": ["c000/rot000"], "val": [], "test": []}))
    with pytest.raises(DataError, match=r"list each class once without its '/rotNNN' and add rotations=True"):
        dataset.split(split_file=tmp_path / "rotations.json")


def test_rotations_add_rotated_classes_in_the_same_split():
    dataset, arrays = make_dataset(10)
    rotated = dataset.with_rotations()
    assert rotated.num_classes == 40
    np.testing.assert_array_equal(rotated["c002/rot090"], np.rot90(arrays["c002"], 1, axes=(1, 2)))
    np.testing.assert_array_equal(rotated["c002/rot180"], np.rot90(arrays["c002"], 2, axes=(1, 2)))
    np.testing.assert_array_equal(rotated["c002/rot270"], np.rot90(arrays["c002"], 3, axes=(1, 2)))
    np.testing.assert_array_equal(rotated["c002"], arrays["c002"])
    splits = dataset.split(seed=0).with_rotations()
    for split in splits:
        bases = {name.split("/")[0] for name in split.class_names}
        assert split.num_classes == 4 * len(bases)
    base_sets = [{n.split("/")[0] for n in s.class_names} for s in splits]
    assert not (base_sets[0] & base_sets[1] or base_sets[0] & base_sets[2] or base_sets[1] & base_sets[2])
    with pytest.raises(DataError, match="square"):
        make_dataset(2, shape=(4, 6, 1))[0].with_rotations()


def test_empty_split_keeps_the_image_shape():
    dataset, _ = make_dataset(3)
    splits = dataset.split((1.0, 0.0, 0.0))
    assert isinstance(splits, DatasetSplits)
    assert splits.val.num_classes == 0 and splits.val.image_shape == (4, 4, 1)
