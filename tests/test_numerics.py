"""A run records how its steps round (keras_metalstm.numerics) with its newest checkpoint, and a resumed run whose
steps round differently says that it will not continue bitwise."""

import json

import pytest
import tensorflow as tf
from cli_helpers import run_cli, train_args
from conftest import needs_kernel_compiler

from keras_metalstm import numerics
from keras_metalstm.cpu_kernels import onednn_enabled
from keras_metalstm.ops import fused_kernels
from keras_metalstm.training import _op_determinism


def cpu_flags():
    """The x86 feature flags that /proc/cpuinfo lists (none elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            line = next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return []
    return line.split(":", 1)[-1].split()


@needs_kernel_compiler
@pytest.mark.skipif(not cpu_flags(), reason="no x86 feature flags in /proc/cpuinfo here (the kernels are x86 code)")
def test_the_kernels_report_the_vector_width_and_multiply_adds_of_this_cpu():
    """Built with -march=native: 16 float lanes where the CPU has AVX-512, else 8; fused multiply-adds where it
    has FMA (read here from /proc/cpuinfo, not from the build)."""
    flags = cpu_flags()
    lanes = 16 if "avx512f" in flags else 8
    assert fused_kernels.arithmetic() == f"{lanes} lanes, {'FMA' if 'fma' in flags else 'no FMA'}"


def test_a_step_s_numerics_name_this_process_s_settings(monkeypatch):
    strategy = tf.distribute.get_strategy()
    recorded = numerics.step_numerics(strategy, xla=True)
    assert recorded["tensorflow"] == tf.__version__
    assert recorded["devices"] == "1 x CPU"
    assert recorded["onednn"] == onednn_enabled()
    assert recorded["xla"] is True and recorded["fused_kernels"] == "not used under XLA"
    assert recorded == json.loads(json.dumps(recorded))  # written to state.json as it is
    assert recorded["op_determinism"] is False  # off in the tests' process (it is process-wide)
    with _op_determinism(True):  # as a deterministic training run sets it
        assert numerics.step_numerics(strategy, xla=True)["op_determinism"] is True
    without_xla = numerics.step_numerics(strategy, xla=False)
    assert without_xla["fused_kernels"] == (fused_kernels.arithmetic() or "off")
    monkeypatch.setattr(fused_kernels, "load", lambda: None)  # where they cannot run (a GPU, no compiler, switched off)
    assert numerics.step_numerics(strategy, xla=False)["fused_kernels"] == "off"


def test_differences_are_the_recorded_entries_that_changed():
    current = {"tensorflow": "2.21.0", "onednn": True, "fused_kernels": "8 lanes, FMA", "xla": False}
    assert numerics.numerics_differences(None, current) == {}  # a run from before runs recorded it
    assert numerics.numerics_differences("tensorflow 2.21.0", current) == {}  # a state.json edited by hand
    assert numerics.numerics_differences({"tensorflow": "2.21.0"}, current) == {}  # unrecorded entries: unknown
    recorded = {**current, "onednn": False, "fused_kernels": "16 lanes, FMA"}
    differences = numerics.numerics_differences(recorded, current)
    assert differences == {"onednn": (False, True), "fused_kernels": ("16 lanes, FMA", "8 lanes, FMA")}
    note = numerics.resume_note(differences)
    assert "oneDNN's CPU kernels: then off, now on" in note
    assert "the fused CPU kernels: then 16 lanes, FMA, now 8 lanes, FMA" in note
    assert "not bitwise" in note


def state(run_dir):
    return json.loads((run_dir / "state.json").read_text())


def test_a_resume_says_when_its_steps_round_differently_from_the_checkpoint_s_session(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    assert run_cli(train_args(data_dir, run_dir, "--episodes", "2", "--checkpoint-every", "2")).exit_code == 0
    written = state(run_dir)["numerics"]
    assert written == numerics.step_numerics(tf.distribute.get_strategy(), xla=False)  # --no-deterministic

    resumed = run_cli(train_args(data_dir, run_dir, "--episodes", "4", "--checkpoint-every", "2", "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert "computes differently" not in resumed.output

    # As if the checkpoint had been written on another TensorFlow without oneDNN.
    other = {**written, "tensorflow": "2.16.1", "onednn": not written["onednn"]}
    (run_dir / "state.json").write_text(json.dumps({**state(run_dir), "numerics": other}))
    # Resumed at the episode it is at, so that this session writes no checkpoint of its own.
    resumed = run_cli(train_args(data_dir, run_dir, "--episodes", "4", "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert f"TensorFlow: then 2.16.1, now {tf.__version__}" in resumed.output
    assert "oneDNN's CPU kernels: then" in resumed.output and "not bitwise" in resumed.output
    # state.json still describes the session that wrote the newest checkpoint, not the one that only read it.
    assert state(run_dir)["numerics"] == other
