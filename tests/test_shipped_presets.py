"""The meta-learners shipped inside the package: both are listed and load by name from the installed files, are
good on new fontglot tasks, and are the runs whose numbers the README's results table reports."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras_metalstm as km  # noqa: E402
from keras_metalstm import presets  # noqa: E402
from keras_metalstm.data import episode_dataset, load_dataset  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"
SHIPPED = {"fontglot_5way_1shot": 1, "fontglot_5way_5shot": 5}
# Least query accuracy on fresh test episodes, well below what each card reports (96.6 / 98.9 %).
AT_LEAST = {"fontglot_5way_1shot": 0.85, "fontglot_5way_5shot": 0.93}
# The README's results table: its first column names a report's method, its columns the 1-shot and 5-shot presets.
TABLE_ROWS = {
    "Baseline pixel nearest neighbour (authors)": "pixel_nearest_neighbour",
    "Baseline nearest neighbour (authors: cosine)": "nearest_neighbour_authors",
    "Baseline fine-tune (authors)": "finetune_authors",
    "Baseline nearest neighbour (ours: Euclidean)": "nearest_neighbour",
    "Baseline fine-tune (ours)": "finetune",
    "Baseline++ (cosine classifier)": "baseline_plus",
    "Meta-Learner LSTM (our recipe)": "meta_lstm",
}


def shipped_report(name):
    """The evaluation report a preset ships (REPORT_FILE), as `metalstm evaluate` saved it."""
    return json.loads((presets.preset_dir(name) / presets.REPORT_FILE).read_text(encoding="utf-8"))


def readme_results_table():
    """{row label: [1-shot cell, 5-shot cell]} of the table under the README's "## Results" heading."""
    section = README.read_text(encoding="utf-8").split("\n## Results\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 3 and not set(cells[1]) <= set("-"):
            rows[cells[0]] = [cell.replace("*", "") for cell in cells[1:]]
    return rows


def test_both_presets_ship_in_the_package_and_are_listed():
    assert set(SHIPPED) <= set(km.list_presets())
    for name, k_shot in SHIPPED.items():
        folder = presets.preset_dir(name)
        assert folder.parent == presets.PACKAGE_PRESETS
        assert {path.name for path in folder.iterdir()} >= set(presets.PRESET_FILES)
        report = presets.read_info(name)["evaluation"]
        assert report["results"]["meta_lstm"]["episodes"] == 600
        card = (folder / presets.MODEL_CARD_FILE).read_text(encoding="utf-8")
        assert f"5-way {k_shot}-shot" in card


def test_the_readme_results_table_is_the_presets_reports():
    table = readme_results_table()
    assert set(TABLE_ROWS) <= set(table), sorted(table)
    for label, method in TABLE_ROWS.items():
        for cell, name in zip(table[label], SHIPPED, strict=True):
            result = shipped_report(name)["results"].get(method)
            expected = f"{result['mean']:.2f} +- {result['ci95']:.2f}" if result else "-"  # "-": not measured
            assert cell == expected, (label, name)
    # the paired row: Meta-LSTM minus the strongest baseline of each column, as the preset's report saved it
    paired = next(cells for label, cells in table.items() if label.startswith("Meta-LSTM minus"))
    for cell, name in zip(paired, SHIPPED, strict=True):
        saved = shipped_report(name)
        baselines = [method for method in saved["results"] if method != "meta_lstm"]
        expected = "-"
        if baselines:
            difference = saved["paired_differences"][max(baselines, key=lambda m: saved["results"][m]["mean"])]
            expected = f"{difference['mean']:+.2f} +- {difference['ci95']:.2f}"
        assert re.sub(r"\s*\(.*\)", "", cell) == expected, name


@pytest.mark.parametrize(("name", "k_shot"), SHIPPED.items())
def test_a_shipped_preset_is_accurate_on_new_fontglot_tasks(name, k_shot):
    """10 test episodes (unseen classes, a seed the reports did not use): the preset's query accuracy is near
    the accuracy its card reports (96-98 %), where chance is 20 %."""
    meta = km.MetaLearner.from_preset(name)
    splits = load_dataset("fontglot")
    episodes = next(iter(episode_dataset(splits.test, 5, k_shot, 15, batch_size=10, seed=77, num_episodes=10)))
    predictions = np.argmax(meta(episodes, mode="test").numpy(), axis=-1)
    accuracy = float(np.mean(predictions == episodes["query_labels"].numpy()))
    assert accuracy >= AT_LEAST[name], accuracy


def test_adapting_a_preset_on_another_number_of_images_per_class_warns_with_both():
    """fontglot_5way_1shot learned to adapt from 1 image per class: a balanced support set of 2 adapts, and says
    that the update rule and the reported accuracy are for 1; its own K adapts silently."""
    import warnings

    from keras_metalstm import export

    meta, provenance = presets.load_path_or_preset("fontglot_5way_1shot", export.load_meta_learner)
    assert provenance == {"preset": "fontglot_5way_1shot", "trained_k_shot": 1}
    split = load_dataset("fontglot").test
    names = split.class_names[:5]
    for per_class in (2, 1):
        images = np.concatenate([split[name][:per_class] for name in names]).astype(np.float32) / 255
        labels = np.repeat(np.arange(5), per_class)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            export.adapt(meta, images, labels, names, info=provenance)
        said = [str(w.message) for w in caught if "images per class" in str(w.message)]
        if per_class == 2:
            assert said == [
                "keras_metalstm: the support set has 2 images per class, and the meta-learner was meta-trained on "
                "1-shot episodes: it adapts, but its update rule and its measured accuracy are for 1-shot tasks. "
                "Give each class 1 image(s), or use a meta-learner trained for 2-shot tasks."
            ]
        else:
            assert said == []


def test_a_run_folders_provenance_names_the_k_it_was_trained_on(tmp_path):
    (tmp_path / "config.yaml").write_text("k_shot: 3\n")
    loaded, provenance = presets.load_path_or_preset(str(tmp_path), lambda path: "meta-learner")
    assert loaded == "meta-learner" and provenance == {"run": str(tmp_path), "trained_k_shot": 3}
    model_file = tmp_path / "meta.keras"  # a file: no run config beside it, no K
    model_file.write_bytes(b"")
    assert presets.load_path_or_preset(str(model_file), lambda path: None)[1] == {"run": str(model_file)}
