"""`metalstm evaluate RUN_DIR`: test-episode accuracy with 95% intervals, optionally beside the baselines (as the
paper's authors ran them, as this package ran them before, and Baseline++)."""

from __future__ import annotations

import click
from keras_metalstm.cli.common import (
    CHECKPOINT_OPTION,
    CONTEXT_SETTINGS,
    SEED_OPTION,
    duration,
    episode_bar,
    quiet_tensorflow,
    user_errors,
)

from keras_metalstm.baselines import DEFAULT_PROTOCOLS, PROTOCOLS
from keras_metalstm.config import QUERY_STATISTICS

DATASETS = ("fontglot", "omniglot", "miniimagenet", "folder", "fashion_mnist")


def run_evaluation(run_dir, progress, log, pretrain_epochs, episodes, **options):
    """`keras_metalstm.evaluation.evaluate_run(run_dir, episodes, **options)` under a progress bar of `episodes`,
    with the baselines' classifier pre-trained for `pretrain_epochs` (None: the run's own); saves the report as
    RUN_DIR/evaluation/<...>.json and redraws the run's curves.png (it shows the baselines of the saved reports).
    Returns (report, path); path is None, after a warning, when the run directory cannot be written (read-only):
    the results are still shown."""
    from keras_metalstm.evaluation import evaluate_run, save_report
    from keras_metalstm.metrics_log import write_curves
    from keras_metalstm.pretraining import PretrainConfig
    from keras_metalstm.runs import load_run_config

    pretrain = None if pretrain_epochs is None else PretrainConfig(pretrain_epochs, seed=load_run_config(run_dir).seed)
    with episode_bar("evaluate", episodes, progress) as update_bar:
        report = evaluate_run(run_dir, episodes, pretrain=pretrain, progress=update_bar, log=log, **options)
    try:
        path = save_report(report, run_dir)
        write_curves(run_dir)
    except OSError as error:
        log(f"warning: the report cannot be saved in {run_dir} ({error.strerror or error}); its results follow")
        return report, None
    return report, path


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option(
    "--episodes",
    type=int,
    default=600,
    show_default=True,
    envvar="METALSTM_EVAL_EPISODES",
    show_envvar=True,
    help="Test episodes E.",
)
@click.option(
    "--baselines",
    is_flag=True,
    envvar="METALSTM_EVAL_BASELINES",
    show_envvar=True,
    help="Add the baselines on the same episodes: by default the paper's fine-tune, nearest neighbour and pixel "
    "nearest neighbour as the authors ran them (see --baseline-protocol, docs/baselines.md).",
)
@click.option(
    "--baseline-protocol",
    "baseline_protocols",
    type=click.Choice(PROTOCOLS),
    multiple=True,
    help="With --baselines: whose baselines, repeatable. authors (default): the authors' code (cosine 1-NN, "
    "15 SGD updates with a learning rate and decay chosen on validation, pixel 1-NN); ours: Euclidean 1-NN and "
    "full-batch fine-tune from a zero output layer with frozen batch norm.",
)
@click.option(
    "--baseline-plus",
    is_flag=True,
    help="With --baselines: add Baseline++ (Chen et al. 2019), a cosine classifier on the frozen pre-trained "
    "features; learning rate, steps and scale chosen on validation episodes.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout instead of the table.")
@click.option(
    "--dataset",
    type=click.Choice(DATASETS, case_sensitive=False),
    default=None,
    help="Evaluate on another data set's classes (cross-domain); images converted to the run's shape.",
)
@click.option("--data-dir", type=click.Path(), default=None, help="Directory of --dataset.")
@click.option(
    "--split",
    type=click.Choice(("test", "val", "train", "all")),
    default="test",
    show_default=True,
    help="Classes to draw test episodes from (all: every class of --dataset).",
)
@SEED_OPTION
@CHECKPOINT_OPTION
@click.option(
    "--pretrain-epochs",
    type=int,
    default=None,
    help="Baselines: epochs of classifier pre-training on the meta-train classes [default: the run's own, its "
    "train --pretrain-epochs, 10 unless set; fixed for a run whose theta_0 started from that classifier].",
)
@click.option(
    "--finetune-val-episodes",
    type=int,
    default=100,
    show_default=True,
    help="Baselines: validation episodes used to choose the fine-tune and Baseline++ settings.",
)
@click.option(
    "--inner-steps",
    type=click.IntRange(min=1),
    default=None,
    help="Test-time ablation: adapt with this many inner steps instead of the run's T.",
)
@click.option(
    "--query-statistics",
    type=click.Choice(QUERY_STATISTICS),
    default=None,
    help="Test-time ablation: normalise the queries with these batch-norm statistics instead of the run's "
    "(query: the running averages gathered on the support set; support: the support batch's under theta_T).",
)
@click.option(
    "--query",
    type=click.IntRange(min=1),
    default=None,
    help="Query images per class in each test episode (default: the run's). Predictions do not depend on it: "
    "lower it for classes with few images.",
)
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
def evaluate(
    run_dir,
    episodes,
    baselines,
    baseline_protocols,
    baseline_plus,
    as_json,
    dataset,
    data_dir,
    split,
    seed,
    checkpoint,
    pretrain_epochs,
    finetune_val_episodes,
    inner_steps,
    query_statistics,
    query,
    progress,
):
    """Evaluate the meta-learner of RUN_DIR on E test episodes (the inner steps T of training unless changed).

    Reports mean accuracy and the 95% interval 1.96 * std / sqrt(E) (population std), in percent. With
    --dataset/--data-dir, the test episodes come from another data set (its test split, or all its classes
    with --split all), converted to the run's image shape by the package's conversion rule.
    """
    quiet_tensorflow()

    def log(message):
        click.echo(message, err=True)

    with user_errors():
        if dataset is not None and dataset.lower() != "fontglot" and data_dir is None:
            raise click.ClickException(f"--dataset {dataset} needs --data-dir PATH")
        if data_dir is not None and dataset is None:
            raise click.ClickException(
                f"--data-dir needs --dataset ({', '.join(DATASETS)})"
            )
        if (baseline_protocols or baseline_plus) and not baselines:
            flag = "--baseline-protocol" if baseline_protocols else "--baseline-plus"
            raise click.ClickException(f"{flag} needs --baselines")
        report, path = run_evaluation(
            run_dir,
            progress,
            log,
            pretrain_epochs,
            episodes,
            baselines=baselines,
            baseline_protocols=tuple(dict.fromkeys(baseline_protocols)) or DEFAULT_PROTOCOLS,
            baseline_plus=baseline_plus,
            dataset=dataset,
            data_dir=data_dir,
            split=split,
            seed=seed,
            which=checkpoint,
            finetune_val_episodes=finetune_val_episodes,
            inner_steps=inner_steps,
            query_statistics=query_statistics,
            query=query,
        )
    if as_json:
        click.echo(report.to_json())
        return
    click.echo(
        f"{report.column}, {episodes} test episodes of {report.details['data']} "
        f"({report.details['test_classes']} classes), {report.query} queries per class, T = {report.inner_steps}, "
        f"seed {seed}:"
    )
    click.echo(report.table())
    differences = report.differences_text()
    if differences:
        click.echo(differences)
    click.echo(
        f"evaluated {run_dir} ({report.details['checkpoint']} checkpoint) on {episodes} episodes in "
        f"{duration(report.seconds)}; " + (f"report saved to {path}" if path else "report not saved (see above)")
    )
