"""`metalstm quickstart`: the README's main job on the built-in data (train, evaluate with baselines, export)."""

from __future__ import annotations

from pathlib import Path

import click
from keras_metalstm.cli.common import CONTEXT_SETTINGS, Timer, duration, quiet_tensorflow, user_errors

# 5-way 1-shot on fontglot, sized to finish in a few minutes on a 2-core CPU.
QUICKSTART = {
    "dataset": "fontglot",
    "n_way": 5,
    "k_shot": 1,
    "query": 15,
    "inner_steps": 12,
    "meta_batch": 1,
    "episodes": 100,
    "val_episodes": 30,
    "log_every": 20,
    "pretrain_epochs": 3,
}
# Validation episodes that choose the authors' fine-tune settings (42 of them): the largest share of the
# evaluation's time, so fewer than `evaluate`'s default; not fewer than 20: on 10 the choice is noise (it picked a
# rate 3 points worse on the test episodes).
FINETUNE_VAL_EPISODES = 20
RECIPE_LINES = {
    "ours": "recipe: ours (theta_0 from the classifier the baselines use, a learned logit scale, the support "
    "set's batch statistics, second order, cosine 1e-4 -> 1e-6); the paper's: metalstm quickstart --recipe paper",
    "paper": "recipe: the paper's (theta_0 from scratch, first order, the query's batch statistics, Adam 1e-3); "
    "it needs thousands of episodes to catch up with the baselines; the winning one: --recipe ours",
}


def quickstart_config(recipe: str, episodes: int, pretrain_epochs: int):
    """The quickstart's RunConfig: `recipe` at the QUICKSTART size, validated and checkpointed three times (the
    third at the last episode, where training validates anyway)."""
    from keras_metalstm.config import recipe_config

    settings = {**QUICKSTART, "episodes": episodes, "pretrain_epochs": pretrain_epochs}
    settings["checkpoint_every"] = settings["validate_every"] = max(1, -(-episodes // 3))
    return recipe_config(recipe, **settings)


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default="metalstm-quickstart",
    show_default=True,
    help="Output directory (the run is in OUT/run).",
)
@click.option(
    "--recipe",
    type=click.Choice(("ours", "paper")),
    default="ours",
    show_default=True,
    help="ours: the README's results recipe; paper: the paper's (see `metalstm train --help`, --recipe).",
)
@click.option(
    "--episodes", type=int, default=QUICKSTART["episodes"], show_default=True, help="Meta-training episodes."
)
@click.option("--eval-episodes", type=int, default=200, show_default=True, help="Test episodes.")
@click.option(
    "--pretrain-epochs",
    type=int,
    default=QUICKSTART["pretrain_epochs"],
    show_default=True,
    help="Epochs of the classifier pre-training (theta_0 of --recipe ours, and the baselines).",
)
@click.option("--resume", is_flag=True, help="Continue (or reuse) the quickstart run in --out.")
@click.option("--export/--no-export", "do_export", default=True, show_default=True, help="Export at the end.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bars.")
def quickstart(out, recipe, episodes, eval_episodes, pretrain_epochs, resume, do_export, progress):
    """Meta-train 5-way 1-shot on fontglot for a few minutes, evaluate beside the authors' baselines on the same
    episodes (paired differences), adapt to a new task given as image folders, export it to SavedModel + ONNX."""
    quiet_tensorflow()
    from keras_metalstm.cli.evaluate import run_evaluation
    from keras_metalstm.cli.train import interrupted_exit_code, run_training, summary_line

    from keras_metalstm.runs import run_exists

    timer = Timer()
    out = Path(out)
    run_dir = out / "run"
    steps = 3 if do_export else 2

    def log(message):
        click.echo(message, err=True)

    with user_errors():
        if out.exists() and any(out.iterdir()) and not resume:
            raise click.ClickException(
                f"{out} is not empty (a previous quickstart?); pass --resume to continue it or choose --out "
                "(nothing was overwritten)"
            )
        config = quickstart_config(recipe, episodes, pretrain_epochs)
        click.echo(RECIPE_LINES[recipe])
        click.echo(f"1/{steps} meta-training 5-way 1-shot on fontglot for {episodes} episodes -> {run_dir}")
        result = run_training(config, run_dir, resume=resume and run_exists(run_dir), progress=progress)
        click.echo(summary_line(result))
        if result.status != "finished":
            raise SystemExit(interrupted_exit_code(result))
        click.echo(f"2/{steps} evaluating on {eval_episodes} test episodes beside the authors' baselines")
        report, path = run_evaluation(
            run_dir,
            progress,
            log,
            pretrain_epochs,
            eval_episodes,
            baselines=True,
            finetune_val_episodes=FINETUNE_VAL_EPISODES,
        )
        click.echo(report.table())
        click.echo(report.differences_text())
        exported = None
        if do_export:
            click.echo(f"3/{steps} adapting to a new task (image folders) and exporting it")
            from keras_metalstm.export import quickstart_export

            try:
                exported = quickstart_export(run_dir, out / "export")
            except ValueError as error:  # ExportError and friends: the run is kept, say what failed
                raise click.ClickException(
                    f"export failed (the run and its evaluation are kept): {error}"
                ) from None
            click.echo(exported)
    click.echo(
        f"quickstart done in {duration(timer.seconds)}: run {run_dir} (checkpoints, metrics.jsonl, "
        f"curves.png), evaluation {path}" + (f", export {exported}" if exported else "")
    )
