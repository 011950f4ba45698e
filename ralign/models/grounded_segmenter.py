"""Text-prompted ("grounded") segmentation for CoMat's attribute concentration: a noun phrase and an image in, a
binary mask of every object the phrase names out, or an all-zero mask when there is none.

Three backends behind one interface:
- `ToyGroundedSegmenter` (`toy_grounded`): Grounded-SAM's two stages with the toy world's models: the toy detector
  (ralign/toy_models/detector) gives the boxes of the phrase's colour-shape class, as GroundingDINO does, and the toy
  CLIPSeg mask inside each box is its mask, as SAM's is for a box prompt.
- `ToySegmenter` (`toy`): the toy CLIPSeg model alone (ralign/toy_models/segmenter). CLIPSeg gives a per-pixel
  probability but no detection, so a phrase counts as found only if at least `min_area` pixels pass the threshold.
  It reads colour better than the colour-shape pair: asked for an absent "red circle" next to a red square, it
  segments the square (93-97 % of such phrases, even after training on them); see its model card.
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
from ralign.models.detector import DEFAULT_THRESHOLD, detect, load_detector
from ralign.rewards.text_parsing import NOUNS
from ralign.world.scene import COLORS, IMAGE_SIZE, SHAPES

TOY_SEGMENTER_DIR = TOY_MODELS_DIR / "segmenter"
TOY_DETECTOR_DIR = TOY_MODELS_DIR / "detector"


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


def _phrase_class(phrase: str) -> tuple[str | None, str]:
    """(colour or None for any, shape) of a segmenter phrase such as "red circle", "circle" or "circles"."""
    words = phrase.lower().split()
    shapes = [NOUNS[w] for w in words if w in NOUNS]  # the prompt reader's nouns, plurals to singular
    if not shapes:
        raise ValueError(f"segmenter phrase {phrase!r} names none of this world's shapes {list(SHAPES)}")
    colours = [w for w in words if w in COLORS]
    return (colours[-1] if colours else None), shapes[-1]


class ToyGroundedSegmenter:
    def __init__(self, detector: str | Path = TOY_DETECTOR_DIR, segmenter: str | Path = TOY_SEGMENTER_DIR,
                 box_threshold: float = DEFAULT_THRESHOLD, mask_threshold: float = 0.5, box_margin: float = 2.0,
                 device: str = "cpu"):
        """`box_threshold`: the detector's class probability for a box (its reward's threshold); `box_margin`: pixels
        added around each box before the mask is cut to it, as a box prompt's mask may reach past a tight box."""
        self.detector = load_detector(detector).requires_grad_(False).eval().to(device)
        self.model, self.tokenizer = toy_segmenter.load_segmenter(segmenter)
        self.model.requires_grad_(False).eval().to(device)
        self.box_threshold, self.mask_threshold, self.box_margin = box_threshold, mask_threshold, box_margin

    @torch.no_grad()
    def masks(self, images01: torch.Tensor, phrases: Sequence[str]) -> torch.Tensor:
        if len(phrases) != len(images01):
            raise ValueError(f"{len(phrases)} phrases for {len(images01)} images: one phrase per image")
        out = images01.new_zeros((len(phrases), *images01.shape[-2:]))
        if not len(phrases):
            return out
        wanted = [_phrase_class(p) for p in phrases]
        images01 = images01.detach().float()
        detections = detect(self.detector, images01, self.box_threshold)
        pixel = toy_segmenter.segment(self.model, self.tokenizer, images01, list(phrases)) > self.mask_threshold
        scale = images01.shape[-1] / IMAGE_SIZE  # boxes are in pixels of the detector's 64x64 frame
        ys, xs = torch.meshgrid(torch.arange(out.shape[-2]), torch.arange(out.shape[-1]), indexing="ij")
        for i, (colour, shape) in enumerate(wanted):
            for d in detections[i]:
                if d.shape != shape or (colour is not None and d.color != colour):
                    continue
                half_w, half_h = (d.w / 2 + self.box_margin) * scale, (d.h / 2 + self.box_margin) * scale
                box = ((xs + 0.5 - d.cx * scale).abs() <= half_w) & ((ys + 0.5 - d.cy * scale).abs() <= half_h)
                inside = pixel[i] & box
                # A found object always gets a mask, as a box prompt always gets one from SAM.
                out[i] = torch.maximum(out[i], (inside if inside.any() else box).float())
        return out


def _backend_class(backend: str):
    if backend == "toy":
        return ToySegmenter
    if backend == "toy_grounded":
        return ToyGroundedSegmenter
    if backend == "grounded_sam":
        from ralign.models.grounded_sam import GroundingDinoSamSegmenter

        return GroundingDinoSamSegmenter
    raise ValueError(f"segmenter backend must be 'toy', 'toy_grounded' or 'grounded_sam', got {backend!r}")


def grounded_segmenter_dirs(spec: dict | None = None) -> list:
    """The directories of weights the segmenter of `spec` reads (see `build_grounded_segmenter`)."""
    from ralign.models.weights import directories_read

    spec = dict(spec or {})
    return directories_read(_backend_class(spec.pop("backend", "toy")).__init__, spec)


def build_grounded_segmenter(spec: dict | None = None, device: str = "cpu") -> GroundedSegmenter:
    """`{"backend": "toy", "path": ..}`, `{"backend": "toy_grounded", "detector": .., "segmenter": ..}` or
    `{"backend": "grounded_sam", "detector": .., "sam": ..}`."""
    spec = dict(spec or {})
    return _backend_class(spec.pop("backend", "toy"))(device=device, **spec)
