"""Tests of atomic, all-or-nothing output files."""

from __future__ import annotations

import contextlib
import errno
import multiprocessing
import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from bnnify.errors import OutputError, OutputExistsError, UsageError
from bnnify.formats.atomic import AtomicOutputs


@contextlib.contextmanager
def atomic_path(path: Path, *, force: bool = False) -> Iterator[Path]:
    """The temporary path of one output, committed when the block ends."""
    with AtomicOutputs([path], force=force) as outputs:
        yield outputs.temp(path)


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


@pytest.mark.parametrize("force", [False, True])
def test_a_failed_commit_step_undoes_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, force: bool
):
    a, b = tmp_path / "a", tmp_path / "b"
    name = "replace" if force else "link"
    real = getattr(os, name)

    def failing(source, destination, **kwargs):
        if Path(destination) == b:
            raise OSError(errno.EIO, "Input/output error")
        return real(source, destination, **kwargs)

    monkeypatch.setattr(os, name, failing)
    with pytest.raises(OSError, match="Input/output"), AtomicOutputs([a, b], force=force) as out:
        out.temp(a).write_bytes(b"A")
        out.temp(b).write_bytes(b"B")
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


def _racer(folder: Path, token: bytes, barrier, results) -> None:
    """One process committing `a` and `b` once every racer is ready to commit."""
    outputs = [folder / "a", folder / "b"]
    try:
        with AtomicOutputs(outputs) as out:
            for path in outputs:
                out.temp(path).write_bytes(token)
            barrier.wait()
    except OutputExistsError:
        results.put("lost")
    else:
        results.put("won")


def test_racing_processes_commit_exactly_one_winner(tmp_path: Path):
    """Whatever the interleaving: one winner, its two files, the others refused, no temps."""
    context = multiprocessing.get_context("fork")
    racers = 4
    for round_ in range(12):
        folder = tmp_path / str(round_)
        folder.mkdir()
        barrier, results = context.Barrier(racers), context.Queue()
        tokens = [f"racer {i} ".encode() * 1000 for i in range(racers)]
        processes = [
            context.Process(target=_racer, args=(folder, token, barrier, results))
            for token in tokens
        ]
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout=60)
            assert process.exitcode == 0
        outcomes = sorted(results.get(timeout=5) for _ in processes)
        assert outcomes == ["lost"] * (racers - 1) + ["won"]
        assert names(folder) == ["a", "b"]
        assert (folder / "a").read_bytes() == (folder / "b").read_bytes()
        assert (folder / "a").read_bytes() in tokens


def test_a_name_taken_after_the_check_is_lost_not_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Another process creates `b` between the existence check and the link."""
    a, b = tmp_path / "a", tmp_path / "b"
    link = os.link

    def competitor_first(source, destination, **kwargs):
        if Path(destination) == b:
            b.write_bytes(b"theirs")
        return link(source, destination, **kwargs)

    monkeypatch.setattr(os, "link", competitor_first)
    outputs = AtomicOutputs([a, b])
    with pytest.raises(OutputExistsError, match="another process") as error, outputs as out:
        out.temp(a).write_bytes(b"ours")
        out.temp(b).write_bytes(b"ours")
    assert error.value.exit_code == 2
    assert names(tmp_path) == ["b"] and b.read_bytes() == b"theirs"


@pytest.mark.parametrize("race", [False, True])
def test_without_hard_links_a_placeholder_claims_the_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, race: bool
):
    a, b = tmp_path / "a", tmp_path / "b"
    opened = os.open

    def no_links(source, destination, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    def competitor_first(path, flags, mode=0o777, **kwargs):
        if race and Path(path) == b and flags & os.O_EXCL:
            b.write_bytes(b"theirs")
        return opened(path, flags, mode, **kwargs)

    monkeypatch.setattr(os, "link", no_links)
    monkeypatch.setattr(os, "open", competitor_first)
    try:
        with AtomicOutputs([a, b]) as out:
            out.temp(a).write_bytes(b"A")
            out.temp(b).write_bytes(b"B")
    except OutputExistsError:
        assert race
        assert names(tmp_path) == ["b"] and b.read_bytes() == b"theirs"
    else:
        assert not race
        assert a.read_bytes() == b"A" and b.read_bytes() == b"B"
        assert names(tmp_path) == ["a", "b"]


@pytest.mark.parametrize(
    ("code", "kind", "words"),
    [
        (errno.ENOSPC, OutputError, "no space left on device"),
        (errno.EDQUOT, OutputError, "disk quota exceeded"),
        (errno.EFBIG, OutputError, "file too large"),
    ],
)
def test_a_full_disk_while_writing_names_the_output(tmp_path: Path, code, kind, words):
    a, b = tmp_path / "a", tmp_path / "b"
    with pytest.raises(kind, match=words) as error, AtomicOutputs([a, b]) as out:
        out.temp(a).write_bytes(b"A")
        out.temp(b).write_bytes(b"B")
        raise OSError(code, os.strerror(code))
    assert str(b) in error.value.message and error.value.exit_code == 1
    assert names(tmp_path) == []


def test_a_file_size_limit_is_reported_for_real(tmp_path: Path):
    """EFBIG from the kernel: a child whose RLIMIT_FSIZE is smaller than its output."""
    script = textwrap.dedent(
        """
        import resource, sys
        from bnnify.errors import OutputError
        from bnnify.formats.atomic import AtomicOutputs

        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            with AtomicOutputs([sys.argv[1]]) as outputs:
                with open(outputs.temp(sys.argv[1]), "wb") as file:
                    for _ in range(4):
                        file.write(b"x" * 2048)
        except OutputError as error:
            print(error.message)
        """
    )
    child = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "out")],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.startswith(f"cannot write {str(tmp_path / 'out')!r}: file too large")
    assert names(tmp_path) == []


def test_other_errors_while_writing_pass_through(tmp_path: Path):
    with pytest.raises(OSError, match="I/O") as error, atomic_path(tmp_path / "a") as temp:
        temp.write_bytes(b"A")
        raise OSError(errno.EIO, "I/O error")
    assert not isinstance(error.value, OutputError)
    assert names(tmp_path) == []


def test_names_too_long_are_refused_on_construction(tmp_path: Path):
    with pytest.raises(UsageError, match="300 bytes long, more than the 255") as error:
        AtomicOutputs([tmp_path / ("x" * 300)])
    assert "..." in error.value.message  # the name is shortened in the message
    # A name of 255 bytes is fine, also in a multi-byte encoding.
    with atomic_path(tmp_path / ("é" * 127)) as temp:
        assert len(os.fsencode(temp.name)) <= 255
        temp.write_bytes(b"")
    with pytest.raises(UsageError, match="256 bytes long"):
        AtomicOutputs([tmp_path / ("é" * 128)])


@pytest.mark.parametrize(
    ("code", "kind", "words"),
    [
        (errno.EACCES, UsageError, "is not writable"),
        (errno.EROFS, UsageError, "is not writable"),
        (errno.ENOSPC, OutputError, "no space left"),
    ],
)
def test_a_folder_that_cannot_take_a_file_is_refused_on_construction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code, kind, words
):
    opened = os.open

    def refusing(path, flags, *args, **kwargs):
        if Path(path).parent == tmp_path and flags & os.O_CREAT:
            raise OSError(code, os.strerror(code), str(path))
        return opened(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing)
    with pytest.raises(kind, match=words) as error:
        AtomicOutputs([tmp_path / "out"])
    assert str(tmp_path / "out") in error.value.message
    assert names(tmp_path) == []


def test_an_unwritable_folder_is_refused_on_construction(tmp_path: Path):
    folder = Path("/sys") if os.geteuid() == 0 else tmp_path / "read_only"
    if folder != Path("/sys"):
        folder.mkdir(mode=0o555)
    with pytest.raises(UsageError, match="is not writable"):
        AtomicOutputs([folder / "out"])
