"""The `bnnify` application: wiring of the commands, version, exit codes."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

import bnnify
from bnnify.cli import (
    calibrate,
    convert,
    env_cmd,
    export,
    fit,
    inspect_cmd,
    kl,
    list_cmd,
    plot,
    predict,
    prune,
)
from bnnify.cli.help_text import readable
from bnnify.cli.output import closed_stdout

__all__ = ["COMMANDS", "app", "main"]

EXIT_CODES = (
    "Exit codes: 0 success; 1 runtime failure (unreadable or inconsistent input, failed "
    "run, disk full); 2 usage or spec error (bad option, spec or name, output exists "
    "without --force, output folder missing or not writable); 3 input refused as unsafe "
    "(pickled code without --trust-pickle, code not confirmed with --arch); 130 "
    "interrupted (Ctrl-C, SIGTERM, SIGHUP: always 130, not 128 + the signal's number). "
    "A closed stdout pipe (`| head`) ends quietly with 0."
)

app = typer.Typer(
    name="bnnify",
    help="Turn saved PyTorch models into Bayesian neural networks (Bayes by Backprop).",
    epilog=EXIT_CODES,
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"bnnify {bnnify.__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Turn saved PyTorch models into Bayesian neural networks (Bayes by Backprop)."""


COMMANDS = {
    "convert": convert.convert,
    "kl": kl.kl,
    "inspect": inspect_cmd.inspect,
    "list": list_cmd.list_registered,
    "fit": fit.fit,
    "predict": predict.predict,
    "calibrate": calibrate.calibrate,
    "plot": plot.plot,
    "export": export.export,
    "prune": prune.prune,
    "env": env_cmd.env,
}
for _name, _function in COMMANDS.items():
    app.command(_name, epilog=EXIT_CODES)(readable(_function))


def main() -> None:
    """Console-script entry point."""
    # PyTorch's own switch for 2 MB-aligned, huge-page backed CPU tensors: a fresh
    # tensor of a large model otherwise costs a page fault per 4 KB on first touch.
    # Read once, at torch's first allocation, so it is set before torch is imported.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    from bnnify.formats.interrupts import install_signal_handlers

    install_signal_handlers()
    try:
        app()
    except BrokenPipeError:  # outside a command (help, version piped into `head`)
        closed_stdout()
        sys.exit(0)
    finally:
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            closed_stdout()
