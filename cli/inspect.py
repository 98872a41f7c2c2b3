"""`metalstm inspect RUN_DIR`: what the run's meta-learner learned, as gates.png, inner_loss.png, trace.json and a
paragraph of text (keras_metalstm.inspection does the work)."""

from __future__ import annotations

import json
from pathlib import Path

import click
from keras_metalstm.cli.common import (
    CHECKPOINT_OPTION,
    CONTEXT_SETTINGS,
    SEED_OPTION,
    Timer,
    duration,
    episode_bar,
    quiet_tensorflow,
    user_errors,
)


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--episodes", type=int, default=20, show_default=True, help="Test episodes E to trace.")
@click.option(
    "--split",
    type=click.Choice(("test", "val", "train")),
    default="test",
    show_default=True,
    help="Classes the episodes come from.",
)
@SEED_OPTION
@CHECKPOINT_OPTION
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder for gates.png, inner_loss.png and trace.json [default: RUN_DIR/inspection].",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print trace.json's object on stdout instead of the text."
)
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
def inspect(run_dir, episodes, split, seed, checkpoint, out, as_json, progress):
    """Trace the meta-learner of RUN_DIR on E episodes and show what it learned.

    gates.png: for each learner layer, the input gate (the learned learning rate) and the forget gate across the
    inner steps (median and 10th-90th percentile over the layer's coordinates). inner_loss.png: the support loss
    and accuracy per inner step beside plain SGD from the same theta_0 at the best fixed learning rate.
    trace.json: the numbers, per layer and per learner variable.
    """
    quiet_tensorflow()
    from keras_metalstm.inspection import INSPECTION_DIR, inspect_run

    timer = Timer()
    out = Path(out) if out else Path(run_dir) / INSPECTION_DIR
    with user_errors():
        with episode_bar("inspect", episodes, progress) as update_bar:
            inspection = inspect_run(
                run_dir, episodes=episodes, split=split, seed=seed, which=checkpoint, progress=update_bar
            )
        paths = inspection.write(out)
    if as_json:
        click.echo(json.dumps(inspection.to_dict()))
        return
    click.echo(inspection.summary())
    click.echo(
        f"inspected {run_dir} ({inspection.run['checkpoint']} checkpoint) on {episodes} {split} episodes in "
        f"{duration(timer.seconds)}: {', '.join(path.name for path in paths)} in {out}"
    )
