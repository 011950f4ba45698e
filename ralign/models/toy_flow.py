"""The toy flow-matching text-to-image model: SD3's classes (an MMDiT `SD3Transformer2DModel`,
`FlowMatchEulerDiscreteScheduler`, `AutoencoderKL` with a shift factor, two `CLIPTextModelWithProjection` encoders),
shrunk to run on two CPU cores, saved as a `StableDiffusion3Pipeline` directory.

SD3 has three text encoders (CLIP-L, CLIP-G, T5-XXL); diffusers lets the T5 be absent (its embeddings are then zeros),
so the toy model has the two CLIP towers only, both of the toy world's word-level tokenizer. Loading goes through
`StableDiffusion3Pipeline.from_pretrained` from safetensors, the same path an SD3.5 checkpoint takes.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from ralign.models import ModelLoadError
from ralign.models.toy_t2i import LATENT_CHANNELS, LATENT_SIZE
from ralign.models.weights import no_progress_bars
from ralign.world.scene import IMAGE_SIZE


def text_encoder(tokenizer, width: int, layers: int, heads: int, projection: int, seed: int) -> CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=tokenizer.model_max_length, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, projection_dim=projection)).eval()


def transformer(width: int, layers: int, heads: int, text_width: int, pooled_width: int) -> SD3Transformer2DModel:
    """Patch size 1 on the 8x8 latent: 64 image tokens (SD3.5 at 1024 px: 4096)."""
    return SD3Transformer2DModel(
        sample_size=LATENT_SIZE, patch_size=1, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_layers=layers,
        attention_head_dim=width // heads, num_attention_heads=heads, joint_attention_dim=text_width,
        caption_projection_dim=width, pooled_projection_dim=pooled_width, pos_embed_max_size=LATENT_SIZE)


def flow_scheduler(shift: float = 1.0) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def tiny_random_flow_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """A randomly initialised flow pipeline for unit tests of code paths (not quality)."""
    from ralign.models.tokenizer import build_word_tokenizer

    tok = build_word_tokenizer()
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=LATENT_CHANNELS, norm_num_groups=4,
        sample_size=IMAGE_SIZE, shift_factor=0.0)
    # joint_attention_dim: the two CLIP widths side by side (diffusers pads them to it); pooled: both projections.
    return StableDiffusion3Pipeline(
        transformer=transformer(width=32, layers=2, heads=2, text_width=64, pooled_width=64), scheduler=flow_scheduler(),
        vae=vae, text_encoder=text_encoder(tok, 32, 1, 2, 32, seed), tokenizer=tok,
        text_encoder_2=text_encoder(tok, 32, 1, 2, 32, seed + 1), tokenizer_2=tok, text_encoder_3=None, tokenizer_3=None)


def encode_prompts(pipe: StableDiffusion3Pipeline, prompts: list[str], guidance: bool = True, device=None):
    """diffusers' SD3 `encode_prompt` at the tokenizer's length: (embeds, negative embeds, pooled, negative pooled)
    (negatives None without guidance). Its warning about truncated prompts (logged for every batch with a long
    prompt) is silenced: the policy reports what a prompt loses through `prompt_overflow`."""
    import logging

    logger = logging.getLogger("diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return pipe.encode_prompt(list(prompts), None, None, device=device, do_classifier_free_guidance=guidance,
                                  max_sequence_length=pipe.tokenizer.model_max_length)
    finally:
        logger.setLevel(level)


def pipeline_embeds(pipe: StableDiffusion3Pipeline, prompts: list[str], guidance: bool = True, device=None) -> dict:
    """`encode_prompts` as the pipeline's keyword arguments (prompt, negative and both pooled embeddings)."""
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    return dict(zip(names, encode_prompts(pipe, prompts, guidance=guidance, device=device)))


def load_flow_pipeline(path: str | Path, torch_dtype: torch.dtype = torch.float32) -> StableDiffusion3Pipeline:
    """`flow` (the committed toy model), a StableDiffusion3Pipeline directory or a hub id, weights from safetensors
    only; a T5 encoder absent from the directory is left out (diffusers then feeds zeros in its place)."""
    import json

    from ralign.models import resolve_model_path

    path = resolve_model_path(str(path))
    local = Path(path).expanduser()
    absent: dict = {}
    if local.is_dir():
        index = local / "model_index.json"
        if not index.is_file():
            raise ModelLoadError(f"{local}: not a diffusers pipeline directory (no model_index.json)")
        spec = json.loads(index.read_text())
        if spec.get("_class_name") != "StableDiffusion3Pipeline":
            raise ModelLoadError(f"{local}: a {spec.get('_class_name')} directory, not a StableDiffusion3Pipeline (a flow model)")
        absent = {k: None for k in ("text_encoder_3", "tokenizer_3") if spec.get(k) in (None, [None, None])}
    try:
        with no_progress_bars():
            pipe = StableDiffusion3Pipeline.from_pretrained(
                str(local) if local.is_dir() else str(path), torch_dtype=torch_dtype, use_safetensors=True,
                local_files_only=os.environ.get("HF_HUB_OFFLINE", "0") == "1" or local.is_dir(), **absent)
    except (OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise ModelLoadError(f"cannot load flow pipeline from {path}: {first}") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe
