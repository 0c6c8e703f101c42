"""Signals turned into `KeyboardInterrupt`, held back while temporary files are handled.

The CLI installs `install_signal_handlers`: SIGINT, SIGTERM and SIGHUP raise
`KeyboardInterrupt` (exit 130) so that cleanup code runs. Three rules make the cleanup
safe against a second signal, wherever it lands:

- While a `KeyboardInterrupt` is being handled (in an `except` or `finally` block, or an
  `__exit__` method, on its way out), a further signal is dropped: the process is
  already stopping, and its cleanup must run to the end.
- Inside `deferred_signals()` (creating, committing or removing temporary files) a
  signal is held back and raised when the outermost block ends normally.
- Temporary files are `track`ed from the moment they exist: whatever was left when the
  interpreter exits is removed then (`remove_tracked`).

Python runs signal handlers in the main thread between bytecodes, so no handler runs
in the middle of this bookkeeping.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = [
    "HANDLED_SIGNALS",
    "deferred_signals",
    "forget",
    "install_signal_handlers",
    "raise_pending",
    "remove_tracked",
    "track",
]

HANDLED_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)

_depth = 0
_pending: int | None = None
_tracked: set[Path] = set()
_atexit_registered = False


def install_signal_handlers() -> None:
    """SIGINT, SIGTERM and SIGHUP raise `KeyboardInterrupt`; main thread only.

    A signal that is ignored when the process starts (`nohup`, a background job of a
    non-interactive shell) stays ignored.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in HANDLED_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _on_signal)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    global _pending
    if isinstance(sys.exc_info()[1], KeyboardInterrupt):
        return
    if _depth:
        _pending = _pending or signum
        return
    raise _interrupt(signum)


def _interrupt(signum: int) -> KeyboardInterrupt:
    return KeyboardInterrupt(f"received {signal.Signals(signum).name}")


def deferred_signals() -> contextlib.AbstractContextManager[None]:
    """Holds back handled signals in the block; raised at the end of the outermost one.

    A signal held back while the block raises is dropped: an exception is already on
    its way out and the command ends with it.
    """
    return _Deferred()


class _Deferred:
    # A class, not a generator: the counter changes in one bytecode on each side, and a
    # generator's own exception state would be one more thing a signal could land in.

    def __enter__(self) -> None:
        global _depth
        _depth += 1

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        global _depth, _pending
        _depth -= 1
        if _depth or _pending is None:
            return
        signum, _pending = _pending, None
        if exc is None:
            raise _interrupt(signum)


def raise_pending() -> None:
    """Raises now a signal held back by `deferred_signals()`, as `KeyboardInterrupt`.

    For long blocks that reach a point where stopping is still clean.
    """
    global _pending
    if _pending is not None:
        signum, _pending = _pending, None
        raise _interrupt(signum)


def track(path: Path) -> None:
    """Records a temporary file to remove if the process ends before `forget(path)`.

    Call it inside `deferred_signals()`, in the block that created the file.
    """
    global _atexit_registered
    if not _atexit_registered:
        atexit.register(_remove_at_exit)
        _atexit_registered = True
    _tracked.add(path)


def forget(path: Path) -> None:
    """The temporary file is gone or became an output: nothing to remove any more."""
    _tracked.discard(path)


def remove_tracked() -> None:
    """Removes every temporary file still tracked (idempotent)."""
    with deferred_signals():
        for path in sorted(_tracked):
            with contextlib.suppress(OSError):
                os.unlink(path)
            forget(path)


def _remove_at_exit() -> None:
    # The last line of defence, for a temporary file whose `with` block never got to
    # run its cleanup (an interrupt raised inside another error's cleanup).
    with contextlib.suppress(KeyboardInterrupt):
        remove_tracked()
