"""`metalstm train --strategy ... [--tpu NAME]`: every strategy's flag path reaches the library factory.

default and mirrored (2 logical CPUs, in a subprocess) really train; multiworker and tpu cannot be started
in-process here (multiworker needs a TF_CONFIG cluster and must be the process's first TensorFlow work, tpu a
TPU), so for them the test checks the factory is called with the flags and that training runs in its scope.
"""

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

pytest.importorskip("keras_metalstm.cli.train")
from keras_metalstm.cli.main import main  # noqa: E402

TINY = ["--dataset", "fontglot", "--n-way", "2", "--k-shot", "1", "--query", "2", "--inner-steps", "2",
        "--hidden-units", "4", "--filters", "4", "--episodes", "4", "--meta-batch", "2", "--val-episodes", "0",
        "--checkpoint-every", "2", "--log-every", "2", "--no-progress", "--no-deterministic"]


def _needs_strategy_flag():
    result = CliRunner().invoke(main, ["train", "--help"])
    if "--strategy" not in result.output:
        pytest.skip("metalstm train has no --strategy flag in this checkout")
    return result.output


def test_help_shows_strategy_and_tpu():
    text = _needs_strategy_flag()
    assert "--tpu" in text
    for name in ("default", "mirrored", "multiworker", "tpu"):
        assert name in text


@pytest.mark.parametrize("name,tpu", [("multiworker", None), ("tpu", "my-tpu"), ("default", None)])
def test_flag_calls_the_factory_and_trains_in_its_scope(tmp_path, monkeypatch, name, tpu):
    _needs_strategy_flag()
    import tensorflow as tf

    import keras_metalstm.distribute as distribute

    calls, scopes = [], []
    stand_in = tf.distribute.OneDeviceStrategy("/cpu:0")  # a real, non-default strategy in place of the cluster

    def fake_factory(strategy_name="default", tpu=None, devices=None):
        calls.append((strategy_name, tpu))
        return stand_in

    import keras_metalstm.cli.train as train_module

    original = train_module.run_training

    def recording_run_training(*args, **kwargs):
        scopes.append(tf.distribute.get_strategy() is stand_in)
        return original(*args, **kwargs)

    monkeypatch.setattr(distribute, "make_strategy", fake_factory)
    monkeypatch.setattr(train_module, "run_training", recording_run_training)
    args = ["train", *TINY, "--run-dir", str(tmp_path / "run"), "--strategy", name]
    if tpu:
        args += ["--tpu", tpu]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert calls == [(name, tpu)]
    assert scopes == [True]
    assert (tmp_path / "run" / "checkpoints").is_dir()


def test_tpu_name_without_tpu_strategy_is_a_usage_error(tmp_path):
    _needs_strategy_flag()
    result = CliRunner().invoke(main, ["train", *TINY, "--run-dir", str(tmp_path / "r"), "--tpu", "x"])
    assert result.exit_code == 2
    assert "--strategy tpu" in result.output


MIRRORED_CLI = """
import sys, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from keras_metalstm.cli.main import main
sys.argv = ["metalstm", "train", *sys.argv[1:]]
main()
"""


def test_mirrored_flag_trains_on_two_replicas_and_resumes(tmp_path):
    _needs_strategy_flag()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    env.pop("TF_CONFIG", None)
    run_dir = tmp_path / "run"
    for episodes, extra in (("2", []), ("4", ["--resume"])):
        args = [*TINY, "--run-dir", str(run_dir), "--strategy", "mirrored", "--episodes", episodes, *extra]
        out = subprocess.run([sys.executable, "-c", MIRRORED_CLI, *args], capture_output=True, text=True,
                             timeout=600, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "finished" and state["episode"] == 4
    assert (run_dir / "best.keras").is_file()
