"""What a use case reports while it runs (log records, progress), drawn through an `Output`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

from bnnify.cli.output import Output
from bnnify.usecases import LOGGER_NAME

__all__ = ["reporting"]


class _ToOutput(logging.Handler):
    def __init__(self, out: Output):
        super().__init__(logging.INFO)
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            self.out.warn(message)
        else:
            self.out.log(message)


@contextmanager
def reporting(out: Output, description: str) -> Iterator[Callable[[int, int], None]]:
    """Shows the use cases' log lines on `out`, and yields their progress callback.

    The callback takes (units done, total units); the bar (on an interactive stderr
    only, see `Output.progress`) starts at the first call, once the total is known.
    """
    logger = logging.getLogger(LOGGER_NAME)
    handler = _ToOutput(out)
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    with ExitStack() as bars:
        advance: Callable[[int], None] | None = None

        def report(done: int, total: int) -> None:
            nonlocal advance
            if advance is None:
                advance = bars.enter_context(out.progress(total, description))
            advance(done)

        try:
            yield report
        finally:
            logger.removeHandler(handler)
            logger.setLevel(saved[0])
            logger.propagate = saved[1]
