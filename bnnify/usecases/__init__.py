"""bnnify's use cases, one module per command: the Python API (re-exported by `bnnify.api`)."""

__all__: list[str] = []
