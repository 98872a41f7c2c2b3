"""`metalstm train`: meta-training with checkpoints, exact resume, validation and logs."""

from __future__ import annotations

from pathlib import Path

import click
from keras_metalstm.cli.common import (
    CONTEXT_SETTINGS,
    duration,
    image_reading_bar,
    layered_config,
    quiet_tensorflow,
    user_errors,
)

from keras_metalstm.config import DTYPE_POLICIES, EPISODE_BATCHING, QUERY_STATISTICS

DATASETS = ("fontglot", "omniglot", "miniimagenet", "folder")


def choice_option(flag, choices, help):
    """An optional flag taking one of `choices` (any case; None when not given, so lower layers can fill it)."""
    return click.option(flag, type=click.Choice(choices, case_sensitive=False), default=None, help=help)


def training_options(function):
    """The run-configuration flags (shared with quickstart where they make sense)."""
    options = [
        choice_option("--dataset", DATASETS, "Data set (default fontglot, built in)."),
        click.option(
            "--data-dir",
            type=click.Path(),
            default=None,
            help="Data directory (omniglot, miniimagenet, folder).",
        ),
        click.option(
            "--split-file",
            type=click.Path(dir_okay=False),
            default=None,
            help='JSON {"train": [...], "val": [...], "test": [...]} of class names splitting an omniglot or folder '
            "data set (e.g. Vinyals' Omniglot lists) instead of its seeded split.",
        ),
        click.option("--n-way", type=int, default=None, help="Classes per episode (default 5)."),
        click.option("--k-shot", type=int, default=None, help="Support images per class (default 1)."),
        click.option("--query", type=int, default=None, help="Query images per class (default 15)."),
        click.option("--inner-steps", type=int, default=None, help="T, updates per episode (default 12)."),
        click.option("--meta-batch", type=int, default=None, help="Episodes per meta-update (default 1)."),
        click.option("--episodes", type=int, default=None, help="Total training episodes (default 5000)."),
        click.option("--learning-rate", type=float, default=None, help="Adam step (default 1e-3)."),
        choice_option(
            "--lr-schedule",
            ("constant", "cosine"),
            "constant (default, the paper) or cosine decay over --episodes to --final-learning-rate.",
        ),
        click.option(
            "--final-learning-rate",
            type=float,
            default=None,
            help="With --lr-schedule cosine: the step at the last episode (default learning rate / 100).",
        ),
        click.option("--clip-norm", type=float, default=None, help="Global-norm clip (default 0.25)."),
        click.option(
            "--theta0-lr-scale",
            type=float,
            default=None,
            help="theta_0's Adam step as a multiple of the update rule's (default 1; 0 freezes theta_0; e.g. 0.1 "
            "with --theta0-init pretrained).",
        ),
        click.option(
            "--xla/--no-xla",
            default=None,
            help="Compile the meta-gradient with XLA: for GPU/TPU (CPU: up to 1.4x slower at 28x28, 2x at 84x84; "
            "default off).",
        ),
        click.option(
            "--seed", type=int, default=None, help="Seed of the episodes and the initial weights (default 0)."
        ),
        click.option(
            "--augment",
            default=None,
            help="Augment the meta-training episodes' images in the input pipeline, e.g. flip,translate=0.1 "
            "(flip: mirror left-right; translate=F: shift up to F of the size; brightness=B: add up to +-B): "
            "keyed on the episode, so resuming stays exact; the compiled step never sees it, so it works with "
            "--xla. Default: none (the paper).",
        ),
        click.option("--hidden-units", type=int, default=None, help="Coordinate LSTM units (default 20)."),
        click.option(
            "--learner",
            default=None,
            help="The learner the meta-learner adapts: conv4 (default, the paper's), resnet12, a saved Keras model "
            "PATH.keras (its architecture; its weights are theta_0's start with --theta0-init pretrained), or "
            "package.module:function, a factory function(input_shape, num_classes) -> keras.Model importable "
            "from the current directory or PYTHONPATH. It must map (H, W, C) images in [0, 1] to N logits.",
        ),
        click.option(
            "--filters",
            type=int,
            default=None,
            help="Width of a built-in learner: conv4's filters, resnet12's first block (default 32).",
        ),
        click.option(
            "--rotations/--no-rotations",
            default=None,
            help="Add each class rotated by 90, 180 and 270 degrees as new classes (x4; default off; the usual "
            "Omniglot protocol).",
        ),
        click.option(
            "--drop-small-classes/--keep-small-classes",
            default=None,
            help="Leave out the classes with fewer than K + Q images (every split, said at the start) instead of "
            "refusing the data set (default: keep, refuse).",
        ),
        click.option(
            "--image-shape",
            default=None,
            metavar="H,W,C",
            help="Convert every image to this shape (e.g. 84,84,3) by the package's rule: grey<->RGB, alpha "
            "dropped, antialiased bilinear resize; needed for an image folder of mixed sizes or modes.",
        ),
        click.option(
            "--first-order/--second-order",
            "first_order",
            default=None,
            help="First-order meta-gradient (default) or second order.",
        ),
        choice_option(
            "--query-statistics",
            QUERY_STATISTICS,
            "Batch-norm statistics of the query pass: query (default, the authors' code: the query batch's own "
            "in training, the inner loop's running support statistics in testing) or support (the support "
            "batch's under the adapted weights, in training and testing alike).",
        ),
        click.option(
            "--learn-logit-scale/--no-learn-logit-scale",
            default=None,
            help="Learn a scale of the query logits in the meta-loss (default off; predictions do not change).",
        ),
        choice_option(
            "--dtype-policy",
            DTYPE_POLICIES,
            "Build the learner with this Keras dtype policy: mixed_bfloat16 (TPU, recent GPUs) computes it in "
            "bfloat16, theta and the meta-learner stay float32 (mixed_float16 has no loss scaling and can "
            "underflow small gradients). Default: the learner's own (float32 for conv4 and resnet12).",
        ),
        choice_option(
            "--episode-batching",
            EPISODE_BATCHING,
            "How the learner runs for a meta-batch's episodes: auto (default: all at once on a GPU/TPU, one after "
            "the other on a CPU), batched (on a CPU only with --xla), or per_episode. Results are the same.",
        ),
        click.option(
            "--checkpoint-every", type=int, default=None, help="Episodes between checkpoints (default 500)."
        ),
        click.option("--validate-every", type=int, default=None, help="Episodes between validations (default 500)."),
        click.option("--val-episodes", type=int, default=None, help="Validation episodes (default 100)."),
        click.option("--log-every", type=int, default=None, help="Episodes between metric rows (default 50)."),
        click.option("--keep-checkpoints", type=int, default=None, help="Checkpoints kept (default 3)."),
        choice_option(
            "--theta0-init",
            ("scratch", "pretrained"),
            "theta_0 from a fresh learner (scratch, the paper) or from a classifier pre-trained on the "
            "meta-train classes (pretrained; cached in RUN_DIR/baselines, reused by evaluate --baselines); default "
            "scratch.",
        ),
        click.option(
            "--pretrain-epochs",
            type=int,
            default=None,
            help="Pre-training epochs for --theta0-init pretrained (default 10).",
        ),
        click.option(
            "--pretrained-model",
            type=click.Path(dir_okay=False),
            default=None,
            help="With --theta0-init pretrained: start from this .keras classifier instead of pre-training one.",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


CONFIG_KEYS = (
    "dataset",
    "data_dir",
    "n_way",
    "k_shot",
    "query",
    "inner_steps",
    "meta_batch",
    "episodes",
    "learning_rate",
    "lr_schedule",
    "final_learning_rate",
    "clip_norm",
    "theta0_lr_scale",
    "xla",
    "seed",
    "augment",
    "hidden_units",
    "learner",
    "filters",
    "rotations",
    "drop_small_classes",
    "split_file",
    "image_shape",
    "first_order",
    "query_statistics",
    "learn_logit_scale",
    "dtype_policy",
    "episode_batching",
    "checkpoint_every",
    "validate_every",
    "val_episodes",
    "log_every",
    "keep_checkpoints",
    "theta0_init",
    "pretrain_epochs",
    "pretrained_model",
)


def resolve_config(run_dir, resume, config_file, flags, recipe="paper"):
    """The RunConfig of `train`: the recipe's settings (or the stored run's config when resuming) < file < env <
    flags."""
    from keras_metalstm.config import CONFIG_FILE_NAME, recipe_config
    from keras_metalstm.runs import load_run_config, run_exists

    base = (f"--recipe {recipe}", recipe_config(recipe).to_dict())
    if resume and run_exists(run_dir):
        base = (str(Path(run_dir) / CONFIG_FILE_NAME), load_run_config(run_dir).to_dict())
    return layered_config(base, config_file, flags)


def default_run_dir(config) -> str:
    return f"runs/{config.dataset}-{config.n_way}way-{config.k_shot}shot"


class ProgressBar:
    """tqdm progress bar with the running loss and accuracy (a keras_metalstm.training.Callback); the workers of a
    cluster other than the chief label their lines with their name."""

    def __init__(self, enabled=True):
        self.enabled = enabled
        self.bar = None
        self.prefix = ""
        self.one_validation_episode = False
        self.losses, self.accuracies = [], []

    def on_start(self, run, start_episode, total_episodes):
        from tqdm import tqdm

        self.prefix = "" if run.chief else f"{run.task}: "
        self.one_validation_episode = run.config.val_episodes == 1
        self.bar = tqdm(
            total=total_episodes,
            initial=start_episode,
            unit="ep",
            disable=not self.enabled,
            dynamic_ncols=True,
            desc=f"{self.prefix}meta-train",
        )

    def on_step(self, episode, loss, accuracy):
        self.losses = (self.losses + [loss])[-50:]
        self.accuracies = (self.accuracies + [accuracy])[-50:]
        self.bar.update(episode - self.bar.n)
        self.bar.set_postfix(
            loss=f"{sum(self.losses) / len(self.losses):.3f}",
            acc=f"{100 * sum(self.accuracies) / len(self.accuracies):.1f}%",
            refresh=False,
        )

    def on_validation(self, episode, accuracy, ci95, is_best):
        mark = " (best)" if is_best else ""
        # One episode has no spread to estimate an interval from (its "+- 0.00%" would claim certainty).
        interval = "% (one episode: no interval)" if self.one_validation_episode else f" +- {100 * ci95:.2f}%"
        self.bar.write(f"{self.prefix}episode {episode}: validation accuracy {100 * accuracy:.2f}{interval}{mark}")

    def on_checkpoint(self, episode, path):
        pass

    def on_message(self, text):
        click.echo(f"{self.prefix}{text}", err=True)

    def on_end(self, result):
        if self.bar is not None:
            self.bar.close()


def run_training(config, run_dir, resume, deterministic=True, progress=True):
    """Train and return the TrainingResult (shared with quickstart)."""
    from keras_metalstm.training import TrainingRun

    bar = ProgressBar(enabled=progress)
    try:
        with image_reading_bar(progress):
            return TrainingRun(config, run_dir, resume=resume, deterministic=deterministic).run(bar)
    finally:
        if bar.bar is not None:
            bar.bar.close()


def summary_line(result) -> str:
    if not result.chief:
        return (
            f"{result.task}: {result.status} at episode {result.episode}; the chief writes the run directory "
            f"{result.run_dir}"
        )
    best = (
        f"best validation accuracy {100 * result.best_val_accuracy:.2f}% at episode {result.best_episode}"
        if result.best_val_accuracy is not None
        else "no validation"
    )
    # What is there: a run stopped at its first episodes has no best/ and no curves yet.
    written = [
        name + "/" * (Path(result.run_dir) / name).is_dir()
        for name in ("config.yaml", "checkpoints", "best", "best.keras", "metrics.jsonl", "curves.png")
        if (Path(result.run_dir) / name).exists()
    ]
    return (
        f"{result.status}: {result.episode} episodes in {duration(result.seconds)} (training time, all "
        f"sessions); {best}; run directory {result.run_dir} ({', '.join(written)})"
    )


@click.command(context_settings=CONTEXT_SETTINGS)
@training_options
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Run directory (default runs/<dataset>-<N>way-<K>shot).",
)
@click.option("--resume", is_flag=True, help="Continue the run in --run-dir exactly where it stopped.")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="YAML or TOML file of settings (flags win).",
)
@click.option(
    "--deterministic/--no-deterministic",
    default=True,
    show_default=True,
    help="TensorFlow op determinism (bitwise-exact resume); off with --xla, which has no deterministic max-pooling "
    "gradient.",
)
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
@click.option(
    "--recipe",
    type=click.Choice(("paper", "ours")),
    default=None,
    help="Starting settings of a new run (flags and --config win). paper (default): theta_0 from scratch, "
    "first order, the query's batch statistics, Adam 1e-3. ours: the README's results: theta_0 from the "
    "pre-trained classifier, a learned logit scale, the support's batch statistics, second order, cosine "
    "1e-4 -> 1e-6.",
)
@click.option(
    "--strategy",
    "strategy_name",
    type=click.Choice(["default", "mirrored", "multiworker", "tpu"]),
    default="default",
    show_default=True,
    help="tf.distribute strategy; --meta-batch is the global batch, split across replicas (multiworker reads "
    "TF_CONFIG).",
)
@click.option("--tpu", default=None, help="TPU name or grpc:// address (with --strategy tpu).")
def train(run_dir, resume, config_file, deterministic, progress, recipe, strategy_name, tpu, **flags):
    """Meta-train the LSTM meta-learner; checkpoints, validation, metrics and curves go to --run-dir.

    A run stopped with Ctrl-C/SIGTERM/SIGHUP saves a checkpoint; `--resume` continues it (also after kill -9, from
    the last checkpoint) and ends with the same weights as an uninterrupted run.
    """
    quiet_tensorflow()
    if tpu and strategy_name != "tpu":
        raise click.UsageError("--tpu needs --strategy tpu")
    if recipe and resume:
        raise click.UsageError("--recipe sets up a new run; a resumed run keeps its stored settings")
    with user_errors():
        import os

        from keras_metalstm.distribute import make_strategy

        strategy = make_strategy(strategy_name, tpu)  # first TensorFlow work: multiworker must come first

        run_dir = run_dir or os.environ.get("METALSTM_RUN_DIR")
        config = resolve_config(run_dir or "", resume and run_dir is not None, config_file, flags, recipe or "paper")
        run_dir = run_dir or default_run_dir(config)
        if resume:
            config = resolve_config(run_dir, True, config_file, flags)
        with strategy.scope():
            result = run_training(config, run_dir, resume, deterministic, progress)
    click.echo(summary_line(result))
    if result.status == "interrupted":
        click.echo(f"interrupted; continue with: metalstm train --run-dir {run_dir} --resume", err=True)
        raise SystemExit(interrupted_exit_code(result))


def interrupted_exit_code(result) -> int:
    """128 + the signal that stopped the run, the shell's convention (130 for Ctrl-C, 143 for SIGTERM, 129 for
    SIGHUP)."""
    import signal

    return 128 + int(result.signal or signal.SIGINT)
