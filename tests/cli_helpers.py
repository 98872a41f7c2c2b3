"""Helpers for the command-line tests: a tiny generated image-folder data set, tiny training flags, the command line
run in-process, free ports."""

import json
import socket
from pathlib import Path

import numpy as np
from PIL import Image

# 2-way 1-shot, 2 queries, T = 2, small conv4: a meta-update takes a few milliseconds.
TINY_FLAGS = [
    "--n-way", "2", "--k-shot", "1", "--query", "2", "--inner-steps", "2", "--hidden-units", "4",
    "--filters", "4", "--log-every", "2", "--val-episodes", "2", "--no-progress",
]


def make_image_folder(root, num_classes=12, per_class=5, size=(28, 28), mode="L", seed=0):
    """One sub-folder per class; a class is a random binary prototype, its images are noisy copies."""
    rng = np.random.default_rng(seed)
    for k in range(num_classes):
        prototype = rng.random(size[::-1]) > 0.5
        folder = root / f"class_{k:02d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            noisy = np.where(rng.random(size[::-1]) < 0.1, ~prototype, prototype)
            pixels = (noisy * 255).astype(np.uint8)
            if mode == "RGB":
                pixels = np.repeat(pixels[..., None], 3, axis=-1)
            Image.fromarray(pixels, mode=mode).save(folder / f"img{i}.png")
    return root


def free_ports(count):
    """`count` TCP ports on 127.0.0.1 that were free a moment ago (for a local TF_CONFIG cluster)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def run_cli(args, env=None, catch_exceptions=False):
    """`metalstm ARGS` in this process (click's CliRunner), exceptions raised as they are unless
    `catch_exceptions` (then a clean failure is the result's SystemExit, anything else is a bug)."""
    from click.testing import CliRunner
    from keras_metalstm.cli.main import main

    return CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=catch_exceptions)


def train_args(data_dir, run_dir, *extra):
    """`metalstm train` on the image folder `data_dir` with TINY_FLAGS. In-process runs pass --no-deterministic:
    op determinism is process-wide and would change other test modules."""
    return ["train", "--dataset", "folder", "--data-dir", data_dir, "--run-dir", run_dir, *TINY_FLAGS,
            "--no-deterministic", *extra]


def invoke(args, env=None):
    """`run_cli` that returns a failure as its result instead of raising it."""
    return run_cli(args, env=env, catch_exceptions=True)


def assert_clean_failure(result, *fragments, code=1):
    """The command failed with `code`, one message naming each of `fragments`, and no traceback."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not an uncaught exception
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def state(run_dir):
    """A run directory's state.json."""
    return json.loads((Path(run_dir) / "state.json").read_text())
