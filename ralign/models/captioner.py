"""The toy captioner: a tiny transformers `BlipForConditionalGeneration` (CoMat's concept-matching model is BLIP).

Captions are `CAPTION_PREFIX + " " + prompt`; the reward masks the prefix out and scores only the prompt's tokens.
`caption_nll` is computed by hand from the logits because BLIP's built-in `.loss` applies label smoothing and
averages over the whole batch, while CoMat's reward is the per-sample negative log-likelihood of the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, BlipConfig, BlipForConditionalGeneration

from ralign.models.tokenizer import build_word_tokenizer
from ralign.world.scene import IMAGE_SIZE

CAPTION_PREFIX = "a picture of"
CAPTION_MAX_TOKENS = 96  # long prompts (up to ~70 words) fit whole


def build_captioner(tokenizer=None) -> tuple[BlipForConditionalGeneration, object]:
    tokenizer = tokenizer or build_word_tokenizer(CAPTION_MAX_TOKENS)
    ids = dict(bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
               eos_token_id=tokenizer.eos_token_id, sep_token_id=tokenizer.eos_token_id)
    config = BlipConfig(
        vision_config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           image_size=IMAGE_SIZE, patch_size=8),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=CAPTION_MAX_TOKENS, encoder_hidden_size=128, **ids),
        projection_dim=128,
    )
    return BlipForConditionalGeneration(config), tokenizer


def load_captioner(path: str | Path) -> tuple[BlipForConditionalGeneration, object]:
    from ralign.models.weights import load_pretrained

    model = load_pretrained(BlipForConditionalGeneration, path)
    return model, AutoTokenizer.from_pretrained(str(path))


def caption_batch(tokenizer, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, prompt_mask): prompt_mask marks the target tokens that belong to the prompt."""
    texts = [f"{CAPTION_PREFIX} {p}" for p in prompts]
    enc = tokenizer(texts, padding="longest", max_length=CAPTION_MAX_TOKENS, truncation=True, return_tensors="pt")
    prefix_len = len(tokenizer(CAPTION_PREFIX).input_ids) - 1  # start token + prefix words, without end-of-text
    prompt_mask = enc.attention_mask.clone().bool()
    prompt_mask[:, :prefix_len] = False
    return enc.input_ids, enc.attention_mask, prompt_mask


def fit_to_model(model: BlipForConditionalGeneration, images01: torch.Tensor) -> torch.Tensor:
    """Images of any size resized to the vision model's square input (bicubic, antialiased), as BLIP's image
    processor does; unchanged when already that size; differentiable."""
    size = model.config.vision_config.image_size
    if tuple(images01.shape[-2:]) == (size, size):
        return images01
    return F.interpolate(images01, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def caption_nll(model: BlipForConditionalGeneration, tokenizer, images01: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """Per-sample NLL (summed over the prompt's tokens, end-of-text included) of `prompts` given images in [0, 1]."""
    device = images01.device
    input_ids, attention_mask, prompt_mask = (t.to(device) for t in caption_batch(tokenizer, prompts))
    out = model(pixel_values=fit_to_model(model, images01) * 2.0 - 1.0, input_ids=input_ids, attention_mask=attention_mask)
    logits = out.logits[:, :-1].float()
    targets = input_ids[:, 1:]
    token_nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return (token_nll * prompt_mask[:, 1:].float()).sum(dim=1)


@torch.no_grad()
def greedy_captions(model: BlipForConditionalGeneration, tokenizer, images01: torch.Tensor, max_new_tokens: int = 40) -> list[str]:
    prefix = tokenizer([CAPTION_PREFIX] * len(images01), return_tensors="pt").input_ids
    out = model.generate(pixel_values=fit_to_model(model, images01) * 2.0 - 1.0, input_ids=prefix, max_new_tokens=max_new_tokens, do_sample=False)
    texts = tokenizer.batch_decode(out, skip_special_tokens=True)
    return [t.strip()[len(CAPTION_PREFIX):].strip() if t.strip().startswith(CAPTION_PREFIX) else t.strip() for t in texts]
