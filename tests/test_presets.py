"""Ready-made meta-learners: a tiny fontglot run packaged as a preset (into a temporary preset folder, never the
package's), loaded by name offline, adapted on a folder of PNGs, exported with parity, used by `metalstm adapt`;
the model card quotes the run's report; setup.py ships the preset files."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from export_helpers import CLASSES, write_support  # noqa: E402
from keras_metalstm.cli.main import main  # noqa: E402

import keras_metalstm as km  # noqa: E402
from keras_metalstm import export, presets  # noqa: E402

NAME = "fontglot_tiny"
REPOSITORY = Path(__file__).resolve().parents[1]
# 5-way 1-shot on fontglot as the real presets, everything else as small as it goes.
TINY_TRAINING = [
    "--dataset", "fontglot", "--n-way", "5", "--k-shot", "1", "--query", "2", "--inner-steps", "2",
    "--hidden-units", "4", "--filters", "4", "--episodes", "2", "--checkpoint-every", "2", "--validate-every", "2",
    "--val-episodes", "1", "--log-every", "2", "--no-progress",
]


def run(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny fontglot run (`metalstm train`) with its evaluation report (`metalstm evaluate`)."""
    run_dir = tmp_path_factory.mktemp("run") / "run"
    trained = run("train", "--run-dir", run_dir, *TINY_TRAINING)
    assert trained.exit_code == 0, trained.output
    evaluated = run("evaluate", run_dir, "--episodes", "2", "--no-progress")
    assert evaluated.exit_code == 0, evaluated.output
    return run_dir


@pytest.fixture(scope="module")
def preset_root(run_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("presets")
    folder = presets.save_preset(run_dir, NAME, out_dir=root)
    assert folder == root / NAME
    return root


@pytest.fixture
def installed(preset_root, monkeypatch):
    """The temporary preset folder on the search path, as KERAS_METALSTM_PRESETS puts it there."""
    monkeypatch.setenv(presets.PRESET_PATH_ENV, str(preset_root))
    return preset_root / NAME


def report_of(run_dir):
    (path,) = (run_dir / "evaluation").glob("*-2ep.json")
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------- packaging
def test_package_data_ships_every_preset_file(monkeypatch):
    """setup.py's package_data as setuptools resolves it (no build): the files a preset is made of match its
    globs, and every file in the package's preset folder is shipped."""
    import importlib.resources
    from distutils.core import run_setup
    from fnmatch import fnmatch

    monkeypatch.chdir(REPOSITORY)  # setup.py reads README.md from the working directory
    distribution = run_setup("setup.py", stop_after="init")
    patterns = distribution.package_data["keras_metalstm"]
    for file in presets.PRESET_FILES:
        assert any(fnmatch(f"preset_files/{NAME}/{file}", pattern) for pattern in patterns), file
    assert importlib.resources.files("keras_metalstm") / "preset_files" == presets.PACKAGE_PRESETS
    build = distribution.get_command_obj("build_py")
    build.ensure_finalized()
    shipped = {
        (Path(source) / name).resolve() for package, source, _, names in build.data_files for name in names
    }
    assert {p for p in presets.PACKAGE_PRESETS.rglob("*") if p.is_file()} <= shipped


def test_the_preset_holds_its_files_and_preset_json_quotes_the_report(run_dir, installed):
    assert sorted(p.name for p in installed.iterdir()) == sorted(presets.PRESET_FILES)
    assert not [p for p in installed.parent.iterdir() if p.name.startswith(".")]  # temporary folder renamed
    info = presets.read_info(NAME)
    report = report_of(run_dir)
    assert info["evaluation"]["results"] == report["results"]
    assert (info["n_way"], info["k_shot"], info["inner_steps"], info["image_shape"]) == (5, 1, 2, [28, 28, 1])
    assert info["sha256"] == presets.file_sha256(installed / presets.META_LEARNER_FILE)
    assert info["bytes"] < 1 << 20 and info["training"]["status"] == "finished"
    assert json.loads((installed / presets.REPORT_FILE).read_text()) == report


def test_the_model_card_has_the_data_licence_recipe_commands_and_the_reports_numbers(run_dir, installed):
    card = (installed / presets.MODEL_CARD_FILE).read_text()
    meta = report_of(run_dir)["results"]["meta_lstm"]
    assert f"**{meta['mean']:.2f} +- {meta['ci95']:.2f}**" in card and f"{meta['episodes']} test episodes" in card
    assert "SIL Open Font License" in card  # fontglot's licence note, quoted from FONTGLOT.md
    assert f"metalstm train --config {presets.TRAIN_CONFIG_FILE} --run-dir runs/{NAME}" in card
    assert f"metalstm evaluate runs/{NAME} --episodes 2 --seed 1000\n" in card
    assert f'km.MetaLearner.from_preset("{NAME}")' in card and f"metalstm adapt {NAME} --support" in card
    assert "No baseline was evaluated" in card


def test_the_card_names_each_baselines_protocol_and_its_paired_difference(run_dir, tmp_path):
    from keras_metalstm.evaluation import EvaluationReport, save_report, summarise

    rng = np.random.default_rng(0)
    methods = ("meta_lstm", "finetune_authors", "nearest_neighbour_authors", "pixel_nearest_neighbour", "finetune")
    accuracies = {method: rng.random(40) for method in methods}
    report = EvaluationReport(
        {m: summarise(v) for m, v in accuracies.items()}, 5, 1, 2, "fontglot", "test", 7, 1.0,
        details={"checkpoint": "best", "test_classes": 277, "data": "fontglot/test", "episodes": 40,
                 "baselines": {"protocols": ["authors", "ours"], "epochs": 3,
                               "finetune": {"val_episodes": 20}}},
        accuracies=accuracies,
    )
    path = save_report(report, tmp_path)
    folder = presets.save_preset(run_dir, "with_baselines", out_dir=tmp_path / "presets", report=path)
    card = (folder / presets.MODEL_CARD_FILE).read_text()
    for method, paired in report.paired_differences.items():
        row = report.results[method]
        assert f"| {row['mean']:.2f} +- {row['ci95']:.2f} | {paired['mean']:+.2f} +- {paired['ci95']:.2f} |" in card
    assert "| Baseline fine-tune | authors |" in card and "| Baseline fine-tune | ours |" in card
    assert "- `authors`: as the paper's authors ran them" in card and "- `ours`: " in card
    assert (
        "metalstm evaluate runs/with_baselines --episodes 40 --seed 7 --baselines --baseline-protocol authors "
        "--baseline-protocol ours --pretrain-epochs 3 --finetune-val-episodes 20" in card
    )


def test_the_quoted_report_is_never_a_test_time_ablation(run_dir, tmp_path):
    from keras_metalstm.runs import load_run_config

    evaluated = tmp_path / "run" / "evaluation"
    evaluated.mkdir(parents=True)
    report = report_of(run_dir)
    (evaluated / "as-trained.json").write_text(json.dumps(report))
    ablation = {**report, "details": {**report["details"], "test_time": {"query_statistics": "support"}}}
    ablation["results"] = {"meta_lstm": {**report["results"]["meta_lstm"], "episodes": 600}}  # more episodes
    (evaluated / "ablation.json").write_text(json.dumps(ablation))
    assert presets.choose_report(tmp_path / "run", load_run_config(run_dir)).name == "as-trained.json"


def test_save_preset_refuses_bad_names_existing_presets_unevaluated_and_running_runs(run_dir, preset_root, tmp_path):
    from keras_metalstm.export import ExportError
    from keras_metalstm.runs import write_state

    with pytest.raises(presets.PresetError, match="must be lower-case letters"):
        presets.save_preset(run_dir, "../escape", out_dir=tmp_path)
    with pytest.raises(ExportError, match="already exists.*force"):
        presets.save_preset(run_dir, NAME, out_dir=preset_root)
    unevaluated = tmp_path / "unevaluated"
    unevaluated.mkdir()
    (unevaluated / "config.yaml").write_bytes((run_dir / "config.yaml").read_bytes())
    with pytest.raises(presets.PresetError, match=r"no evaluation report.*metalstm evaluate"):
        presets.save_preset(unevaluated, NAME, out_dir=tmp_path)
    write_state(unevaluated, "running", 1, 2, None, None, 0.0)  # by this (live) process
    with pytest.raises(presets.PresetError, match="still training"):
        presets.save_preset(unevaluated, NAME, out_dir=tmp_path)
    assert not (tmp_path / NAME).exists()


# --------------------------------------------------------------------------------------------- loading
def test_from_preset_reads_only_the_preset_folder_and_holds_the_runs_weights(run_dir, installed):
    from keras_metalstm.runs import load_meta_learner

    assert NAME in km.list_presets() and presets.preset_dir(NAME) == installed
    touched = []
    recording = [True]

    def audit(event, args):  # an audit hook cannot be removed: it records while `recording`
        if recording[0] and (event == "open" or event.startswith("socket.")):
            touched.append((event, str(args[0])))

    sys.addaudithook(audit)
    try:
        meta = km.MetaLearner.from_preset(NAME)
    finally:
        recording[0] = False
    assert touched and all(event == "open" and Path(path).parent == installed for event, path in touched), touched
    _, trained = load_meta_learner(run_dir)
    for loaded, expected in zip(meta.get_weights(), trained.get_weights(), strict=True):
        np.testing.assert_array_equal(loaded, expected)


def test_a_preset_adapts_a_folder_of_pngs_and_exports_with_parity(run_dir, installed, tmp_path):
    from keras_metalstm.runs import load_meta_learner

    support = write_support(tmp_path / "support")
    adapted = export.adapt_folder(km.MetaLearner.from_preset(NAME), support)
    assert list(adapted.class_names) == sorted(CLASSES)
    queries = np.random.default_rng(1).random((8, 28, 28, 1), dtype=np.float32)
    from_run = export.adapt_folder(load_meta_learner(run_dir)[1], support)
    np.testing.assert_allclose(adapted(queries).numpy(), from_run(queries).numpy(), atol=1e-6)
    result = export.export_adapted(adapted, tmp_path / "saved_models" / "task", format="both")
    assert result.parity.ok and {row["backend"] for row in result.parity.rows} == {"savedmodel", "onnx"}


def test_metalstm_adapt_takes_a_preset_name(preset_root, tmp_path):
    support = write_support(tmp_path / "support")
    out = tmp_path / "task.keras"
    result = run("adapt", NAME, "--support", support, "--out", out, env={presets.PRESET_PATH_ENV: str(preset_root)})
    assert result.exit_code == 0, result.output
    assert f"adapted 5-way ({', '.join(sorted(CLASSES))}) on 10 support images with T=2 -> {out}" in result.output
    assert export.load_adapted(out).info["preset"] == NAME


def test_an_unknown_name_is_one_clear_line_naming_both_possibilities(preset_root, tmp_path, monkeypatch):
    env = {presets.PRESET_PATH_ENV: str(preset_root)}
    support = write_support(tmp_path / "support", shots=1)
    for args in (("adapt", "fontglot_5wya_1shot", "--support", support, "--out", tmp_path / "x.keras"),
                 ("export", "fontglot_5wya_1shot")):
        result = run(*args, env=env)
        assert result.exit_code == 1 and "Traceback" not in result.output
        (line,) = result.output.strip().splitlines()
        # every preset on the search path is named: the temporary one and those shipped in the package
        available = ", ".join(sorted({NAME, *os.listdir(presets.PACKAGE_PRESETS)}))
        assert "neither an existing path nor a preset name" in line and f"available presets: {available}" in line
    monkeypatch.setenv(presets.PRESET_PATH_ENV, str(preset_root))
    with pytest.raises(presets.PresetError, match=f"unknown preset 'nope'; available presets: {available}"):
        km.MetaLearner.from_preset("nope")


def test_a_damaged_or_newer_preset_is_refused(installed, tmp_path):
    damaged = tmp_path / NAME
    damaged.mkdir()
    for file in presets.PRESET_FILES:
        (damaged / file).write_bytes((installed / file).read_bytes())
    (damaged / presets.META_LEARNER_FILE).write_bytes(b"truncated")
    with pytest.raises(presets.PresetError, match="the preset is damaged"):
        km.MetaLearner.from_preset(str(damaged))  # a preset folder's path works too (the Keras convention)
    info = json.loads((damaged / presets.INFO_FILE).read_text())
    (damaged / presets.INFO_FILE).write_text(json.dumps({**info, "format": presets.FORMAT + 1}))
    with pytest.raises(presets.PresetError, match="newer than this keras-metalstm reads.*upgrade"):
        km.MetaLearner.from_preset(str(damaged))


# ------------------------------------------------------------------------------------ the real recipe
@pytest.mark.slow
def test_a_run_evaluated_with_baselines_becomes_a_preset_whose_card_commands_reproduce_it(run_dir, tmp_path):
    """scripts/make_preset.py on a run evaluated beside both protocols' baselines; the evaluate command the
    card prints writes the same numbers again; `metalstm export NAME` gives the adapt-in-serving SavedModel."""
    import subprocess

    flags = ["--baselines", "--baseline-protocol", "authors", "--baseline-protocol", "ours"]
    flags += ["--pretrain-epochs", "1", "--finetune-val-episodes", "1", "--no-progress"]
    assert run("evaluate", run_dir, "--episodes", "4", *flags).exit_code == 0
    made = subprocess.run(
        [sys.executable, str(REPOSITORY / "scripts" / "make_preset.py"), str(run_dir), "full", "--out", str(tmp_path)],
        capture_output=True, text=True,
    )
    assert made.returncode == 0, made.stderr
    assert f"full -> {tmp_path / 'full'}" in made.stdout and "on 4 test episodes" in made.stdout
    card = (tmp_path / "full" / presets.MODEL_CARD_FILE).read_text()
    quoted = json.loads((tmp_path / "full" / presets.REPORT_FILE).read_text())
    assert len(quoted["results"]) == 6 and "| Baseline pixel nearest neighbour | authors |" in card
    (command,) = [line for line in card.splitlines() if line.startswith("metalstm evaluate")]
    _, _, _, *card_flags = command.split()
    (saved,) = (run_dir / "evaluation").glob("*-4ep-baselines-*.json")
    before = json.loads(saved.read_text())
    assert run("evaluate", run_dir, *card_flags, "--no-progress").exit_code == 0
    assert json.loads(saved.read_text())["results"] == before["results"] == quoted["results"]
    env = {presets.PRESET_PATH_ENV: str(tmp_path)}
    exported = run("export", "full", "--out", tmp_path / "saved_models" / "full", env=env)
    assert exported.exit_code == 0, exported.output
    assert "adapt-in-serving SavedModel of the 5-way meta-learner" in exported.output


def test_the_cards_recipe_says_when_the_episodes_were_augmented():
    from keras_metalstm.config import RunConfig

    info = {"training": {"episode": 10, "status": "finished"}}
    augmented = presets._recipe(RunConfig(augment="translate=0.1"), info)
    assert "meta-training episodes augmented `translate=0.1`" in augmented
    assert "augmented" not in presets._recipe(RunConfig(), info)
