"""The user's path on real data: adapt on fontglot meta-test classes given as image folders, export, predict the
held-out query images of those classes; the exports score exactly what `evaluate` (test mode) scores."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras_metalstm as km  # noqa: E402
from keras_metalstm import export  # noqa: E402
from keras_metalstm.data import EpisodeSampler, load_dataset  # noqa: E402

N_WAY, K_SHOT, QUERY = 5, 1, 5


@pytest.fixture(scope="module")
def test_split():
    return load_dataset("fontglot").test


def write_episode(sampler, index, root):
    """Episode `index` as the user would have it: support/<label>-<codepoint>/*.png and query/*.png files."""
    class_ids, image_ids = (t.numpy() for t in sampler.indices(index))
    split = sampler.source_dataset
    names = [f"{label}-{split.class_names[c].split()[0]}" for label, c in enumerate(class_ids)]
    support, query = Path(root) / "support", Path(root) / "query"
    query.mkdir(parents=True)
    query_files, query_labels = [], []
    for label, ids in enumerate(image_ids):
        (support / names[label]).mkdir(parents=True)
        for shot, image_id in enumerate(ids):
            image = Image.fromarray(split.images[image_id][..., 0], mode="L")
            if shot < K_SHOT:
                image.save(support / names[label] / f"{shot}.png")
            else:
                path = query / f"{label}-{shot}.png"
                image.save(path)
                query_files.append(path)
                query_labels.append(label)
    return support, query_files, np.array(query_labels), names


def evaluate_accuracy(meta, sampler, index):
    """What `evaluate` scores for one episode: test-mode query accuracy of the meta-learner."""
    episode = {key: value[None] for key, value in sampler.episode(index).items()}
    _, accuracy = meta.episode_metrics(episode, mode="test")
    return float(accuracy.numpy()[0]), episode


def check_exports_match_evaluate(meta, split, episodes, tmp_path, seed=11):
    sampler = EpisodeSampler(split, N_WAY, K_SHOT, QUERY, seed=seed)
    scores = []
    for index in range(episodes):
        expected, episode = evaluate_accuracy(meta, sampler, index)
        support, query_files, labels, names = write_episode(sampler, index, tmp_path / f"ep{index}")
        adapted = export.adapt_folder(meta, support)
        assert list(adapted.class_names) == names
        result = export.export_adapted(adapted, tmp_path / f"ep{index}" / "model", format="both")
        assert result.parity.ok
        images, _ = export.read_images(query_files, adapted.image_shape)
        np.testing.assert_array_equal(images, episode["query_images"][0])  # the files hold the same pixels
        for path in (result.path, result.path / "model.onnx"):
            outputs = export.load_predictor(path).predict(images)
            accuracy = float(np.mean(outputs["class_ids"] == labels))
            assert accuracy == pytest.approx(expected, abs=1e-6), (path, index)
            assert list(outputs["class_names"]) == [names[i] for i in outputs["class_ids"]]
        scores.append(expected)
    return scores


@pytest.mark.parametrize("query_statistics", ["query", "support"])
def test_exports_of_fontglot_adaptations_score_what_evaluate_said(test_split, tmp_path, query_statistics):
    import keras

    keras.utils.set_random_seed(0)
    meta = km.MetaLearner(
        km.learners.conv4(input_shape=(28, 28, 1), num_classes=N_WAY, filters=8),
        inner_steps=3,
        query_statistics=query_statistics,
    )
    check_exports_match_evaluate(meta, test_split, episodes=2, tmp_path=tmp_path)


@pytest.mark.slow
def test_briefly_meta_trained_fontglot_export_beats_chance_and_matches_evaluate(test_split, tmp_path):
    import keras

    from keras_metalstm.data import episode_dataset

    keras.utils.set_random_seed(0)
    splits = load_dataset("fontglot")
    meta = km.MetaLearner(
        km.learners.conv4(input_shape=(28, 28, 1), num_classes=N_WAY, filters=16), inner_steps=3
    )
    trainer = km.MetaTrainer(meta)
    for batch in episode_dataset(splits.train, N_WAY, K_SHOT, QUERY, batch_size=2, seed=0).take(60):
        trainer.train_step(batch)
    scores = check_exports_match_evaluate(meta, test_split, episodes=10, tmp_path=tmp_path)
    assert np.mean(scores) > 1.5 / N_WAY
