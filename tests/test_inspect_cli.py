"""`metalstm inspect RUN_DIR` on a tiny run of a user's own learner (`--learner module:function`, not conv4): the
figures, trace.json named by the learner's variables, the text, and one-line errors."""

import json
import sys

import pytest
from cli_helpers import TINY_FLAGS, make_image_folder, run_cli
from PIL import Image

from keras_metalstm.inner_loop_trace import layer_of
from keras_metalstm.runs import load_meta_learner

MODULE = "inspect_test_models"
FACTORY = """
import keras


def small(input_shape, num_classes):
    images = keras.Input(shape=input_shape)
    features = keras.layers.Conv2D(3, 3, strides=2, name="stem")(images)
    features = keras.layers.LayerNormalization(name="norm")(features)
    features = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(features))
    return keras.Model(images, keras.layers.Dense(num_classes, name="head")(features))
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 2-episode run of `small`, trained where its module is importable (inspect then needs only the run)."""
    root = tmp_path_factory.mktemp("inspect")
    (root / f"{MODULE}.py").write_text(FACTORY)
    data_dir = make_image_folder(root / "data")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.syspath_prepend(str(root))
        result = run_cli(
            [
                "train",
                "--dataset",
                "folder",
                "--data-dir",
                data_dir,
                "--run-dir",
                root / "run",
                *TINY_FLAGS,
                "--no-deterministic",
                "--episodes",
                "2",
                "--checkpoint-every",
                "2",
                "--validate-every",
                "2",
                "--learner",
                f"{MODULE}:small",
            ]
        )
    sys.modules.pop(MODULE, None)
    assert result.exit_code == 0, result.output
    return root / "run"


def test_inspect_writes_figures_and_a_trace_named_by_the_learners_variables(run_dir, tmp_path):
    out = tmp_path / "inspection"
    result = run_cli(["inspect", run_dir, "--episodes", "2", "--out", out, "--no-progress"])
    assert result.exit_code == 0, result.output

    _, meta = load_meta_learner(run_dir)
    paths = [variable.path for variable in meta.learner.trainable_variables]
    layers = list(dict.fromkeys(layer_of(path) for path in paths))
    assert layers == ["stem", "norm", "head"]
    trace = json.loads((out / "trace.json").read_text())
    assert [variable["name"] for variable in trace["variables"]] == paths
    assert [layer["name"] for layer in trace["layers"]] == layers
    assert sum(layer["size"] for layer in trace["layers"]) == meta.num_parameters
    steps = trace["inner_steps"]
    assert steps == 2 and trace["episodes"] == 2 and trace["split"] == "test"
    for layer in trace["layers"]:
        for gate in ("input_gate", "forget_gate"):
            statistics = layer[gate]
            assert all(len(statistics[key]) == steps for key in ("mean", "p10", "median", "p90"))
            assert all(
                0 <= p10 <= median <= p90 <= 1
                for p10, median, p90 in zip(
                    statistics["p10"], statistics["median"], statistics["p90"], strict=True
                )
            )
    support = trace["support"]
    assert support["steps"] == [0, 1, 2]
    assert support["sgd"]["learning_rate"] in [float(rate) for rate in support["sgd_grid"]]
    assert len(support["meta_learner"]["loss"]["mean"]) == len(support["sgd"]["accuracy"]["ci95"]) == 3

    with Image.open(out / "gates.png") as image:
        assert image.format == "PNG" and image.size[1] > 3 * 200  # a row of panels per layer
    with Image.open(out / "inner_loss.png") as image:
        assert image.format == "PNG" and image.size[0] > 500
    for layer in layers:
        assert f"layer {layer}: learning rate median" in result.output
    assert "plain SGD at the best fixed learning rate" in result.output
    assert f"inspected {run_dir} (best checkpoint) on 2 test episodes" in result.output
    assert trace["summary"] in result.output

    as_json = run_cli(["inspect", run_dir, "--episodes", "1", "--out", out, "--json", "--no-progress"])
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.output)["variables"][0]["name"] == paths[0]
    assert json.loads((out / "trace.json").read_text())["episodes"] == 1


def test_inspect_errors_are_one_line(run_dir, tmp_path):
    for args, message in (
        ([tmp_path / "missing"], "does not exist"),
        ([run_dir, "--episodes", "0"], "--episodes must be at least 1"),
    ):
        result = run_cli(["inspect", *args, "--no-progress"])
        assert result.exit_code != 0 and message in result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1

    no_checkpoint = tmp_path / "fresh"
    no_checkpoint.mkdir()
    for name in ("config.yaml", "learner.json"):
        (no_checkpoint / name).write_bytes((run_dir / name).read_bytes())
    result = run_cli(["inspect", no_checkpoint, "--no-progress"])
    assert result.exit_code != 0 and "holds no checkpoint" in result.output
    assert not (no_checkpoint / "inspection").exists()
