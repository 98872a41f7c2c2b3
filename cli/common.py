"""Helpers shared by the commands: config layering (file < METALSTM_* env < flags) and error reporting."""

from __future__ import annotations

import contextlib
import time

import click

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def layered_config(base: dict, config_file: str | None, flags: dict) -> dict:
    """base < config file < METALSTM_* environment < flags that were given (not None)."""
    from keras_metalstm.config import env_overrides, read_config_file

    values = dict(base)
    if config_file:
        values.update(read_config_file(config_file))
    values.update(env_overrides())
    values.update({k: v for k, v in flags.items() if v is not None})
    return values


@contextlib.contextmanager
def user_errors():
    """Turn the library's expected errors into a clear message and a non-zero exit (no traceback)."""
    from keras_metalstm.config import ConfigError
    from keras_metalstm.data import DataError
    from keras_metalstm.export.errors import ExportError
    from keras_metalstm.presets import PresetError
    from keras_metalstm.runs import TrainingError

    try:
        yield
    except (ConfigError, DataError, ExportError, PresetError, TrainingError) as error:
        raise click.ClickException(str(error)) from None
    except OSError as error:
        raise click.ClickException(os_error_message(error)) from None


def os_error_message(error: OSError) -> str:
    """One line for a file-system failure (read-only directory, full disk, missing permission...)."""
    where = f" {error.filename}" if error.filename else ""
    return (
        f"cannot write or read{where}: {error.strerror or error}. Check that the path is writable and the disk "
        "has space; files written before were kept"
    )


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class Timer:
    def __init__(self):
        self.start = time.time()

    @property
    def seconds(self) -> float:
        return time.time() - self.start


def quiet_tensorflow():
    """Silence TensorFlow's C++ start-up chatter (set before TensorFlow is imported)."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
