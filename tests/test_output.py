"""Tests of bnnify.cli.output: one sink per command, the modes, and errors to exit codes."""

from __future__ import annotations

import json

import pytest
import typer
from rich.table import Table

from bnnify.cli.output import Output, command, human_bytes
from bnnify.errors import (
    EXIT_INTERRUPTED,
    EXIT_RUNTIME,
    EXIT_UNSAFE,
    EXIT_USAGE,
    BnnifyError,
    InputError,
    SpecError,
    UnsafeInputError,
)


def emit(out: Output) -> None:
    out.log("a log line")
    out.detail("a detail")
    out.warn("a warning")
    out.line("a result line")
    table = Table("column")
    table.add_row("cell")
    out.table(table)
    out.json({"value": 1.5})


@pytest.mark.parametrize(
    ("mode", "stdout", "stderr"),
    [
        ({}, ["a result line", "cell"], ["a log line", "Warning: a warning"]),
        ({"json_mode": True}, ['"value": 1.5'], ["Warning: a warning"]),
        ({"quiet": True}, [], []),
        ({"verbose": True}, ["a result line"], ["a log line", "a detail", "Warning: a warning"]),
    ],
    ids=["human", "json", "quiet", "verbose"],
)
def test_each_mode_writes_where_it_should(capsys, monkeypatch, mode, stdout, stderr):
    monkeypatch.setenv("NO_COLOR", "1")
    emit(Output(**mode))
    captured = capsys.readouterr()
    for text in stdout:
        assert text in captured.out
    for text in stderr:
        assert text in captured.err
    assert "a log line" not in captured.out and "a result line" not in captured.err
    if mode.get("json_mode"):
        assert json.loads(captured.out) == {"value": 1.5}
    if mode.get("quiet"):
        assert (captured.out, captured.err) == ("", "")
    assert "\x1b[" not in captured.out + captured.err


def test_markup_in_messages_is_printed_as_it_is(capsys, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    Output().line("[bold]not markup[/bold]")
    assert "[bold]not markup[/bold]" in capsys.readouterr().out


def test_json_turns_tensors_and_paths_into_plain_values(capsys, tmp_path):
    import torch

    Output(json_mode=True).json({"t": torch.tensor([1, 2]), "path": tmp_path})
    assert json.loads(capsys.readouterr().out) == {"t": [1, 2], "path": str(tmp_path)}


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (SpecError("bad spec", hint="fix it"), EXIT_USAGE),
        (InputError("bad file"), EXIT_RUNTIME),
        (UnsafeInputError("pickled"), EXIT_UNSAFE),
        (KeyboardInterrupt(), EXIT_INTERRUPTED),
        (ValueError("a bug"), EXIT_RUNTIME),
    ],
)
def test_command_maps_errors_to_exit_codes_without_traceback(capsys, error, code):
    @command
    def failing() -> None:
        raise error

    with pytest.raises(typer.Exit) as exit:
        failing()
    assert exit.value.exit_code == code
    err = " ".join(capsys.readouterr().err.split())
    assert "Traceback" not in err
    if isinstance(error, BnnifyError):
        assert err.startswith(f"Error: {error.message}")
        assert ("Hint: fix it" in err) == (error.hint is not None)
    elif isinstance(error, KeyboardInterrupt):
        assert err.startswith("Interrupted")
    else:
        assert "internal error: ValueError: a bug" in err and "BNNIFY_DEBUG" in err


def test_command_keeps_typer_exits():
    @command
    def done() -> None:
        raise typer.Exit(0)

    with pytest.raises(typer.Exit):
        done()


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (0, "0 B"),
        (999, "999 B"),
        (1000, "1.0 KB"),
        (6312, "6.3 KB"),
        (2.5e9, "2.5 GB"),
        (3e15, "3000.0 TB"),
    ],
)
def test_human_bytes(count, text):
    assert human_bytes(count) == text
