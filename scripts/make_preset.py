"""Package a finished, evaluated training run as a ready-made meta-learner (a preset) of keras-metalstm.

    python scripts/make_preset.py /work/runs/fg1-scale fontglot_5way_1shot

writes keras_metalstm/preset_files/fontglot_5way_1shot/ of the installed (for a checkout: `pip install -e .`)
package: the meta-learner file, the run's settings, its evaluation report, preset.json and MODEL_CARD.md
(`keras_metalstm.presets.save_preset`). A maintainer's tool, so not a `metalstm` command.
"""

import click
from keras_metalstm.cli.common import quiet_tensorflow, user_errors


@click.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("name")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder to write NAME/ into (default: the package's keras_metalstm/preset_files).",
)
@click.option(
    "--report",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="The evaluation report to quote (default: RUN_DIR/evaluation's test report with the most episodes, "
    "then the most compared methods).",
)
@click.option("--force", is_flag=True, help="Replace an existing preset of that name.")
def main(run_dir, name, out_dir, report, force):
    """Package RUN_DIR (its evaluated checkpoint) as the preset NAME."""
    quiet_tensorflow()
    with user_errors():
        from keras_metalstm.presets import INFO_FILE, MODEL_CARD_FILE, read_info, save_preset

        folder = save_preset(run_dir, name, out_dir=out_dir, report=report, force=force)
        info = read_info(folder)
    meta = info["evaluation"]["results"]["meta_lstm"]
    click.echo(
        f"{name} -> {folder} ({info['bytes'] / 1024:.0f} KiB meta-learner; Meta-LSTM {meta['mean']:.2f} +- "
        f"{meta['ci95']:.2f} % on {meta['episodes']} test episodes); see {folder / MODEL_CARD_FILE} and "
        f"{folder / INFO_FILE}"
    )


if __name__ == "__main__":
    main()
