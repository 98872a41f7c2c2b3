"""Helpers shared by the commands: config layering (file < METALSTM_* env < flags) and error reporting."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import time
import warnings

import click

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
# Options of the commands that score a run's meta-learner on test episodes (evaluate, inspect): the same seed
# gives the same episodes to both.
SEED_OPTION = click.option(
    "--seed",
    type=int,
    default=1000,
    show_default=True,
    envvar="METALSTM_EVAL_SEED",
    show_envvar=True,
    help="Seed of the test episodes.",
)
CHECKPOINT_OPTION = click.option(
    "--checkpoint",
    type=click.Choice(("best", "latest")),
    default="best",
    show_default=True,
    help="Best-validation or latest checkpoint (best: the latest when no validation ran, and so named).",
)


def layered_config(base: tuple[str, dict], config_file: str | None, flags: dict):
    """The RunConfig of base (where, values) < config file < METALSTM_* environment < flags that were given (not
    None); a value the checks refuse is named with the file, variable or flag it came from."""
    from keras_metalstm.config import ENV_PREFIX, env_overrides, layered_run_config, read_config_file

    layers = [base]
    if config_file:
        layers.append((f"config file {config_file}", read_config_file(config_file)))
    for name, value in env_overrides().items():
        layers.append((f"environment variable {ENV_PREFIX}{name.upper()}", {name: value}))
    layers += [(f"--{name.replace('_', '-')}", {name: value}) for name, value in flags.items() if value is not None]
    return layered_run_config(layers)


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


class LibraryMessages(logging.Handler):
    """Writes the library's log messages to stderr above any progress bar (tqdm.write), one line each."""

    def emit(self, record):
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def show_library_messages():
    """Show the library's INFO messages (keras_metalstm.*: a first build of the fused kernels...) on stderr, and
    every warning as one line, "warning: <message>"."""
    library = logging.getLogger("keras_metalstm")
    if not any(isinstance(handler, LibraryMessages) for handler in library.handlers):
        handler = LibraryMessages()
        handler.setFormatter(logging.Formatter("%(message)s"))
        library.addHandler(handler)
    library.setLevel(logging.INFO)
    # A warning is a line for the user: Python's form adds the file, line number and source line that raised it.
    warnings.formatwarning = _one_line_warning


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def image_reading_bar(enabled: bool):
    """A block in which image files read by the data loaders show a bar on stderr (from one second on; it goes
    when the reading is done)."""
    from tqdm import tqdm

    from keras_metalstm.data import reading_progress

    def bar(total):
        return tqdm(
            total=total, unit="img", desc="read images", file=sys.stderr, dynamic_ncols=True, leave=False, delay=1.0
        )

    return reading_progress(bar if enabled else None)


def progress_bar(desc: str, total: int, unit: str, enabled: bool):
    """A bar of `total` units on stderr; a context manager that closes it."""
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc=desc, disable=not enabled, file=sys.stderr, dynamic_ncols=True)


@contextlib.contextmanager
def episode_bar(desc: str, episodes: int, enabled: bool):
    """Yields `update(count=1)` for a bar of `episodes` episodes on stderr, with the data's image files shown by
    `image_reading_bar` while they are read. The bar opens at the first episode, so that an error in loading the
    run or its data is not printed under an empty bar; it is closed at the end, whatever happens."""
    opened = []

    def update(count=1):
        if not opened:
            opened.append(progress_bar(desc, episodes, "ep", enabled))
        opened[0].update(count)

    try:
        with image_reading_bar(enabled):
            yield update
    finally:
        for bar in opened:
            bar.close()


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


# What TensorFlow writes to the process's stderr on every machine without a GPU, before its own logging is set
# up (TF_CPP_MIN_LOG_LEVEL does not reach these lines): nothing a user can act on.
START_UP_NOISE = re.compile(
    r"absl::InitializeLog|cudart_stub\.cc|cuInit|oneDNN custom operations|Unable to register cu\w+ factory"
    r"|computation placer already registered|This TensorFlow binary is optimized|rebuild TensorFlow with"
)


def quiet_tensorflow():
    """Import TensorFlow without its start-up chatter: C++ logs below warnings are off, and the lines it writes
    while loading and finding no GPU are dropped (any other line it writes then is passed on). A user-set
    TF_CPP_MIN_LOG_LEVEL, `metalstm --verbose` or METALSTM_VERBOSE=1 leaves everything as TensorFlow does it."""
    if os.environ.get("METALSTM_VERBOSE", "") not in ("", "0") or "TF_CPP_MIN_LOG_LEVEL" in os.environ:
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    if "tensorflow" in sys.modules:
        return
    with _stderr_without(START_UP_NOISE):
        import tensorflow as tf

        tf.config.list_physical_devices()  # the CUDA probe ("failed call to cuInit") happens here, filtered
    # Python-side deprecation and retracing notices of TensorFlow/absl: the CLI's own messages say what matters.
    tf.get_logger().setLevel("ERROR")


@contextlib.contextmanager
def _stderr_without(noise: re.Pattern):
    """Capture file descriptor 2 (C++ writes there directly, past sys.stderr) and replay the lines that do not
    match `noise`, also when the block raises."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [
                line
                for line in captured.read().decode("utf-8", "replace").splitlines(keepends=True)
                if not noise.search(line)
            ]
            sys.stderr.write("".join(kept))
