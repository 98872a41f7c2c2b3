"""The command line is quiet by default: no TensorFlow start-up line on a CPU-only machine, other stderr kept."""

import os
import re
import subprocess
import sys

from cli_helpers import TINY_FLAGS, make_image_folder

# Any line of TensorFlow's C++ logging ("I0000 00:00:... file.cc:31] ...", "2025-09-17 ...: I external/...")
# or of the messages a CPU-only machine prints at start-up.
TENSORFLOW_LOG_LINE = re.compile(
    r"^[IWEF]\d{4} \d\d:\d\d:|^\d{4}-\d\d-\d\d [\d:.]+: [IWEF] |cuInit|cudart|oneDNN|absl::InitializeLog"
)


def quiet_environment(**extra):
    """The user's environment as a fresh shell has it: none of the variables that change the logging."""
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "METALSTM_VERBOSE")}
    return {**env, **extra}


def test_train_prints_no_tensorflow_start_up_line(tmp_path):
    data_dir = make_image_folder(tmp_path / "data", num_classes=8, per_class=3)
    first = sorted(data_dir.iterdir())[0]
    (data_dir / "stray.png").write_bytes(next(first.iterdir()).read_bytes())  # left out, with a warning
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "keras_metalstm.cli.main", "train", "--dataset", "folder", "--data-dir",
         str(data_dir), "--run-dir", str(run_dir), *TINY_FLAGS, "--episodes", "2", "--val-episodes", "0",
         "--checkpoint-every", "2"],
        capture_output=True, text=True, env=quiet_environment(), timeout=300,
    )
    assert result.returncode == 0, result.stderr
    output = (result.stdout + result.stderr).splitlines()
    assert [line for line in output if TENSORFLOW_LOG_LINE.search(line)] == []
    # a warning is one line for the user, without the file, line and source line Python adds
    warned = [line for line in output if "stray.png" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: keras_metalstm: image folder"), output
    assert not [line for line in output if "Warning" in line or ".py:" in line], output
    summary = [line for line in output if line.startswith("finished: 2 episodes")]
    assert summary, output  # the summary line is there, naming only what the run wrote (no validation: no best/)
    assert summary[0].endswith(f"{run_dir} (config.yaml, checkpoints/, best.keras, metrics.jsonl, curves.png)")
    assert (run_dir / "state.json").exists()

    helped = subprocess.run([sys.executable, "-m", "keras_metalstm.cli.main", "quickstart", "--help"],
                            capture_output=True, text=True, env=quiet_environment(), timeout=120)
    assert helped.returncode == 0 and "--episodes" in helped.stdout
    assert not [line for line in (helped.stdout + helped.stderr).splitlines() if TENSORFLOW_LOG_LINE.search(line)]


def test_a_first_build_of_the_fused_kernels_is_announced(tmp_path):
    # The first step of a fresh machine compiles the kernels (20-30 s on 2 cores): the CLI says so, on one line.
    # A stand-in compiler writes no real library, so the run then goes on with stock ops, warning once.
    data_dir = make_image_folder(tmp_path / "data", num_classes=8, per_class=3)
    compiler = tmp_path / "c++"
    compiler.write_text('#!/bin/sh\nwhile [ "$1" != "-o" ]; do shift; done\necho not a library > "$2"\n')
    compiler.chmod(0o755)
    result = subprocess.run(
        [sys.executable, "-m", "keras_metalstm.cli.main", "train", "--dataset", "folder", "--data-dir",
         str(data_dir), "--run-dir", str(tmp_path / "run"), *TINY_FLAGS, "--episodes", "1", "--val-episodes", "0"],
        capture_output=True, text=True, timeout=300,
        env=quiet_environment(KERAS_METALSTM_CACHE=str(tmp_path / "kernels"), CXX=str(compiler)),
    )
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    compiling = [line for line in lines if line.startswith("compiling the fused CPU kernels")]
    assert len(compiling) == 1 and str(tmp_path / "kernels") in compiling[0], result.stderr
    assert len([line for line in lines if line.startswith("compiled the fused CPU kernels in")]) == 1


def test_compare_prints_its_line_and_no_tensorflow_start_up_line(tmp_path):
    import json

    import numpy as np

    from keras_metalstm.evaluation import EvaluationReport, summarise

    paths = []
    for name, value in (("a", 0.8), ("b", 0.5)):
        accuracies = {"meta_lstm": np.full(10, value)}
        report = EvaluationReport({"meta_lstm": summarise(accuracies["meta_lstm"])}, 5, 1, 12, "fontglot", "test",
                                  1000, 1.0, accuracies=accuracies)
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(report.to_dict()))
    result = subprocess.run([sys.executable, "-m", "keras_metalstm.cli.main", "compare", *map(str, paths)],
                            capture_output=True, text=True, env=quiet_environment(), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "+30.00 +- 0.00 points (paired over the same 10 episodes)" in result.stdout
    assert not [line for line in (result.stdout + result.stderr).splitlines() if TENSORFLOW_LOG_LINE.search(line)]


def test_start_up_filter_drops_only_the_noise_and_replays_the_rest(tmp_path):
    # A child process whose "TensorFlow import" writes to file descriptor 2 directly, as C++ code does.
    script = (
        "import os, sys\n"
        "from keras_metalstm.cli.common import START_UP_NOISE, _stderr_without\n"
        "with _stderr_without(START_UP_NOISE):\n"
        "    os.write(2, b'I0000 00:00:1.5 1 cudart_stub.cc:31] Could not find cuda drivers on your machine\\n')\n"
        "    os.write(2, b'a real problem the user must see\\n')\n"
        "    os.write(2, b'E0000 00:00:1.6 1 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR (303)\\n')\n"
        "os.write(2, b'after the import\\n')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == ["a real problem the user must see", "after the import"]


def test_verbose_and_a_user_set_log_level_leave_tensorflow_alone():
    script = (
        "import os, sys\n"
        "from keras_metalstm.cli import common\n"
        "common.quiet_tensorflow()\n"
        "print(os.environ.get('TF_CPP_MIN_LOG_LEVEL'), 'tensorflow' in sys.modules)\n"
    )
    runs = {
        "verbose": quiet_environment(METALSTM_VERBOSE="1"),
        "user level": quiet_environment(TF_CPP_MIN_LOG_LEVEL="0"),
    }
    printed = {
        name: subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                             timeout=120).stdout.split()
        for name, env in runs.items()
    }
    # neither sets a level nor imports TensorFlow under the filter (the default's effect: the first test)
    assert printed == {"verbose": ["None", "False"], "user level": ["0", "False"]}
