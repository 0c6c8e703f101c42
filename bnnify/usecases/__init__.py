"""bnnify's use cases: convert, fit, predict, kl and inspect, over the file formats."""

__all__: list[str] = []
