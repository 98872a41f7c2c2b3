"""The figures: curves.png's data-scaled validation axis and baseline lines, gates.png and inner_loss.png, and the
baselines read from a run's saved evaluation reports."""

import json
import os

import numpy as np
from PIL import Image

from keras_metalstm.config import RunConfig
from keras_metalstm.evaluation import saved_baselines
from keras_metalstm.plots import (
    GATE_PANEL_HEIGHT,
    HEADER,
    HEIGHT,
    SERIES_COLOURS,
    VAL_COLOUR,
    WIDTH,
    data_range,
    plot_gates,
    plot_inner_loss,
    plot_training_curves,
)

ROWS = [
    *(
        {"kind": "train", "episode": e, "loss": 1.0 - e / 200, "accuracy": 0.5 + e / 400}
        for e in range(10, 110, 10)
    ),
    *({"kind": "val", "episode": e, "accuracy": a, "ci95": 0.004} for e, a in ((50, 0.905), (100, 0.915))),
]
BASELINE = {"label": "Baseline fine-tune (authors)", "accuracy": 0.91, "split": "test", "episodes": 600}


def pixels_of(path, colour, box):
    """(rows, columns) of the pixels of exactly `colour` inside `box` (left, top, right, bottom)."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("RGB").crop(box))
    return np.nonzero(np.all(pixels == colour, axis=-1))


def test_data_range_fits_the_data_within_bounds():
    low, high = data_range([0.9998, 0.9999], 0.0, 1.0)
    assert 0.9997 < low < 0.9998 and 0.9999 < high <= 1.0  # a fixed 0-1 axis would flatten these
    low, high = data_range([1.0, 1.0], 0.0, 1.0, minimum_span=0.02)  # a constant series at the bound
    assert high == 1.0 and 0.97 < low < 0.99
    assert data_range([float("nan"), 2.0, 4.0], lower=0.0) == (1.9, 4.1)
    assert data_range([]) == (0.0, 1.0)


def test_validation_axis_is_scaled_to_the_data_and_baselines_are_lines(tmp_path):
    path = plot_training_curves(ROWS, tmp_path / "curves.png", baselines=[BASELINE])
    with Image.open(path) as image:
        assert image.size == (WIDTH, HEIGHT)
    validation_panel = (2 * WIDTH // 3, 0, WIDTH, HEIGHT)
    rows, _ = pixels_of(path, VAL_COLOUR, validation_panel)
    # One point of accuracy apart, the two validation points are far apart on the axis (a 0-1 axis: 3 pixels).
    assert rows.max() - rows.min() > HEIGHT / 4
    rows, _ = pixels_of(path, SERIES_COLOURS[1], validation_panel)
    line_row = np.bincount(rows).argmax()
    assert np.sum(rows == line_row) > WIDTH / 3 * 0.4  # dashed, across the panel
    with Image.open(path) as image:  # its label just above it, in its colour (anti-aliased: orange-ish)
        above = np.asarray(
            image.convert("RGB").crop((2 * WIDTH // 3, line_row - 14, WIDTH, line_row - 1)), int
        )
    assert np.sum(above[..., 0] - above[..., 2] > 60) > 50

    plain = plot_training_curves(ROWS, tmp_path / "plain.png")
    assert pixels_of(plain, SERIES_COLOURS[1], validation_panel)[0].size == 0


def test_gates_and_inner_loss_figures(tmp_path):
    steps = 4
    statistics = {"p10": [0.01] * steps, "median": [0.02, 0.03, 0.03, 0.04], "p90": [0.05] * steps}
    forget = {"p10": [0.9990] * steps, "median": [0.9995] * steps, "p90": [0.9999] * steps}
    layers = [
        {"name": name, "input_gate": statistics, "forget_gate": forget} for name in ("conv1", "bn1", "logits")
    ]
    with Image.open(plot_gates(layers, tmp_path / "gates.png")) as image:
        assert image.format == "PNG" and image.size[1] == HEADER + 3 * GATE_PANEL_HEIGHT

    curve = {"mean": [1.5, 1.0, 0.6, 0.4, 0.3], "ci95": [0.1] * 5}
    accuracy = {"mean": [0.2, 0.5, 0.7, 0.9, 1.0], "ci95": [0.05] * 5}
    curves = [
        {"label": "meta-learner", "loss": curve, "accuracy": accuracy},
        {"label": "plain SGD", "loss": curve, "accuracy": {"mean": [float("nan")] * 5, "ci95": [0.0] * 5}},
    ]
    path = plot_inner_loss(list(range(5)), curves, tmp_path / "inner_loss.png", note="4 test episodes")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (WIDTH, HEIGHT + HEADER)
    assert pixels_of(path, SERIES_COLOURS[0], (0, 0, WIDTH, HEIGHT + HEADER))[0].size > 100
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary file left


def test_saved_baselines_come_from_the_runs_own_data_and_the_most_episodes(tmp_path):
    RunConfig(dataset="fontglot").save(tmp_path / "config.yaml")
    reports = tmp_path / "evaluation"
    reports.mkdir()

    def report(name, dataset, split, episodes, finetune, data_dir=None):
        results = {
            "meta_lstm": {"mean": 95.0, "ci95": 1.0, "episodes": episodes},
            "finetune_authors": {"mean": finetune, "ci95": 1.0, "episodes": episodes, "protocol": "authors"},
        }
        content = {"results": results, "dataset": dataset, "data_dir": data_dir, "split": split}
        (reports / name).write_text(json.dumps(content))

    report("long.json", "fontglot", "test", 600, 91.5)
    report("short.json", "fontglot", "test", 100, 80.0)
    report("cross.json", "omniglot", "test", 1000, 50.0)
    report("folder.json", "fontglot", "test", 1000, 30.0, data_dir=str(tmp_path / "my_fonts"))
    report("all.json", "fontglot", "all", 2000, 40.0)
    (reports / "broken.json").write_text("{")
    incomplete = {"results": {"finetune_authors": {"mean": 99.0}}, "dataset": "fontglot", "split": "test"}
    (reports / "incomplete.json").write_text(json.dumps(incomplete))
    assert saved_baselines(tmp_path) == [
        {
            "method": "finetune_authors",
            "label": "Baseline fine-tune (authors)",
            "accuracy": 0.915,
            "split": "test",
            "episodes": 600,
        }
    ]
    assert saved_baselines(tmp_path / "no-run") == []
