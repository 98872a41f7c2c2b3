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
