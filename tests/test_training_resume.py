"""Exact resume and signals, through the installed `metalstm` console script in subprocesses.

A run killed with SIGKILL and resumed with --resume ends with bitwise the same meta-learner and optimizer state
as an uninterrupted run with the same seed (op determinism is on by default in the command line).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from cli_helpers import TINY_FLAGS, make_image_folder

METALSTM = shutil.which("metalstm") or os.path.join(os.path.dirname(sys.executable), "metalstm")
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


def train_command(data_dir, run_dir, episodes, *extra):
    return [METALSTM, "train", "--dataset", "folder", "--data-dir", str(data_dir), "--run-dir", str(run_dir),
            *TINY_FLAGS, "--episodes", str(episodes), "--checkpoint-every", "10", "--validate-every", "20",
            "--seed", "3", *extra]


def wait_for_checkpoint(process, run_dir, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if list((run_dir / "checkpoints").glob("ckpt-*.index")):
            return
        if process.poll() is not None:
            raise AssertionError(f"training ended before its first checkpoint: {process.stderr.read()}")
        time.sleep(0.02)
    raise AssertionError("no checkpoint within the timeout")


def checkpoint_values(run_dir):
    import tensorflow as tf

    path = tf.train.latest_checkpoint(str(run_dir / "checkpoints"))
    reader = tf.train.load_checkpoint(path)
    names = [n for n, _ in tf.train.list_variables(path) if "save_counter" not in n and "OBJECT_GRAPH" not in n]
    return path, {n: reader.get_tensor(n) for n in names}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data") / "folder")


def test_console_script_answers_help():
    result = subprocess.run([METALSTM, "--help"], capture_output=True, text=True, env=ENV, timeout=120)
    assert result.returncode == 0
    assert all(name in result.stdout for name in ("train", "evaluate", "quickstart"))


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, data_dir):
    episodes = 60
    full = subprocess.Popen(train_command(data_dir, tmp_path / "full", episodes), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed = subprocess.Popen(train_command(data_dir, tmp_path / "killed", episodes), env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(killed, tmp_path / "killed")
    deadline = time.time() + 120  # state.json follows each checkpoint: kill once it describes one
    while json.loads((tmp_path / "killed" / "state.json").read_text())["episode"] == 0 and time.time() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    state = json.loads((tmp_path / "killed" / "state.json").read_text())
    assert state["status"] == "running" and state["episode"] < episodes  # really killed mid-run
    # state.json describes the newest checkpoint, with the seconds trained until then (or, killed while writing
    # the next one, names it as its last checkpoint)
    newest = max(int(path.stem.split("-")[1]) for path in (tmp_path / "killed" / "checkpoints").glob("ckpt-*.index"))
    assert newest in (state["episode"], (state["checkpoint"] or {}).get("episode"))
    assert state["seconds"] > 0 and state["pid"] == killed.pid
    resumed = subprocess.run(train_command(data_dir, tmp_path / "killed", episodes, "--resume"), env=ENV,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"process {killed.pid} is gone" in resumed.stderr  # the crash is named, not taken for a live run
    final = json.loads((tmp_path / "killed" / "state.json").read_text())
    assert final["status"] == "finished" and final["seconds"] > state["seconds"]
    assert full.wait(timeout=600) == 0, full.stderr.read()

    path_full, values_full = checkpoint_values(tmp_path / "full")
    path_resumed, values_resumed = checkpoint_values(tmp_path / "killed")
    assert path_full.endswith(f"ckpt-{episodes}") and path_resumed.endswith(f"ckpt-{episodes}")
    assert values_full.keys() == values_resumed.keys()
    assert any("theta0" in n for n in values_full) and any("optimizer" in n for n in values_full)
    for name, value in values_full.items():
        np.testing.assert_array_equal(values_resumed[name], value, err_msg=name)  # bitwise
    # and the run did learn something that differs from its start
    first = sorted((tmp_path / "full" / "checkpoints").glob("ckpt-*.index"))
    assert len(first) >= 1
    rows = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    train_episodes = [r["episode"] for r in rows if r["kind"] == "train"]
    assert train_episodes == sorted(set(train_episodes)) and train_episodes[-1] == episodes
    seconds = [r["seconds"] for r in rows]
    assert seconds == sorted(seconds)  # the resumed session's times continue the killed one's


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    process = subprocess.Popen(train_command(data_dir, run_dir, 100000), env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(process, run_dir)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "interrupted"
    import tensorflow as tf

    assert tf.train.latest_checkpoint(str(run_dir / "checkpoints")).endswith(f"ckpt-{state['episode']}")
    assert "--resume" in stderr and "interrupted" in stdout


# Runs a command on the pseudo-terminal given as its standard streams, as its controlling terminal (a login or
# SSH session): closing the terminal's other end then sends the command SIGHUP, as the kernel does on a hang-up.
# SIGHUP is reset to its default, as in a login session: tests started under nohup would pass its SIG_IGN on.
ON_TERMINAL = ("import fcntl, os, signal, sys, termios; signal.signal(signal.SIGHUP, signal.SIG_DFL); os.setsid(); "
               "fcntl.ioctl(0, termios.TIOCSCTTY, 0); os.execvp(sys.argv[1], sys.argv[1:])")


def train_on_a_terminal(command, run_dir, cwd, close=True, timeout=240):
    """Start `command` on a new terminal, showing its output; at its first checkpoint, close the terminal (`close`),
    or send the run SIGHUP and show the rest of its output. Returns the process and what the terminal showed."""
    import select

    primary, secondary = os.openpty()
    process = subprocess.Popen([sys.executable, "-c", ON_TERMINAL, *command], stdin=secondary, stdout=secondary,
                               stderr=secondary, env=ENV, cwd=cwd)
    os.close(secondary)
    shown, readable, hung_up = b"", True, False
    deadline = time.time() + timeout
    while not hung_up or readable:
        assert time.time() < deadline, shown.decode(errors="replace")[-3000:]
        if not hung_up and list((run_dir / "checkpoints").glob("ckpt-*.index")):
            hung_up = True
            if close:
                break
            process.send_signal(signal.SIGHUP)
        assert hung_up or process.poll() is None, shown.decode(errors="replace")[-3000:]
        if readable and select.select([primary], [], [], 0.05)[0]:
            try:
                chunk = os.read(primary, 65536)  # a terminal nobody reads fills up and blocks the run
            except OSError:  # nothing has the terminal open: the run ended, or nohup sent its output to nohup.out
                chunk = b""
            shown, readable = shown + chunk, bool(chunk)
        elif not readable:
            time.sleep(0.05)
    os.close(primary)
    return process, shown.decode(errors="replace")


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="no pseudo-terminals on this platform")
def test_a_closed_terminal_stops_the_run_at_a_checkpoint_unless_it_runs_under_nohup(tmp_path, data_dir):
    """SIGHUP: the run, its progress bar on the terminal that closed, saves a checkpoint and exits with 129 (it
    was lost since the last checkpoint, as with kill -9); a `kill -HUP` with the terminal open ends the same way,
    saying so there. Under nohup the run trains on."""
    import tensorflow as tf

    for close, run_dir in ((True, tmp_path / "closed"), (False, tmp_path / "signalled")):
        with_progress = [arg for arg in train_command(data_dir, run_dir, 100000) if arg != "--no-progress"]
        process, shown = train_on_a_terminal(with_progress, run_dir, tmp_path, close=close)
        assert process.wait(timeout=120) == 128 + signal.SIGHUP, shown[-3000:]
        state = json.loads((run_dir / "state.json").read_text())
        assert state["status"] == "interrupted"
        assert tf.train.latest_checkpoint(str(run_dir / "checkpoints")).endswith(f"ckpt-{state['episode']}")
        assert close or f"interrupted; continue with: metalstm train --run-dir {run_dir} --resume" in shown, shown

    nohup = ["nohup", *train_command(data_dir, tmp_path / "nohup", 100000)]
    process, _ = train_on_a_terminal(nohup, tmp_path / "nohup", tmp_path)
    closed_at = tf.train.latest_checkpoint(str(tmp_path / "nohup" / "checkpoints"))
    deadline = time.time() + 120
    while tf.train.latest_checkpoint(str(tmp_path / "nohup" / "checkpoints")) == closed_at:
        assert time.time() < deadline and process.poll() is None, (tmp_path / "nohup.out").read_text()[-3000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM


def test_a_progress_write_that_meets_the_hung_up_terminal_before_sighup_does_not_fail_the_run(monkeypatch):
    """The terminal closes, then SIGHUP arrives: a progress bar writing in between gets EIO. It is dropped where
    standard output or error is a hung-up terminal (then sent to os.devnull), and raised anywhere else."""
    import errno

    from keras_metalstm import stop_signals

    class WritesToTheTerminal:
        def on_step(self, episode, loss, accuracy):
            raise OSError(errno.EIO, "Input/output error")

        def on_message(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    swapped = []
    monkeypatch.setattr(stop_signals, "leave_closed_terminal", lambda: swapped.append(True) or True)
    callbacks = stop_signals.OutputMayHangUp(WritesToTheTerminal())
    assert callbacks.on_step(1, 0.5, 0.5) is None and swapped == [True]
    with pytest.raises(OSError, match="No space left"):  # not a hang-up
        callbacks.on_message("text")
    monkeypatch.setattr(stop_signals, "leave_closed_terminal", lambda: False)  # EIO, but no hung-up terminal
    with pytest.raises(OSError, match="Input/output error"):
        callbacks.on_step(1, 0.5, 0.5)
