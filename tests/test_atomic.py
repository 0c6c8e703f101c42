"""Tests of atomic, all-or-nothing output files."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from bnnify.errors import OutputExistsError, UsageError
from bnnify.formats.atomic import AtomicOutputs, atomic_path, install_sigterm_handler


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def umask():
    """Sets the process umask for one test."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def test_outputs_appear_on_exit_and_not_before(tmp_path: Path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    with AtomicOutputs([a, str(b)]) as outputs:
        temp = outputs.temp(a)
        assert temp.parent == tmp_path
        assert temp.name.startswith(".a.bin.") and temp.name.endswith(".tmp")
        assert outputs.temp(str(a)) == temp
        temp.write_bytes(b"A")
        outputs.temp(b).write_bytes(b"B")
        assert names(tmp_path) == sorted([temp.name, outputs.temp(b).name])
    assert a.read_bytes() == b"A" and b.read_bytes() == b"B"
    assert names(tmp_path) == ["a.bin", "b.bin"]


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt, SystemExit])
def test_an_exception_leaves_nothing_behind(tmp_path: Path, error: type[BaseException]):
    paths = [tmp_path / "a", tmp_path / "b", tmp_path / "never"]
    with pytest.raises(error), AtomicOutputs(paths) as outputs:
        outputs.temp(paths[0]).write_bytes(b"complete")
        outputs.temp(paths[1]).write_bytes(b"partial")
        raise error
    assert names(tmp_path) == []


def test_temps_removed_by_the_caller_are_ignored(tmp_path: Path):
    with pytest.raises(RuntimeError, match="boom"), AtomicOutputs([tmp_path / "a"]) as outputs:
        outputs.temp(tmp_path / "a").unlink()
        raise RuntimeError("boom")
    assert names(tmp_path) == []


def test_unwritten_outputs_commit_nothing(tmp_path: Path):
    paths = [tmp_path / "a", tmp_path / "b"]
    with pytest.raises(RuntimeError, match="never written"), AtomicOutputs(paths) as outputs:
        outputs.temp(paths[0]).write_bytes(b"A")
    assert names(tmp_path) == []


def test_existing_outputs_are_refused_before_any_work(tmp_path: Path):
    for name in ("a", "b"):
        (tmp_path / name).write_bytes(b"old")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    paths = [tmp_path / "a", tmp_path / "new", tmp_path / "b", tmp_path / "dangling"]
    with pytest.raises(OutputExistsError) as info:
        AtomicOutputs(paths)
    for name in ("a", "b", "dangling"):
        assert str(tmp_path / name) in info.value.message
    assert str(tmp_path / "new") not in info.value.message
    assert info.value.hint == "pass --force to overwrite"
    assert names(tmp_path) == ["a", "b", "dangling"]


def test_force_replaces_existing_outputs(tmp_path: Path):
    path = tmp_path / "out"
    path.write_bytes(b"old")
    with atomic_path(path, force=True) as temp:
        temp.write_bytes(b"new")
        assert path.read_bytes() == b"old"
    assert path.read_bytes() == b"new"
    assert names(tmp_path) == ["out"]


def test_an_output_that_appears_meanwhile_is_not_clobbered(tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    with pytest.raises(OutputExistsError), AtomicOutputs([a, b]) as outputs:
        outputs.temp(a).write_bytes(b"ours")
        outputs.temp(b).write_bytes(b"ours")
        b.write_bytes(b"theirs")
    assert names(tmp_path) == ["b"] and b.read_bytes() == b"theirs"


def test_a_failed_rename_undoes_the_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    a, b = tmp_path / "a", tmp_path / "b"
    replace = os.replace

    def failing(source, destination):
        if Path(destination) == b:
            raise OSError(28, "No space left on device")
        replace(source, destination)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="No space"), AtomicOutputs([a, b]) as outputs:
        outputs.temp(a).write_bytes(b"A")
        outputs.temp(b).write_bytes(b"B")
    assert names(tmp_path) == []


def test_outputs_never_overwrite_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    source = tmp_path / "model.pt"
    source.write_bytes(b"input")
    (tmp_path / "link.pt").symlink_to(source)
    os.link(source, tmp_path / "hard.pt")
    monkeypatch.chdir(tmp_path)
    for output in (source, "model.pt", "./sub/../model.pt", tmp_path / "link.pt", "hard.pt"):
        with pytest.raises(UsageError, match="would overwrite the input"):
            AtomicOutputs([tmp_path / "other", output], force=True, inputs=[source])
    assert source.read_bytes() == b"input"


def test_directories_and_missing_folders_are_refused(tmp_path: Path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(UsageError, match="is a directory"):
        AtomicOutputs([tmp_path / "folder"], force=True)
    with pytest.raises(UsageError, match="does not exist") as info:
        AtomicOutputs([tmp_path / "missing" / "out"])
    assert str(tmp_path / "missing") in info.value.message
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(UsageError, match="does not exist"):
        AtomicOutputs([tmp_path / "file" / "out"])


def test_the_same_output_twice_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="more than once"):
        AtomicOutputs([tmp_path / "out", "out"])


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_permissions_follow_the_umask(tmp_path: Path, umask, mask: int):
    umask(mask)
    path = tmp_path / "out"
    with atomic_path(path) as temp:
        assert stat.S_IMODE(temp.stat().st_mode) == 0o666 & ~mask
        temp.write_bytes(b"x")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def test_temp_is_given_only_for_declared_outputs_inside_the_block(tmp_path: Path):
    outputs = AtomicOutputs([tmp_path / "a"])
    with pytest.raises(ValueError, match="inside the `with` block"):
        outputs.temp(tmp_path / "a")
    with outputs:
        with pytest.raises(ValueError, match="not one of the declared outputs"):
            outputs.temp(tmp_path / "b")
        outputs.temp(tmp_path / "a").write_bytes(b"")
    with pytest.raises(ValueError, match="committed"):
        outputs.temp(tmp_path / "a")
    with pytest.raises(RuntimeError, match="only once"), outputs:
        pass


def test_long_names_get_valid_temp_names(tmp_path: Path):
    path = tmp_path / ("x" * 250)
    with atomic_path(path) as temp:
        assert len(temp.name) <= 255
        temp.write_bytes(b"")
    assert path.exists()


def test_sigterm_becomes_keyboard_interrupt_and_cleans_up(tmp_path: Path):
    previous = signal.getsignal(signal.SIGTERM)
    try:
        install_sigterm_handler()
        with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "out") as temp:
            temp.write_bytes(b"partial")
            signal.raise_signal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert names(tmp_path) == []


def test_sigterm_in_a_child_process_leaves_no_file(tmp_path: Path):
    script = textwrap.dedent(
        """
        import os, signal, sys
        from bnnify.formats.atomic import atomic_path, install_sigterm_handler

        install_sigterm_handler()
        try:
            with atomic_path(sys.argv[1]) as temp:
                temp.write_bytes(b"partial")
                os.kill(os.getpid(), signal.SIGTERM)
                temp.write_bytes(b"never reached")
        except KeyboardInterrupt:
            sys.exit(130)
        """
    )
    child = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "out")],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        capture_output=True,
        text=True,
        check=False,
    )
    assert child.returncode == 130, child.stderr
    assert names(tmp_path) == []


def test_sigterm_handler_is_left_alone_outside_the_main_thread():
    previous = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=install_sigterm_handler)
    thread.start()
    thread.join()
    assert signal.getsignal(signal.SIGTERM) == previous
