"""Tests of what a shell script relies on: JSON schemas, pipes, `-o -`, help, completion, env."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import BNNIFY, flat
from fit_files import cli, run_bnnify, shared_fit_files, single_thread, subprocess_env

from bnnify.cli.help_text import undocumented
from bnnify.cli.main import COMMANDS
from bnnify.cli.output import Output, json_text
from bnnify.cli.schemas import KL_BLOCK, SCHEMAS
from bnnify.errors import InputError
from bnnify.formats.report import KLReport, write_report

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")

DOCS = Path(__file__).resolve().parents[1] / "docs" / "json.md"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return shared_fit_files(tmp_path_factory)


@pytest.fixture(autouse=True)
def _one_thread(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written to the working directory
    with single_thread():
        yield


def strict_json(text: str) -> dict:
    """`json.loads` refusing NaN and Infinity, which are not JSON."""

    def refuse(value):
        raise ValueError(f"non-JSON constant {value}")

    return json.loads(text, parse_constant=refuse)


def schema_of(command: str, *args) -> dict:
    """`bnnify COMMAND ARGS --json` and `... --json -q`: one same strict JSON document
    following the command's schema."""
    loud = cli(command, *args, "--json")
    assert loud.exit_code == 0, loud.output
    data = strict_json(loud.stdout)
    assert next(iter(data)) == "schema" and data["schema"] == f"bnnify.{command}/1"
    assert set(data) == set(SCHEMAS[command]), set(data) ^ set(SCHEMAS[command])
    quiet = cli(command, *args, "--json", "-q", "-f") if "-o" in args else None
    if quiet is not None:  # -q silences logs, never the data asked for
        assert quiet.exit_code == 0 and set(strict_json(quiet.stdout)) == set(data)
    return data


# ------------------------------------------------------------------ JSON schemas


def test_every_command_follows_its_documented_schema(files, tmp_path):
    reg = (files.reg_fitted, "-m", files.reg_model)
    convert = schema_of("convert", files.reg_model, "-o", "c.bnn.safetensors")
    assert tuple(convert["kl"]) == KL_BLOCK and convert["dry_run"] is False
    assert all(isinstance(p, str) for p in convert["outputs"])
    kl = schema_of("kl", "c.bnn.safetensors", "--top", "1")
    assert tuple(kl["kl"]) == KL_BLOCK and kl["kl"]["sum"] == convert["kl"]["sum"]
    assert len(kl["parameters"]) == 1 < kl["parameter_count"]
    report = schema_of("kl", "c.kl.safetensors")
    assert report["from_report"] and report["value"] == kl["value"]
    inspect = schema_of("inspect", "c.bnn.safetensors")
    assert inspect["parameter_count"] == convert["reparametrized"]
    schema_of("list")
    schema_of("env")
    schema_of("predict", *reg, "-i", files.reg_train, "-o", "p.csv")
    schema_of("export", *reg, "-i", files.reg_train, "--format", "safetensors", "-o", "e.st")
    schema_of("prune", files.reg_fitted, "--keep", "0.5", "-o", "pruned.safetensors")
    data = ("-d", files.reg_train, "--task", "regression", "--epochs", "1")
    lines = records_of("fit", "c.bnn.safetensors", "-m", files.reg_model, *data, "--search")
    assert lines[0]["schema"] == "bnnify.fit.epoch/1" and lines[0]["point"] == 0
    assert {r["schema"] for r in lines[:-1]} == {"bnnify.fit.epoch/1", "bnnify.fit.search_point/1"}
    assert lines[-1]["schema"] == "bnnify.fit/1" and lines[-1]["search"] is not None
    calibrate = schema_of("calibrate", *reg, "--data", files.reg_train, "-o", "cal.safetensors")
    assert calibrate["output"] == "cal.safetensors"
    pytest.importorskip("matplotlib")
    Path("figures").mkdir()
    plot = schema_of("plot", "c.bnn.safetensors", "-o", "figures")
    assert plot["figures"] and all(isinstance(f["path"], str) for f in plot["figures"].values())


def records_of(command: str, *args) -> list[dict]:
    """`bnnify COMMAND ARGS --json` as JSON Lines: each line strict JSON of a known schema."""
    result = cli(command, *args, "--json")
    assert result.exit_code == 0, result.output
    records = [strict_json(line) for line in result.stdout.splitlines()]
    for record in records:
        name = record["schema"].removeprefix("bnnify.").removesuffix("/1")
        keys = set(record) - ({"point"} if name == "fit.epoch" else set())  # with --search
        assert next(iter(record)) == "schema" and keys == set(SCHEMAS[name]), name
    return records


def documented() -> dict[str, list[str]]:
    """docs/json.md: per `## bnnify.<command>/1` section, the keys of its table."""
    sections = re.split(r"^## `bnnify\.([\w.]+)/1`", DOCS.read_text(), flags=re.MULTILINE)
    return {
        name: re.findall(r"^\| `(\w+)` \|", body, flags=re.MULTILINE)
        for name, body in zip(sections[1::2], sections[2::2], strict=True)
    }


def test_the_documentation_lists_every_key_of_every_schema():
    docs = documented()
    assert set(docs) == set(SCHEMAS)
    for command, keys in SCHEMAS.items():
        assert docs[command] == list(keys), command
    assert "`sum`, `mean`, `method`, `samples`" in DOCS.read_text()
    assert "docs/json.md" in (DOCS.parents[1] / "README.md").read_text()


def test_json_is_strict_and_a_kl_that_is_not_finite_is_an_error():
    text = json_text({"path": Path("a"), "snr_cut": float("nan"), "x": float("inf")})
    assert strict_json(text) == {"path": "a", "snr_cut": None, "x": None}
    for bad in ({"kl": {"sum": float("inf")}}, {"history": [{"kl": float("nan")}]}):
        with pytest.raises(InputError, match="KL divergence"):
            json_text(bad)


def test_an_infinite_total_kl_exits_1_with_a_message(tmp_path):
    class Huge(KLReport):  # written with a total of 0: each value is finite, their sum is not
        total = mean = 0.0

    huge = Huge(["a", "b"], [1.5e308, 1.5e308], [1, 1], "analytic", None, {}, {})
    write_report(huge, tmp_path / "huge.kl.safetensors")
    for flags in ([], ["--json"]):
        result = cli("kl", "huge.kl.safetensors", *flags)
        assert result.exit_code == 1 and result.stdout == ""
        assert "total KL divergence is inf" in flat(result.stderr)


def test_json_lines_share_the_emitter(capsys):
    out = Output(command="fit", json_mode=True, quiet=True)
    out.json_line({"epoch": 1}, schema="fit.epoch")
    out.json({"done": True})
    lines = capsys.readouterr().out.splitlines()
    assert json.loads(lines[0]) == {"schema": "bnnify.fit.epoch/1", "epoch": 1}
    assert json.loads("".join(lines[1:]))["schema"] == "bnnify.fit/1"


# ---------------------------------------------------------------- pipes, -o -


def test_a_closed_pipe_ends_quietly_with_the_outputs_written(files, tmp_path):
    """`bnnify convert ... -v | head -1`: the reader is gone before anything is printed."""
    process = subprocess.Popen(
        [sys.executable, "-m", "bnnify", "convert", files.reg_model, "-v", "-o", "c.safetensors"],
        cwd=tmp_path,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    process.stdout.close()  # closed while bnnify still loads torch: every print hits EPIPE
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=300) == 0, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr and "Error" not in stderr
    assert (tmp_path / "c.safetensors").is_file() and (tmp_path / "c.kl.safetensors").is_file()


def test_dash_streams_predictions_and_other_outputs_refuse_it(files, tmp_path):
    reg = (files.reg_fitted, "-m", files.reg_model, "-i", files.reg_train)
    done = run_bnnify("predict", *reg, "-o", "-", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    assert header.split(",")[:2] == ["mean", "std"] and len(rows) > 10
    assert "Predicted" in done.stderr  # the summary moved to stderr
    refused = run_bnnify("convert", files.reg_model, "-o", "-", cwd=tmp_path)
    assert refused.returncode == 2 and "it is stdout" in flat(refused.stderr)
    both = run_bnnify("predict", *reg, "-o", "-", "--json", cwd=tmp_path)
    assert both.returncode == 2 and both.stdout == ""
    assert not (tmp_path / "-").exists() and not list(tmp_path.iterdir())


def test_predictions_follow_the_extension(files, tmp_path):
    reg = (files.reg_fitted, "-m", files.reg_model, "-i", files.reg_train)
    assert cli("predict", *reg, "-o", "p.csv").exit_code == 0
    assert Path("p.csv").read_text().startswith("mean,std,")
    assert cli("predict", *reg, "-o", "p.safetensors").exit_code == 0
    assert Path("p.safetensors").read_bytes()[8:9] == b"{"
    for name in ("p.npy", "p.pt", "p"):
        refused = cli("predict", *reg, "-o", name)
        assert refused.exit_code == 2 and "not a supported format" in flat(refused.stderr)
    refused = cli("predict", *reg, "-o", "q.csv", "--keep-samples")
    assert refused.exit_code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv", "p.safetensors"]


def test_kl_and_inspect_read_metadata_without_torch(files, tmp_path):
    assert cli("convert", files.reg_model, "-o", "c.bnn.safetensors", "-q").exit_code == 0
    code = (
        "import sys\n"
        "from bnnify.cli.main import main\n"
        "for argv in (['kl', 'c.kl.safetensors'], ['inspect', 'c.bnn.safetensors', '--json'],"
        " ['inspect', '.']):\n"
        "    sys.argv = ['bnnify', *argv]\n"
        "    try:\n"
        "        main()\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code in (0, None), exit.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "KL (sum):" in done.stdout and '"schema": "bnnify.inspect/1"' in done.stdout


# ------------------------------------------------------------------- convert


def test_dry_run_prints_the_plan_and_writes_nothing(files, tmp_path):
    result = cli("convert", files.reg_model, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "Would convert" in result.stdout and "Dry run: nothing was written." in result.stdout
    assert "Reparametrized parameters" in result.stdout
    data = strict_json(cli("convert", files.reg_model, "--dry-run", "--json").stdout)
    assert data["dry_run"] is True and data["outputs"] == [] and data["kl"]["sum"] > 0
    assert list(tmp_path.iterdir()) == []


def test_the_verbose_table_is_readable_for_many_parameters(tmp_path):
    import torch
    from torch import nn

    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(12)])
    torch.save(model.state_dict(), tmp_path / "deep.pt")
    result = cli("convert", "deep.pt", "--dry-run", "--filter", "1*.weight", "--top", "2")
    lines = result.stdout.splitlines()
    names = [m.group(1) for line in lines if (m := re.match(r"│ (\S+\.weight) ", line))]
    assert names == ["1.weight", "10.weight"]  # natural order: 1, 10, 11 (2 of 3 matched)
    text = flat(result.stdout)
    assert "Every parameter: posterior pretrained_gaussian (delta=0.1), prior gaussian" in text
    assert "Reparametrized parameters (2 of 3)" in text


# --------------------------------------------------------------- help, env, completion


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_is_readable_at_80_columns(command):
    assert undocumented(COMMANDS[command]) == []
    result = cli(command, "--help")
    from typer.testing import CliRunner

    from bnnify.cli.main import app

    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0
    text = result.stdout
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text and "list[" not in text and "<int range>" not in text
    options = [line for line in text.splitlines() if "--help" not in line]
    assert not any("<bool>" in line for line in options)
    if command == "convert":
        assert "<stem>.bnn.safetensors]" in text and "<stem>.kl.safetensors]" in text
    if command == "fit":
        assert "Log every epoch" in text


def test_env_says_what_a_bug_report_needs():
    import torch

    data = strict_json(cli("env", "--json").stdout)
    assert data["torch"]["version"] == torch.__version__
    assert data["threads"]["torch"] == torch.get_num_threads()
    human = cli("env").stdout
    assert f"torch {torch.__version__}" in human and "None" not in human


@pytest.mark.skipif(not BNNIFY.exists(), reason="the bnnify console script is not installed")
def test_shell_completion(tmp_path):
    done = subprocess.run(
        [BNNIFY, "--show-completion", "bash"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0 and "_bnnify_completion" in done.stdout, done.stderr
    env = {**subprocess_env(), "_BNNIFY_COMPLETE": "complete_bash", "COMP_WORDS": "bnnify con"}
    completed = subprocess.run(
        [BNNIFY],
        cwd=tmp_path,
        env={**env, "COMP_CWORD": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert "convert" in completed.stdout, completed.stderr


def test_no_python_reprs_in_human_output(files, tmp_path):
    assert cli("convert", files.reg_model, "-o", "c.bnn.safetensors", "-q").exit_code == 0
    text = cli("inspect", "c.bnn.safetensors").stdout + cli("list").stdout
    for repr_ in ("None", "[]", "{'", "{}"):
        assert repr_ not in text, repr_
    assert os.environ.get("BNNIFY_DEBUG") is None


def test_a_sharded_output_is_read_back_by_the_name_it_was_given(files, tmp_path):
    Path("out").mkdir()
    made = strict_json(
        cli(
            "convert",
            files.reg_model,
            "--shard-size",
            "200B",
            "-o",
            "out/ab.bnn.safetensors",
            "--json",
        ).stdout
    )
    index = "out/ab.bnn.safetensors.index.json"
    assert index in made["outputs"] and len(made["outputs"]) > 3  # several shards
    expected = strict_json(cli("kl", index, "--json").stdout)["value"]
    reg = ("-m", files.reg_model, "-i", files.reg_train, "-o", "-", "-q")
    for name in ("out/ab.bnn.safetensors", "out", index):
        assert strict_json(cli("kl", name, "--json").stdout)["value"] == expected, name
        shown = strict_json(cli("inspect", name, "--json").stdout)
        assert shown["kind"] == "sharded" and len(shown["files"]) == len(made["outputs"]) - 1
        assert cli("predict", name, *reg).stdout.startswith("mean,std"), name


def test_fit_verbose_logs_every_epoch_as_its_help_says(files, tmp_path):
    assert cli("convert", files.reg_model, "-o", "c.bnn.safetensors", "-q").exit_code == 0
    run_ = ("fit", "c.bnn.safetensors", "-m", files.reg_model, "-d", files.reg_train)
    run_ += ("--task", "regression", "--epochs", "20", "-f", "-o", "f.safetensors")
    for flags, lines in (((), 10), (("-v",), 20)):
        result = cli(*run_, *flags)
        assert result.exit_code == 0, result.output
        epochs = [line for line in result.stderr.splitlines() if line.startswith("epoch ")]
        assert len(epochs) == lines, flags
