"""The toy object detector: a tiny transformers `ConditionalDetrForObjectDetection` (ResNet backbone from its config,
no timm, no pretrained weights), standing in for the detector of GenEval-style rewards (Flow-GRPO trains on GenEval's
Mask2Former detections). One class per colour-shape combination of the world; a box per object. Any DETR-family
detection model saved with these class names loads (`AutoModelForObjectDetection`): softmax heads with a no-object
class (DETR) and sigmoid heads (Conditional / Deformable DETR) are both read.

Why Conditional DETR and not DETR: trained from scratch here, DETR (same size, 5000 steps) learnt where objects are
left to right but not top to bottom (every box centred at y = 32, whatever the row); DETR's object queries must
discover positions through attention alone, which is its known slow convergence. Conditional DETR predicts each box
relative to a reference point of its query and attends with spatial queries, so localisation is learnt early.

Saved as `config.json` + `model.safetensors` (`save_pretrained`), loaded from safetensors only. Images enter in
[0, 1] (the reward convention) and are mapped to [-1, 1] here, the normalisation it was trained with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (AutoModelForObjectDetection, ConditionalDetrConfig, ConditionalDetrForObjectDetection, PreTrainedModel,
                          ResNetConfig)

from ralign.world.scene import COLORS, IMAGE_SIZE, SHAPES

# Class ids: every colour-shape combination, in the world's vocabulary order. Written into the config's id2label, and
# checked on load: a detector of another vocabulary would name objects the prompts cannot ask for.
LABELS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)
MAX_OBJECTS = 12  # detection slots (DETR's object queries); a scene holds at most 9 objects, one per grid cell
# Class probability above which a query is an object. Chosen on `val` renders with the generated look, never with the
# oracle: at 0.3 the detector reward passes 85-100 % of prompts' own scenes and fails 98-100 % of their near misses;
# at 0.5 it passes only 35-75 % (a focal-loss head's probabilities run low).
DEFAULT_THRESHOLD = 0.3


@dataclass(frozen=True)
class Detection:
    color: str
    shape: str
    score: float  # the class probability
    cx: float  # box centre and side lengths, in pixels of the 64x64 image
    cy: float
    w: float
    h: float

    @property
    def side(self) -> float:
        return (self.w + self.h) / 2


FEATURE_STRIDES = (4, 8)


def build_detector(feature_stride: int = 8) -> ConditionalDetrForObjectDetection:
    """A fresh detector. Stride 8 (the stem's 4, stage 2's 2): an 8x8 feature map at 64x64, one cell per 8 px; the
    smallest object is 9 px. Stride 4 reads stage 1's 16x16 map instead (the same stem and stage 1, so a stride-8
    detector's weights carry over, see `with_feature_stride`): finer shape detail for small blurred objects, at four
    times the encoder's tokens."""
    if feature_stride not in FEATURE_STRIDES:
        raise ValueError(f"detector feature stride must be one of {FEATURE_STRIDES}, got {feature_stride}")
    if feature_stride == 8:
        backbone = ResNetConfig(num_channels=3, embedding_size=32, hidden_sizes=[32, 64, 128], depths=[1, 1, 1],
                                layer_type="basic", out_features=["stage2"])
    else:
        backbone = ResNetConfig(num_channels=3, embedding_size=32, hidden_sizes=[32], depths=[1],
                                layer_type="basic", out_features=["stage1"])
    config = ConditionalDetrConfig(
        backbone_config=backbone, num_queries=MAX_OBJECTS, d_model=96, encoder_layers=2, decoder_layers=2,
        encoder_ffn_dim=192, decoder_ffn_dim=192, encoder_attention_heads=4, decoder_attention_heads=4,
        dropout=0.0, auxiliary_loss=True, num_labels=len(LABELS),
        id2label={i: f"{c} {s}" for i, (c, s) in enumerate(LABELS)}, label2id={f"{c} {s}": i for i, (c, s) in enumerate(LABELS)},
    )
    return ConditionalDetrForObjectDetection(config)


def feature_map_side(model: PreTrainedModel, image_side: int = 64) -> int:
    """The side of the detector's feature map for `image_side` images (from its backbone config)."""
    backbone = model.config.backbone_config
    stage = backbone.stage_names.index(backbone.out_features[0])
    return image_side // (4 * 2 ** max(0, stage - 1))


def with_feature_stride(model: PreTrainedModel, feature_stride: int) -> tuple[PreTrainedModel, list[str]]:
    """`model` rebuilt with another feature stride, every tensor of the same name and shape copied over (stem, stage 1,
    transformer, heads); returns it with the names left at their fresh initialisation (the input projection, whose
    input channels change). transformers' `ignore_mismatched_sizes` does this only through a saved directory."""
    fresh = build_detector(feature_stride)
    old = model.state_dict()
    state = fresh.state_dict()
    kept = {k: v for k, v in old.items() if k in state and state[k].shape == v.shape}
    fresh.load_state_dict(kept, strict=False)
    return fresh, sorted(k for k in state if k not in kept)


def save_detector(model: PreTrainedModel, path: str | Path) -> None:
    Path(path).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))


def load_detector(path: str | Path) -> PreTrainedModel:
    """The detector in `path` (written by `save_detector`), from safetensors only; one-line errors for a directory
    that is not a detector, damaged weights, or a detector of another vocabulary."""
    from ralign.config import MissingPathError
    from ralign.models.weights import CheckpointError, load_pretrained

    path = Path(path)
    if not (path / "config.json").is_file():
        raise MissingPathError(f"{path}: no config.json (not a detector directory)")
    model = load_pretrained(AutoModelForObjectDetection, path)
    names = [model.config.id2label.get(i, model.config.id2label.get(str(i))) for i in range(model.config.num_labels)]
    if names != [f"{c} {s}" for c, s in LABELS]:
        raise CheckpointError(f"{path}: a detector of other classes ({names[:3]}...); this world's are {len(LABELS)} "
                              "colour-shape combinations")
    return model


def detection_loss(model: PreTrainedModel, images01: torch.Tensor, targets: list[dict]) -> torch.Tensor:
    """The model's DETR-family set loss (Hungarian matching; class, L1 and GIoU terms; auxiliary decoder losses). `targets`: per image
    `class_labels` (n,) and `boxes` (n, 4) as normalised (cx, cy, w, h)."""
    return model(pixel_values=images01 * 2.0 - 1.0, labels=targets).loss


@torch.no_grad()
def detect(model: PreTrainedModel, images01: torch.Tensor, threshold: float = DEFAULT_THRESHOLD,
           duplicate_iou: float = 0.5) -> list[list[Detection]]:
    """Per image, the objects whose most likely class is a real one (a softmax head's no-object class included in
    the choice) with probability above `threshold`. Two boxes of one class overlapping by more than `duplicate_iou` are one object (kept: the likelier);
    DETR's set loss discourages duplicates but does not forbid them, and a duplicate would miscount."""
    from torchvision.ops import batched_nms, box_convert

    out = model(pixel_values=images01 * 2.0 - 1.0)
    if out.logits.shape[-1] == len(LABELS) + 1:  # DETR: softmax over the classes and "no object"
        probs = out.logits.softmax(-1)
    else:  # Conditional / Deformable DETR: an independent sigmoid per class (focal loss)
        probs = out.logits.sigmoid()
    results = []
    for p, boxes in zip(probs, out.pred_boxes):
        score, label = p.max(-1)
        keep = (label < len(LABELS)) & (score > threshold)
        score, label, boxes = score[keep], label[keep], boxes[keep] * IMAGE_SIZE
        xyxy = box_convert(boxes, "cxcywh", "xyxy")
        kept = batched_nms(xyxy, score, label, duplicate_iou)
        results.append([Detection(*LABELS[int(label[k])], float(score[k]), *map(float, boxes[k])) for k in kept.tolist()])
    return results
