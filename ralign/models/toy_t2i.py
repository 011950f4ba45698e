"""Configurations of the toy text-to-image model: the same diffusers / transformers classes as Stable Diffusion 1.5,
shrunk so that they train and run on two CPU cores.

Shape of the toy model (SD1.5 in brackets):
- text encoder: CLIPTextModel, 3 layers, width 128, 24-token limit [12 layers, 768, 77 tokens];
- VAE: AutoencoderKL, 64x64x3 -> 8x8x4 latents, the same factor-8 downsampling as SD [512x512x3 -> 64x64x4];
- UNet: UNet2DConditionModel with cross-attention at 8x8 and 4x4, ~3M parameters [~860M];
- schedulers: DDPM for training, DDIM for sampling, SD's scaled-linear betas.

Measured on this machine (2 cores): with diffusers' default SDPA attention, a UNet whose `attention_head_dim` is
read as *head count* 32 (diffusers' legacy naming) spent 60 % of its time in attention; a few wide heads is ~2.5x
faster, hence the small head counts below.
"""

from __future__ import annotations

from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel

from ralign.world.prompts import TEXT_MAX_TOKENS
from ralign.world.scene import IMAGE_SIZE

TEXT_WIDTH = 128
LATENT_CHANNELS = 4
VAE_FACTOR = 8
LATENT_SIZE = IMAGE_SIZE // VAE_FACTOR

# SD1.5's noise schedule; prediction of epsilon as in SD1.5.
SCHEDULER_KWARGS = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
)


def text_clip(vocab_size: int, pad_id: int, bos_id: int, eos_id: int) -> CLIPModel:
    """A tiny CLIP whose text tower becomes the diffusion text encoder (as SD1.5 uses OpenAI CLIP's text tower)."""
    config = CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=TEXT_WIDTH,
            intermediate_size=4 * TEXT_WIDTH,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=TEXT_MAX_TOKENS,
            pad_token_id=pad_id,
            bos_token_id=bos_id,
            # eos != 2 selects transformers' "first end-of-text token" pooling rather than the legacy argmax rule.
            eos_token_id=eos_id,
        ),
        vision_config=dict(
            image_size=IMAGE_SIZE,
            patch_size=8,
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=3,
            num_attention_heads=4,
        ),
        projection_dim=128,
    )
    return CLIPModel(config)


def vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 64, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
    )


def unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=4,  # diffusers reads this as the number of heads
        norm_num_groups=32,
    )


def train_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SCHEDULER_KWARGS)


def sample_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**SCHEDULER_KWARGS, set_alpha_to_one=False, steps_offset=1)


def tiny_random_pipeline(seed: int = 0):
    """A randomly initialised pipeline, smaller still than the toy model, for unit tests of code paths (not quality)."""
    import torch
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from ralign.models.tokenizer import build_word_tokenizer

    torch.manual_seed(seed)
    tok = build_word_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       max_position_embeddings=tok.model_max_length, pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    )
    vae_model = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=LATENT_CHANNELS, norm_num_groups=4, sample_size=IMAGE_SIZE,
    )
    unet_model = UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, block_out_channels=(16, 32),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8,
    )
    return StableDiffusionPipeline(
        vae=vae_model, text_encoder=text_encoder.eval(), tokenizer=tok, unet=unet_model, scheduler=sample_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
