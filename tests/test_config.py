"""RunConfig: validation, YAML/TOML round trips and the file < environment < flags layering."""

import os

import pytest

from keras_metalstm.config import SHAPE_FIELDS, ConfigError, RunConfig, env_overrides, read_config_file


def test_defaults_are_the_papers_1_shot_setting():
    config = RunConfig()
    assert (config.n_way, config.k_shot, config.query, config.inner_steps) == (5, 1, 15, 12)
    assert (config.learning_rate, config.clip_norm, config.hidden_units) == (1e-3, 0.25, 20)


def test_yaml_round_trip(tmp_path):
    config = RunConfig(n_way=3, k_shot=5, bn_momentum=None, image_shape=[28, 28, 1], data_dir="x")
    config.save(tmp_path / "c.yaml")
    assert RunConfig.load(tmp_path / "c.yaml") == config


def test_toml_file_with_dashed_keys(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('n-way = 3\nk_shot = 5\nxla = true\nlearning-rate = 0.01\n')
    assert read_config_file(path) == {"n_way": 3, "k_shot": 5, "xla": True, "learning_rate": 0.01}


def test_unknown_key_and_bad_values_are_errors(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("n_wya: 3\n")
    with pytest.raises(ConfigError, match=r"unknown setting 'n_wya'; did you mean 'n_way'\? known settings"):
        read_config_file(path)
    with pytest.raises(ConfigError, match="n_way must be at least 2"):
        RunConfig(n_way=0)
    # met on --resume with another --lr-schedule, where the run's final_learning_rate stays: no schedule change
    with pytest.raises(ConfigError, match=r"only used with lr_schedule 'cosine'.*\(a resumed run keeps its schedule\)"):
        RunConfig(final_learning_rate=1e-6)
    for seed in (-1, 2**32):  # NumPy's seeding took them with a traceback
        with pytest.raises(ConfigError, match=rf"seed must lie in 0\.\.4294967295, got {seed}"):
            RunConfig(seed=seed)
    with pytest.raises(ConfigError, match="multiple of meta_batch"):
        RunConfig(episodes=10, meta_batch=4)
    RunConfig(meta_batch=8)  # the default intervals (500, 500, 50) need not be multiples of it
    with pytest.raises(ConfigError, match="invalid value"):
        RunConfig.from_dict({"k_shot": "five"})


def test_environment_values_are_converted():
    env = {"METALSTM_K_SHOT": "5", "METALSTM_XLA": "yes", "METALSTM_LEARNING_RATE": "0.01",
           "METALSTM_BN_MOMENTUM": "none", "METALSTM_RUN_DIR": "ignored-here", "OTHER": "1"}
    assert env_overrides(env) == {"k_shot": 5, "xla": True, "learning_rate": 0.01, "bn_momentum": None}


def test_a_refused_setting_is_named_with_where_its_value_came_from():
    from keras_metalstm.config import layered_run_config

    base = ("the recipe", RunConfig().to_dict())
    layers = [base, ("config file run.yaml", {"k_shot": 0, "episodes": 4}), ("--meta-batch", {"meta_batch": 3})]
    with pytest.raises(ConfigError) as refused:
        layered_run_config(layers)
    assert str(refused.value) == "k_shot must be at least 1, got 0 (k_shot from config file run.yaml)"
    layers[1] = ("config file run.yaml", {"episodes": 4})
    with pytest.raises(ConfigError) as refused:
        layered_run_config(layers)
    assert str(refused.value).endswith("(episodes from config file run.yaml, meta_batch from --meta-batch)")
    # a quoted value is no field: query_statistics' message quotes 'query', and query is not named
    layers = [base, ("--query", {"query": 2}), ("QS", {"query_statistics": "batch"})]
    with pytest.raises(ConfigError) as refused:
        layered_run_config(layers)
    assert str(refused.value).endswith("got 'batch' (query_statistics from QS)")
    assert layered_run_config([base, ("--k-shot", {"k_shot": 5})]).k_shot == 5
    # only the refused one of two checked together is named (both were, the good one blamed with its source)
    with pytest.raises(ConfigError) as refused:
        layered_run_config([base, ("--clip-norm", {"clip_norm": -1.0})])
    assert str(refused.value) == "clip_norm must be positive, got -1.0 (clip_norm from --clip-norm)"


def test_shape_differences_name_the_fields():
    a, b = RunConfig(), RunConfig(k_shot=5, episodes=10)
    assert a.shape_differences(b) == {"k_shot": (1, 5)}  # episodes may change on resume


def test_theta0_initialisation_settings_are_checked():
    assert RunConfig().theta0_init == "scratch"  # the paper: theta_0 from a freshly initialised learner
    assert RunConfig.from_dict({"theta0_init": "Pretrained", "pretrain_epochs": "3"}).pretrain_epochs == 3
    with pytest.raises(ConfigError, match="theta0_init must be 'scratch' or 'pretrained'"):
        RunConfig(theta0_init="imagenet")
    with pytest.raises(ConfigError, match="pretrain_epochs must be at least 1"):
        RunConfig(theta0_init="pretrained", pretrain_epochs=0)
    with pytest.raises(ConfigError, match="only used with theta0_init 'pretrained'"):
        RunConfig(pretrained_model="classifier.keras")


def test_query_statistics_setting_is_checked_and_read_from_the_environment():
    assert RunConfig().query_statistics == "query"
    assert RunConfig.from_dict(env_overrides({"METALSTM_QUERY_STATISTICS": "Support"})).query_statistics == "support"
    with pytest.raises(ConfigError, match="query_statistics must be 'query' or 'support'"):
        RunConfig(query_statistics="transductive")


def test_episode_batching_setting_is_checked_and_not_part_of_a_run_s_shape():
    assert RunConfig().episode_batching == "auto"
    assert "episode_batching" not in SHAPE_FIELDS  # the results do not depend on it: a resumed run may change it
    with pytest.raises(ConfigError, match="episode_batching must be one of"):
        RunConfig(episode_batching="parallel")


def test_paths_are_made_absolute_and_urls_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = RunConfig(data_dir="images", theta0_init="pretrained", pretrained_model="~/classifier.keras")
    assert config.data_dir == str(tmp_path / "images")
    assert config.pretrained_model == os.path.expanduser("~/classifier.keras")
    assert RunConfig.from_dict(env_overrides({"METALSTM_DATA_DIR": ""})).data_dir is None
    with pytest.raises(ConfigError, match="data_dir gs://bucket/images is a URL: it must be a local path"):
        RunConfig(data_dir="gs://bucket/images")


def test_dtype_policy_setting_is_checked_read_from_the_environment_and_part_of_a_run_s_shape():
    assert RunConfig().dtype_policy is None  # the learner's own layers' policies
    assert "dtype_policy" in SHAPE_FIELDS  # the stored learner keeps its policy: a resume must not ask another
    config = RunConfig.from_dict(env_overrides({"METALSTM_DTYPE_POLICY": "Mixed_BFloat16"}))
    assert config.dtype_policy == "mixed_bfloat16"
    with pytest.raises(ConfigError, match="dtype_policy must be one of"):
        RunConfig(dtype_policy="float64")


def test_theta0_lr_scale_and_logit_scale_settings_are_checked_and_read_from_the_environment():
    assert RunConfig().theta0_lr_scale == 1.0 and RunConfig().learn_logit_scale is False
    overrides = env_overrides({"METALSTM_THETA0_LR_SCALE": "0.1", "METALSTM_LEARN_LOGIT_SCALE": "true"})
    config = RunConfig.from_dict(overrides)
    assert config.theta0_lr_scale == 0.1 and config.learn_logit_scale is True
    with pytest.raises(ConfigError, match="theta0_lr_scale must be >= 0"):
        RunConfig(theta0_lr_scale=-0.5)


def test_recipes_are_starting_points_under_the_file_the_environment_and_the_flags(tmp_path, monkeypatch):
    from keras_metalstm.cli.train import resolve_config

    from keras_metalstm.config import RECIPES, ConfigError, RunConfig, recipe_config

    assert recipe_config("paper") == RunConfig()  # the paper's recipe is the defaults
    ours = recipe_config("ours")
    assert (ours.theta0_init, ours.learn_logit_scale, ours.query_statistics, ours.first_order) == (
        "pretrained", True, "support", False)
    assert (ours.lr_schedule, ours.learning_rate, ours.final_learning_rate) == ("cosine", 1e-4, 1e-6)
    with pytest.raises(ConfigError, match="unknown recipe 'fast'.*paper, ours"):
        recipe_config("fast")

    config_file = tmp_path / "c.yaml"
    config_file.write_text("final_learning_rate: 2.0e-6\n")
    monkeypatch.setenv("METALSTM_QUERY_STATISTICS", "query")
    config = resolve_config(tmp_path / "new", False, str(config_file), {"learning_rate": 3e-4, "episodes": None},
                            "ours")
    assert (config.learning_rate, config.final_learning_rate, config.query_statistics) == (3e-4, 2e-6, "query")
    assert config.theta0_init == "pretrained" and config.first_order is False  # the rest of the recipe
    assert set(RECIPES) == {"paper", "ours"}


def test_a_recipe_is_refused_on_resume(tmp_path):
    from click.testing import CliRunner
    from keras_metalstm.cli.main import main

    result = CliRunner().invoke(main, ["train", "--run-dir", str(tmp_path / "r"), "--resume", "--recipe", "ours"])
    assert result.exit_code == 2 and "--recipe sets up a new run" in result.output
    assert not (tmp_path / "r").exists()


def test_first_line_keeps_a_short_message_and_marks_a_cut_one():
    from keras_metalstm.config import first_line

    assert first_line(ValueError("disk full\nmore detail")) == "disk full"
    assert first_line(ValueError("")) == "ValueError"
    cut = first_line(ValueError("x" * 50), limit=20)
    assert cut == "x" * 17 + "..." and len(cut) == 20
