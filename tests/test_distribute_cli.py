"""`metalstm train --strategy ... [--tpu NAME]`: every strategy's flag path reaches the library factory.

default and mirrored (2 logical CPUs, in a subprocess) really train; multiworker and tpu cannot be started
in-process here (multiworker needs a TF_CONFIG cluster and must be the process's first TensorFlow work, tpu a
TPU), so for them the test checks the factory is called with the flags and that training runs in its scope.
multiworker also trains and resumes for real: two `metalstm train` processes, a local 2-worker cluster, one
run directory.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from cli_helpers import free_ports
from click.testing import CliRunner
from keras_metalstm.cli.main import main

TINY = ["--dataset", "fontglot", "--n-way", "2", "--k-shot", "1", "--query", "2", "--inner-steps", "2",
        "--hidden-units", "4", "--filters", "4", "--episodes", "4", "--meta-batch", "2", "--val-episodes", "0",
        "--checkpoint-every", "2", "--log-every", "2", "--no-progress", "--no-deterministic"]


def test_help_shows_strategy_and_tpu():
    text = CliRunner().invoke(main, ["train", "--help"]).output
    assert "--strategy" in text and "--tpu" in text
    for name in ("default", "mirrored", "multiworker", "tpu"):
        assert name in text


@pytest.mark.parametrize("name,tpu", [("multiworker", None), ("tpu", "my-tpu"), ("default", None)])
def test_flag_calls_the_factory_and_trains_in_its_scope(tmp_path, monkeypatch, name, tpu):
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
    assert state["numerics"]["devices"] == "2 x CPU"  # the replicas that wrote the checkpoint
    assert "computes differently" not in out.stdout + out.stderr  # resumed as it started
    assert (run_dir / "best.keras").is_file()
    odd = tmp_path / "odd"  # 3 episodes cannot be shared by 2 replicas: refused before the run directory is made
    args = [*TINY, "--run-dir", str(odd), "--strategy", "mirrored", "--episodes", "3", "--meta-batch", "3"]
    out = subprocess.run([sys.executable, "-c", MIRRORED_CLI, *args], capture_output=True, text=True, timeout=600,
                         env=env)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "A batch of 3 episodes cannot be shared by the strategy's 2 replicas" in out.stderr
    assert "Use --meta-batch 4." in out.stderr
    assert not odd.exists()


# One worker of a local cluster: `metalstm train` with two test hooks. The non-chief starts its run only once the
# chief has written config.yaml (the chief does so before its first collective): the worst case of the race on a
# fresh run directory. Its private checkpoint directory is copied to KEEP before it is removed, to compare its
# weights with the chief's.
MULTIWORKER_CLI = """
import os, shutil, sys, time
run_dir, keep, *args = sys.argv[1:]
import keras_metalstm.distribute as distribute
make_strategy, remove_worker_directory = distribute.make_strategy, distribute.remove_worker_directory

def make_strategy_then_wait_for_the_chief(*a, **k):
    strategy = make_strategy(*a, **k)
    deadline = time.time() + 300
    while not distribute.is_chief(strategy) and time.time() < deadline:
        if os.path.exists(os.path.join(run_dir, "config.yaml")):
            break
        time.sleep(0.05)
    return strategy

def keep_then_remove(path, directory):
    if os.path.abspath(path) != os.path.abspath(directory):
        shutil.copytree(path, keep)
    remove_worker_directory(path, directory)

distribute.make_strategy = make_strategy_then_wait_for_the_chief
distribute.remove_worker_directory = keep_then_remove
from keras_metalstm.cli.main import main
sys.argv = ["metalstm", "train", *args]
main()
"""


def _train_on_two_workers(tmp_path, run_dir, session, *extra, worker_extras=((), ())):
    """Both workers' (returncode, stdout, stderr); worker 1 keeps its checkpoints in tmp_path/<session>-keep1.
    Worker i also gets the flags worker_extras[i]."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    processes = []
    for index in range(2):
        args = [*TINY, "--run-dir", str(run_dir), "--strategy", "multiworker", *extra, *worker_extras[index]]
        temp = tmp_path / f"tmp{index}"  # each worker's TMPDIR: the private directories it leaves behind
        temp.mkdir(exist_ok=True)
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
                   TMPDIR=str(temp), TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker",
                                                                                       "index": index}}))
        keep = tmp_path / f"{session}-keep{index}"
        processes.append(subprocess.Popen([sys.executable, "-c", MULTIWORKER_CLI, str(run_dir), str(keep), *args],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    try:
        outputs = [process.communicate(timeout=900) for process in processes]
        return [(process.returncode, *output) for process, output in zip(processes, outputs, strict=True)]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()


def _checkpoint_tensors(directory):
    import tensorflow as tf

    path = tf.train.latest_checkpoint(str(directory))
    reader = tf.train.load_checkpoint(path)
    names = [name for name, _ in tf.train.list_variables(path) if "OBJECT_GRAPH" not in name]
    return path, {name: reader.get_tensor(name) for name in names}


def test_multiworker_cli_only_the_chief_writes_the_run_directory_and_resume_continues(tmp_path):
    run_dir = tmp_path / "run"
    # The first session validates at its end (a best checkpoint); the resumed one does not validate but still
    # rebuilds the best meta-learner for best.keras on both workers, from the first session's best.
    sessions = (("first", 4, ["--val-episodes", "2"]), ("resumed", 6, ["--resume", "--val-episodes", "0"]))
    for session, episodes, extra in sessions:
        results = _train_on_two_workers(tmp_path, run_dir, session, "--episodes", str(episodes), *extra)
        assert [returncode for returncode, _, _ in results] == [0, 0], [err[-3000:] for _, _, err in results]
        (_, chief_out, _), (_, worker_out, _) = results
        assert chief_out.strip().splitlines()[-1].startswith(f"finished: {episodes} episodes")
        assert worker_out.strip().splitlines()[-1].startswith(f"worker 1: finished at episode {episodes}")
        assert "config.yaml" not in worker_out  # no summary as if it had written the run directory
        # no private checkpoint directory left behind on either worker
        assert [p.name for p in (tmp_path / "tmp0").iterdir() if p.name.startswith("metalstm-")] == []
        assert [p.name for p in (tmp_path / "tmp1").iterdir() if p.name.startswith("metalstm-")] == []
        # both workers end with the same weights and optimizer state: the chief's kept checkpoint and the
        # other worker's private copy hold the same tensors
        chief_path, chief_tensors = _checkpoint_tensors(run_dir / "checkpoints")
        worker_path, worker_tensors = _checkpoint_tensors(tmp_path / f"{session}-keep1" / "checkpoints")
        assert os.path.basename(chief_path) == os.path.basename(worker_path) == f"ckpt-{episodes}"
        assert chief_tensors.keys() == worker_tensors.keys()
        for name, value in chief_tensors.items():
            np.testing.assert_array_equal(value, worker_tensors[name], err_msg=name)

    # only the chief's files, each once: one config, one metrics row per logged step and validation
    names = {p.name for p in run_dir.iterdir()} - {"tensorboard"}  # tensorboard/ when the package is installed
    assert names == {"config.yaml", "learner.json", "splits.json", "checkpoints", "best", "best.keras", "metrics.jsonl",
                     "metrics.csv", "curves.png", "state.json"}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["episode"]) for r in rows] == [("train", 2), ("train", 4), ("val", 4), ("train", 6)]
    assert len((run_dir / "metrics.csv").read_text().splitlines()) == 1 + len(rows)
    assert json.loads((run_dir / "state.json").read_text())["episode"] == 6

    from keras_metalstm.runs import load_meta_learner

    config, meta = load_meta_learner(run_dir, "latest")  # the final checkpoint fits a fresh meta-learner
    assert (config.episodes, config.n_way) == (6, 2)
    assert meta.weights


def test_multiworker_cli_refused_run_directory_stops_every_worker_with_a_message(tmp_path):
    from keras_metalstm.config import RunConfig

    run_dir = tmp_path / "run"
    RunConfig().save(run_dir / "config.yaml")  # another run's
    results = _train_on_two_workers(tmp_path, run_dir, "refused", "--episodes", "4")
    (chief_code, _, chief_err), (worker_code, _, worker_err) = results
    assert (chief_code, worker_code) == (1, 1)  # no worker left waiting for the other
    assert "holds a run that was set up but never started" in chief_err and "pass --resume" in chief_err
    assert "worker 1: stopped before training: another worker could not start the run" in worker_err
    assert "Traceback" not in chief_err + worker_err
    assert [p.name for p in run_dir.iterdir()] == ["config.yaml"]


def test_multiworker_cli_workers_given_different_settings_stop_before_training(tmp_path):
    """Their collectives would mix mismatched tensors until the loss became NaN, and the message blamed the
    learning rate."""
    run_dir = tmp_path / "run"
    results = _train_on_two_workers(tmp_path, run_dir, "mismatched", "--episodes", "4",
                                    worker_extras=(("--seed", "0"), ("--seed", "1")))
    (chief_code, _, chief_err), (worker_code, _, worker_err) = results
    assert (chief_code, worker_code) == (1, 1), [chief_err[-2000:], worker_err[-2000:]]
    for task, err in (("worker 0", chief_err), ("worker 1", worker_err)):
        assert f"{task}: stopped before training: the workers were given different run settings" in err, err[-2000:]
        assert "Traceback" not in err
    assert not (run_dir / "checkpoints").exists()
