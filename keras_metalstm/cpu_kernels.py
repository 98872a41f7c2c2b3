"""Which CPU kernels TensorFlow runs its convolutions and matrix products on: oneDNN's or its own (Eigen's).

TensorFlow reads TF_ENABLE_ONEDNN_OPTS once, when it is imported. Unset, it turns oneDNN's kernels on only on
some x86 CPUs (seen: on for a Zen 4 and a Xeon with AVX-512, off for an AVX2-only AMD EPYC Zen 3). On that Zen 3
TensorFlow's own matmul ran at half oneDNN's rate and an 84x84x3 meta-training step took 1.2-1.5x longer
(benchmarks/README.md). `metalstm` calls `prefer_onednn()` before any command imports TensorFlow, so every x86
machine trains on oneDNN's kernels; a user's TF_ENABLE_ONEDNN_OPTS wins. A Python program can do the same by
calling it before its first `import tensorflow` (importing keras_metalstm does not import TensorFlow).
"""

from __future__ import annotations

import os
import platform
import sys

ONEDNN_VARIABLE = "TF_ENABLE_ONEDNN_OPTS"
X86_MACHINES = ("x86_64", "amd64")


def prefer_onednn() -> bool:
    """Ask TensorFlow for oneDNN's CPU kernels in this process (and the processes it starts) by setting
    TF_ENABLE_ONEDNN_OPTS=1, unless the variable is set already, TensorFlow is already imported (too late: it has
    read the variable) or the CPU is not x86 (not measured elsewhere: TensorFlow's own choice stands). Returns
    whether it set the variable."""
    if ONEDNN_VARIABLE in os.environ or "tensorflow" in sys.modules:
        return False
    if platform.machine().lower() not in X86_MACHINES:
        return False
    os.environ[ONEDNN_VARIABLE] = "1"
    return True


def onednn_enabled() -> bool | None:
    """Whether TensorFlow runs its CPU ops on oneDNN's kernels in this process (None where it cannot tell).
    Imports TensorFlow."""
    try:
        from tensorflow.python.util import _pywrap_util_port
    except ImportError:
        return None
    return bool(_pywrap_util_port.IsMklEnabled())


def kernels_description(enabled: bool | None, setting: str | None, set_by_package: bool = False) -> str:
    """One line saying which CPU kernels TensorFlow ran and what chose them: `setting` is TF_ENABLE_ONEDNN_OPTS
    (None if unset), `set_by_package` whether `prefer_onednn` set it."""
    kernels = {True: "oneDNN's", False: "Eigen's (oneDNN off)", None: "unknown"}[enabled]
    if set_by_package:
        cause = f"keras_metalstm's prefer_onednn ({ONEDNN_VARIABLE}={setting})"
    elif setting is not None:
        cause = f"{ONEDNN_VARIABLE}={setting}"
    else:
        cause = "TensorFlow's default on this CPU"
    return f"TensorFlow's CPU kernels: {kernels}, chosen by {cause}"
