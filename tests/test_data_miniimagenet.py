"""Mini-ImageNet loader on generated fixtures in its three formats: train/val/test.csv (filename,label) +
images/*.jpg, the pickled mini-imagenet-cache-{train,val,test}.pkl files, and train/val/test folders of class
folders."""

import os
import pickle
import shutil

import numpy as np
import pytest
from PIL import Image

from keras_metalstm.data import DataError, load_dataset, load_miniimagenet

CLASSES = {
    "train": ["n01532829", "n01558993", "n01704323"],
    "val": ["n01855672", "n02091244"],
    "test": ["n01930112", "n01981276"],
}
PER_CLASS = 4


def make_miniimagenet(root):
    """Ravi & Larochelle layout; class k's images have mean colour 30*k; two are not 84x84 RGB."""
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    k = 0
    for split, labels in CLASSES.items():
        rows = ["filename,label"]
        for label in labels:
            k += 1
            for i in range(1, PER_CLASS + 1):
                name = f"{label}{i:08d}.jpg"
                size = (84, 84) if i > 1 else (100, 130)  # real files may be larger: resized to 84x84
                pixels = np.clip(30 * k + rng.normal(0, 3, (*size, 3)), 0, 255).astype(np.uint8)
                image = Image.fromarray(pixels)
                if label == "n01855672" and i == 2:
                    image = image.convert("L")  # a grey JPEG among RGB ones
                image.save(images / name, quality=95)
                rows.append(f"{name},{label}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture()
def mini_dir(tmp_path):
    return make_miniimagenet(tmp_path)


def test_loads_the_three_splits_as_84x84_rgb(mini_dir):
    splits = load_miniimagenet(mini_dir)
    assert [list(s.class_names) for s in splits] == list(CLASSES.values())
    assert splits.image_shape == (84, 84, 3)
    for split in splits:
        assert (
            split.images.dtype == np.uint8 and split.class_sizes.tolist() == [PER_CLASS] * split.num_classes
        )
    # images follow their csv label: class k has mean colour 30*k (resized and grey files included)
    means = [splits.train[c].mean() for c in CLASSES["train"]] + [
        splits.test[c].mean() for c in CLASSES["test"]
    ]
    np.testing.assert_allclose(means, [30, 60, 90, 180, 210], atol=3)
    grey = splits.val["n01855672"][1]
    assert np.abs(grey[..., 0].astype(int) - grey[..., 2]).max() == 0  # grey -> RGB by repetition
    assert splits.train.sources_of("n01532829")[0] == "n0153282900000001.jpg"
    assert load_dataset("miniimagenet", mini_dir, image_size=32).image_shape == (32, 32, 3)


def test_csv_naming_a_missing_file_is_refused(mini_dir):
    (mini_dir / "images" / "n0185567200000003.jpg").unlink()
    with pytest.raises(
        DataError, match=r"val.csv line 4 names 'n0185567200000003.jpg', which is not in .*images"
    ):
        load_miniimagenet(mini_dir)


def test_missing_csv_and_bad_header_are_refused(mini_dir):
    (mini_dir / "test.csv").write_text("file,class\nx.jpg,n1\n")
    with pytest.raises(DataError, match="test.csv must start with the header 'filename,label'"):
        load_miniimagenet(mini_dir)
    (mini_dir / "test.csv").unlink()
    with pytest.raises(DataError, match="split file not found: .*test.csv"):
        load_miniimagenet(mini_dir)


def test_class_in_two_split_files_is_refused(mini_dir):
    with open(mini_dir / "test.csv", "a") as f:
        f.write("n0153282900000001.jpg,n01532829\n")
    with pytest.raises(DataError, match="'n01532829' is in both train.csv and test.csv"):
        load_miniimagenet(mini_dir)


def test_an_image_listed_twice_is_refused(mini_dir):
    """Within a split it would be its own query; in train.csv and test.csv a test image trained on."""
    train_lines = (mini_dir / "train.csv").read_text()
    with open(mini_dir / "train.csv", "a") as f:
        f.write("n0153282900000002.jpg,n01532829\n")
    with pytest.raises(DataError, match=r"'n0153282900000002.jpg' is listed twice: train.csv line 3 and train.csv "
                                        r"line \d+; an image may be listed once only"):
        load_miniimagenet(mini_dir)
    (mini_dir / "train.csv").write_text(train_lines)
    test_label = (mini_dir / "test.csv").read_text().splitlines()[1].split(",")[1]
    with open(mini_dir / "test.csv", "a") as f:
        f.write(f"n0153282900000002.jpg,{test_label}\n")
    with pytest.raises(DataError, match=r"listed twice: train.csv line 3 and test.csv line \d+"):
        load_miniimagenet(mini_dir)


def test_truncated_jpeg_is_named(mini_dir):
    victim = mini_dir / "images" / "n0155899300000003.jpg"
    victim.write_bytes(victim.read_bytes()[:400])
    with pytest.raises(DataError, match=r"unreadable image file.*n0155899300000003\.jpg"):
        load_miniimagenet(mini_dir)


# ------------------------------------------------------------------ the cache files (mini-imagenet-cache-*.pkl)
def test_split_folders_load_as_the_csv_files_do(mini_dir, tmp_path):
    """The same files laid out as train/<wnid>/*.jpg, val/..., test/...: the same classes and images."""
    folders = tmp_path / "folders"
    for split, labels in CLASSES.items():
        for label in labels:
            (folders / split / label).mkdir(parents=True)
            for image in sorted((mini_dir / "images").glob(f"{label}*.jpg")):
                shutil.copy(image, folders / split / label / image.name)
    from_csv, from_folders = load_miniimagenet(mini_dir), load_dataset("miniimagenet", folders)
    assert [list(s.class_names) for s in from_folders] == list(CLASSES.values())
    for csv_split, folder_split in zip(from_csv, from_folders, strict=True):
        np.testing.assert_array_equal(folder_split.images, csv_split.images)
    assert from_folders.train.sources_of("n01532829")[0] == "train/n01532829/n0153282900000001.jpg"


def make_miniimagenet_cache(root, protocol=pickle.HIGHEST_PROTOCOL):
    """The three cache files: {"image_data": uint8 (n, 84, 84, 3), "class_dict": {wnid: [indices]}}, a class's
    images interleaved with the others' (the loader must follow the indices); class k has mean colour 30*k."""
    k = 0
    for split, labels in CLASSES.items():
        images, class_dict = [], {label: [] for label in labels}
        for _ in range(PER_CLASS):
            for label in labels:
                colour = 30 * (list(CLASSES[split]).index(label) + 1 + k)
                class_dict[label].append(len(images))
                images.append(np.full((84, 84, 3), colour, np.uint8))
        k += len(labels)
        contents = {"image_data": np.stack(images), "class_dict": class_dict}
        (root / f"mini-imagenet-cache-{split}.pkl").write_bytes(pickle.dumps(contents, protocol=protocol))
    return root


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_the_cache_files_load_as_the_same_three_splits(tmp_path, protocol):
    splits = load_miniimagenet(make_miniimagenet_cache(tmp_path, protocol))
    assert [list(s.class_names) for s in splits] == list(CLASSES.values())
    assert splits.image_shape == (84, 84, 3)
    assert all(s.class_sizes.tolist() == [PER_CLASS] * s.num_classes for s in splits)
    means = [float(splits.train[c].mean()) for c in CLASSES["train"]] + [
        float(splits.test[c].mean()) for c in CLASSES["test"]
    ]
    assert means == [30, 60, 90, 180, 210]
    assert splits.val.sources_of("n02091244")[1] == "mini-imagenet-cache-val.pkl[3]"
    assert load_dataset("miniimagenet", tmp_path, image_size=32).image_shape == (32, 32, 3)


def test_a_cache_file_asking_for_anything_but_arrays_is_refused_unrun(tmp_path):
    make_miniimagenet_cache(tmp_path)
    marker = tmp_path / "ran"

    class Hostile:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "mini-imagenet-cache-val.pkl").write_bytes(pickle.dumps({"image_data": Hostile(), "class_dict": {}}))
    refused = r"cannot read Mini-ImageNet cache file .*val\.pkl: it asks for (posix|os)\.system"
    with pytest.raises(DataError, match=refused):
        load_miniimagenet(tmp_path)
    assert not marker.exists()


def test_malformed_cache_files_and_an_empty_folder_are_named(tmp_path):
    with pytest.raises(DataError, match="holds neither Mini-ImageNet's split files .*, its cache files .* nor train/"):
        load_miniimagenet(tmp_path)
    make_miniimagenet_cache(tmp_path)
    (tmp_path / "mini-imagenet-cache-test.pkl").write_bytes(pickle.dumps({"images": np.zeros(3)}))
    with pytest.raises(DataError, match="test.pkl is not a Mini-ImageNet cache file"):
        load_miniimagenet(tmp_path)
    for class_dict, message in (
        ({"n0": [-1, 0], "n1": [1, 2]}, r"class_dict\['n0'\] names image -1, but image_data holds images 0\.\.3"),
        ({"n0": [0, 1.5], "n1": [2, 3]}, r"class_dict\['n0'\] holds indices that are not whole numbers"),
        ({"n0": [0, 1], "n1": [1, 2]}, r"class_dict lists image 1 more than once .*: each image belongs to one class"),
    ):
        contents = {"image_data": np.zeros((4, 84, 84, 3), np.uint8), "class_dict": class_dict}
        (tmp_path / "mini-imagenet-cache-test.pkl").write_bytes(pickle.dumps(contents))
        with pytest.raises(DataError, match=message):
            load_miniimagenet(tmp_path)
    (tmp_path / "mini-imagenet-cache-test.pkl").unlink()
    with pytest.raises(DataError, match="cache file not found: .*test.pkl"):
        load_miniimagenet(tmp_path)
