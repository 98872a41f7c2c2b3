"""What decides how this process's training steps round, recorded with a run so that a resumed run can say when it
will not continue bitwise as the uninterrupted run would have.

A resumed run sees exactly the episodes, optimizer state and episode counter of the uninterrupted run
(keras_metalstm.training). Its weights stay bitwise those of that run only if its steps also round the same way:
the same TensorFlow release, devices and replicas, CPU kernels (oneDNN's or TensorFlow's own; the library's fused
kernels, their vector width and multiply-adds, or stock ops), XLA or not, and op determinism on in both sessions.
A difference does not stop a resume: the run continues correctly, only not bitwise.
"""

from __future__ import annotations

# What each recorded entry is, as a message names it.
LABELS = {
    "tensorflow": "TensorFlow",
    "devices": "devices",
    "onednn": "oneDNN's CPU kernels",
    "fused_kernels": "the fused CPU kernels",
    "xla": "XLA",
    "op_determinism": "op determinism",
}


def step_numerics(strategy, xla: bool) -> dict:
    """{entry: value} for the LABELS of a training step run under `strategy` in this process as it is set now (op
    determinism included), JSON-serialisable.

    Without XLA, loads the fused kernels (compiling them on the first use on this machine) to ask how they round;
    with it they are not used (the XLA-compiled meta-gradient holds stock ops only)."""
    import tensorflow as tf
    from tensorflow.python.framework import config as tf_config  # not public: as training._op_determinism

    from keras_metalstm.cpu_kernels import onednn_enabled
    from keras_metalstm.ops import fused_kernels

    try:
        device = strategy.extended.worker_devices[0]
    except RuntimeError:  # the default strategy: TensorFlow places ops on its default device
        device = (tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU"))[0].name
    return {
        "tensorflow": tf.__version__,
        "devices": f"{strategy.num_replicas_in_sync} x {tf.DeviceSpec.from_string(device).device_type}",
        "onednn": onednn_enabled(),
        "fused_kernels": "not used under XLA" if xla else (fused_kernels.arithmetic() or "off"),
        "xla": bool(xla),
        "op_determinism": bool(tf_config.is_op_determinism_enabled()),
    }


def numerics_differences(recorded, current: dict) -> dict:
    """{entry: (recorded value, current value)} where they differ; nothing for a run that recorded none (written
    before runs recorded it, or a state.json edited into something else) or an entry it did not record."""
    recorded = recorded if isinstance(recorded, dict) else {}
    return {key: (recorded[key], value) for key, value in current.items() if key in recorded and recorded[key] != value}


def resume_note(differences: dict) -> str:
    """The message of a resume whose step rounds differently from the session that wrote the checkpoint."""
    listed = "; ".join(
        f"{LABELS.get(key, key)}: then {_shown(then)}, now {_shown(now)}" for key, (then, now) in differences.items()
    )
    return (
        f"this session computes differently from the one that wrote the checkpoint ({listed}): the run continues "
        "from it, but not bitwise as an uninterrupted run would; to keep it bitwise, resume with the same settings "
        "on the same kind of machine"
    )


def _shown(value) -> str:
    if value is None or isinstance(value, bool):
        return {True: "on", False: "off", None: "unknown"}[value]
    return str(value)
