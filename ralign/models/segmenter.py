"""The toy text-prompted segmenter: a tiny transformers `CLIPSegForImageSegmentation`, standing in for Grounded-SAM
(a text-prompted detector + SAM) in CoMat's attribute concentration. Phrases are noun phrases ("red circle",
"circle", "circles"); the output is a per-pixel probability at image resolution.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoTokenizer, CLIPSegConfig, CLIPSegForImageSegmentation

from ralign.models.tokenizer import build_word_tokenizer
from ralign.world.scene import IMAGE_SIZE

SEGMENTER_MAX_TOKENS = 16
# Pixels above threshold for a phrase to count as found (the smallest rendered object covers ~40): CLIPSeg has no
# detection head, and a few stray pixels must not turn an absent object into a mask.
MIN_DETECTION_AREA = 12


def build_segmenter(tokenizer=None) -> tuple[CLIPSegForImageSegmentation, object]:
    tokenizer = tokenizer or build_word_tokenizer(SEGMENTER_MAX_TOKENS)
    config = CLIPSegConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=SEGMENTER_MAX_TOKENS,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                           image_size=IMAGE_SIZE, patch_size=4),
        projection_dim=64,
        extract_layers=[1, 2],
        reduce_dim=32,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=64,
    )
    return CLIPSegForImageSegmentation(config), tokenizer


def load_segmenter(path: str | Path) -> tuple[CLIPSegForImageSegmentation, object]:
    from ralign.models.weights import load_pretrained

    model = load_pretrained(CLIPSegForImageSegmentation, path)
    return model, AutoTokenizer.from_pretrained(str(path))


def segment_logits(model: CLIPSegForImageSegmentation, tokenizer, images01: torch.Tensor, phrases: Sequence[str]) -> torch.Tensor:
    enc = tokenizer(list(phrases), padding="max_length", max_length=SEGMENTER_MAX_TOKENS, truncation=True, return_tensors="pt")
    out = model(input_ids=enc.input_ids.to(images01.device), attention_mask=enc.attention_mask.to(images01.device),
                pixel_values=images01 * 2.0 - 1.0)
    logits = out.logits
    return logits if logits.dim() == 3 else logits.unsqueeze(0)


@torch.no_grad()
def segment(model: CLIPSegForImageSegmentation, tokenizer, images01: torch.Tensor, phrases: Sequence[str]) -> torch.Tensor:
    """(B, H, W) probabilities that a pixel belongs to the phrase's object(s), one phrase per image."""
    return torch.sigmoid(segment_logits(model, tokenizer, images01, phrases))
