"""load_dataset: names, options and the errors the command line will show."""

import pytest

from keras_metalstm.data import DATASET_NAMES, DataError, dataset_options, load_dataset


def test_names_and_options():
    assert DATASET_NAMES == ("fontglot", "omniglot", "miniimagenet", "folder", "fashion_mnist")
    assert dataset_options("fontglot")["rotations"] is False
    assert dataset_options("omniglot")["split"] == 1200 and dataset_options("omniglot")["rotations"] is True
    assert "root" not in dataset_options("folder") and "image_shape" in dataset_options("folder")


def test_fontglot_needs_no_data_dir():
    splits = load_dataset("fontglot", rotations=True)
    assert splits.image_shape == (28, 28, 1) and splits.val.num_classes == 4 * 221


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="unknown data set 'cifar'; choose one of fontglot, omniglot"):
        load_dataset("cifar")
    with pytest.raises(DataError, match=r"unknown option\(s\) \['shots'\] for data set 'fontglot'"):
        load_dataset("fontglot", shots=3)
    with pytest.raises(DataError, match="'omniglot' needs a data directory"):
        load_dataset("omniglot")
    with pytest.raises(DataError, match="Mini-ImageNet data directory not found"):
        load_dataset("mini-imagenet", tmp_path / "nowhere")
    assert issubclass(DataError, ValueError)
