"""CoMat's attribute concentration: push each entity's cross-attention into the region where a grounded segmenter
finds that entity in the generated image.

For a prompt's entities (noun + modifiers, ralign/rewards/text_parsing.py) with token positions e_i, masks M_i from the
grounded segmenter (all zero where the object is missing), and the UNet's head-averaged cross-attention A (pixels u
x tokens k, softmax over k) captured at a few training timesteps in the mid and up blocks:
- token loss  = mean_i mean_{k in e_i} (1 − Σ_u A_uk M_iu / Σ_u A_uk)²     (each token's attention mass inside its mask)
- pixel loss  = mean_i BCE(Σ_{k in e_i} A_·k, M_i)                          (the entity's map should *be* its mask)
Each is computed per layer, masks resized to the layer's resolution and binarised (> 0, as CoMat does), summed over
the layers of a resolution group (token) or on the group's mean map (pixel), and summed over groups and captured
timesteps — CoMat's reduction. The score is −(token_weight·token + pixel_weight·pixel), CoMat's weights by default.
Masks are targets (no gradient); the gradient flows through A into the UNet (and a trainable text encoder).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ralign.models.grounded_segmenter import build_grounded_segmenter
from ralign.rewards.base import Reward, RewardOutput
from ralign.rewards.text_parsing import Entity, entity_positions, parse_entities

_EPS = 1e-8


def resize_masks(masks: torch.Tensor, side: int) -> torch.Tensor:
    """(E, H, W) {0,1} -> (E, side, side) {0,1}: antialiased down-sampling, then any coverage counts (CoMat's `> 0`)."""
    if masks.shape[-1] == side:
        return (masks > 0).float()
    small = F.interpolate(masks[:, None].float(), size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return (small[:, 0] > 0).float()


def token_loss(attn: torch.Tensor, masks: torch.Tensor, tokens: Sequence[Sequence[int]]) -> torch.Tensor:
    """attn (side, side, K), masks (E, side, side), tokens[i] = positions of entity i -> scalar."""
    flat = attn.reshape(-1, attn.shape[-1])  # (U, K)
    per_entity = []
    for mask, toks in zip(masks.reshape(len(masks), -1), tokens):
        a = flat[:, list(toks)]  # (U, k_i)
        inside = (a * mask[:, None]).sum(0) / (a.sum(0) + _EPS)
        per_entity.append(((1.0 - inside) ** 2).mean())
    return torch.stack(per_entity).mean()


def pixel_loss(attn: torch.Tensor, masks: torch.Tensor, tokens: Sequence[Sequence[int]]) -> torch.Tensor:
    """attn (side, side, K), masks (E, side, side) -> scalar; an all-zero mask asks for no attention anywhere."""
    per_entity = []
    for mask, toks in zip(masks, tokens):
        entity_map = attn[..., list(toks)].sum(-1).clamp(_EPS, 1.0 - 1e-6)  # softmax over tokens: sums stay <= 1
        per_entity.append(F.binary_cross_entropy(entity_map, mask))
    return torch.stack(per_entity).mean()


def concentration_losses(maps_per_step: Sequence[dict[str, list[torch.Tensor]]], masks: torch.Tensor,
                         tokens: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """For one sample: maps_per_step[t][group] = list of (side, side, K) maps; masks (E, H, W) at image size."""
    tok, pix = masks.new_zeros(()), masks.new_zeros(())
    for groups in maps_per_step:
        for group_maps in groups.values():
            side = group_maps[0].shape[0]
            m = resize_masks(masks, side)
            for layer_map in group_maps:
                tok = tok + token_loss(layer_map, m, tokens)
            pix = pix + pixel_loss(torch.stack(group_maps).mean(0), m, tokens)
    return tok, pix


def _usable(entities: list[Entity], token_idx: list[list[int]]) -> tuple[list[Entity], list[list[int]]]:
    """Entities with tokens, and no two asking the segmenter for the same phrase (a mask could not tell them apart;
    CoMat drops duplicated nouns too)."""
    phrases = [e.segment_phrase for e in entities]
    keep = [i for i, e in enumerate(entities) if token_idx[i] and phrases.count(e.segment_phrase) == 1]
    return [entities[i] for i in keep], [token_idx[i] for i in keep]


class GroundedAttentionReward(Reward):
    name = "grounded_attention"
    differentiable = True
    uses_attention = True

    @classmethod
    def model_dirs_for(cls, options: dict) -> list:
        from ralign.models.grounded_segmenter import grounded_segmenter_dirs

        return grounded_segmenter_dirs(options.get("segmenter"))

    def __init__(self, segmenter: dict | None = None, token_weight: float = 1e-3, pixel_weight: float = 5e-5,
                 parser: str = "auto", device: str = "cpu"):
        self.segmenter = build_grounded_segmenter(segmenter, device=device)
        self.token_weight, self.pixel_weight, self.parser = token_weight, pixel_weight, parser

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], attention: dict | None = None, **_) -> RewardOutput:
        if attention is None:
            raise ValueError("grounded_attention needs the UNet's cross-attention maps of the chain that made the images "
                             "(captured by the learner's chain, or by a sampler for the rollouts it ships); images alone are not enough")
        maps, offsets = attention["maps"], attention["token_offsets"]
        parsed = []
        for prompt, prompt_offsets in zip(prompts, offsets, strict=True):
            entities = parse_entities(prompt, self.parser)
            parsed.append(_usable(entities, entity_positions(prompt_offsets, entities)))
        # One segmenter call for every (image, entity) pair of the batch.
        pairs = [(b, e.segment_phrase) for b, (ents, _) in enumerate(parsed) for e in ents]
        all_masks = self.segmenter.masks(images.detach()[[b for b, _ in pairs]], [p for _, p in pairs]) if pairs else None
        tok_losses, pix_losses, found = [], [], []
        row = 0
        for b, (ents, toks) in enumerate(parsed):
            if not ents:
                zero = images.new_zeros(())
                tok_losses.append(zero), pix_losses.append(zero), found.append(zero)
                continue
            masks = all_masks[row : row + len(ents)].to(images.dtype)
            row += len(ents)
            sample_maps = [{g: [m[b] for m in ms] for g, ms in step.items()} for step in maps]
            t, p = concentration_losses(sample_maps, masks, toks)
            tok_losses.append(t), pix_losses.append(p)
            found.append((masks.flatten(1).sum(1) > 0).float().mean())
        tok, pix = torch.stack(tok_losses), torch.stack(pix_losses)
        score = -(self.token_weight * tok + self.pixel_weight * pix)
        return RewardOutput(score, {"token_loss": tok, "pixel_loss": pix, "entities_found": torch.stack(found).detach()})
