"""Every failure is one clear line and a true record: I/O errors, interrupted and failed runs, bad settings.

Each test asserts the exit code, that the message names the problem, that no traceback is printed, and what is
on disk afterwards. A read-only directory and a full disk are simulated by making the write raise the real
OSError / ResourceExhaustedError (the tests run as root, whom permissions do not stop).
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import yaml
from cli_helpers import (
    assert_clean_failure,
    invoke,
    make_image_folder,
    state,
    train_args,
)
from PIL import Image


def dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# ------------------------------------------------------------------------------------------- bad settings
@pytest.mark.parametrize("flags,message", [
    (["--learning-rate", "nan"], "learning_rate must be a finite number, got nan"),
    (["--learning-rate", "inf"], "learning_rate must be a finite number, got inf"),
    (["--clip-norm", "nan"], "clip_norm must be a finite number, got nan"),
    (["--n-way", "1"], "n_way must be at least 2"),
    (["--image-shape", "28,28"], "image_shape must be H,W,C"),
    (["--image-shape", "abc"], "image_shape must be H,W,C, three whole numbers with C = 1 or 3 (e.g. 84,84,3), got "
                               "['abc']"),
    (["--image-shape", "28.5,28,1"], "image_shape must be H,W,C, three whole numbers"),
    (["--episode-batching", "batched"], "not on this CPU: add --xla, or use --episode-batching auto"),
    (["--episode-batching", "batched", "--xla", "--dtype-policy", "mixed_bfloat16"],
     "cannot be evaluated for a batch of episodes at once (conv1: mixed precision (mixed_bfloat16); "),
])
def test_bad_numbers_are_refused_before_anything_is_written(tmp_path, data_dir, flags, message):
    run_dir = tmp_path / "run"
    assert_clean_failure(invoke(train_args(data_dir, run_dir, *flags)), message)
    assert not run_dir.exists()


def test_images_too_small_for_a_built_in_learner_are_refused_with_the_smallest_shape(tmp_path, data_dir):
    """conv4 and resnet12 halve the image four times: under 16x16 the learner failed to build, in 70 lines of a
    Keras traceback."""
    for learner in ("conv4", "resnet12"):
        result = invoke([*train_args(data_dir, tmp_path / "run", "--image-shape", "15,28,1"), "--learner", learner])
        assert_clean_failure(result, f"the built-in learner {learner} halves the image four times (2x2 max pooling) "
                             "and needs images of at least 16x16, got 15x28: give --image-shape 16,16,1 or larger")
        assert not (tmp_path / "run").exists()


def test_urls_as_paths_are_refused_instead_of_becoming_local_folders(tmp_path, data_dir, trained, monkeypatch):
    """gs:// and s3:// paths (a Cloud TPU user's habit): every artifact is written beside its target and renamed,
    which object stores cannot do, and Path("gs://b/run") is the local folder gs:/b/run."""
    monkeypatch.chdir(tmp_path)
    run_dir, _ = trained
    adapted = tmp_path / "task.keras"
    support = make_image_folder(tmp_path / "support", num_classes=2, per_class=1)
    assert invoke(["adapt", run_dir, "--support", support, "--out", adapted]).exit_code == 0
    commands = {
        "the run directory": train_args(data_dir, "gs://bucket/run"),
        "data_dir": train_args("s3://bucket/images", tmp_path / "run"),
        "learner": [*train_args(data_dir, tmp_path / "run"), "--learner", "gs://bucket/learner.keras"],
        "pretrained_model": [*train_args(data_dir, tmp_path / "run"), "--theta0-init", "pretrained",
                             "--pretrained-model", "gs://bucket/classifier.keras"],
        "the run directory ": ["evaluate", "gs://bucket/run", "--no-progress"],
        "the export target": ["export", adapted, "--out", "gs://bucket/models/task"],
        "the export target ": ["adapt", run_dir, "--support", support, "--out", "gs://bucket/task.keras"],
    }
    for what, args in commands.items():
        assert_clean_failure(invoke(args), f"{what.strip()} ", "is a URL: it must be a local path", "mount the bucket")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["support", "task.keras"]


def test_resume_of_a_missing_run_is_refused(tmp_path, data_dir):
    result = invoke(train_args(data_dir, tmp_path / "misspelled", "--resume"))
    assert_clean_failure(result, "holds no training run to resume")
    assert not (tmp_path / "misspelled").exists()


def test_resume_with_fewer_episodes_than_done_is_refused_and_changes_nothing(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    assert invoke(train_args(data_dir, run_dir, "--episodes", "6", "--checkpoint-every", "2")).exit_code == 0
    before = (run_dir / "config.yaml").read_text()
    result = invoke(train_args(data_dir, run_dir, "--resume", "--episodes", "4"))
    assert_clean_failure(result, "already at episode 6", "--episodes above 6")
    assert (run_dir / "config.yaml").read_text() == before


def test_a_test_split_too_small_for_the_episodes_is_said_at_the_start_of_training(tmp_path):
    from keras_metalstm.data import load_dataset

    data_dir = make_image_folder(tmp_path / "data", num_classes=12, per_class=5)
    small = load_dataset("folder", data_dir).test.class_names[0]
    for image in sorted((data_dir / small).glob("*.png"))[2:]:
        image.unlink()  # 2 images left: 1 support + 2 queries do not fit
    result = invoke(train_args(data_dir, tmp_path / "run", "--query", "2", "--episodes", "2"))
    assert result.exit_code == 0, result.output  # training does not need the test split ...
    for fragment in ("will not find test episodes", f"class {small!r}", "has 2 images",
                     "lower the queries (--query) or, for a new run, the shots (--k-shot)"):
        assert fragment in result.output  # ... but the user hears of it now, not at evaluation time


def test_a_split_with_too_few_classes_for_the_episodes_says_how_the_classes_are_split_and_the_ways_out(tmp_path):
    data_dir = make_image_folder(tmp_path / "data", num_classes=8, per_class=3)  # 5 / 1 / 2 by the seeded split
    result = invoke(train_args(data_dir, tmp_path / "run", "--n-way", "2", "--episodes", "2"))
    assert_clean_failure(result, "need at least 2 classes", "the data set has 8 classes split 5 train / 1 val / 2 "
                         "test, images 28x28x1: a split file (--split-file)", "--val-episodes 0")
    assert not (tmp_path / "run").exists()


def test_classes_too_small_for_the_episodes_are_left_out_on_request_and_said(tmp_path):
    """A folder with a few small classes: refused by default (the message names the option), trained with
    --drop-small-classes, which says how many classes of each split it left out and stays fixed on --resume."""
    from keras_metalstm.data import load_dataset

    data_dir = make_image_folder(tmp_path / "data", num_classes=16, per_class=5)
    splits = load_dataset("folder", data_dir)
    small = [splits.train.class_names[0], splits.train.class_names[1], splits.test.class_names[0]]
    for name in small:
        for image in sorted((data_dir / name).glob("*.png"))[2:]:
            image.unlink()  # 2 images left: 1 support + 2 queries do not fit
    refused = invoke(train_args(data_dir, tmp_path / "refused", "--episodes", "2"))
    assert_clean_failure(refused, "has 2 images", "metalstm train --drop-small-classes")
    assert not (tmp_path / "refused").exists()

    result = invoke(train_args(data_dir, tmp_path / "run", "--episodes", "2", "--drop-small-classes"))
    assert result.exit_code == 0, result.output
    assert "left out 3 of 16 classes with fewer than K + Q = 3 images (--drop-small-classes): train 2, val 0, " \
           "test 1" in result.output
    assert "will not find test episodes" not in result.output
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["drop_small_classes"] is True
    changed = invoke(train_args(data_dir, tmp_path / "run", "--episodes", "4", "--resume", "--keep-small-classes"))
    assert_clean_failure(changed, "drop_small_classes: run has True, requested False")
    # when too few classes are left for the episodes, the refusal says what --drop-small-classes left out
    emptied = invoke(train_args(data_dir, tmp_path / "emptied", "--query", "9", "--drop-small-classes"))
    assert_clean_failure(emptied, "need at least 2 classes", "the data set has 0 classes split 0 train",
                         "; left out 16 of 16 classes with fewer than K + Q = 10 images (--drop-small-classes)")


class ThreeWorkerCluster:
    class cluster_resolver:  # noqa: N801 - the attribute tf.distribute strategies have
        task_type, task_id = "worker", 1

        @staticmethod
        def cluster_spec():
            import tensorflow as tf

            return tf.train.ClusterSpec({"chief": ["chief:1"], "worker": ["one:1", "two:1"]})


def test_a_meta_gradient_too_large_for_the_machines_memory_is_said_at_the_start(tmp_path, data_dir, monkeypatch):
    """Past the machine's memory the system kills the run with no message of ours: the user hears it at the start,
    with the estimate from the step's measured footprint per coordinate, inner step and episode."""
    import tensorflow as tf

    import keras_metalstm.training_session as training_session
    from keras_metalstm.distribute import episodes_per_worker
    from keras_metalstm.run_checks import (
        FEWEST_BYTES_PER_COORDINATE_STEP,
        MOST_BYTES_PER_COORDINATE_STEP,
        memory_problem,
    )

    assert 200 < FEWEST_BYTES_PER_COORDINATE_STEP < MOST_BYTES_PER_COORDINATE_STEP < 1000
    # A ResNet-18-sized learner at T = 12 on a 25 GB machine; conv4 fits.
    note = memory_problem(11_000_000, 12, 1, 25e9)
    assert "11,000,000 parameters" in note and "about 30-105 GB, more than its 25 GB" in note
    assert memory_problem(112_261, 12, 8, 25e9) is None
    assert episodes_per_worker(tf.distribute.get_strategy(), 6) == 6
    assert episodes_per_worker(ThreeWorkerCluster(), 6) == 2  # each machine holds its share

    monkeypatch.setattr(training_session, "physical_memory", lambda: 1000)  # a 1 kB machine
    result = invoke(train_args(data_dir, tmp_path / "run", "--episodes", "2", "--meta-batch", "2"))
    assert result.exit_code == 0, result.output  # a note, not a refusal: the estimate is a lower bound
    assert "for 2 episode(s) at once on this machine keeps about" in result.output, result.output
    assert "Lower --inner-steps or --meta-batch" in result.output


# ------------------------------------------------------------------------------------------- I/O failures
def test_a_read_only_run_directory_is_one_clear_line(tmp_path, data_dir, monkeypatch):
    import keras_metalstm.config as config_module

    def read_only(path, text):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(config_module, "atomic_write_text", read_only)
    result = invoke(train_args(data_dir, tmp_path / "run", "--episodes", "2"))
    assert_clean_failure(result, "Read-only file system", str(tmp_path / "run" / "config.yaml"))


def test_a_full_disk_while_writing_best_keras_names_it_and_leaves_no_temporary_file(tmp_path, data_dir,
                                                                                      monkeypatch):
    """A full disk's ENOSPC from write() carries no file name: the message named no path, and the half-written
    temporary file stayed in the run directory for good."""
    import keras_metalstm as km

    def save_on_a_full_disk(model, path, *args, **kwargs):
        with open(path, "wb") as partial:
            partial.write(b"PK\x03\x04 half a zip")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(km.MetaLearner, "save", save_on_a_full_disk)
    run_dir = tmp_path / "run"
    result = invoke(train_args(data_dir, run_dir, "--episodes", "2"))
    assert_clean_failure(result, f"cannot write or read {run_dir / 'best.keras'}: No space left on device")
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(".")] == []
    # a start that failed before it wrote state.json (a disk full from the start): --resume starts it again
    (run_dir / "state.json").unlink()
    shutil.rmtree(run_dir / "checkpoints")
    monkeypatch.undo()
    refused = invoke(train_args(data_dir, run_dir, "--episodes", "2"))
    assert_clean_failure(refused, "holds a run that was set up but never started", "pass --resume to start it")
    again = invoke(train_args(data_dir, run_dir, "--episodes", "2", "--resume"))
    assert again.exit_code == 0, again.output


@pytest.mark.parametrize("folder,what,episode,kept,last", [
    ("checkpoints", "checkpoint", 4, os.path.join("checkpoints", "ckpt-3") + ")", 3),  # the validation's
    ("best", "best checkpoint", 3, "kept (none yet)", 2),  # the first validation is the best so far
])
def test_a_full_disk_during_a_checkpoint_keeps_the_last_one_and_says_failed(tmp_path, data_dir, monkeypatch, folder,
                                                                            what, episode, kept, last):
    import tensorflow as tf

    run_dir = tmp_path / "run"
    real_save = tf.train.CheckpointManager.save

    def save(manager, checkpoint_number=None, **kwargs):
        if checkpoint_number == episode and manager.directory.endswith(folder):
            partial = os.path.join(manager.directory, f"ckpt-{episode}_temp")
            os.makedirs(partial)  # where TensorFlow writes before it renames
            raise tf.errors.ResourceExhaustedError(None, None, (
                "{{function_node __wrapped__SaveV2_dtypes_31_device_/job:localhost/replica:0/task:0/device:CPU:0}} "
                f"{partial}/part-00000-of-00001.data-00000-of-00001.tempstate1844; No space left on device [Op:SaveV2]"
            ))
        return real_save(manager, checkpoint_number=checkpoint_number, **kwargs)

    monkeypatch.setattr(tf.train.CheckpointManager, "save", save)
    result = invoke(train_args(data_dir, run_dir, "--episodes", "6", "--checkpoint-every", "2",
                               "--validate-every", "3"))
    assert_clean_failure(result, f"cannot save the {what} of episode {episode} in {run_dir / folder}: No space left "
                         "on device. The last", kept)
    assert "function_node" not in result.output and "tempstate" not in result.output
    assert not list((run_dir / folder).glob("*_temp*"))
    record = state(run_dir)
    assert record["status"].startswith("failed: ") and "No space left" in record["status"]
    assert record["episode"] == episode and record["checkpoint"]["episode"] == last
    # As if the sessions before had trained for 1,000 s: the resumed run counts on from its checkpoint's time.
    (run_dir / "state.json").write_text(json.dumps({**record, "checkpoint": {"episode": last, "seconds": 1000.0}}))
    monkeypatch.undo()
    resumed = invoke(train_args(data_dir, run_dir, "--resume", "--episodes", "6"))
    assert resumed.exit_code == 0, resumed.output
    assert (f"the previous session stopped at episode {episode} (failed: TrainingError: cannot save the {what} "
            f"of episode {episode}") in resumed.output
    assert f"resuming from that checkpoint, episode {last}" in resumed.output
    assert state(run_dir)["status"] == "finished" and state(run_dir)["seconds"] > 1000


def test_corrupt_exports_given_to_predict(tmp_path):
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((28, 28), np.uint8), mode="L").save(image)
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(os.urandom(300))
    assert_clean_failure(invoke(["predict", onnx, image]), "cannot load the ONNX model", "export it again")
    version = tmp_path / "saved" / "1"
    version.mkdir(parents=True)
    (version / "saved_model.pb").write_bytes(b"\x08\x01\x12" + os.urandom(40))
    assert_clean_failure(invoke(["predict", version, image]), "cannot load the SavedModel", "export it again")
    keras_file = tmp_path / "task.keras"
    keras_file.write_bytes(os.urandom(500))
    assert_clean_failure(invoke(["predict", keras_file, image]), "is not a Keras model file")


# --------------------------------------------------------------------------------------- interrupted runs
def test_ctrl_c_twice_during_validation_is_recorded_as_interrupted(tmp_path, data_dir, monkeypatch):
    import keras_metalstm.evaluation as evaluation

    def second_ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    run_dir = tmp_path / "run"
    monkeypatch.setattr(evaluation, "evaluate_episodes", second_ctrl_c)
    result = invoke(train_args(data_dir, run_dir, "--episodes", "8", "--checkpoint-every", "2",
                               "--validate-every", "4"))
    assert result.exit_code != 0
    record = state(run_dir)
    assert record["status"] == "interrupted" and record["episode"] == 4


def test_a_start_interrupted_before_the_first_checkpoint_can_be_started_again(tmp_path, data_dir, monkeypatch):
    import keras_metalstm.baseline_cache as baseline_cache

    def ctrl_c_while_pretraining(*args, **kwargs):
        raise KeyboardInterrupt

    run_dir = tmp_path / "run"
    monkeypatch.setattr(baseline_cache, "cached_pretrained_classifier", ctrl_c_while_pretraining)
    first = invoke(train_args(data_dir, run_dir, "--episodes", "2", "--theta0-init", "pretrained"))
    assert first.exit_code != 0 and (run_dir / "config.yaml").is_file()
    monkeypatch.undo()
    again = invoke(train_args(data_dir, run_dir, "--episodes", "2", "--checkpoint-every", "2"))
    assert again.exit_code == 0, again.output
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["theta0_init"] == "scratch"


def test_a_run_killed_while_running_before_its_first_checkpoint_can_be_started_again(tmp_path, data_dir):
    """SIGKILL after the training loop began (state.json says "running") but before any checkpoint: nothing of
    the run is worth keeping, and its process is gone."""
    run_dir = tmp_path / "run"
    assert invoke(train_args(data_dir, run_dir, "--episodes", "2")).exit_code == 0
    shutil.rmtree(run_dir / "checkpoints")
    shutil.rmtree(run_dir / "best", ignore_errors=True)
    (run_dir / "best.keras").unlink(missing_ok=True)
    record = {**state(run_dir), "status": "running", "episode": 0, "pid": dead_pid()}
    (run_dir / "state.json").write_text(json.dumps(record))
    again = invoke(train_args(data_dir, run_dir, "--episodes", "2"))
    assert again.exit_code == 0, again.output
    assert state(run_dir)["status"] == "finished"


def test_ctrl_c_while_a_command_starts_ends_with_130_and_a_later_run_starts_afresh(tmp_path, data_dir, monkeypatch):
    import keras_metalstm.training as training

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    run_dir = tmp_path / "run"
    monkeypatch.setattr(training, "load_splits", ctrl_c)
    first = invoke(train_args(data_dir, run_dir, "--episodes", "2"))
    assert first.exit_code == 130 and "interrupted" in first.output and "Aborted" not in first.output
    monkeypatch.undo()
    assert invoke(train_args(data_dir, run_dir, "--episodes", "2")).exit_code == 0


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_with_its_exit_code_and_the_resumed_log_equals_an_uninterrupted_one(
        tmp_path, data_dir, monkeypatch, signum, code):
    from keras_metalstm.cli.train import ProgressBar

    flags = ["--episodes", "8", "--log-every", "4", "--checkpoint-every", "8", "--validate-every", "8"]
    assert invoke(train_args(data_dir, tmp_path / "full", *flags)).exit_code == 0
    real_step = ProgressBar.on_step

    def signal_at_episode_3(bar, episode, loss, accuracy):
        real_step(bar, episode, loss, accuracy)
        if episode == 3:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(ProgressBar, "on_step", signal_at_episode_3)
    stopped = invoke(train_args(data_dir, tmp_path / "stopped", *flags))
    assert stopped.exit_code == code, stopped.output
    assert state(tmp_path / "stopped")["status"] == "interrupted"
    monkeypatch.undo()
    resumed = invoke(train_args(data_dir, tmp_path / "stopped", "--resume", *flags))
    assert resumed.exit_code == 0, resumed.output

    def train_rows(run_dir):
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [(r["episode"], r["loss"], r["accuracy"]) for r in rows if r["kind"] == "train"]

    full, stopped_rows = train_rows(tmp_path / "full"), train_rows(tmp_path / "stopped")
    assert [r[0] for r in stopped_rows] == [r[0] for r in full] == [4, 8]
    # episode 4's row averages episodes 1-4, three of them from before the stop
    np.testing.assert_allclose(np.array(stopped_rows)[:, 1:], np.array(full)[:, 1:], rtol=1e-4, atol=1e-6)


def test_stale_export_temporaries_of_a_killed_export_are_removed_by_the_next_export(tmp_path):
    import keras

    import keras_metalstm as km
    from keras_metalstm import export

    keras.utils.set_random_seed(0)
    learner = km.learners.conv4(input_shape=(28, 28, 1), num_classes=2, filters=2)
    adapted = export.AdaptedLearner(learner, ["a", "b"])
    models = tmp_path / "models"
    stale = models / f".1.tmp-{dead_pid()}-0123abcd"  # what kill -9 during an export leaves
    (stale / "variables").mkdir(parents=True)
    alive = models / f".2.tmp-{os.getpid()}-89abcdef"  # a concurrent export of this process: kept
    alive.mkdir()
    result = export.export_adapted(adapted, models, format="savedmodel")
    assert result.path == models / "1" and (models / "1" / "saved_model.pb").is_file()
    assert not stale.exists() and alive.exists()


def test_a_failed_export_leaves_no_empty_model_folder(tmp_path):
    from keras_metalstm.export.files import atomic_path

    target = tmp_path / "saved_models" / "task" / "1"
    with pytest.raises(RuntimeError, match="the converter failed"), atomic_path(target, directory=True):
        raise RuntimeError("the converter failed")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "saved_models").mkdir()
    (tmp_path / "saved_models" / "other").mkdir()  # a folder that was there before stays
    with pytest.raises(KeyboardInterrupt), atomic_path(target, directory=True):
        raise KeyboardInterrupt
    assert [p.name for p in (tmp_path / "saved_models").iterdir()] == ["other"]
    with atomic_path(target, directory=True) as written:
        (written / "saved_model.pb").write_bytes(b"model")
    assert (target / "saved_model.pb").read_bytes() == b"model"


def test_a_folder_of_mixed_sizes_and_modes_trains_with_image_shape(tmp_path):
    data_dir = make_image_folder(tmp_path / "data", num_classes=12, per_class=5)
    for folder in sorted(data_dir.iterdir())[::2]:  # every other class as 32x32 RGB
        for image in folder.glob("*.png"):
            with Image.open(image) as grey:
                grey.convert("RGB").resize((32, 32)).save(image)
    refused = invoke(train_args(data_dir, tmp_path / "refused", "--episodes", "2"))
    assert_clean_failure(refused, "mixed shapes", "--image-shape H,W,C")
    assert not (tmp_path / "refused").exists()
    trained = invoke(train_args(data_dir, tmp_path / "run", "--episodes", "2", "--image-shape", "28,28,1"))
    assert trained.exit_code == 0, trained.output
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["image_shape"] == [28, 28, 1]


def test_an_unreadable_image_is_named_in_one_sentence(tmp_path):
    data_dir = make_image_folder(tmp_path / "data", num_classes=12, per_class=5)
    broken = next((data_dir / "class_03").glob("*.png"))
    broken.write_bytes(b"not an image")
    result = invoke(train_args(data_dir, tmp_path / "run", "--episodes", "2"))
    assert_clean_failure(result, "unreadable image file(s)", broken.name, "Replace or delete them")
    assert ".." not in result.output.replace(str(tmp_path), "")


def test_where_theta0_cannot_start_is_refused_before_training(tmp_path):
    """theta_0 from a --pretrained-model file that is not there, or from the cached classifier under multi-worker
    (each worker would pre-train its own): refused by the run's start-up check; a scratch run passes."""
    import tensorflow as tf

    import keras_metalstm as km
    from keras_metalstm.config import RunConfig
    from keras_metalstm.learner_architecture import architecture_config
    from keras_metalstm.run_checks import check_theta0_source
    from keras_metalstm.runs import TrainingError

    architecture = architecture_config(km.learners.conv4(input_shape=(28, 28, 1), num_classes=5))
    one_device = tf.distribute.get_strategy()
    check_theta0_source(RunConfig(), one_device, architecture)
    check_theta0_source(RunConfig(theta0_init="pretrained"), one_device, architecture)
    missing = RunConfig(theta0_init="pretrained", pretrained_model=str(tmp_path / "gone.keras"))
    with pytest.raises(TrainingError, match=r"gone\.keras does not exist; pass a \.keras classifier"):
        check_theta0_source(missing, one_device, architecture)

    class MultiWorker(tf.distribute.MultiWorkerMirroredStrategy):
        def __init__(self):  # the type is what the check looks at; no cluster is needed
            pass

    with pytest.raises(TrainingError, match="under a multi-worker strategy needs --pretrained-model"):
        check_theta0_source(RunConfig(theta0_init="pretrained"), MultiWorker(), architecture)
    check_theta0_source(missing.replace(pretrained_model=None, theta0_init="scratch"), MultiWorker(), architecture)
