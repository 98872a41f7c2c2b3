"""A run directory recovered from what happens to it between sessions: TensorFlow's checkpoint list or best/ lost
in a copy, a session stopped before its last validation, and a second session started while one trains."""

import json
import os
import shutil
import subprocess
import sys
import time

from cli_helpers import assert_clean_failure, invoke, state, train_args


def test_a_resume_without_tensorflows_list_of_checkpoints_continues_from_the_newest(tmp_path, data_dir):
    """A copy of a run that left out checkpoints/checkpoint: the resume started again from episode 0 and wrote
    over the run's checkpoints."""
    from keras_metalstm.runs import latest_checkpoint

    run_dir = tmp_path / "run"
    first = invoke(train_args(data_dir, run_dir, "--episodes", "4", "--checkpoint-every", "2"))
    assert first.exit_code == 0, first.output
    (run_dir / "checkpoints" / "checkpoint").unlink()
    assert latest_checkpoint(run_dir) == str(run_dir / "checkpoints" / "ckpt-4")
    resumed = invoke(train_args(data_dir, run_dir, "--episodes", "6", "--checkpoint-every", "2", "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming from the checkpoint of episode 4 ({run_dir / 'checkpoints' / 'ckpt-4'})" in resumed.output
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [row["episode"] for row in rows if row["kind"] == "train"]
    assert trained == sorted(set(trained)) and trained[-1] == 6  # continued from 4, no episode trained twice


def test_a_resume_without_the_best_checkpoint_saves_the_final_weights_and_says_so(tmp_path, data_dir, caplog):
    """best/ deleted or not copied: the resume trained, then failed at its end reading a best checkpoint "at None"."""
    import logging

    run_dir = tmp_path / "run"
    first = invoke(train_args(data_dir, run_dir, "--episodes", "2", "--val-episodes", "2", "--validate-every", "2"))
    assert first.exit_code == 0, first.output
    shutil.rmtree(run_dir / "best")
    with caplog.at_level(logging.WARNING, logger="keras_metalstm"):
        resumed = invoke(train_args(data_dir, run_dir, "--episodes", "4", "--val-episodes", "0", "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert "holds no best checkpoint (deleted, or left out of a copy): best.keras gets the run's final weights" in (
        caplog.text
    )
    assert (run_dir / "best.keras").is_file() and state(run_dir)["status"] == "finished"


def test_validations_paused_with_zero_still_fix_the_episodes_a_later_resume_validates_on(tmp_path, data_dir):
    """A run validated on 2 episodes, resumed with --val-episodes 0 (config.yaml then says 0), then resumed with 3:
    the new validations were compared with a best measured on 2."""
    run_dir = tmp_path / "run"
    first = invoke(train_args(data_dir, run_dir, "--episodes", "2", "--val-episodes", "2", "--validate-every", "2"))
    assert first.exit_code == 0, first.output
    paused = invoke(train_args(data_dir, run_dir, "--episodes", "4", "--val-episodes", "0", "--resume"))
    assert paused.exit_code == 0, paused.output
    assert state(run_dir)["best_val_episodes"] == 2 and state(run_dir)["episode"] == 4
    other = invoke(train_args(data_dir, run_dir, "--episodes", "6", "--val-episodes", "3", "--resume"))
    assert_clean_failure(other, f"cannot resume {run_dir} with --val-episodes 3: its validations ran 2 episodes")
    assert state(run_dir)["episode"] == 4


def test_adapting_a_run_without_a_best_checkpoint_says_it_takes_the_latest(tmp_path, data_dir, caplog):
    import logging

    from keras_metalstm import export

    run_dir = tmp_path / "run"
    assert invoke(train_args(data_dir, run_dir, "--episodes", "2", "--val-episodes", "0")).exit_code == 0
    with caplog.at_level(logging.INFO, logger="keras_metalstm"):
        export.load_meta_learner(run_dir)
    assert f"{run_dir} has no best checkpoint yet (no validation ran, or it is still training)" in caplog.text


def test_a_run_stopped_before_validating_its_last_episode_is_validated_when_resumed_there(tmp_path, data_dir):
    """Ctrl-C between the last update and its validation, then --resume --episodes <that episode>: the run ended
    with no final validation and no best checkpoint, unlike one that was not stopped."""
    run_dir = tmp_path / "run"
    # a checkpoint at the last episode, not validated (here: validation off in the first session)
    assert invoke(train_args(data_dir, run_dir, "--episodes", "4", "--val-episodes", "0")).exit_code == 0
    assert not (run_dir / "best").exists()
    resumed = invoke(train_args(data_dir, run_dir, "--episodes", "4", "--val-episodes", "2", "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert "episode 4: validation accuracy" in resumed.output
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["episode"] for row in rows if row["kind"] == "val"] == [4]
    assert list((run_dir / "best").glob("ckpt-4.index"))
    again = invoke(train_args(data_dir, run_dir, "--episodes", "4", "--val-episodes", "2", "--resume"))
    assert again.exit_code == 0 and "episode 4: validation accuracy" not in again.output  # validated once


def test_a_run_being_trained_by_another_live_process_is_refused(tmp_path, data_dir):
    """A second session in the directory would restore, train and write over the first's files (its metrics log
    lost rows); a dead session's process id reused by a newer process is not taken for the owner."""
    run_dir = tmp_path / "run"
    assert invoke(train_args(data_dir, run_dir, "--episodes", "2")).exit_code == 0
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        time.sleep(1.5)  # the owner writes state.json after it started
        (run_dir / "state.json").write_text(json.dumps({**state(run_dir), "status": "running", "pid": owner.pid}))
        for flags in (["--resume"], []):
            refused = invoke(train_args(data_dir, run_dir, "--episodes", "4", *flags))
            assert_clean_failure(refused, f"is being trained now by process {owner.pid} on this machine",
                                 "then --resume (nothing was changed)")
        assert state(run_dir)["pid"] == owner.pid
        an_hour_ago = time.time() - 3600  # state.json written long before the live process started: a crash
        os.utime(run_dir / "state.json", (an_hour_ago, an_hour_ago))
        resumed = invoke(train_args(data_dir, run_dir, "--episodes", "4", "--resume"))
        assert resumed.exit_code == 0, resumed.output
    finally:
        owner.kill()
        owner.wait()
