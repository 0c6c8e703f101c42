"""Streamed conversion of a large sharded checkpoint: time, throughput and peak memory.

    python benchmarks/bench_convert.py [--quick] [--size-gb 2.2] [--shard-mb 500]
        [--workdir DIR] [--keep] [--out benchmarks/out/bench_convert.json]

Builds a synthetic Hugging Face-style sharded safetensors checkpoint (float32 Linear-like
weights and biases, a few large tensors and many small ones) shard by shard, converts it
with the real CLI (`python -m bnnify convert`) in a subprocess whose memory is sampled
from `/proc/<pid>/status` every 5 ms, then checks the output against the input. Reported:
the child's peak RSS above its start-up RSS over the model size, and its two parts.
RssAnon is memory the process holds (a few times the largest tensor while one parameter
is converted); RssFile counts the pages of the memory-mapped input shards, which stay
mapped until the model is closed, so it grows to the model's size, but they are clean
file pages that the kernel reclaims under memory pressure. Nothing asserts on time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import environment, write_json

from bnnify.formats.checkpoint import Checkpoint
from bnnify.formats.safetensors_io import ShardedWriter, TensorInfo

_REPO = Path(__file__).resolve().parent.parent
_FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")
_GB = 1e9
_MB = 1e6


# ------------------------------------------------------------------ the input model


def plan_tensors(total_bytes: int) -> list[TensorInfo]:
    """Float32 tensors of a transformer-like model of at least `total_bytes` bytes.

    Three large embedding-like matrices (the largest about a twelfth of the model), then
    blocks of Linear weights and biases and norm vectors until the size is reached.
    """
    width = 1024 if total_bytes >= _GB else 256
    largest = max(total_bytes // 12, 4 * width * 4)
    infos = [
        TensorInfo(name, torch.float32, (int(largest * share) // (4 * width), width))
        for name, share in (
            ("embed_tokens.weight", 1.0),
            ("lm_head.weight", 0.8),
            ("proj_in.weight", 0.6),
        )
    ]
    block = {
        "attn.qkv.weight": (3 * width, width),
        "attn.qkv.bias": (3 * width,),
        "attn.out.weight": (width, width),
        "attn.out.bias": (width,),
        "mlp.up.weight": (4 * width, width),
        "mlp.up.bias": (4 * width,),
        "mlp.down.weight": (width, 4 * width),
        "mlp.down.bias": (width,),
        "norm1.weight": (width,),
        "norm1.bias": (width,),
        "norm2.weight": (width,),
        "norm2.bias": (width,),
    }
    layer = 0
    while sum(info.nbytes for info in infos) < total_bytes:
        infos += [
            TensorInfo(f"layers.{layer}.{name}", torch.float32, shape)
            for name, shape in block.items()
        ]
        layer += 1
    return infos


def build_checkpoint(folder: Path, infos: list[TensorInfo], shard_bytes: int) -> Path:
    """Writes the model as shards plus an index, one tensor in memory at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    seeds = {info.name: i for i, info in enumerate(infos)}
    shapes = {info.name: info.shape for info in infos}
    with ShardedWriter(folder, "model", infos, {"format": "pt"}, shard_bytes) as writer:
        for name in writer.order:
            generator = torch.Generator().manual_seed(seeds[name])
            writer.write(name, torch.randn(shapes[name], generator=generator).mul_(0.02))
        writer.finish()
    return writer.index_path


# ------------------------------------------------------------- the measured child


def _status(pid: int) -> dict[str, int] | None:
    """Memory fields of /proc/<pid>/status in bytes; None once the process has exited."""
    try:
        with open(f"/proc/{pid}/status") as file:
            lines = file.read().splitlines()
    except OSError:
        return None
    values = {}
    for line in lines:
        key, _, rest = line.partition(":")
        if key in _FIELDS:
            values[key] = int(rest.split()[0]) * 1024
    # A zombie has no memory lines: the process is gone, its pid not yet reaped.
    return values if "VmRSS" in values else None


class _Sampler:
    """Peaks of a child's VmRSS, RssAnon and RssFile, polled every `interval` seconds."""

    def __init__(self, pid: int, interval: float = 0.005):
        self.pid = pid
        self.interval = interval
        self.samples = 0
        self.peak: dict[str, int] = dict.fromkeys(_FIELDS, 0)
        self.at_peak: dict[str, int] = {}
        self.when: dict[str, float] = {}
        self._start = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (values := _status(self.pid)) is not None:
            self.samples += 1
            if values["VmRSS"] > self.peak["VmRSS"]:
                self.at_peak = values
            for key, value in values.items():
                if value > self.peak[key]:
                    self.peak[key] = value
                    self.when[key] = time.perf_counter() - self._start
            time.sleep(self.interval)

    def join(self) -> None:
        self._thread.join()


def run_measured(command: list[str], log_dir: Path, label: str) -> dict:
    """Runs `command`, sampling its memory, and returns timing, memory and its outputs."""
    stdout_path, stderr_path = log_dir / f"{label}.stdout", log_dir / f"{label}.stderr"
    with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, cwd=_REPO)
        sampler = _Sampler(process.pid)
        # wait4 reaps the child and returns its own rusage (ru_maxrss in KiB on Linux).
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
    sampler.join()
    return {
        "command": command,
        "returncode": process.returncode,
        "wall_s": wall,
        "samples": sampler.samples,
        "peak_rss": sampler.peak["VmRSS"],
        "peak_rss_anon": sampler.peak["RssAnon"],
        "peak_rss_file": sampler.peak["RssFile"],
        "rss_at_peak": {k: v for k, v in sampler.at_peak.items() if k != "VmHWM"},
        "vm_hwm": sampler.peak["VmHWM"],
        "peak_at_s": {k: v for k, v in sampler.when.items() if k != "VmHWM"},
        "ru_maxrss": usage.ru_maxrss * 1024,
        "stdout": stdout_path.read_text(errors="replace"),
        "stderr": stderr_path.read_text(errors="replace"),
    }


# ------------------------------------------------------------------- verification


def _shard_files(index: Path) -> dict[str, Path]:
    weight_map = json.loads(index.read_text())["weight_map"]
    return {name: index.parent / shard for name, shard in weight_map.items()}


def verify(input_index: Path, output_index: Path, infos: list[TensorInfo]) -> dict:
    """Checks the parameter count and that a few posterior means equal the input weights."""
    inputs = _shard_files(input_index)
    by_size = sorted(infos, key=lambda info: info.nbytes)
    picks = {by_size[0].name, by_size[-1].name, infos[0].name, infos[-1].name}
    picks |= {info.name for info in random.Random(0).sample(infos, min(4, len(infos)))}
    checked, problems = [], []
    with Checkpoint(output_index) as checkpoint:
        kept = sum(torch.Size(r.shape).numel() for r in checkpoint.deterministic.values())
        parameters_out = checkpoint.num_elements() + kept
        posterior = checkpoint.spec.posterior[0]
        for name in sorted(picks):
            with safe_open(str(inputs[name]), framework="pt") as file:
                expected = file.get_tensor(name)
            record = checkpoint.parameters.get(name)
            if record is None:
                same = torch.equal(checkpoint.tensor(name), expected)
            else:
                same = torch.equal(checkpoint.tensor(record.tensors["mu"]), expected)
                rho = checkpoint.tensor(record.tensors["rho"])
                if rho.shape != expected.shape or not bool(torch.isfinite(rho).all()):
                    problems.append(f"{name}: rho has shape {tuple(rho.shape)} or is not finite")
            if not same:
                problems.append(f"{name}: the output differs from the input weight")
            checked.append(name)
    parameters_in = sum(torch.Size(info.shape).numel() for info in infos)
    if parameters_out != parameters_in:
        problems.append(f"{parameters_out} parameters in the output, {parameters_in} in the input")
    return {
        "ok": not problems,
        "problems": problems,
        "posterior": posterior,
        "parameters_in": parameters_in,
        "parameters_out": parameters_out,
        "checked": checked,
    }


# ------------------------------------------------------------------------ report


def _sizes(paths: list[Path]) -> list[int]:
    return [path.stat().st_size for path in paths]


def summarize(infos: list[TensorInfo], input_index: Path, run: dict, baseline: dict) -> dict:
    """Sizes, throughput and memory of one measured conversion."""
    cli = json.loads(run["stdout"])
    outputs = [Path(p) for p in cli["outputs"]]
    report = [p for p in outputs if p.name.endswith(".kl.safetensors")]
    checkpoint = [p for p in outputs if p not in report]
    shards = [p for p in checkpoint if not p.name.endswith(".index.json")]
    input_shards = sorted(set(_shard_files(input_index).values()))
    model_bytes = sum(info.nbytes for info in infos)
    parameters = sum(torch.Size(info.shape).numel() for info in infos)
    largest = max(infos, key=lambda info: info.nbytes)
    above = run["peak_rss"] - baseline["peak_rss"]
    anon_above = run["peak_rss_anon"] - baseline["peak_rss_anon"]
    return {
        "model_bytes": model_bytes,
        "model_files_bytes": sum(_sizes(input_shards)) + input_index.stat().st_size,
        "parameters": parameters,
        "tensors": len(infos),
        "input_shards": len(input_shards),
        "largest_input_shard_bytes": max(_sizes(input_shards)),
        "largest_tensor": {"name": largest.name, "bytes": largest.nbytes},
        "output_bytes": sum(_sizes(checkpoint)),
        "output_shards": len(shards),
        "largest_output_shard_bytes": max(_sizes(shards)),
        "report_bytes": sum(_sizes(report)),
        "reparametrized": cli["reparametrized"],
        "deterministic": cli["deterministic"],
        "kl_sum": cli["kl"]["sum"],
        "convert_s": run["wall_s"],
        "input_gb_per_s": model_bytes / _GB / run["wall_s"],
        "parameters_per_s": parameters / run["wall_s"],
        "peak_above_baseline": above,
        "peak_anon_above_baseline": anon_above,
        "peak_above_baseline_over_model": above / model_bytes,
        "peak_anon_above_baseline_over_model": anon_above / model_bytes,
        "peak_anon_above_baseline_over_largest_tensor": anon_above / largest.nbytes,
        "expected_over_model": (max(_sizes(shards)) + largest.nbytes) / model_bytes,
    }


def _mb(n: int) -> str:
    return f"{n / _MB:,.1f} MB"


def table(s: dict, run: dict, baseline: dict, check: dict) -> str:
    at_peak, largest = run["rss_at_peak"], s["largest_tensor"]
    rows = [
        ("model size", f"{_mb(s['model_bytes'])} ({s['parameters'] / 1e6:,.1f}M float32 "
                       f"params, {s['tensors']} tensors)"),
        ("input shards", f"{s['input_shards']} (largest {_mb(s['largest_input_shard_bytes'])})"),
        ("largest tensor", f"{_mb(largest['bytes'])} ({largest['name']})"),
        ("output checkpoint", f"{_mb(s['output_bytes'])} in {s['output_shards']} shards "
                              f"(largest {_mb(s['largest_output_shard_bytes'])})"),
        ("reparametrized / kept", f"{s['reparametrized']} / {s['deterministic']}"),
        ("conversion wall time", f"{s['convert_s']:.1f} s"),
        ("throughput", f"{s['input_gb_per_s']:.3f} GB/s input, "
                       f"{s['parameters_per_s'] / 1e6:.1f}M params/s"),
        ("start-up RSS (baseline)", f"{_mb(baseline['peak_rss'])} "
                                    f"(anon {_mb(baseline['peak_rss_anon'])})"),
        ("peak RSS (VmRSS, sampled)", _mb(run["peak_rss"])),
        ("  RssAnon / RssFile at that peak", f"{_mb(at_peak.get('RssAnon', 0))} / "
                                             f"{_mb(at_peak.get('RssFile', 0))}"),
        ("peak RssAnon / peak RssFile", f"{_mb(run['peak_rss_anon'])} / "
                                        f"{_mb(run['peak_rss_file'])}"),
        ("VmHWM / ru_maxrss", f"{_mb(run['vm_hwm'])} / {_mb(run['ru_maxrss'])}"),
        ("peak RSS above baseline", _mb(s["peak_above_baseline"])),
        ("peak RssAnon above baseline", _mb(s["peak_anon_above_baseline"])),
        ("**peak above baseline / model**", f"**{s['peak_above_baseline_over_model']:.3f}**"),
        ("peak anon above baseline / model", f"{s['peak_anon_above_baseline_over_model']:.3f}"),
        ("peak anon above baseline / largest tensor",
         f"{s['peak_anon_above_baseline_over_largest_tensor']:.2f}"),
        ("(largest out shard + largest tensor) / model", f"{s['expected_over_model']:.3f}"),
        ("verification", "ok" if check["ok"] else "FAILED: " + "; ".join(check["problems"])),
    ]  # fmt: skip
    lines = ["| metric | value |", "| --- | --- |"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


# -------------------------------------------------------------------------- main


def _convert_command(index: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "bnnify", "convert", str(index),
        "-o", str(out / "model.bnn.safetensors"),
        "--report", str(out / "model.kl.safetensors"),
        "--json", "--force",
    ]  # fmt: skip


def _checked(run: dict, what: str) -> dict:
    if run["returncode"] != 0:
        sys.exit(f"{what} failed with exit code {run['returncode']}:\n{run['stderr'][-4000:]}")
    return run


def bench(args: argparse.Namespace, work: Path) -> dict:
    size_gb = 0.2 if args.quick else args.size_gb
    shard_mb = args.shard_mb or (50 if args.quick else 500)
    infos = plan_tensors(int(size_gb * _GB))
    print(f"building {sum(i.nbytes for i in infos) / _GB:.2f} GB in {work} ...", file=sys.stderr)
    start = time.perf_counter()
    index = build_checkpoint(work / "model", infos, int(shard_mb * _MB))
    built = time.perf_counter() - start
    (work / "out").mkdir()
    baseline_command = [sys.executable, "-c", "import bnnify.cli.main, bnnify.usecases.convert"]
    baseline = _checked(run_measured(baseline_command, work, "baseline"), "the baseline")
    print("converting through the CLI ...", file=sys.stderr)
    run = _checked(run_measured(_convert_command(index, work / "out"), work, "convert"), "convert")
    summary = summarize(infos, index, run, baseline)
    print("verifying the output ...", file=sys.stderr)
    output_index = next((work / "out").glob("*.index.json"), work / "out/model.bnn.safetensors")
    check = verify(index, output_index, infos)
    print(table(summary, run, baseline, check))
    for record in (run, baseline):
        record.pop("stdout")
    return {
        "environment": environment(),
        "quick": args.quick,
        "size_gb": size_gb,
        "input_shard_mb": shard_mb,
        "build_s": built,
        "summary": summary,
        "convert": run,
        "baseline": baseline,
        "verification": check,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a ~200 MB model, for development")
    parser.add_argument("--size-gb", type=float, default=2.2, help="model size (default 2.2)")
    parser.add_argument("--shard-mb", type=float, help="input shard size (default 500, --quick 50)")
    parser.add_argument("--workdir", type=Path, help="parent of the work folder (default /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/bench_convert.json"))
    args = parser.parse_args()
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_convert_", dir=args.workdir))
    try:
        result = bench(args, work)
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    write_json(args.out, result)
    print(f"wrote {args.out}", file=sys.stderr)
    if not result["verification"]["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
