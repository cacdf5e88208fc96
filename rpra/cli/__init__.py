"""The `rpra` command line: parse, build objects, call the library, print.

The command tree, by what a user does with it (each group's commands live in its module):

    using the model     ask, chat, serve, serve-remote            rpra/cli/use.py
    managing            models list|pull|path, doctor, logs,      rpra/cli/manage.py
                        config show
    measuring           collect, bench run|report|pool,                rpra/cli/measure.py
                        report-card build|show, calibrate
    training            train sft|probe|list|export               rpra/cli/train.py

Commands that run the model take ``--config FILE``, ``--set KEY=VALUE`` and flags generated from
the ``Settings`` fields (rpra/cli/common.py); flags beat ``RPRA_*`` environment variables, which
beat the config file. Nothing heavy is imported until a command runs.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.markup import escape

import rpra
from rpra.cli import manage, measure, train, use
from rpra.cli.common import err
from rpra.config import mask_urls
from rpra.errors import RpraError

app = typer.Typer(
    help="rpra: a small local model predicts its own judge score and defers to a remote model when it would do badly.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        print(f"rpra {rpra.__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print rpra's version and exit.")
    ] = False,
) -> None:
    pass  # the commands do the work; this only holds the options that come before them


def _group(name: str, help: str) -> typer.Typer:
    group = typer.Typer(help=help, no_args_is_help=True)
    app.add_typer(group, name=name)
    return group


# Using the model
app.command()(use.ask)
app.command()(use.chat)
app.command()(use.serve)
app.command("serve-remote", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(use.serve_remote)

# Managing the device
models = _group("models", "List, download and locate models.")
models.command("list")(manage.models_list)
models.command("pull")(manage.models_pull)
models.command("path")(manage.models_path)
app.command()(manage.doctor)
app.command()(manage.logs)
_group("config", "Inspect the effective configuration.").command("show")(manage.config_show)

# Measuring the predictors
app.command()(measure.collect)
bench = _group("bench", "The deferral benchmark: how much quality is kept for how many remote calls.")
bench.command("run")(measure.bench_run)
bench.command("report")(measure.bench_report)
bench.command("pool")(measure.bench_pool)
cards = _group("report-card", "Report cards: the larger model's summary of the device model's strengths and weaknesses.")
cards.command("build")(measure.card_build)
cards.command("show")(measure.card_show)
app.command()(measure.calibrate)

# Training the predictors
training = _group("train", "Trained predictors: a LoRA adapter (SFT), an activation probe and a draft verifier, fitted on collected records.")
training.command("sft")(train.sft_command())
training.command("probe")(train.train_probe)
training.command("verifier")(train.train_verifier)
training.command("pool")(train.train_pool)
training.command("ladder")(train.train_ladder)
training.command("list")(train.train_list)
training.command("export")(train.train_export)


def main() -> None:
    """Console entry point: project errors become one red line and exit code 1, not a traceback."""
    try:
        app()
    except RpraError as exc:
        err.print(f"[red]error:[/] {escape(mask_urls(str(exc)))}")  # no credentials in a URL on screen
        sys.exit(1)
