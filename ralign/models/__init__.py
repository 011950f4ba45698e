"""Model definitions and loaders (toy and real). `ModelLoadError` and `TOY_MODELS_DIR` live here, not in `pipeline`,
so that the CLI can use them without importing diffusers (seconds of start-up on every command, even one refused at
once)."""

from pathlib import Path

from ralign.config import UserError

# The committed toy models (ralign/toy_models/*/MODEL_CARD.md), written by `ralign world pretrain`.
TOY_MODELS_DIR = Path(__file__).resolve().parent.parent / "toy_models"


class ModelLoadError(UserError):
    """A checkpoint that cannot be loaded, with the reason in one line."""
