"""Tests of the CLI's output sink: everything printed is sanitized, logs are routed."""

from __future__ import annotations

import json
import logging
import re
import warnings

import pytest
import typer
from rich.table import Table
from rich.text import Text

from bnnify.cli.output import Output, command, sanitize

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
