"""`metalstm adapt / export / predict` end to end (click's runner, in process) and their error messages."""

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from export_helpers import CLASSES, make_meta, write_support  # noqa: E402
from keras_metalstm.cli.main import main  # noqa: E402


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    make_meta().save(root / "meta.keras")
    write_support(root / "support")
    return root


@pytest.fixture(scope="module")
def adapted_file(workspace):
    out = workspace / "task.keras"
    result = run("adapt", workspace / "meta.keras", "--support", workspace / "support", "--out", out)
    assert result.exit_code == 0, result.output
    assert (
        f"adapted 5-way ({', '.join(sorted(CLASSES))}) on 10 support images with T=2 -> {out}"
        in result.output
    )
    return out


@pytest.fixture(scope="module")
def exported_dir(workspace, adapted_file):
    out = workspace / "saved_models" / "task"
    result = run("export", adapted_file, "--format", "both", "--out", out)
    assert result.exit_code == 0, result.output
    assert "parity OK" in result.output and f"-> {out / '1'} (saved_model.pb, model.onnx)" in result.output
    return out / "1"


def test_commands_are_in_the_metalstm_group():
    assert {"adapt", "export", "predict"} <= set(main.list_commands(None))


def test_predict_prints_class_and_probability_per_image_for_savedmodel_and_onnx(workspace, exported_dir):
    images = sorted((workspace / "support").glob("*/0.png"))
    text = run("predict", exported_dir, *images)
    assert text.exit_code == 0, text.output
    rows = [line.split() for line in text.stdout.strip().splitlines()]
    assert [row[0] for row in rows] == [str(p) for p in images]
    as_json = run("predict", exported_dir / "model.onnx", *images, "--json")
    assert as_json.exit_code == 0, as_json.output
    records = json.loads(as_json.stdout)
    assert [r["image"] for r in records] == [str(p) for p in images]
    for row, record in zip(rows, records, strict=True):
        assert row[1] == record["class_name"] and float(row[2]) == pytest.approx(
            record["probability"], abs=1e-4
        )
        logits = np.array(record["logits"])
        probabilities = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        assert record["probability"] == pytest.approx(probabilities.max(), abs=1e-5)
        assert record["class_name"] == sorted(CLASSES)[int(logits.argmax())]
    assert "predicted 5 image(s) with onnx model" in as_json.stderr


def test_predict_takes_a_folder_as_its_image_files_sorted(exported_dir, workspace, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for index, image in enumerate(sorted((workspace / "support").glob("*/0.png"))):
        (folder / f"{4 - index}.png").write_bytes(image.read_bytes())  # names sort unlike the classes
    (folder / ".hidden.png").write_bytes(image.read_bytes())
    (folder / "notes.txt").write_text("not an image")
    images = sorted(folder.glob("[0-9].png"))
    from_folder = run("predict", exported_dir, folder, "--json")
    from_files = run("predict", exported_dir, *images, "--json")
    assert from_folder.exit_code == 0 and from_files.exit_code == 0, from_folder.output + from_files.output
    assert json.loads(from_folder.stdout) == json.loads(from_files.stdout)
    assert [r["image"] for r in json.loads(from_folder.stdout)] == [str(p) for p in images]
    empty = tmp_path / "empty"
    empty.mkdir()
    refused = run("predict", exported_dir, empty)
    assert refused.exit_code == 1 and "holds no image files" in refused.output and "Traceback" not in refused.output


def test_predict_shows_a_bar_of_its_images_on_stderr_unless_told_not_to(exported_dir, workspace):
    images = sorted((workspace / "support").glob("*/0.png"))
    shown = run("predict", exported_dir, *images)
    hidden = run("predict", exported_dir, *images, "--no-progress")
    assert shown.exit_code == 0 and hidden.exit_code == 0, shown.output + hidden.output
    assert "predict: 100%" in shown.stderr and "5/5" in shown.stderr
    assert "predict:" not in hidden.stderr and hidden.stdout == shown.stdout


def test_predict_labelled_prints_each_true_class_and_the_accuracy_overall_and_per_class(
    exported_dir, workspace, tmp_path
):
    support = workspace / "support"
    files = sorted(support.glob("*/*.png"))
    plain = json.loads(run("predict", exported_dir, *files, "--json", "--no-progress").stdout)
    right = {name: 0 for name in CLASSES}
    for record, path in zip(plain, files, strict=True):
        right[path.parent.name] += record["class_name"] == path.parent.name
    expected = sum(right.values()) / len(files)
    text = run("predict", exported_dir, support, "--labelled", "--no-progress")
    assert text.exit_code == 0, text.output
    per_class = ", ".join(f"{name} {right[name]}/2" for name in sorted(CLASSES))
    assert f"accuracy {expected:.2%} ({sum(right.values())} of 10 images): {per_class}" in text.stdout
    assert "(true: alpha)" in text.stdout
    as_json = run("predict", exported_dir, support, "--labelled", "--json", "--no-progress")
    records = json.loads(as_json.stdout)
    assert [r["label"] for r in records] == [f.parent.name for f in files]
    assert [r["class_name"] for r in records] == [r["class_name"] for r in plain]
    assert f"accuracy {expected:.2%}" in as_json.stderr
    (tmp_path / "omega").mkdir()
    (tmp_path / "omega" / "0.png").write_bytes(files[0].read_bytes())
    unknown = run("predict", exported_dir, tmp_path, "--labelled")
    assert unknown.exit_code == 1 and "class folder(s) omega are not classes of the model" in unknown.output
    two = run("predict", exported_dir, support, support, "--labelled")
    assert two.exit_code == 1 and "--labelled takes one folder" in two.output


def test_predict_on_a_model_folder_uses_its_newest_version(exported_dir, workspace):
    image = next((workspace / "support").glob("*/0.png"))
    result = run("predict", exported_dir.parent, image)
    assert result.exit_code == 0, result.output
    assert f"savedmodel model {exported_dir}" in result.stderr


def test_predict_rejects_a_wrong_array_with_a_clear_message(exported_dir, tmp_path):
    np.save(tmp_path / "wrong.npy", np.zeros((2, 32, 32, 1), np.float32))
    result = run("predict", exported_dir, tmp_path / "wrong.npy")
    assert result.exit_code == 1
    assert "wrong.npy" in result.output and "takes (28, 28, 1)" in result.output


def test_export_defaults_to_saved_models_and_never_overwrites(adapted_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = run("export", adapted_file, "--format", "onnx", "--no-verify")
    assert first.exit_code == 0, first.output
    assert (tmp_path / "saved_models" / "task" / "1" / "model.onnx").is_file()
    again = run("export", adapted_file, "--format", "onnx", "--version", "1", "--no-verify")
    assert again.exit_code == 1 and "already exists" in again.output and "--force" in again.output
    forced = run("export", adapted_file, "--format", "onnx", "--version", "1", "--force", "--no-verify")
    assert forced.exit_code == 0, forced.output


def test_export_of_a_meta_learner_is_adapt_in_serving_savedmodel_only(workspace, tmp_path):
    result = run("export", workspace / "meta.keras", "--out", tmp_path / "meta")
    assert result.exit_code == 0, result.output
    assert "adapt-in-serving SavedModel of the 5-way meta-learner" in result.output
    assert (tmp_path / "meta" / "1" / "saved_model.pb").is_file()
    refused = run("export", workspace / "meta.keras", "--format", "onnx", "--out", tmp_path / "meta")
    assert refused.exit_code == 1 and "ONNX cannot represent" in refused.output


def test_predict_with_a_support_set_adapts_inside_the_meta_learners_savedmodel(workspace, exported_dir, tmp_path):
    """The adapt-in-serving SavedModel run as TensorFlow Serving runs it, from the command line: the predictions
    of `metalstm adapt` + `export` + `predict`, from one command."""
    assert run("export", workspace / "meta.keras", "--out", tmp_path / "meta").exit_code == 0
    images = sorted((workspace / "support").glob("*/*.png"))
    served = run("predict", tmp_path / "meta", *images, "--support", workspace / "support", "--json")
    assert served.exit_code == 0, served.output
    assert f"with adapt-in-serving savedmodel model {tmp_path / 'meta' / '1'}" in served.output
    expected = run("predict", exported_dir, *images, "--json")
    served_rows, expected_rows = json.loads(served.stdout), json.loads(expected.stdout)
    assert [row["class_name"] for row in served_rows] == [row["class_name"] for row in expected_rows]
    np.testing.assert_allclose(
        [row["logits"] for row in served_rows], [row["logits"] for row in expected_rows], atol=1e-4
    )
    without = run("predict", tmp_path / "meta", *images)
    assert without.exit_code == 1 and "give it a support set (--support DIR" in without.output
    misplaced = run("predict", exported_dir / "model.onnx", *images, "--support", workspace / "support")
    assert misplaced.exit_code == 1 and "leave --support out" in misplaced.output


def test_adapt_rejects_wrong_class_count_existing_output_and_bad_suffix(workspace, adapted_file, tmp_path):
    four = write_support(tmp_path / "four", classes=CLASSES[:4])
    result = run("adapt", workspace / "meta.keras", "--support", four, "--out", tmp_path / "x.keras")
    assert result.exit_code == 1 and "4 class folder(s)" in result.output and "5-way" in result.output
    assert not (tmp_path / "x.keras").exists()
    result = run("adapt", workspace / "meta.keras", "--support", workspace / "support", "--out", adapted_file)
    assert result.exit_code == 1 and "already exists" in result.output
    result = run(
        "adapt", workspace / "meta.keras", "--support", workspace / "support", "--out", tmp_path / "x.h5"
    )
    assert result.exit_code == 1 and ".keras" in result.output
    result = run("adapt", adapted_file, "--support", workspace / "support", "--out", tmp_path / "y.keras")
    assert result.exit_code == 1 and "not a meta-learner" in result.output
    (tmp_path / "a_file").write_text("in the way")
    # The output's folder is checked first: an adapted file is no meta-learner, but that is not reached.
    result = run("adapt", adapted_file, "--support", workspace / "support", "--out", tmp_path / "a_file" / "y.keras")
    assert result.exit_code == 1 and f"{tmp_path / 'a_file'} is a file, not a folder" in result.output


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny fontglot training run (`metalstm train`), the documented input of `metalstm adapt` (slow tests:
    training and loading a run take tens of seconds on 2 busy cores)."""
    run_dir = tmp_path_factory.mktemp("run") / "run"
    flags = ["--n-way", "5", "--k-shot", "1", "--query", "2", "--inner-steps", "2", "--hidden-units", "4"]
    flags += ["--filters", "4", "--episodes", "2", "--checkpoint-every", "2", "--validate-every", "2"]
    flags += ["--val-episodes", "1", "--log-every", "2", "--no-progress"]
    result = run("train", "--dataset", "fontglot", "--run-dir", run_dir, *flags)
    assert result.exit_code == 0, result.output
    return run_dir


@pytest.mark.slow
def test_adapt_accepts_a_training_run_folder(run_dir, workspace, tmp_path):
    out = tmp_path / "task.keras"
    result = run("adapt", run_dir, "--support", workspace / "support", "--out", out)
    assert result.exit_code == 0, result.output
    assert "adapted 5-way" in result.output and out.is_file()


@pytest.mark.slow
def test_quickstart_export_hook_adapts_exports_and_predicts(run_dir, tmp_path):
    from keras_metalstm.export import quickstart_export

    description = quickstart_export(run_dir, tmp_path / "export")
    assert "parity OK" in description and "adapt-in-serving SavedModel" in description
    assert (tmp_path / "export" / "adapted.keras").is_file()
    assert (tmp_path / "export" / "saved_models" / "task" / "1" / "model.onnx").is_file()
    assert (tmp_path / "export" / "saved_models" / "metalstm" / "1" / "saved_model.pb").is_file()
    assert len(list((tmp_path / "export" / "support").iterdir())) == 5
