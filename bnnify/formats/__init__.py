"""bnnify's files and formats: model files, checkpoints, KL reports, specs, data, outputs."""

__all__: list[str] = []
