"""Tests of signal handling: interrupts that never leave a temporary file behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from bnnify.formats.atomic import AtomicOutputs
from bnnify.formats.interrupts import (
    HANDLED_SIGNALS,
    deferred_signals,
    install_signal_handlers,
    remove_tracked,
    track,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def handlers():
    """Installs bnnify's handlers for one test, restoring the previous ones."""
    previous = {signum: signal.getsignal(signum) for signum in HANDLED_SIGNALS}
    install_signal_handlers()
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_each_signal_becomes_an_interrupt_that_cleans_up(tmp_path, handlers, name):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt, match=name), AtomicOutputs([out]) as outputs:
        outputs.temp(out).write_bytes(b"partial")
        signal.raise_signal(getattr(signal, name))
    assert list(tmp_path.iterdir()) == []


def test_an_ignored_signal_stays_ignored():
    previous = {signum: signal.getsignal(signum) for signum in HANDLED_SIGNALS}
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        install_signal_handlers()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is not previous[signal.SIGTERM]
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_handlers_are_left_alone_outside_the_main_thread():
    previous = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=install_signal_handlers)
    thread.start()
    thread.join()
    assert signal.getsignal(signal.SIGTERM) == previous


def test_a_deferred_signal_is_raised_when_the_block_ends(handlers):
    done = []
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"), deferred_signals():
        with deferred_signals():
            signal.raise_signal(signal.SIGTERM)
            done.append("inner")
        done.append("outer")
    assert done == ["inner", "outer"]


def test_a_signal_deferred_in_a_failing_block_is_dropped(handlers):
    with pytest.raises(ValueError), deferred_signals():
        signal.raise_signal(signal.SIGINT)
        raise ValueError
    with deferred_signals():
        pass  # nothing left to raise


def test_a_signal_while_an_interrupt_is_handled_is_dropped(handlers):
    cleaned = []
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        signal.raise_signal(signal.SIGINT)
        cleaned.append(True)
    assert cleaned == [True]


def test_tracked_files_are_removed_once(tmp_path):
    files = [tmp_path / "a", tmp_path / "b"]
    with deferred_signals():
        for file in files:
            file.write_bytes(b"")
            track(file)
    files[0].unlink()  # already gone: fine
    remove_tracked()
    remove_tracked()
    assert list(tmp_path.iterdir()) == []


# Runs rounds of "write two outputs" and sends itself `first` after `start` Python events
# (opcodes) and `second` `after` events later, each at the next point where CPython
# runs signal handlers (after a call, at a function's start, on a backward jump): the
# signals land at exact, varied points (creating a temporary file, writing, committing,
# cleaning up), deterministically.
SWEEP = r"""
import dis, json, os, sys
from pathlib import Path
from bnnify.formats.atomic import AtomicOutputs
from bnnify.formats.interrupts import install_signal_handlers

install_signal_handlers()
folder, pairs, afters = Path(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
payload = b"x" * 50_000
BREAKERS = {"CALL", "CALL_FUNCTION_EX", "JUMP_BACKWARD", "RESUME"}
points = {}


def handler_point(frame):
    # Offsets right after an instruction that checks for pending signals.
    code = frame.f_code
    if code not in points:
        after, previous = set(), None
        for instruction in dis.get_instructions(code):
            if previous in BREAKERS:
                after.add(instruction.offset)
            previous = instruction.opname
        points[code] = after
    return frame.f_lasti in points[code]


def body():
    a, b = folder / "a", folder / "b"
    with AtomicOutputs([a, b]) as out:
        out.temp(a).write_bytes(payload)
        out.temp(b).write_bytes(payload)


def play(start, after, first=0, second=0):
    count, me, plan = [0], sys._getframe(), []
    if after is not None:
        plan = [(start, first), (start + after, second)]

    def tracer(frame, event, arg):
        frame.f_trace_opcodes = True
        count[0] += 1
        if plan and count[0] >= plan[0][0] and event == "opcode" and handler_point(frame):
            os.kill(os.getpid(), plan.pop(0)[1])
        return tracer

    def rearm(frame, event, arg):
        # An interrupt raised inside `tracer` switches tracing off: switch it back on,
        # for every frame under this one, until the second signal is sent.
        if sys.gettrace() is None and plan:
            sys.settrace(tracer)
            while frame is not None and frame is not me:
                frame.f_trace, frame.f_trace_opcodes = tracer, True
                frame = frame.f_back

    try:
        sys.settrace(tracer)
        sys.setprofile(rearm)
        try:
            body()
        finally:
            sys.setprofile(None)
            sys.settrace(None)
    except KeyboardInterrupt:
        return "interrupted", not plan, count[0]
    return "done", not plan, count[0]


_, _, events = play(0, None)
report = {"events": events, "interrupted": 0, "both": 0, "bad": []}
# Most events are the checks before any file exists: look closer at the rest.
starts = [*range(1, events, events // 20), *range(events * 6 // 10, events, events // 50)]
report["rounds"] = len(starts) * len(afters)
for start in starts:
    for i, after in enumerate(afters):
        try:
            outcome, both, _ = play(start, after, *pairs[i % len(pairs)])
        except KeyboardInterrupt:
            outcome, both = "interrupted late", True
        sys.setprofile(None)
        sys.settrace(None)
        report["interrupted"] += outcome != "done"
        report["both"] += both
        left = sorted(p.name for p in folder.iterdir())
        whole = left == ["a", "b"] and all(
            (folder / n).read_bytes() == payload for n in left
        )
        if left and not whole:
            report["bad"].append([start, after, outcome, left])
        for name in left:
            (folder / name).unlink()
print(json.dumps(report))
"""


def test_two_signals_anywhere_leave_no_temporary_file(tmp_path):
    """No temporary file, and either both outputs whole or none, for every pair of points."""
    pairs = [[signal.SIGINT, signal.SIGINT], [signal.SIGTERM, signal.SIGHUP]]
    afters = [0, 1, 2, 4, 8, 16, 48, 144]
    child = subprocess.run(
        [sys.executable, "-c", SWEEP, str(tmp_path), json.dumps(pairs), json.dumps(afters)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    report = json.loads(child.stdout)
    assert report["bad"] == []
    # The sweep did what it says: most rounds were interrupted, by both signals.
    rounds = report["rounds"]
    assert report["interrupted"] > rounds * 0.9 and report["both"] > rounds // 2
    assert list(tmp_path.iterdir()) == []
