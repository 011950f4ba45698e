"""Model definitions and loaders (toy and real). `ModelLoadError` lives here, not in `pipeline`, so that the CLI can
catch it without importing diffusers (seconds of start-up on every command, even one refused at once)."""


class ModelLoadError(RuntimeError):
    """A checkpoint that cannot be loaded, with the reason in one line."""
