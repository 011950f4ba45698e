"""The toy reward CLIP and preference model: tiny open_clip `CLIP`s on 64x64 images and the toy vocabulary.

Real runs load open_clip checkpoints (CLIP ViT-H, PickScore-style preference models) through open_clip; the toy ones
use the same class with a custom config, saved as safetensors + JSON config + the word tokenizer, never pickles.
Images enter in [0, 1] (the reward convention) and are mapped to [-1, 1] here, the normalisation they were trained
with. The text tower's context is 32 tokens: longer than the diffusion encoder's 24, so long prompts are seen further
(segment embeddings handle the rest, see LongAlign's reward).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoTokenizer

from ralign.models.tokenizer import build_word_tokenizer
from ralign.world.scene import IMAGE_SIZE

REWARD_CONTEXT = 32
WEIGHTS = "model.safetensors"


def reward_clip_config(vocab_size: int) -> dict:
    return {
        "embed_dim": 128,
        "vision_cfg": {"image_size": IMAGE_SIZE, "patch_size": 8, "width": 128, "layers": 3, "head_width": 32, "mlp_ratio": 2.0},
        # eos is the tokenizer's highest id, so open_clip's default argmax pooling picks the end-of-text token.
        "text_cfg": {"context_length": REWARD_CONTEXT, "vocab_size": vocab_size, "width": 128, "heads": 4, "layers": 3, "mlp_ratio": 2.0},
    }


def build_reward_clip(tokenizer=None) -> tuple[open_clip.CLIP, object]:
    tokenizer = tokenizer or build_word_tokenizer(REWARD_CONTEXT)
    return open_clip.CLIP(**reward_clip_config(len(tokenizer))), tokenizer


def save_reward_clip(model: open_clip.CLIP, tokenizer, path: str | Path, config: dict | None = None) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / WEIGHTS))
    (path / "open_clip_config.json").write_text(json.dumps(config or reward_clip_config(len(tokenizer)), indent=2))
    tokenizer.save_pretrained(str(path / "tokenizer"))


def load_reward_clip(path: str | Path) -> tuple[open_clip.CLIP, object]:
    """(model, tokenizer) from a directory written by `save_reward_clip`; safetensors only."""
    from ralign.config import MissingPathError

    path = Path(path)
    if not (path / "open_clip_config.json").is_file():
        raise MissingPathError(f"{path}: no open_clip_config.json (not a reward CLIP directory)")
    from ralign.models.weights import CheckpointError, check_fits, read_json, read_safetensors

    config = read_json(path / "open_clip_config.json")
    try:
        model = open_clip.CLIP(**config)
    except TypeError as exc:
        raise CheckpointError(f"{path / 'open_clip_config.json'}: not an open_clip CLIP config ({exc})") from None
    state = read_safetensors(path / WEIGHTS)
    check_fits(state, {k: v.shape for k, v in model.state_dict().items()}, str(path / WEIGHTS), complete=True)
    model.load_state_dict(state, strict=True)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    return model, tokenizer


def tokenize(tokenizer, prompts: Sequence[str], device=None) -> torch.Tensor:
    ids = tokenizer(list(prompts), padding="max_length", max_length=REWARD_CONTEXT, truncation=True, return_tensors="pt").input_ids
    return ids.to(device) if device is not None else ids


def fit_to_model(model: open_clip.CLIP, images01: torch.Tensor) -> torch.Tensor:
    """Images of any size brought to the vision tower's input as open_clip's own preprocessing does: the shorter
    side resized to the input size (bicubic, antialiased), then a centre crop. Unchanged when already that size;
    differentiable."""
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    h, w = images01.shape[-2:]
    if (h, w) == (size, size):
        return images01
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    resized = F.interpolate(images01, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[..., top:top + size, left:left + size]


def encode_images(model: open_clip.CLIP, images01: torch.Tensor) -> torch.Tensor:
    """Normalised image embeddings of images in [0, 1] of any size (differentiable)."""
    return F.normalize(model.encode_image(fit_to_model(model, images01) * 2.0 - 1.0), dim=-1)


def encode_texts(model: open_clip.CLIP, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Normalised text embeddings."""
    device = next(model.parameters()).device
    return F.normalize(model.encode_text(tokenize(tokenizer, prompts, device)), dim=-1)
