"""bnnify's use cases, one module per command: the Python API (re-exported by `bnnify.api`)."""

__all__ = ["LOGGER_NAME"]

# The one logger of the use cases: their informational lines and warnings, which the CLI
# draws on stderr (`bnnify.cli.reporting`) and a Python caller configures as it likes.
LOGGER_NAME = "bnnify.usecases"
