"""bnnify's command-line interface (the only layer that imports Typer and Rich)."""

__all__: list[str] = []
