"""oneDNN's CPU kernels: prefer_onednn asks for them before TensorFlow reads the setting, a user's setting wins,
and `metalstm` asks before any command imports TensorFlow. Each case runs in a fresh process, because TensorFlow
reads TF_ENABLE_ONEDNN_OPTS once, when it is imported."""

import os
import platform
import subprocess
import sys

import pytest

from keras_metalstm.cpu_kernels import X86_MACHINES, kernels_description

ON_X86 = platform.machine().lower() in X86_MACHINES
ORIGINAL_SETTING = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
only_on_x86 = pytest.mark.skipif(not ON_X86, reason="prefer_onednn leaves TensorFlow's choice alone off x86")


def run_fresh(script, onednn_setting=None):
    """stdout's last line of `script` in a new interpreter, with TF_ENABLE_ONEDNN_OPTS as given (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    if onednn_setting is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = onednn_setting
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()[-1]


PREFER_THEN_IMPORT = """
import os
from keras_metalstm.cpu_kernels import onednn_enabled, prefer_onednn
chosen = prefer_onednn()
print(chosen, os.environ.get("TF_ENABLE_ONEDNN_OPTS"), onednn_enabled())
"""


@only_on_x86
def test_prefer_onednn_turns_the_kernels_on_before_tensorflow_is_imported():
    assert run_fresh(PREFER_THEN_IMPORT) == "True 1 True"


def test_a_users_setting_wins_over_prefer_onednn():
    assert run_fresh(PREFER_THEN_IMPORT, onednn_setting="0") == "False 0 False"


def test_prefer_onednn_changes_nothing_once_tensorflow_is_imported():
    script = "import tensorflow\n" + PREFER_THEN_IMPORT.replace("onednn_enabled()", "'-'")
    assert run_fresh(script) == "False None -"


@only_on_x86
def test_the_command_line_asks_for_onednn_before_a_command_imports_tensorflow():
    # A stand-in command, registered on the real group, reports what TensorFlow chose when the command ran.
    script = """
import os
import click
from click.testing import CliRunner
from keras_metalstm.cli.main import main
from keras_metalstm.cpu_kernels import onednn_enabled

@main.command("probe")
def probe():
    click.echo(f"{os.environ.get('TF_ENABLE_ONEDNN_OPTS')} {onednn_enabled()}")

print(CliRunner().invoke(main, ["probe"]).output.strip())
"""
    assert run_fresh(script) == "1 True"


@pytest.mark.parametrize(("machine", "sets_it"), [("x86_64", True), ("AMD64", True), ("aarch64", False)])
def test_prefer_onednn_sets_the_variable_only_on_x86(monkeypatch, machine, sets_it):
    # As before TensorFlow's import: the variable unset and no TensorFlow in sys.modules (both restored after).
    import keras_metalstm.cpu_kernels as cpu_kernels

    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "registers the variable's restoration")
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS")
    monkeypatch.delitem(sys.modules, "tensorflow", raising=False)
    monkeypatch.setattr(cpu_kernels.platform, "machine", lambda: machine)
    assert cpu_kernels.prefer_onednn() is sets_it
    assert os.environ.get("TF_ENABLE_ONEDNN_OPTS") == ("1" if sets_it else None)


def test_the_variable_set_by_a_test_above_is_gone():
    # prefer_onednn's tests must not leave the variable to this process's later subprocesses.
    assert os.environ.get("TF_ENABLE_ONEDNN_OPTS") == ORIGINAL_SETTING


def test_the_kernels_description_names_what_chose_them():
    assert kernels_description(True, "1", set_by_package=True) == (
        "TensorFlow's CPU kernels: oneDNN's, chosen by keras_metalstm's prefer_onednn (TF_ENABLE_ONEDNN_OPTS=1)"
    )
    assert kernels_description(False, "0").endswith("Eigen's (oneDNN off), chosen by TF_ENABLE_ONEDNN_OPTS=0")
    assert kernels_description(True, None).endswith("oneDNN's, chosen by TensorFlow's default on this CPU")
