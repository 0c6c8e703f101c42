"""The README's pipeline script runs in bash as shown, on the demo's files, in a child process."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bnnify.demo import main as demo_main

ROOT = Path(__file__).resolve().parent.parent


def _script() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### In a pipeline") :]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_pipeline_script_converts_fits_exports_and_checks_exit_codes(tmp_path):
    folder = tmp_path / "demo_out"
    with torch.random.fork_rng(devices=[]):
        demo_main([str(folder / "model.pt")])
    (folder / "pipeline.sh").write_text(_script())
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    env |= {"OMP_NUM_THREADS": "1", "NO_COLOR": "1"}
    run = subprocess.run(
        ["bash", "pipeline.sh"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip().endswith("ready: model.ensemble.pt returns (mean, std)")
    report = json.loads((folder / "export.json").read_text())
    assert report["schema"] == "bnnify.export/1" and report["outputs"] == ["mean", "std"]
    assert (folder / "model.ensemble.pt").is_file()
    mean, std = torch.jit.load(str(folder / "model.ensemble.pt"))(torch.randn(3, 8))
    assert mean.shape == std.shape == (3, 1) and bool((std > 0).all())


def test_a_failing_step_stops_the_script_with_its_exit_code(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "pipeline.sh").write_text(_script())
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    run = subprocess.run(
        ["bash", "pipeline.sh"], cwd=folder, env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 1  # no model.pt: convert fails with 1
    assert "pipeline: convert failed (exit 1)" in run.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["pipeline.sh"]
