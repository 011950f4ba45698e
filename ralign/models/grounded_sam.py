"""Grounded-SAM through transformers: the real-checkpoint backend of `ralign.models.grounded_segmenter`.

Grounded-SAM (IDEA-Research's Grounded-Segment-Anything) is two models in a row: GroundingDINO, an open-vocabulary
detector, finds boxes for a free-text query, and SAM (Segment Anything) turns each box into a pixel mask. CoMat's
attribute concentration needs exactly that: for every entity of the prompt ("red car"), a mask of where that entity
is in the generated image (all zero when it is missing), to pull the entity's cross-attention into that region.

Per image: the phrase is the detector's query; a box is kept when its score (the highest token probability)
passes `box_threshold` and at least one word of the phrase passes `text_threshold` for it, i.e. the detector
names the box with the phrase. The kept boxes prompt SAM; of SAM's three candidate masks per box the one with the
highest predicted IoU is taken, and the masks of all boxes are united.

Thresholds: GroundingDINO's README and this class default to box 0.35 / text 0.25; Grounded-SAM's demo scripts and
CoMat's released code (attr_concen_utils/gsam_interface.py) use box 0.3 / text 0.25. CoMat queries all nouns of a
prompt at once and keeps a box only when its decoded label equals one noun; with one phrase per query here, "the
label holds a word of the phrase" is the counterpart. (CoMat's code takes masks from FastSAM rather than SAM.)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor, SamModel, SamProcessor


def detector_query(phrase: str) -> str:
    """GroundingDINO's text format: lowercase, phrases ended by "." (the model splits its query at the dots)."""
    text = phrase.strip().lower()
    return text if text.endswith(".") else text + "."


def best_candidates(masks: torch.Tensor, iou_scores: torch.Tensor) -> torch.Tensor:
    """masks (..., candidates, h, w), predicted IoU (..., candidates) -> (..., h, w): SAM answers an ambiguous prompt
    with several candidate masks and scores each; every prompt keeps its highest-scored one."""
    best = iou_scores.argmax(dim=-1).to(masks.device)
    index = best[..., None, None, None].expand(*best.shape, 1, *masks.shape[-2:])
    return masks.gather(-3, index).squeeze(-3)


class GroundingDinoSamSegmenter:
    def __init__(self, detector: str | Path, sam: str | Path, box_threshold: float = 0.35, text_threshold: float = 0.25,
                 device: str = "cpu"):
        """`detector` / `sam`: local directories or hub ids (e.g. "IDEA-Research/grounding-dino-tiny",
        "facebook/sam-vit-base"); weights are read from safetensors only."""
        from ralign.models.weights import load_pretrained

        # Not strict: hub checkpoints of these models may carry tensors the transformers classes drop on load.
        self._setup(
            load_pretrained(GroundingDinoForObjectDetection, detector, strict=False),
            GroundingDinoProcessor.from_pretrained(str(detector)),
            load_pretrained(SamModel, sam, strict=False),
            SamProcessor.from_pretrained(str(sam)),
            box_threshold, text_threshold, device,
        )

    @classmethod
    def from_components(cls, detector_model: GroundingDinoForObjectDetection, detector_processor: GroundingDinoProcessor,
                        sam_model: SamModel, sam_processor: SamProcessor, box_threshold: float = 0.35,
                        text_threshold: float = 0.25, device: str = "cpu") -> GroundingDinoSamSegmenter:
        """Already-built models and processors (e.g. small random ones in tests)."""
        self = cls.__new__(cls)
        self._setup(detector_model, detector_processor, sam_model, sam_processor, box_threshold, text_threshold, device)
        return self

    def _setup(self, detector_model, detector_processor, sam_model, sam_processor, box_threshold, text_threshold, device):
        self.device = torch.device(device)
        self.detector = detector_model.requires_grad_(False).eval().to(self.device)
        self.sam = sam_model.requires_grad_(False).eval().to(self.device)
        self.detector_processor, self.sam_processor = detector_processor, sam_processor
        self.box_threshold, self.text_threshold = float(box_threshold), float(text_threshold)
        tokenizer = detector_processor.tokenizer
        # Decoded box labels carry [SEP] and the query's "." along with the phrase's words; these are not words.
        self._non_words = [t for t in tokenizer.all_special_tokens if t] + ["."]

    @staticmethod
    def _to_uint8(images01: torch.Tensor) -> list[torch.Tensor]:
        # The processors' own path for real photos (PIL / uint8 -> rescale by 1/255); CoMat quantises the same way.
        # CPU tensors work with both the torchvision and the PIL image-processor backends.
        return list(images01.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu())

    def _names_phrase(self, label: str) -> bool:
        for token in self._non_words:
            label = label.replace(token, " ")
        return bool(label.strip())

    @torch.no_grad()
    def boxes(self, images01: torch.Tensor, phrases: Sequence[str]) -> list[torch.Tensor]:
        """Per image, the (n, 4) xyxy pixel boxes the detector finds for its phrase (n may be 0), on `self.device`."""
        if len(phrases) != len(images01):
            raise ValueError(f"{len(phrases)} phrases for {len(images01)} images: one phrase per image")
        if not len(phrases):
            return []
        height, width = images01.shape[-2:]
        # Every query ends with ".": a list of dot-free strings would be merged by the processor into ONE query
        # ("a. b.") instead of one query per image.
        inputs = self.detector_processor(images=self._to_uint8(images01), text=[detector_query(p) for p in phrases],
                                         padding=True, return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.detector.dtype)
        outputs = self.detector(**inputs)
        results = self.detector_processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=self.box_threshold, text_threshold=self.text_threshold,
            target_sizes=[(height, width)] * len(phrases))
        found = []
        for result in results:
            boxes = result["boxes"]
            # Without boxes the labels are still [""]: the tokenizer's batch_decode([]) returns one empty string.
            named = [self._names_phrase(label) for label in result["text_labels"]] if len(boxes) else []
            keep = torch.tensor(named, dtype=torch.bool, device=boxes.device)
            found.append(boxes[keep].reshape(-1, 4).float())
        return found

    @torch.no_grad()
    def masks_for_boxes(self, images01: torch.Tensor, boxes: Sequence[torch.Tensor]) -> torch.Tensor:
        """(B, H, W) float {0, 1}: SAM's union mask of each image's xyxy pixel boxes; all zero where it has none."""
        if len(boxes) != len(images01):
            raise ValueError(f"{len(boxes)} box sets for {len(images01)} images")
        out = torch.zeros((len(images01), *images01.shape[-2:]), dtype=torch.float32, device=images01.device)
        rows = [i for i, b in enumerate(boxes) if len(b)]
        if not rows:
            return out
        # One SAM batch needs the same number of boxes in every image; repeating an image's own box adds nothing to
        # its union.
        most = max(len(boxes[i]) for i in rows)
        padded = [torch.cat([boxes[i], boxes[i][:1].expand(most - len(boxes[i]), 4)]).tolist() for i in rows]
        uint8 = self._to_uint8(images01)
        inputs = self.sam_processor(images=[uint8[i] for i in rows], input_boxes=padded, return_tensors="pt")
        sam_out = self.sam(pixel_values=inputs["pixel_values"].to(self.device, self.sam.dtype),
                           input_boxes=inputs["input_boxes"].to(self.device, self.sam.dtype), multimask_output=True)
        # Choosing at SAM's low resolution means only the chosen mask of each box is up-sampled to image size.
        chosen = best_candidates(sam_out.pred_masks, sam_out.iou_scores)  # (rows, boxes, h, w)
        full = self.sam_processor.image_processor.post_process_masks(
            list(chosen.unsqueeze(2).float()), inputs["original_sizes"], inputs["reshaped_input_sizes"])
        for row, mask in zip(rows, full):
            out[row] = mask[:, 0].any(dim=0).to(out.device, torch.float32)
        return out

    @torch.no_grad()
    def masks(self, images01: torch.Tensor, phrases: Sequence[str]) -> torch.Tensor:
        """(B, H, W) float masks in {0, 1} at image resolution on the images' device; phrase i is looked for in
        image i."""
        return self.masks_for_boxes(images01, self.boxes(images01, phrases))
