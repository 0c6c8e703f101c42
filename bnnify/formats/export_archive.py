"""torch.export archives, loaded safely."""

from __future__ import annotations

import weakref
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from bnnify.errors import FormatError
from bnnify.formats._export_code import check_program
from bnnify.formats._export_guard import guarded, quiet_torch_logs, run_check, unsafe
from bnnify.formats.export_inputs import check_shapes

__all__ = ["check_archive", "guarded", "load_export", "unlift"]

# What torch.export.load's legacy fallback (torch < 2.8 layout) reads with Python's zipfile.
_LEGACY = frozenset({"version", "serialized_exported_program.json", "serialized_state_dict.pt"})
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
# Programs loaded with trust_pickle: `unlift` leaves them to torch as well.
_TRUSTED: weakref.WeakSet = weakref.WeakSet()


def load_export(stream: BinaryIO, file: Path, *, trust_pickle: bool = False) -> Any:
    """`torch.export.load(stream)`, unable to run code from the archive unless trusted.

    Unless `trust_pickle`, the archive is first checked with `check_archive`, then
    loaded under `guarded`, which sits where torch 2.13 could run code from the file
    (paths under torch/):

    - `torch.load(..., weights_only=False)` of pickled weights and tensor constants
      (export/pt2_archive/_package.py:891, :949), and the `weights_only=False` retry of
      `deserialize_torch_artifact` for sample inputs and legacy weights and constants
      (_export/serde/serialize.py:441): every `torch.load` is made `weights_only=True`,
      and a pickle that needs more is refused.
    - custom objects, `torch._C._pickle_load_obj` (_package.py:972), and opaque objects,
      `pickle.loads` (_package.py:978): refused, as is any full unpickle (the audit event
      `pickle.find_class`, whatever calls it).
    - AOTInductor native libraries, `_load_aoti` (_package.py:1040, called at :1183 and
      :1196): refused, as is any `ctypes` library or new process (audit events).
    - the legacy loader `torch.export.load` falls back to, with Python's zipfile, when
      `load_pt2` raises RuntimeError or finds no program (export/__init__.py:347, :358):
      unreachable, `load_pt2` raising a FormatError instead.
    - `sympy.sympify` of the graph's shape expressions, which evaluates them as Python
      (_export/serde/serialize.py:2412): only sympy constructors, numbers and arithmetic.
    - the Python source fx generates from the graph and executes
      (fx/graph_module.py:143): placeholder names (from serialize.py:2554-2579),
      attribute paths (fx/graph.py:254, :862, :926, :935) and keyword names (:644) are
      written into it unescaped; they must be names, and the source must only define
      functions.
    - modules imported to read pytree contexts (utils/_pytree.py:971, :2018, from
      serialize.py:3518): only enums of modules already imported and builtin
      defaultdict factories.
    - input guards that `ExportedProgram.module()` compiles with `exec`
      (export/_unlift.py:213): the program's own are checked here, the ones `unlift`
      compiles there.

    Args:
        stream: The open archive (seekable).
        file: Its path, for messages.
        trust_pickle: Load with torch's own behaviour (trusted files only).

    Returns:
        The `torch.export.ExportedProgram`.

    Raises:
        UnsafeInputError: If loading would run code from the archive.
        FormatError: If the archive is corrupt or not one torch.export.save writes.
        Exception: Whatever torch raises for an archive that passes the checks but
            fails to deserialize (the caller reports it as corrupt).
    """
    if trust_pickle:
        with quiet_torch_logs():
            program = torch.export.load(stream)
        _TRUSTED.add(program)
        return program
    check_archive(stream, file)
    stream.seek(0)
    with guarded(file):
        program = torch.export.load(stream)
        run_check(check_program, program)
    return program


def unlift(program: Any, file: Path) -> nn.Module:
    """`program.module()`, under the guard of `load_export` (its generated code is checked).

    The module refuses inputs of other shapes than the program fixed with an
    `InputError` (see `check_shapes`).

    Raises:
        UnsafeInputError: If the module's code would run code from the archive.
    """
    if program in _TRUSTED:
        module = program.module()
    else:
        with guarded(file):
            module = program.module()
    check_shapes(program, module)
    return module


# ------------------------------------------------------------------ structure


def check_archive(stream: BinaryIO, file: Path) -> None:
    """Refuses an archive that torch's own zip reader and Python's zipfile see differently.

    torch reads a .pt2 with miniz (`torch._C.PyTorchFileReader`): member names end at a
    NUL byte in its listing but not in its look-ups, look-ups ignore ASCII case, and
    every member must sit in the folder of the first one. An archive passes when both
    readers list the same members in the same order, every name is printable and
    inside that root folder, no two names differ only in case, members are stored
    uncompressed, and it holds no AOTInductor code nor pickled objects.

    Raises:
        UnsafeInputError: If the archive is built to be read differently, or holds code.
        FormatError: If it is truncated, corrupt or not written by torch.export.save.
    """
    records = _torch_records(stream, file)  # None: torch refuses to list them
    stream.seek(0)
    try:
        infos = zipfile.ZipFile(stream).infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        unsafe(file, f"only torch's zip reader can read it ({error})")
    names = [_raw_name(info, file) for info in infos]
    root = names[0].partition("/")[0] if names else ""
    seen: set[str] = set()
    for name in names:
        _check_name(name, root, seen, file)
    if records is None or [f"{root}/{r}" for r in records] != names:
        unsafe(file, "torch's zip reader and Python's zipfile list different members")
    size = stream.seek(0, 2)
    for info in infos:
        _check_member(info, size, file)


def _torch_records(stream: BinaryIO, file: Path) -> list[str] | None:
    """The member names torch lists, without the root folder, and its format marker checked.

    None if torch refuses to list them (a member outside the root folder): the names
    Python's zipfile lists then show which.
    """
    try:
        reader = torch._C.PyTorchFileReader(stream)
    except RuntimeError as error:
        stream.seek(0)
        if _legacy_members(stream):
            unsafe(
                file,
                "it holds members of the torch < 2.8 layout, which torch.export.load falls "
                "back to and unpickles without weights_only",
            )
        raise FormatError(
            f"'{file}' is a truncated or corrupt torch.export archive: {_first_line(error)}",
            hint="Copy or download the file again, or re-save it with torch.export.save.",
        ) from None
    try:
        records = reader.get_all_records()
    except UnicodeDecodeError:
        unsafe(file, "it holds a member name that is not UTF-8")
    except RuntimeError:
        return None
    if "archive_format" not in records or reader.get_record("archive_format") != b"pt2":
        raise FormatError(f"'{file}' is a zip archive but not a torch.export program")
    if "models/model.json" not in records:
        raise FormatError(f"'{file}' is a torch.export archive without a program (models/)")
    return records


def _legacy_members(stream: BinaryIO) -> bool:
    try:
        names = zipfile.ZipFile(stream).namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return False
    return bool(_LEGACY.intersection(names))


def _raw_name(info: zipfile.ZipInfo, file: Path) -> str:
    """The member name as stored (zipfile cuts `filename` at NUL; torch does not)."""
    raw = info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        unsafe(file, f"it holds a member name that is not UTF-8 ({raw!r})")


def _check_name(name: str, root: str, seen: set[str], file: Path) -> None:
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        unsafe(file, f"it holds a member name with a control character ({name!r})")
    parts = name.split("/")
    if parts[0] != root or len(parts) < 2 or {"", ".", ".."} & set(parts) or "\\" in name:
        unsafe(file, f"it holds a member outside its root folder {root!r} ({name!r})")
    key = name.translate(_ASCII_LOWER)
    if key in seen:
        unsafe(file, f"it holds two members named {name!r} (torch's reader ignores case)")
    seen.add(key)
    record = name.partition("/")[2].translate(_ASCII_LOWER)
    if record.startswith("data/aotinductor/"):
        unsafe(file, f"it holds AOTInductor native code ({name!r})")
    if record.startswith(("data/constants/custom_obj_", "data/constants/opaque_obj_")):
        unsafe(file, f"it holds a pickled Python object ({name!r})")


def _check_member(info: zipfile.ZipInfo, size: int, file: Path) -> None:
    if info.flag_bits & 0x1:
        raise FormatError(f"'{file}' holds an encrypted member ({info.orig_filename!r})")
    if info.compress_type != zipfile.ZIP_STORED:
        raise FormatError(
            f"'{file}' holds a compressed member ({info.orig_filename!r}): "
            "torch.export.save stores members uncompressed",
            hint="Re-save the program with torch.export.save instead of repacking the archive.",
        )
    if info.file_size != info.compress_size or info.header_offset + info.file_size > size:
        raise FormatError(
            f"'{file}' is a corrupt torch.export archive: member {info.orig_filename!r} "
            f"declares {info.file_size} bytes in a {size}-byte file"
        )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
