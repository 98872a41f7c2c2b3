"""`metalstm`: the command line of keras-metalstm (train, evaluate, inspect, quickstart, and the export commands).

Only parsing, calling the library and printing happen here; TensorFlow is imported lazily inside the commands,
so `metalstm --help` answers at once.
"""

from __future__ import annotations

import os

import click
from keras_metalstm.cli.common import CONTEXT_SETTINGS, show_library_messages

from keras_metalstm.cpu_kernels import prefer_onednn


class Commands(click.Group):
    """The commands; Ctrl-C before a command takes it over (a training run saves a checkpoint and says how to go
    on) ends with the shell's code for it, 130, instead of click's "Aborted!" and 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=Commands, context_settings=CONTEXT_SETTINGS)
@click.version_option(package_name="keras-metalstm", prog_name="metalstm")
@click.option(
    "--verbose",
    is_flag=True,
    envvar="METALSTM_VERBOSE",
    help="Show TensorFlow's start-up and C++ log lines (hidden by default unless TF_CPP_MIN_LOG_LEVEL is set).",
)
def main(verbose):
    """Few-shot learning with the LSTM meta-learner (Ravi & Larochelle, ICLR 2017).

    \b
    metalstm train --dataset fontglot --run-dir runs/demo     meta-train with checkpoints
    metalstm evaluate runs/demo --baselines                   600 test episodes, 95% intervals
    metalstm quickstart                                       both + adapt + export, built-in data
    metalstm inspect runs/demo                                what the meta-learner learned

    train's run settings also come from --config FILE (YAML or TOML) and METALSTM_<SETTING>
    environment variables (e.g. METALSTM_K_SHOT=5); command-line flags win. On an x86 CPU, TensorFlow runs on oneDNN's
    kernels (TF_ENABLE_ONEDNN_OPTS=1 unless you set it; =0 turns them off).
    """
    if verbose:
        # Read by quiet_tensorflow() when a command imports TensorFlow.
        os.environ["METALSTM_VERBOSE"] = "1"
    # Before any command imports TensorFlow, which reads the setting once.
    prefer_onednn()
    show_library_messages()


def _register():
    from keras_metalstm.cli.compare import compare
    from keras_metalstm.cli.evaluate import evaluate
    from keras_metalstm.cli.inspect import inspect
    from keras_metalstm.cli.quickstart import quickstart
    from keras_metalstm.cli.serving import adapt, export, predict
    from keras_metalstm.cli.train import train

    for command in (train, evaluate, compare, inspect, quickstart, adapt, export, predict):
        main.add_command(command)


_register()

if __name__ == "__main__":
    main()
