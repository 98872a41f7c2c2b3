"""Episode sampler: contract shapes, sampling statistics, determinism and resume, bad settings."""

import numpy as np
import pytest
import tensorflow as tf

from keras_metalstm.data import ClassIndexedDataset, DataError, EpisodeSampler, episode_dataset, load_fontglot

NUM_CLASSES = 12


def identity_dataset(num_classes=NUM_CLASSES, sizes=None):
    """Each image's pixels encode its global index, so an episode can be traced back to classes and images."""
    sizes = [20 + (c % 5) for c in range(num_classes)] if sizes is None else sizes
    total = sum(sizes)
    index = np.arange(total)
    images = np.zeros((total, 2, 2, 1), np.uint8)
    images[:, 0, 0, 0] = index // 256
    images[:, 0, 1, 0] = index % 256
    images[:, 1, 1, 0] = 255
    names = [f"class{c:02d}" for c in range(num_classes)]
    return ClassIndexedDataset(images, sizes, names, name="identity")


def image_ids(images):
    """Global image index of each image of a float (..., 2, 2, 1) batch."""
    pixels = np.round(np.asarray(images) * 255).astype(np.int64)
    return pixels[..., 0, 0, 0] * 256 + pixels[..., 0, 1, 0]


def class_of(dataset, ids):
    return np.searchsorted(dataset.class_starts, ids, side="right") - 1


def take(pipeline, count):
    return [{k: v.numpy() for k, v in batch.items()} for batch in pipeline.take(count)]


def test_batch_matches_the_episode_contract():
    dataset = identity_dataset()
    pipeline = episode_dataset(dataset, n_way=5, k_shot=2, q_query=3, batch_size=4, seed=1)
    spec = pipeline.element_spec
    assert set(spec) == {"support_images", "support_labels", "query_images", "query_labels"}
    assert spec["support_images"].shape == (4, 10, 2, 2, 1) and spec["support_images"].dtype == tf.float32
    assert spec["support_labels"].shape == (4, 10) and spec["support_labels"].dtype == tf.int32
    assert spec["query_images"].shape == (4, 15, 2, 2, 1) and spec["query_images"].dtype == tf.float32
    assert spec["query_labels"].shape == (4, 15) and spec["query_labels"].dtype == tf.int32
    batch = take(pipeline, 1)[0]
    assert batch["support_images"].min() >= 0.0 and batch["support_images"].max() <= 1.0
    assert batch["support_images"].max() == 1.0  # pixel (1, 1) is 255 -> exactly 1.0
    # Class-major labels: K copies of 0, then of 1, ...
    np.testing.assert_array_equal(batch["support_labels"][0], np.repeat(np.arange(5), 2))
    np.testing.assert_array_equal(batch["query_labels"][0], np.repeat(np.arange(5), 3))


def test_batch_size_one_keeps_the_batch_axis():
    spec = episode_dataset(identity_dataset(), 3, 1, 1, batch_size=1).element_spec
    assert spec["support_images"].shape == (1, 3, 2, 2, 1)
    assert spec["query_labels"].shape == (1, 3)


def test_episodes_are_valid_n_way_k_shot_q_query_tasks():
    dataset = identity_dataset()
    n, k, q = 5, 3, 4
    for batch in take(episode_dataset(dataset, n, k, q, batch_size=8, seed=3), 10):
        for b in range(8):
            support_ids = image_ids(batch["support_images"][b])
            query_ids = image_ids(batch["query_images"][b])
            support_classes = class_of(dataset, support_ids)
            query_classes = class_of(dataset, query_ids)
            # every image of one label comes from one class, and labels map to N distinct classes
            label_class = {}
            for label, cls in zip(batch["support_labels"][b], support_classes, strict=True):
                assert label_class.setdefault(label, cls) == cls
            assert sorted(label_class) == list(range(n))
            assert len(set(label_class.values())) == n
            # query images carry the same label -> class mapping, Q per class, K per class in support
            for label, cls in zip(batch["query_labels"][b], query_classes, strict=True):
                assert label_class[label] == cls
            assert np.bincount(batch["support_labels"][b], minlength=n).tolist() == [k] * n
            assert np.bincount(batch["query_labels"][b], minlength=n).tolist() == [q] * n
            # all N*(K+Q) images are distinct: support and query never share an image
            all_ids = np.concatenate([support_ids, query_ids])
            assert len(set(all_ids.tolist())) == n * (k + q)


def test_classes_and_labels_are_drawn_uniformly():
    dataset = identity_dataset()
    n, episodes = 4, 1200
    sampler = EpisodeSampler(dataset, n, 1, 1, seed=7)
    class_count = np.zeros(NUM_CLASSES)
    label_of_class = np.zeros((NUM_CLASSES, n))
    first_images = np.zeros(dataset.class_sizes[0])
    all_class_ids, all_ids = next(iter(tf.data.Dataset.range(episodes).map(sampler.indices).batch(episodes)))
    for class_ids, ids in zip(all_class_ids.numpy(), all_ids.numpy(), strict=True):
        class_count[class_ids] += 1
        label_of_class[class_ids, np.arange(n)] += 1
        for row, c in enumerate(class_ids):
            if c == 0:
                first_images[ids[row, 0] - dataset.class_starts[0]] += 1
    expected = episodes * n / NUM_CLASSES  # 400 per class
    assert np.all(np.abs(class_count - expected) < 0.2 * expected), class_count
    # random relabelling: each class gets each label about equally often (100 expected)
    assert np.all(np.abs(label_of_class - expected / n) < 0.45 * expected / n), label_of_class
    # every image of class 0 gets picked as a support image
    assert np.all(first_images > 0)


def test_same_seed_same_episodes_other_seed_other_episodes():
    dataset = identity_dataset()
    a = take(episode_dataset(dataset, 5, 1, 2, batch_size=2, seed=11), 5)
    b = take(episode_dataset(dataset, 5, 1, 2, batch_size=2, seed=11), 5)
    c = take(episode_dataset(dataset, 5, 1, 2, batch_size=2, seed=12), 5)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["support_images"], y["support_images"])
        np.testing.assert_array_equal(x["query_images"], y["query_images"])
    assert any(not np.array_equal(x["query_images"], z["query_images"]) for x, z in zip(a, c, strict=True))


def test_resume_from_episode_i_continues_the_same_stream():
    dataset = identity_dataset()
    full = take(episode_dataset(dataset, 5, 2, 3, batch_size=1, seed=5), 12)
    resumed = take(episode_dataset(dataset, 5, 2, 3, batch_size=1, seed=5, start_episode=7), 5)
    for x, y in zip(full[7:], resumed, strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    # the stream does not depend on the batch size either: batches of 3 starting at episode 3
    batched = take(episode_dataset(dataset, 5, 2, 3, batch_size=3, seed=5, start_episode=3), 3)
    for j, batch in enumerate(batched):
        for i in range(3):
            np.testing.assert_array_equal(batch["query_images"][i], full[3 + 3 * j + i]["query_images"][0])


def test_num_episodes_is_finite_and_must_fill_batches():
    dataset = identity_dataset()
    assert len(take(episode_dataset(dataset, 3, 1, 1, batch_size=4, num_episodes=12), 100)) == 3
    with pytest.raises(DataError, match="multiple of batch_size"):
        episode_dataset(dataset, 3, 1, 1, batch_size=4, num_episodes=10)
    with pytest.raises(DataError, match="batch_size must be >= 1"):
        episode_dataset(dataset, 3, 1, 1, batch_size=0)


@pytest.mark.parametrize(
    "settings, name",
    [
        ({"k_shot": 1.5}, "k_shot"),
        ({"n_way": 5.0}, "n_way"),
        ({"q_query": True}, "q_query"),
        ({"batch_size": 2.5}, "batch_size"),
    ],
)
def test_counts_that_are_not_whole_numbers_are_refused_not_truncated(settings, name):
    episode_settings = {"n_way": 3, "k_shot": 1, "q_query": 1, **settings}
    with pytest.raises(DataError, match=rf"{name} must be a whole number, got {settings[name]!r}"):
        episode_dataset(identity_dataset(), **episode_settings)
    # numpy's integers are whole numbers
    episode = take(episode_dataset(identity_dataset(), np.int64(3), np.int32(2), 1), 1)[0]
    assert episode["support_images"].shape[:2] == (1, 3 * 2)


def test_a_seed_out_of_int64_or_not_a_split_is_refused_with_the_fix():
    """A seed of 2**70 failed inside tf.data's trace, "a" in int(), 1.5 was truncated; the splits object given for
    one split failed with an AttributeError."""
    for seed, message in ((2**70, r"seed must lie in 0\.\.2\*\*63 - 1"), (-1, r"seed must lie in 0\.\."),
                          ("a", r"seed must be a whole number, got 'a'"), (1.5, r"seed must be a whole number")):
        with pytest.raises(DataError, match=message):
            episode_dataset(identity_dataset(), 3, 1, 1, seed=seed)
    splits = identity_dataset().split((0.5, 0.25, 0.25), seed=0)
    with pytest.raises(DataError, match=r"got DatasetSplits: pass splits\.train, splits\.val or splits\.test"):
        episode_dataset(splits, 3, 1, 1)


def test_n_larger_than_the_split_is_refused():
    with pytest.raises(DataError, match=r"20-way episodes need at least 20 classes but identity has 12"):
        episode_dataset(identity_dataset(), 20, 1, 1)


def test_class_with_too_few_images_is_named_with_counts():
    sizes = [20] * NUM_CLASSES
    sizes[4] = 5
    dataset = identity_dataset(sizes=sizes)
    with pytest.raises(
        DataError,
        match=r"class 'class04' of identity has 5 images but 1-shot episodes with 15 "
        r"queries need K\+Q = 16",
    ):
        episode_dataset(dataset, 5, 1, 15)
    # the suggested fix works
    assert dataset.with_min_images(16).num_classes == NUM_CLASSES - 1
    episode_dataset(dataset.with_min_images(16), 5, 1, 15)


def test_fontglot_episodes_are_float_images_in_unit_range():
    fontglot = load_fontglot().subset(load_fontglot().class_names[:50])
    batch = take(episode_dataset(fontglot, 5, 5, 15, batch_size=2, seed=0), 1)[0]
    assert batch["support_images"].shape == (2, 25, 28, 28, 1)
    assert batch["query_images"].shape == (2, 75, 28, 28, 1)
    assert batch["support_images"].dtype == np.float32
    assert 0.0 <= batch["query_images"].min() and batch["query_images"].max() <= 1.0
    # glyphs are white on black: mostly dark pixels, some bright ones
    assert 0.02 < batch["support_images"].mean() < 0.5 and batch["support_images"].max() > 0.9


def test_the_episode_pipelines_run_without_tf_datas_autotuning_thread():
    # Deleting an iterator over an autotuned pipeline waits for tf.data's tuning thread, seconds to a minute after
    # the last element (keras_metalstm/data/pipelines.py; benchmarks/episodes.py --teardown measures it).
    from keras_metalstm.distribute import distributed_episodes

    dataset = identity_dataset()
    pipelines = {
        "episode_dataset": episode_dataset(dataset, 5, 1, 3, num_episodes=4),
        "endless episode_dataset": episode_dataset(dataset, 5, 1, 3, batch_size=2),
        "distributed_episodes": distributed_episodes(
            tf.distribute.get_strategy(), dataset, 5, 1, 3, global_batch=2, num_episodes=4
        ),
    }
    assert {name: pipeline.options().autotune.enabled for name, pipeline in pipelines.items()} == dict.fromkeys(
        pipelines, False
    )
    # ... and the episodes are the ones the pipeline gives with the tuning on.
    default = tf.data.Options()
    default.autotune.enabled = True
    tuned = take(pipelines["episode_dataset"].with_options(default), 4)
    for shipped, reference in zip(take(pipelines["episode_dataset"], 4), tuned, strict=True):
        assert all(np.array_equal(shipped[key], reference[key]) for key in shipped)
