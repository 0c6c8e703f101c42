"""bnnify's files and formats: model files, checkpoints, KL reports, predictions, specs, data."""

__all__: list[str] = []
