"""A guard around torch that refuses, while a torch.export archive loads, to run its code."""

from __future__ import annotations

import functools
import logging
import pickle
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import torch

from bnnify.errors import FormatError, UnsafeInputError
from bnnify.formats._export_code import (
    CodeRefused,
    check_graph,
    check_guard,
    check_python_code,
    check_sym_expr,
    check_treespec,
)
from bnnify.formats.detect import refused_global

__all__ = ["guarded", "quiet_torch_logs", "run_check", "unsafe"]

logger = logging.getLogger(__name__)

_HINT = (
    "If you trust this file, pass --trust-pickle (trust_pickle=True). Better, export the "
    "model without tensor subclasses, custom objects or AOTInductor."
)
_LOCK = threading.RLock()
_local = threading.local()
_hook_installed = False
# Audit events that no part of a torch.export load needs, but for the modules torch
# imports on the way: a full (not weights-only) unpickle resolving a global, a native
# library, a new process, a browser.
_EVENTS = {
    "pickle.find_class": "run a full unpickle",
    "ctypes.dlopen": "load a native library",
    "os.system": "run a shell command",
    "os.exec": "start a program",
    "os.posix_spawn": "start a process",
    "os.spawn": "start a process",
    "subprocess.Popen": "start a process",
    "webbrowser.open": "open a web browser",
}


class _Refused(Exception):
    """Raised where torch would run code from the archive (recorded: torch may catch it)."""


@contextmanager
def guarded(file: Path) -> Iterator[None]:
    """While the block runs in this thread, torch cannot run code from an archive.

    Where torch 2.13 could run code from a .pt2 (see `bnnify.formats.export_archive`), the
    functions it calls are wrapped: module attributes replaced on entry and restored
    on exit, even on error. In other threads the wrappers call through unchanged;
    guarded blocks of different threads run one at a time; a nested block is part of
    the outer one. A refusal that torch catches and hides is still reported.

    Args:
        file: The archive, for messages.

    Raises:
        UnsafeInputError: If the block tried to run code from the archive.
    """
    with _LOCK:
        if _guarded():
            yield
            return
        _install_audit_hook()
        patches = _patches(file)
        originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
        refusals: list[str] = []
        _local.refusals = refusals
        try:
            for owner, name, wrap in patches:
                setattr(owner, name, wrap(getattr(owner, name)))
            with quiet_torch_logs():
                yield
        except Exception:
            if not refusals:
                raise
        finally:
            for owner, name, original in reversed(originals):
                setattr(owner, name, original)
            del _local.refusals
        if refusals:
            unsafe(file, f"loading it would {refusals[0]}")


@contextmanager
def quiet_torch_logs() -> Iterator[None]:
    """torch's log records from this thread go to bnnify's debug log, without tracebacks."""
    thread = threading.get_ident()

    def divert(record: logging.LogRecord) -> bool:
        if record.thread != thread:
            return True
        logger.debug("torch: %s", record.getMessage())
        return False

    handlers = {
        handler
        for name, each in list(logging.Logger.manager.loggerDict.items())
        if name == "torch" or name.startswith("torch.")
        if isinstance(each, logging.Logger)
        for handler in each.handlers
    }
    for handler in handlers:
        handler.addFilter(divert)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(divert)


def unsafe(file: Path, what: str) -> NoReturn:
    """Raises the UnsafeInputError of archive `file`, `what` saying why."""
    raise UnsafeInputError(f"'{file}' is an unsafe torch.export archive: {what}", hint=_HINT)


def run_check(check: Callable[[Any], None], value: Any) -> None:
    """`check(value)` in a guarded block: its CodeRefused is refused like the guard's own."""
    try:
        check(value)
    except CodeRefused as refused:
        _refuse(f"run Python written in the file: {refused}")


# -------------------------------------------------------------------- wrappers


def _guarded() -> bool:
    return getattr(_local, "refusals", None) is not None


def _refuse(what: str) -> NoReturn:
    _local.refusals.append(what)
    raise _Refused(what)


def _install_audit_hook() -> None:
    global _hook_installed
    if not _hook_installed:
        # Audit hooks cannot be removed: this one acts only inside a guarded block.
        sys.addaudithook(_audit)
        _hook_installed = True


def _audit(event: str, args: tuple) -> None:
    if event in _EVENTS and _guarded():
        if event != "pickle.find_class" and _importing():
            return  # the import-time work of an installed module torch imports lazily
        _refuse(f"{_EVENTS[event]} ({event} {args[:2]!r})")


def _importing() -> bool:
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _patches(file: Path) -> list[tuple[object, str, Callable[[Any], Any]]]:
    """(owner, attribute, wrapper factory) for each function torch may run file code with."""
    # Imported before the guard starts, so their own import-time work is not guarded.
    import sympy
    import torch._inductor.cpp_builder  # load_pt2 imports it
    from torch._export.serde import serialize
    from torch.export import _unlift
    from torch.export.pt2_archive import _package

    return [
        (_package, "load_pt2", functools.partial(_no_fallback, file=file)),
        (_package, "_load_aoti", _refusing("load AOTInductor native code")),
        (torch, "load", _weights_only),
        (torch.serialization, "load", _weights_only),
        (torch._C, "_pickle_load_obj", _refusing("unpickle a TorchScript custom object")),
        (pickle, "loads", _refusing("unpickle a Python object")),
        (pickle, "load", _refusing("unpickle a Python object")),
        (sympy, "sympify", _checked_sympify),
        (torch.fx.Graph, "python_code", _checked_python_code),
        (serialize, "treespec_loads", _checked(check_treespec)),
        (_unlift, "_convert_guards_code_to_fn", _checked_guards),
    ]


def _no_fallback(original: Callable, *, file: Path) -> Callable:
    @functools.wraps(original)
    def load_pt2(f: Any, **kwargs: Any) -> Any:
        if not _guarded():
            return original(f, **kwargs)
        try:
            contents = original(f, **kwargs)
        except RuntimeError as error:
            # Not a RuntimeError: torch.export.load would retry with its legacy loader.
            reason = (str(error).strip() or type(error).__name__).splitlines()[0]
            raise FormatError(f"'{file}' is a corrupt torch.export archive: {reason}") from None
        if "model" not in contents.exported_programs:
            raise FormatError(f"'{file}' is a torch.export archive without a program")
        return contents

    return load_pt2


def _weights_only(original: Callable) -> Callable:
    @functools.wraps(original)
    def load(f: Any, map_location: Any = None, pickle_module: Any = None, **kwargs: Any) -> Any:
        if not _guarded():
            return original(f, map_location, pickle_module, **kwargs)
        if pickle_module is not None:
            _refuse(f"unpickle with the pickle module {pickle_module!r}")
        kwargs["weights_only"] = True
        try:
            return original(f, map_location, **kwargs)
        except pickle.UnpicklingError as error:
            _refuse(f"unpickle more than weights: {refused_global(error) or 'an object'}")

    return load


def _refusing(what: str) -> Callable[[Callable], Callable]:
    def wrap(original: Callable) -> Callable:
        @functools.wraps(original)
        def refused(*args: Any, **kwargs: Any) -> Any:
            if not _guarded():
                return original(*args, **kwargs)
            _refuse(what)

        return refused

    return wrap


def _checked(check: Callable[[str], None]) -> Callable[[Callable], Callable]:
    """A wrapper that calls `check` on the first argument (a string) before the original."""

    def wrap(original: Callable) -> Callable:
        @functools.wraps(original)
        def checked(text: Any, *args: Any, **kwargs: Any) -> Any:
            if _guarded() and isinstance(text, str):
                run_check(check, text)
            return original(text, *args, **kwargs)

        return checked

    return wrap


def _checked_sympify(original: Callable) -> Callable:
    @functools.wraps(original)
    def sympify(a: Any, *args: Any, **kwargs: Any) -> Any:
        if _guarded() and isinstance(a, str):
            names = kwargs.get("locals", args[0] if args else None) or {}
            run_check(functools.partial(check_sym_expr, names=names), a)
        return original(a, *args, **kwargs)

    return sympify


def _checked_python_code(original: Callable) -> Callable:
    @functools.wraps(original)
    def python_code(self: torch.fx.Graph, *args: Any, **kwargs: Any) -> Any:
        if not _guarded():
            return original(self, *args, **kwargs)
        run_check(check_graph, self)
        code = original(self, *args, **kwargs)
        run_check(check_python_code, code)
        return code

    return python_code


def _checked_guards(original: Callable) -> Callable:
    @functools.wraps(original)
    def convert(guards_code: list[str], *args: Any, **kwargs: Any) -> Any:
        if _guarded():
            for guard in guards_code:
                run_check(check_guard, guard)
        return original(guards_code, *args, **kwargs)

    return convert
