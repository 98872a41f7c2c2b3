"""Where a setting of `metalstm train` comes from (a config file, a METALSTM_* variable, a flag) and what a bad
value there is told: the message names the file, variable or flag, and nothing is written."""

import pytest
from cli_helpers import TINY_FLAGS, assert_clean_failure, invoke, train_args


@pytest.mark.parametrize("text,message", [
    ("learning_rate: .nan\n", "learning_rate must be a finite number"),
    ("data_dir: [1, 2]\n", "run.yaml: setting 'data_dir' takes text (a name or a path), got list [1, 2]"),
    ("seed: true\n", "run.yaml: invalid value True for setting 'seed'"),
    ("learning_rate: false\n", "run.yaml: invalid value False for setting 'learning_rate'"),
    ("xla: 5\n", "run.yaml: invalid value 5 for setting 'xla'"),
    ("run_dir: elsewhere\n", "run.yaml: run_dir is where a run is kept, not one of its settings (its config.yaml is "
                              "inside it): give it as --run-dir or METALSTM_RUN_DIR"),
])
def test_bad_values_in_a_config_file(tmp_path, data_dir, text, message):
    config = tmp_path / "run.yaml"
    config.write_text(f"dataset: folder\nepisodes: 2\n{text}")
    result = invoke(["train", "--run-dir", tmp_path / "run", "--config", config, *TINY_FLAGS])
    assert_clean_failure(result, message)
    assert not (tmp_path / "run").exists()


def test_a_bad_environment_variable_is_named(tmp_path, data_dir):
    result = invoke(train_args(data_dir, tmp_path / "run", "--episodes", "2"), env={"METALSTM_SEED": "abc"})
    assert_clean_failure(result, "environment variable METALSTM_SEED: invalid value 'abc' for setting 'seed'")
    assert not (tmp_path / "run").exists()


def test_a_setting_out_of_range_is_named_with_its_file_variable_or_flag(tmp_path, data_dir):
    config = tmp_path / "run.yaml"
    config.write_text("k_shot: 0\n")
    sources = [
        (["--config", config], {}, f"k_shot must be at least 1, got 0 (k_shot from config file {config})"),
        ([], {"METALSTM_VAL_EPISODES": "-1"}, "(val_episodes from environment variable METALSTM_VAL_EPISODES)"),
        (["--episodes", "3", "--meta-batch", "2"], {}, "(episodes from --episodes, meta_batch from --meta-batch)"),
    ]
    for args, env, message in sources:
        run_dir = tmp_path / "run"
        result = invoke(["train", "--dataset", "folder", "--data-dir", data_dir, "--run-dir", run_dir, *args], env=env)
        assert_clean_failure(result, message)
        assert not run_dir.exists()


def test_a_misspelled_environment_variable_is_refused(tmp_path, data_dir):
    result = invoke(train_args(data_dir, tmp_path / "run"), env={"METALSTM_K_SHOTS": "5"})
    assert_clean_failure(result, "environment variable METALSTM_K_SHOTS is not a setting (did you mean "
                         "METALSTM_K_SHOT?)")


def test_verbose_by_flag_or_environment_is_not_taken_for_a_misspelled_setting(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("METALSTM_VERBOSE", "0")  # restored afterwards: --verbose sets it for the process
    for args, env in ((["--verbose"], None), ([], {"METALSTM_VERBOSE": "1"})):
        run_dir = tmp_path / f"run{len(args)}"
        result = invoke([*args, *train_args(data_dir, run_dir, "--episodes", "1")], env=env)
        assert result.exit_code == 0, result.output
