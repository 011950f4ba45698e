"""Loading text-to-image pipelines: the committed toy model, a local diffusers directory, or a hub id.

One code path serves the toy world and real checkpoints (SD1.5): `StableDiffusionPipeline.from_pretrained`, weights
from safetensors only. Toy model names resolve to directories shipped inside the package.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

TOY_MODELS_DIR = Path(__file__).resolve().parent.parent / "toy_models"
TOY_NAMES = {
    "base": TOY_MODELS_DIR / "base",
}


class ModelLoadError(RuntimeError):
    """A checkpoint that cannot be loaded, with the reason in one line."""


def resolve_model_path(name_or_path: str) -> str:
    """`base` -> the committed toy pipeline; an existing directory -> itself; anything else is treated as a hub id."""
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


def load_pipeline(name_or_path: str, torch_dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    path = resolve_model_path(name_or_path)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            path,
            torch_dtype=torch_dtype,
            use_safetensors=True,  # never unpickle weights
            safety_checker=None,
            requires_safety_checker=False,
            local_files_only=os.environ.get("HF_HUB_OFFLINE", "0") == "1" or Path(path).exists(),
        )
    except (OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise ModelLoadError(f"cannot load pipeline from {path}: {first}") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate_images(
    pipe: StableDiffusionPipeline,
    prompts: Sequence[str],
    *,
    steps: int = 20,
    guidance: float = 5.0,
    seed: int = 0,
    batch_size: int = 32,
    prompt_embeds_fn=None,
) -> list[np.ndarray]:
    """uint8 HxWx3 images for `prompts`; image i depends only on (seed, i), not on the batch it falls in.

    `prompt_embeds_fn(prompts) -> (cond, uncond)` replaces the pipeline's own text encoding (segment-level encoding of
    long prompts, interpolated encoders)."""
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    out: list[np.ndarray] = []
    latent_shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        # One generator per image keeps results independent of batching.
        latents = torch.stack(
            [torch.randn(latent_shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + start + i)) for i in range(len(chunk))]
        )
        kwargs = dict(prompt=chunk)
        if prompt_embeds_fn is not None:
            cond, uncond = prompt_embeds_fn(chunk)
            kwargs = dict(prompt_embeds=cond, negative_prompt_embeds=uncond)
        result = pipe(
            **kwargs,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=latents.to(pipe.unet.dtype),
            output_type="np",
        )
        out.extend((np.clip(result.images, 0, 1) * 255).round().astype(np.uint8))
    return out
