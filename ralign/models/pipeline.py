"""Loading text-to-image pipelines: the committed toy model, a local diffusers directory, or a hub id.

One code path serves the toy world and real checkpoints (SD1.5): `StableDiffusionPipeline.from_pretrained`, weights
from safetensors only. Toy model names resolve to directories shipped inside the package.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from safetensors import SafetensorError

from ralign.diffusion.seeding import sample_seed
from ralign.models.weights import no_progress_bars
from ralign.models import TOY_MODELS_DIR, TOY_NAMES, ModelLoadError, resolve_model_path  # noqa: F401 - re-exported

def load_pipeline(name_or_path: str, torch_dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    path = resolve_model_path(name_or_path)
    try:
        with no_progress_bars():
            pipe = StableDiffusionPipeline.from_pretrained(
            path,
                torch_dtype=torch_dtype,
                use_safetensors=True,  # never unpickle weights
                safety_checker=None,
                requires_safety_checker=False,
                local_files_only=os.environ.get("HF_HUB_OFFLINE", "0") == "1" or Path(path).exists(),
            )
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise ModelLoadError(f"cannot load pipeline from {path}: {first}") from exc
    if Path(path).is_dir():
        _check_weight_files(pipe, Path(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


_WEIGHT_FILE = re.compile(r"^(diffusion_pytorch_model|model)(-\d+-of-\d+)?\.safetensors$")


def _check_weight_files(pipe: StableDiffusionPipeline, root: Path) -> None:
    """diffusers and transformers only warn about tensors a component's files lack (left at their random
    initialisation) or hold in excess (ignored): a damaged or mismatched model would load and generate noise.
    Compare each component's parameters with the tensor names in its safetensors headers (no tensor data read).
    Only local directories are checked; weights in a legacy layout that diffusers renames on load would be refused
    here and need converting first."""
    from safetensors import safe_open

    for name in ("unet", "vae", "text_encoder"):
        files = sorted(f for f in (root / name).glob("*.safetensors") if _WEIGHT_FILE.match(f.name))
        if not files:
            continue
        in_files: set[str] = set()
        for f in files:
            with safe_open(str(f), "pt") as handle:
                in_files.update(handle.keys())
        expected = set(getattr(pipe, name).state_dict())
        where = files[0] if len(files) == 1 else root / name
        for problem, keys in (("missing", expected - in_files), ("not part of the model", in_files - expected)):
            if keys:
                shown = ", ".join(repr(k) for k in sorted(keys)[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
                raise ModelLoadError(f"{where}: tensor(s) {shown} {problem} (a damaged file, or weights of another model)")


@torch.no_grad()
def generate_images(
    pipe,
    prompts: Sequence[str],
    *,
    steps: int = 20,
    guidance: float = 5.0,
    seed: int = 0,
    batch_size: int = 32,
    prompt_embeds_fn=None,
) -> list[np.ndarray]:
    """uint8 HxWx3 images for `prompts` from a diffusers pipeline (a UNet one or a StableDiffusion3Pipeline); image i
    depends only on (seed, i), not on the batch it falls in.

    `prompt_embeds_fn(prompts) -> dict` of the pipeline's embedding arguments (`prompt_embeds`,
    `negative_prompt_embeds`, ...) replaces its own text encoding (segment-level encoding of long prompts,
    interpolated encoders, SD3's pooled embeddings)."""
    denoiser = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
    size = denoiser.config.sample_size * pipe.vae_scale_factor
    out: list[np.ndarray] = []
    latent_shape = (denoiser.config.in_channels, denoiser.config.sample_size, denoiser.config.sample_size)
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        # One generator per image keeps results independent of batching.
        latents = torch.stack(
            [torch.randn(latent_shape, generator=torch.Generator().manual_seed(sample_seed(seed, start + i))) for i in range(len(chunk))]
        )
        kwargs = prompt_embeds_fn(chunk) if prompt_embeds_fn is not None else dict(prompt=chunk)
        result = pipe(
            **kwargs,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=latents.to(denoiser.device, denoiser.dtype),
            output_type="np",
        )
        out.extend((np.clip(result.images, 0, 1) * 255).round().astype(np.uint8))
    return out
