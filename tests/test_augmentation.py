"""Augmentation of meta-training episodes in the input pipeline (keras_metalstm.augmentation, `metalstm train
--augment`): each transform checked against NumPy, episodes still a pure function of (seed, episode), and the
setting reaching the training pipeline only."""

import numpy as np
import pytest
import tensorflow as tf
import yaml
from cli_helpers import run_cli, train_args

from keras_metalstm.augmentation import Augmentation
from keras_metalstm.config import ConfigError, RunConfig
from keras_metalstm.data import DataError, EpisodeSampler, load_dataset

KEY = tf.constant([3, 9], tf.int64)


def random_images(count=48, shape=(12, 10, 1), seed=0):
    return np.random.default_rng(seed).integers(1, 256, (count, *shape), dtype=np.uint8)


def shifted(image, dy, dx):
    """NumPy: `image` moved by (dy, dx) pixels, the uncovered border zero."""
    out = np.zeros_like(image)
    height, width = image.shape[:2]
    out[max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)] = image[
        max(-dy, 0) : height - max(dy, 0), max(-dx, 0) : width - max(dx, 0)
    ]
    return out


def test_the_text_form_round_trips_and_bad_settings_name_the_forms():
    augmentation = Augmentation.parse(" Translate=0.1, flip ,brightness=0.25")
    assert augmentation == Augmentation(flip=True, translate=0.1, brightness=0.25)
    assert str(augmentation) == "flip,translate=0.1,brightness=0.25"
    assert Augmentation.parse(str(augmentation)) == augmentation
    assert Augmentation.parse(None) is None and Augmentation.parse("none") is None
    assert Augmentation.parse("translate=0") is None  # augments nothing
    for text, message in [
        ("rotate=10", "unknown augmentation 'rotate=10'.*flip, translate=F"),
        ("flip=1", "unknown augmentation 'flip=1'"),
        ("translate=a", "'a' is not a number"),
        ("translate=0.5", r"translate must lie in \[0, 0.5\)"),
        ("brightness=2", r"brightness must lie in \[0, 1\]"),
        ("translate", "augmentation 'translate' needs a value, translate=0.1 say"),
    ]:
        with pytest.raises(ValueError, match=message):
            Augmentation.parse(text)
    # a shift of a whole number of pixels, round(F x size): a fraction under half a pixel would shift nothing
    Augmentation(translate=0.02).check_image_shape((28, 28, 1))
    with pytest.raises(ValueError, match=r"translate=0.01 shifts 28x28 images by round\(0.01 x 28\) = 0 pixels: use "
                       r"translate > 0.0179"):
        Augmentation(translate=0.01).check_image_shape((28, 28, 1))
    with pytest.raises(DataError, match="augment translate=0.01: translate=0.01 shifts 28x28 images"):
        EpisodeSampler(load_dataset("fontglot").train, 5, 1, 1, augment=Augmentation(translate=0.01))
    assert RunConfig(augment="flip , translate=0.1").augment == "flip,translate=0.1"
    with pytest.raises(ConfigError, match="unknown augmentation"):
        RunConfig(augment="mirror")


def test_flip_mirrors_some_images_left_right_and_keeps_the_others():
    images = random_images()
    out = Augmentation(flip=True)(tf.constant(images), KEY).numpy()
    mirrored = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images, strict=True)]
    kept = [np.array_equal(o, i) for o, i in zip(out, images, strict=True)]
    assert all(m != k for m, k in zip(mirrored, kept, strict=True))
    assert 10 < sum(mirrored) < 38  # each with probability 1/2


@pytest.mark.parametrize("flip", [False, True])
def test_translate_moves_each_image_by_whole_pixels_within_the_fraction_zero_filled(flip):
    images = random_images()
    out = Augmentation(flip=flip, translate=0.2)(tf.constant(images), KEY).numpy()  # margins: 2 rows, 2 columns
    moves = []
    for image, result in zip(images, out, strict=True):
        matches = [
            (mirrored, dy, dx)
            for mirrored in ([False, True] if flip else [False])
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if np.array_equal(result, shifted(image[:, ::-1] if mirrored else image, dy, dx))
        ]
        assert len(matches) == 1, "every image is its original (mirrored or not) shifted within the margins"
        moves.append(matches[0])
    assert len({move[1:] for move in moves}) > 10  # drawn per image
    if flip:
        assert 10 < sum(move[0] for move in moves) < 38


def test_brightness_adds_one_clipped_value_per_image():
    images = random_images()
    out = Augmentation(brightness=0.1)(tf.constant(images), KEY).numpy().astype(int)
    for image, result in zip(images.astype(int), out, strict=True):
        inside = (result > 0) & (result < 255)
        deltas = np.unique(result[inside] - image[inside])
        assert len(deltas) == 1 and abs(deltas[0]) <= 26
        np.testing.assert_array_equal(result, np.clip(image + deltas[0], 0, 255))


def test_the_same_key_gives_the_same_images_and_another_key_others():
    images = tf.constant(random_images(shape=(28, 28, 1)))
    augmentation = Augmentation(flip=True, translate=0.1, brightness=0.1)
    first, again = augmentation(images, KEY).numpy(), augmentation(images, KEY).numpy()
    other = augmentation(images, tf.constant([3, 10], tf.int64)).numpy()
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_augmented_episodes_keep_their_classes_and_labels_and_resume_exactly():
    split = load_dataset("fontglot").train
    augmentation = Augmentation(flip=True, translate=0.1)
    plain = EpisodeSampler(split, 5, 1, 3, seed=4)
    augmented = EpisodeSampler(split, 5, 1, 3, seed=4, augment=augmentation)
    for index in (0, 7):
        for ids, same in zip(plain.indices(index), augmented.indices(index), strict=True):
            np.testing.assert_array_equal(ids, same)
        episode, reference = augmented.episode(index), plain.episode(index)
        assert not np.array_equal(episode["support_images"], reference["support_images"])
        for key in ("support_labels", "query_labels"):
            np.testing.assert_array_equal(episode[key], reference[key])
    stream = list(augmented.dataset(batch_size=2, num_episodes=6))
    fresh = EpisodeSampler(split, 5, 1, 3, seed=4, augment=augmentation)
    resumed = list(fresh.dataset(2, start_episode=2, num_episodes=4))
    for batch, again in zip(stream[1:], resumed, strict=True):
        for key in batch:
            np.testing.assert_array_equal(batch[key], again[key])


def test_train_augments_its_meta_training_episodes_only_and_keeps_the_setting_on_resume(
    tmp_path, data_dir, monkeypatch
):
    samplers = []
    original = EpisodeSampler.__init__

    def recording(self, dataset, *args, **kwargs):
        original(self, dataset, *args, **kwargs)
        samplers.append((dataset.num_classes, self.augment))

    monkeypatch.setattr(EpisodeSampler, "__init__", recording)
    run_dir = tmp_path / "run"
    result = run_cli(train_args(data_dir, run_dir, "--episodes", "2", "--augment", "translate=0.1,flip", "--xla"))
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["augment"] == "flip,translate=0.1"
    splits = load_dataset("folder", data_dir)
    used = {(classes, augment) for classes, augment in samplers}
    assert (splits.train.num_classes, Augmentation(flip=True, translate=0.1)) in used
    assert {augment for classes, augment in used if classes != splits.train.num_classes} == {None}
    refused = run_cli(train_args(data_dir, run_dir, "--episodes", "4", "--augment", "flip", "--resume"))
    assert refused.exit_code != 0 and "augment" in refused.output
    too_small = run_cli(train_args(data_dir, tmp_path / "small", "--episodes", "2", "--augment", "translate=0.01"))
    assert too_small.exit_code != 0 and "Traceback" not in too_small.output
    assert "--augment translate=0.01: translate=0.01 shifts 28x28 images by round(0.01 x 28) = 0 pixels" in (
        too_small.output
    )
    assert not (tmp_path / "small").exists()
