"""The README's command-line walkthrough runs as shown (on the demo's files)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import torch
from cli_helpers import invoke

from bnnify.demo import main as demo_main

ROOT = Path(__file__).resolve().parent.parent


def _walkthrough() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## The command-line tool") :]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def test_readme_commands_run_as_shown(tmp_path, monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        (tmp_path / "sample_configs").symlink_to(ROOT / "sample_configs")
        demo_main([str(tmp_path / "demo_out" / "model.pt")])
        monkeypatch.chdir(tmp_path)
        commands = _walkthrough()
        assert commands[0] == ["cd", "demo_out"]
        monkeypatch.chdir(tmp_path / "demo_out")
        for words in commands[1:]:
            assert words[0] == "bnnify"
            result = invoke(*words[1:])
            assert result.exit_code == 0, (words, result.output)
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "demo_out" / "predictions.safetensors").is_file()


def _test_rmse(folder: Path, checkpoint: str) -> float:
    import bnnify

    test = folder / "test.safetensors"
    predicted = bnnify.predict(folder / checkpoint, folder / "model.pt", test, targets=test)
    return predicted.metrics["bayesian"]["rmse"]


def test_the_walkthrough_fit_ends_no_worse_than_it_started(tmp_path, monkeypatch):
    # Issue 10: the walkthrough's fit used to end worse on test data than the converted
    # model (the last epoch kept while validation RMSE rose). The kept epoch is now the
    # best on validation, the starting point included.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        demo_main([str(tmp_path / "model.pt")])
        monkeypatch.chdir(tmp_path)
        fit = next(words for words in _walkthrough() if words[:2] == ["bnnify", "fit"])
        assert invoke("convert", "model.pt", "--force").exit_code == 0
        assert invoke(*fit[1:]).exit_code == 0
        assert _test_rmse(tmp_path, "model.bnn.fit.safetensors") <= _test_rmse(
            tmp_path, "model.bnn.safetensors"
        )
    finally:
        torch.set_num_threads(threads)
