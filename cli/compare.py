"""`metalstm compare A.json B.json`: one method of two saved evaluation reports, paired over their common episodes."""

from __future__ import annotations

import json
from pathlib import Path

import click
from keras_metalstm.cli.common import CONTEXT_SETTINGS, quiet_tensorflow, user_errors


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("first", type=click.Path(exists=True, dir_okay=False))
@click.argument("second", type=click.Path(exists=True, dir_okay=False))
@click.option("--method", default="meta_lstm", show_default=True, help="The method of FIRST (a report key).")
@click.option("--second-method", default=None, help="The method of SECOND (default: --method).")
def compare(first, second, method, second_method):
    """FIRST's --method minus SECOND's, episode by episode: two `metalstm evaluate` reports (RUN_DIR/evaluation/
    *.json) on the same episodes, e.g. a test-time ablation (--inner-steps, --query-statistics) against the run
    as trained, or two runs."""
    quiet_tensorflow()  # the package imports TensorFlow
    from keras_metalstm.report_comparison import compare_reports

    with user_errors():
        reports = []
        for path in (first, second):
            try:
                reports.append(json.loads(Path(path).read_text(encoding="utf-8")))
            except ValueError as error:
                raise click.ClickException(f"{path} is not an evaluation report (JSON): {error}") from None
        try:
            difference = compare_reports(*reports, method=method, second_method=second_method)
        except ValueError as error:
            raise click.ClickException(str(error)) from None
    click.echo(
        f"{method} of {first} minus {second_method or method} of {second}: {difference['mean']:+.2f} +- "
        f"{difference['ci95']:.2f} points (paired over the same {difference['episodes']} episodes)"
    )
