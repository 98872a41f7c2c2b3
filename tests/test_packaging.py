"""What setup.py asks pip for, as setuptools reads it (no build): requirements that resolve to a working set of
packages at both ends of the TensorFlow range we support."""

from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture
def requirements(monkeypatch):
    from distutils.core import run_setup

    monkeypatch.chdir(REPOSITORY)  # setup.py reads README.md from the working directory
    distribution = run_setup("setup.py", stop_after="init")
    return {requirement.name: requirement for requirement in map(Requirement, distribution.install_requires)}


def test_onnx_1_19_0_is_excluded_and_the_releases_either_side_are_not(requirements):
    """onnx 1.19.0 imports ml_dtypes' float4 type (ml_dtypes >= 0.5) but declares ml_dtypes without a version;
    TensorFlow 2.16 and 2.17 pin ml_dtypes < 0.5, so pip chose 1.19.0 there and every ONNX export failed on import.
    1.18 does not use ml_dtypes; 1.19.1 and later declare ml_dtypes >= 0.5, which pip then weighs."""
    onnx = requirements["onnx"].specifier
    assert not onnx.contains("1.19.0")
    assert onnx.contains("1.18.0") and onnx.contains("1.19.1") and onnx.contains("1.23.2")


def test_the_keras_floor_reads_the_shipped_presets(requirements):
    """Keras loads `.keras` files written by its own or an earlier version (a Keras 3.15 file's initializers carry
    arguments that Keras 3.14 refuses): the lowest Keras pip may install must be at least the presets' writer."""
    import json
    import zipfile

    from packaging.version import Version

    from keras_metalstm.presets import META_LEARNER_FILE, PACKAGE_PRESETS

    floor = min(Version(spec.version) for spec in requirements["keras"].specifier if spec.operator == ">=")
    files = sorted(PACKAGE_PRESETS.glob(f"*/{META_LEARNER_FILE}"))
    assert files
    for path in files:
        with zipfile.ZipFile(path) as archive:
            written_by = Version(json.loads(archive.read("metadata.json"))["keras_version"])
        assert floor >= Version(f"{written_by.major}.{written_by.minor}"), path
