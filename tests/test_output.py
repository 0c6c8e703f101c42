"""Tests of bnnify.cli.output: one sink per command, the modes, errors to exit codes,
everything printed sanitized, and logs routed."""

from __future__ import annotations

import json
import logging
import re
import warnings

import pytest
import typer
from rich.table import Table
from rich.text import Text

from bnnify.cli.output import Output, command, human_bytes, sanitize
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

RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
HOSTILE = "a\x1b[31mb\x1b]8;;http://x\x07c\x1b]8;;\x07\rd\x00e\x9bf\u202eg\nh"


def test_sanitize_writes_controls_as_escapes():
    assert sanitize(HOSTILE) == (
        "a\\x1b[31mb\\x1b]8;;http://x\\x07c\\x1b]8;;\\x07\\x0dd\\x00e\\x9bf\\u202eg\\x0ah"
    )
    assert sanitize("plain, é and 中文") == "plain, é and 中文"
    assert sanitize(sanitize(HOSTILE)) == sanitize(HOSTILE)


def test_every_kind_of_line_is_sanitized(capsys):
    out = Output(verbose=True)
    out.line(HOSTILE)
    out.log(HOSTILE)
    out.detail(HOSTILE)
    out.warn(HOSTILE)
    table = Table(title=HOSTILE)
    table.add_column(HOSTILE)
    table.add_column(Text(HOSTILE))
    table.add_row(HOSTILE, Text(HOSTILE))
    out.table(table)
    captured = capsys.readouterr()
    assert not RAW.search(captured.out + captured.err), repr(captured)
    assert captured.out.count("\\x1b[31mb") == 6 and captured.err.count("\\x1b[31mb") == 3


def test_markup_in_names_is_not_interpreted(capsys):
    name = "[bold]name[/bold]\x1b"
    Output().line(name)
    assert capsys.readouterr().out.strip() == sanitize(name)


def test_json_stays_valid_and_exact(capsys):
    Output(json_mode=True).json({"name": HOSTILE})
    captured = capsys.readouterr().out
    assert not RAW.search(captured)
    assert json.loads(captured) == {"name": HOSTILE}


def test_errors_are_one_sanitized_line(capsys):
    @command
    def failing() -> None:
        raise ValueError(HOSTILE)

    with pytest.raises(typer.Exit):
        failing()
    err = capsys.readouterr().err
    assert not RAW.search(err)
    assert len([line for line in err.splitlines() if line.startswith("Error:")]) == 1


def test_logs_and_warnings_go_through_the_sink(capsys):
    @command
    def noisy() -> None:
        logging.getLogger("bnnify").warning("from bnnify %s", HOSTILE)
        logging.getLogger("bnnify").info("not shown")
        logging.getLogger("torch.export").warning("a third-party traceback")
        warnings.warn(f"a warning {HOSTILE}", UserWarning, stacklevel=1)

    noisy()
    err = capsys.readouterr().err
    assert not RAW.search(err)
    assert "Warning: from bnnify a\\x1b[31mb" in err and "Warning: a warning" in err
    assert "not shown" not in err and "third-party" not in err
    assert logging.getLogger("torch.export").isEnabledFor(logging.WARNING)  # restored


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
