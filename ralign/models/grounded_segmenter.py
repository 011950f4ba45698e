"""Text-prompted ("grounded") segmentation for CoMat's attribute concentration: a noun phrase and an image in, a
binary mask of every object the phrase names out, or an all-zero mask when there is none.

Two backends behind one interface:
- `ToySegmenter`: the toy world's CLIPSeg model (ralign/toy_models/segmenter). CLIPSeg gives a per-pixel probability
  but no detection, so a phrase counts as found only if at least `min_area` pixels pass the threshold; that plays
  the part of the detector's box threshold in Grounded-SAM.
- `GroundingDinoSamSegmenter` (ralign/models/grounded_sam.py): GroundingDINO boxes for the phrase, then SAM masks for
  the boxes, both through transformers, for real checkpoints.

Masks are detached targets: no gradient flows into the segmenter.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch

from ralign.models import TOY_MODELS_DIR
from ralign.models import segmenter as toy_segmenter

TOY_SEGMENTER_DIR = TOY_MODELS_DIR / "segmenter"


class GroundedSegmenter(Protocol):
    def masks(self, images01: torch.Tensor, phrases: Sequence[str]) -> torch.Tensor:
        """(B, H, W) float masks in {0, 1} at image resolution; phrase i is looked for in image i."""
        ...


class ToySegmenter:
    def __init__(self, path: str | Path = TOY_SEGMENTER_DIR, threshold: float = 0.5, min_area: int = toy_segmenter.MIN_DETECTION_AREA, device: str = "cpu"):
        self.model, self.tokenizer = toy_segmenter.load_segmenter(path)
        self.model.requires_grad_(False).to(device)
        self.threshold, self.min_area = threshold, min_area

    @torch.no_grad()
    def masks(self, images01: torch.Tensor, phrases: Sequence[str]) -> torch.Tensor:
        if len(phrases) != len(images01):
            raise ValueError(f"{len(phrases)} phrases for {len(images01)} images: one phrase per image")
        if not len(phrases):
            return images01.new_zeros((0, *images01.shape[-2:]))
        prob = toy_segmenter.segment(self.model, self.tokenizer, images01.detach().float(), list(phrases))
        mask = (prob > self.threshold).float()
        found = mask.flatten(1).sum(1) >= self.min_area
        return mask * found[:, None, None].float()


def build_grounded_segmenter(spec: dict | None = None, device: str = "cpu") -> GroundedSegmenter:
    """`{"backend": "toy", "path": ..}` or `{"backend": "grounded_sam", "detector": .., "sam": ..}`."""
    spec = dict(spec or {})
    backend = spec.pop("backend", "toy")
    if backend == "toy":
        return ToySegmenter(device=device, **spec)
    if backend == "grounded_sam":
        from ralign.models.grounded_sam import GroundingDinoSamSegmenter

        return GroundingDinoSamSegmenter(device=device, **spec)
    raise ValueError(f"segmenter backend must be 'toy' or 'grounded_sam', got {backend!r}")
