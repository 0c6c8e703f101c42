"""Tests of bnnify.cli.reporting: the use cases' log lines and progress, through an `Output`."""

from __future__ import annotations

import importlib
import logging

import pytest

from bnnify.cli.output import Output, command
from bnnify.cli.reporting import reporting
from bnnify.usecases import LOGGER_NAME

LOGGER = logging.getLogger(LOGGER_NAME)


def test_info_lines_are_logs_and_warnings_are_warnings(capsys, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    with reporting(Output(), "Working"):
        LOGGER.info("Loaded %s", "model.pt")
        LOGGER.warning("careful")
        LOGGER.debug("not shown")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == ["Loaded model.pt", "Warning: careful"]


def test_json_and_quiet_modes_hide_what_they_hide(capsys):
    with reporting(Output(json_mode=True), "Working"):
        LOGGER.info("hidden in JSON mode")
        LOGGER.warning("shown")
    with reporting(Output(quiet=True), "Working"):
        LOGGER.warning("hidden when quiet")
    err = capsys.readouterr().err
    assert "shown" in err and "hidden" not in err


def test_the_logger_is_left_as_it_was(capsys):
    logger = logging.getLogger("bnnify.usecases")
    before = (logger.level, logger.propagate, list(logger.handlers))
    with reporting(Output(), "Working") as progress:
        progress(3, 10)
        progress(7, 10)
    assert (logger.level, logger.propagate, list(logger.handlers)) == before
    LOGGER.info("after the command")
    assert "after the command" not in capsys.readouterr().err


def test_no_bar_is_drawn_when_stderr_is_not_a_terminal(capsys):
    with reporting(Output(), "Working") as progress:
        for _ in range(5):
            progress(2, 10)
    assert capsys.readouterr().err == ""


def test_use_case_lines_pass_the_switch_that_silences_other_libraries(capsys, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.delenv("BNNIFY_DEBUG", raising=False)

    @command
    def run() -> None:
        with reporting(Output(), "Working"):
            LOGGER.info("Loaded model.pt")
            logging.getLogger("torch.export").warning("a third-party record")

    run()
    assert capsys.readouterr().err.splitlines() == ["Loaded model.pt"]
    assert LOGGER.isEnabledFor(logging.INFO) == (LOGGER.getEffectiveLevel() <= logging.INFO)


@pytest.mark.parametrize("name", ["convert", "fit", "checkpoint_kl", "predict"])
def test_every_use_case_logs_on_the_channel_the_cli_draws(name):
    module = importlib.import_module(f"bnnify.usecases.{name}")
    assert module.logger.name == LOGGER_NAME
