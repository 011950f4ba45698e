"""Model definitions and loaders (toy and real). `ModelLoadError` and `TOY_MODELS_DIR` live here, not in `pipeline`,
so that the CLI can use them without importing diffusers (seconds of start-up on every command, even one refused at
once)."""

import json
from pathlib import Path

from ralign.config import UserError

# The committed toy models (ralign/toy_models/*/MODEL_CARD.md), written by `ralign world pretrain`.
TOY_MODELS_DIR = Path(__file__).resolve().parent.parent / "toy_models"


class ModelLoadError(UserError):
    """A checkpoint that cannot be loaded, with the reason in one line."""


# Toy model names that resolve to directories shipped inside the package.
TOY_NAMES = {
    "base": TOY_MODELS_DIR / "base",
    "flow": TOY_MODELS_DIR / "flow",
}
# Names of randomly initialised pipelines built in memory for tests, by the family they belong to.
TINY_RANDOM = {"tiny-random": "unet", "tiny-random-flow": "flow"}
# diffusers pipeline classes whose denoiser is a flow-matching transformer (ralign.diffusion.flow_policy).
FLOW_PIPELINE_CLASSES = ("StableDiffusion3Pipeline",)


def resolve_model_path(name_or_path: str) -> str:
    """A toy model name -> its committed directory; an existing directory -> itself; anything else is treated as a hub id."""
    if name_or_path in TOY_NAMES:
        path = TOY_NAMES[name_or_path]
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(f"toy model '{name_or_path}' is missing at {path}; run `ralign world pretrain`")
        return str(path)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(f"{path}: not a diffusers pipeline directory (no model_index.json)")
        return str(path.resolve())
    if "/" in name_or_path and not name_or_path.startswith((".", "/")):
        return name_or_path  # hub id; from_pretrained honours HF_HUB_OFFLINE and the local cache
    raise ModelLoadError(f"{name_or_path!r}: no such directory, and not a toy model name ({sorted(TOY_NAMES)}) or hub id")


def pipeline_family(name_or_path: str) -> str | None:
    """'flow' (a StableDiffusion3Pipeline: flow-matching transformer) or 'unet' (an SD-style UNet pipeline), read from
    the pipeline's model_index.json without loading any weights; None for a hub id whose index is not in the local
    cache (it is read when the pipeline loads)."""
    if name_or_path in TINY_RANDOM:
        return TINY_RANDOM[name_or_path]
    where = resolve_model_path(name_or_path)
    index = Path(where) / "model_index.json"
    if not index.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(where, "model_index.json")
        except Exception:  # noqa: BLE001 - not a valid repo id: loading the pipeline says why
            return None
        if not isinstance(cached, str):
            return None
        index = Path(cached)
    try:
        class_name = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{index}: unreadable model_index.json ({exc})") from exc
    return "flow" if class_name in FLOW_PIPELINE_CLASSES else "unet"
