"""The `bnnify` application: wiring of the commands, version, exit codes."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

import bnnify
from bnnify.cli import convert, export, fit, inspect_cmd, kl, list_cmd, predict, prune
from bnnify.cli.output import closed_stdout

__all__ = ["app", "main"]

EXIT_CODES = (
    "Exit codes: 0 success; 1 runtime failure (unreadable or inconsistent input, failed "
    "run, disk full); 2 usage or spec error (bad option, spec or name, output exists "
    "without --force, output folder missing or not writable); 3 input refused as unsafe "
    "(pickled code without --trust-pickle, code not confirmed with --arch); 130 "
    "interrupted (Ctrl-C, SIGTERM, SIGHUP)."
)

app = typer.Typer(
    name="bnnify",
    help="Turn saved PyTorch models into Bayesian neural networks (Bayes by Backprop).",
    epilog=EXIT_CODES,
    no_args_is_help=True,
    add_completion=False,
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


app.command("convert", epilog=EXIT_CODES)(convert.convert)
app.command("kl", epilog=EXIT_CODES)(kl.kl)
app.command("inspect", epilog=EXIT_CODES)(inspect_cmd.inspect)
app.command("list", epilog=EXIT_CODES)(list_cmd.list_registered)
app.command("fit", epilog=EXIT_CODES)(fit.fit)
app.command("predict", epilog=EXIT_CODES)(predict.predict)
app.command("export", epilog=EXIT_CODES)(export.export)
app.command("prune", epilog=EXIT_CODES)(prune.prune)


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
