"""Pretraining of the toy object detector (`ralign world pretrain --only detector`), for the `detector` reward.

Like the other reward models it learns from the world's data, never from the oracle: renders of generated scenes and
of their near misses (counts off by one, objects missing, moved or recoloured: more varied layouts than prompts'
scenes alone), given the look of generated images, with each scene object's class and box as the target.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch

from ralign.models import detector as det
from ralign.pretrain.common import Progress, cosine_lr, descend, parameter_count
from ralign.pretrain.rewards import NEAR_MISSES, GeneratedLook, _continued_note, _earlier_card, _steps, _write_card, near_miss_scene
from ralign.world.data import images_to_tensor, sample_stream
from ralign.world.prompts import FAMILIES, PromptSample, generate
from ralign.world.scene import IMAGE_SIZE, SIZES, Scene, SceneObject, cell_center, random_jitter, render

log = logging.getLogger(__name__)
_CLASS = {combo: i for i, combo in enumerate(det.LABELS)}


def scene_targets(scene: Scene) -> dict:
    """DETR's target for one scene: class ids and normalised (cx, cy, w, h) boxes, the renderer's own geometry."""
    jitter = scene.jitter or tuple((0.0, 0.0) for _ in scene.objects)
    boxes, labels = [], []
    for o, (dx, dy) in zip(scene.objects, jitter):
        cx, cy = cell_center(o.row, o.col)
        side = SIZES[o.size] / IMAGE_SIZE
        boxes.append([(cx + dx) / IMAGE_SIZE, (cy + dy) / IMAGE_SIZE, side, side])
        labels.append(_CLASS[o.combo])
    return {"class_labels": torch.tensor(labels, dtype=torch.long), "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)}


# A rounded square with corner radius rho (a fraction of its side) covers 1 - (4 - pi) rho^2 of its box and contains
# the circle of that box; its IoU with the square equals its IoU with the circle where that cover is sqrt(pi / 4).
# An in-between shape is labelled as the world shape it overlaps most: a square below this radius, a circle above.
ROUNDING_SPLIT = math.sqrt((1 - math.sqrt(math.pi / 4)) / (4 - math.pi))


def deform_shapes(scene: Scene, fraction: float, rng: np.random.Generator) -> tuple[Scene, list[float | None]]:
    """(relabelled scene, rounding): each circle or square, with probability `fraction`, drawn as a rounded square of
    a random corner radius and labelled as the world shape it overlaps most (ROUNDING_SPLIT). Generative models draw
    such in-between shapes; a detector that only saw perfect ones calls them at random."""
    objects, rounding = [], []
    for o in scene.objects:
        if o.shape in ("circle", "square") and rng.random() < fraction:
            rho = float(rng.uniform(0.0, 0.5))
            objects.append(SceneObject(o.color, "square" if rho < ROUNDING_SPLIT else "circle", o.size, o.row, o.col))
            rounding.append(rho)
        else:
            objects.append(o)
            rounding.append(None)
    return Scene(tuple(objects), scene.jitter), rounding


def _training_scenes(samples: list[PromptSample], near_miss_fraction: float, rng: np.random.Generator,
                     deform_fraction: float = 0.0) -> list[tuple[Scene, list[float | None] | None]]:
    scenes = []
    for s in samples:
        scene = s.scene if s.scene.jitter else Scene(s.scene.objects, random_jitter(rng, len(s.scene.objects)))
        if rng.random() < near_miss_fraction:
            kinds = NEAR_MISSES[s.family]
            scene = near_miss_scene(PromptSample(s.prompt, s.family, s.split, scene, s.unseen), kinds[int(rng.integers(len(kinds)))], rng)
        scenes.append(deform_shapes(scene, deform_fraction, rng) if deform_fraction > 0 else (scene, None))
    return scenes


def _images01(scenes: list[Scene], rounding: list | None = None) -> torch.Tensor:
    rounding = rounding or [None] * len(scenes)
    return (images_to_tensor([render(sc, rounding=r) for sc, r in zip(scenes, rounding)]) + 1.0) / 2.0


def _same_objects(found: list[det.Detection], scene: Scene) -> bool:
    """Whether the detections are exactly the scene's objects: class, size (by box side) and grid cell."""
    from ralign.rewards.detector import detected_cell, detected_size

    got = sorted((d.color, d.shape, detected_size(d), detected_cell(d)) for d in found)
    want = sorted((o.color, o.shape, o.size, (o.row, o.col)) for o in scene.objects)
    return got == want


@torch.no_grad()
def detector_quality(model, look: GeneratedLook, n: int = 64, seed: int = 321) -> dict:
    """Per family on `n` held-out `test` prompts, with the generated look (no oracle involved):
    - `exact`: the detections are exactly the scene's objects (class, size, cell);
    - `verdict_on_correct`: the detector reward's all-correct verdict on the prompt's own scene (should be 1);
    - `verdict_on_near_miss`: the same verdict on a near miss of it (wrong by construction; should be 0)."""
    from ralign.rewards.detector import score_detections

    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    out = {}
    for fam in FAMILIES:
        samples = generate(fam, n, "test", seed=seed)
        kinds = NEAR_MISSES[fam]
        misses = [near_miss_scene(s, kinds[k % len(kinds)], rng) for k, s in enumerate(samples)]
        own = det.detect(model, look(_images01([s.scene for s in samples]), gen))
        wrong = det.detect(model, look(_images01(misses), gen))

        def verdict(prompt, found):
            return score_detections(prompt, found)[1] == 1.0

        out[fam] = {
            "exact": round(float(np.mean([_same_objects(f, s.scene) for f, s in zip(own, samples)])), 3),
            "verdict_on_correct": round(float(np.mean([verdict(s.prompt, f) for f, s in zip(own, samples)])), 3),
            "verdict_on_near_miss": round(float(np.mean([verdict(s.prompt, f) for f, s in zip(wrong, samples)])), 3),
        }
    return out


def train_detector(out_dir, seed: int = 0, scale: float = 1.0, steps: int = 4000, batch: int = 32, lr: float = 3e-4,
                   near_miss_fraction: float = 0.5, deform_fraction: float = 0.0, continue_steps: int = 0,
                   eval_prompts: int = 64, feature_stride: int | None = None) -> dict:
    """DETR's set loss on renders with the generated look, on a fresh detector with `feature_stride` (default 8, see
    `build_detector`). `deform_fraction` of circles and squares are drawn as
    in-between rounded squares (`deform_shapes`). `continue_steps > 0` trains the detector already in `out_dir` for
    that many more steps; its card keeps the earlier training's description. Continued with another `feature_stride`,
    it starts from the tensors the two backbones share (`with_feature_stride`)."""
    out = Path(out_dir)
    earlier = _earlier_card(out) if continue_steps > 0 else None
    model = det.load_detector(out) if continue_steps > 0 else det.build_detector(feature_stride or 8)
    fresh_tensors = []
    if feature_stride and det.feature_map_side(model) != 64 // feature_stride:
        model, fresh_tensors = det.with_feature_stride(model, feature_stride)
    steps = continue_steps if continue_steps > 0 else _steps(steps, scale)
    torch.manual_seed(seed)
    rng, gen = np.random.default_rng(seed + 21), torch.Generator().manual_seed(seed + 22)
    look = GeneratedLook(out.parent / "base" / "vae")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = cosine_lr(opt, steps, warmup=min(200, max(1, steps // 10)))
    stream = sample_stream(batch, seed=seed + 23)
    progress = Progress("detector", steps, max(1, min(100, steps)))
    model.train()
    for i in range(steps):
        scenes, rounding = zip(*_training_scenes(next(stream), near_miss_fraction, rng, deform_fraction))
        loss = det.detection_loss(model, look(_images01(list(scenes), list(rounding)), gen), [scene_targets(sc) for sc in scenes])
        progress.step(i, descend(loss, model.parameters(), opt, sched, max_norm=0.1))  # DETR's own clipping
    model.eval()
    det.save_detector(model, out)
    metrics = {"steps": steps, "batch": batch, "lr": lr, "near_miss_fraction": near_miss_fraction, "deform_fraction": deform_fraction,
               "wall_s": round(progress.wall_s, 1), "final_loss": round(float(np.mean(progress.losses[-100:])), 4),
               "params": parameter_count(model), "continued": earlier is not None, "feature_side": det.feature_map_side(model),
               "fresh_tensors": fresh_tensors}
    return write_detector_card(out, model, metrics, look, eval_prompts, earlier)


@torch.no_grad()
def rounded_shape_accuracy(model, look: GeneratedLook, n: int = 64, seed: int = 321, band: float = 0.05) -> dict:
    """How often the detector names an in-between shape (a held-out `single` prompt's circle or square drawn as a
    rounded square, corner radius uniform on [0, 0.5]) as the world shape it overlaps most; `clear` leaves out radii
    within `band` of ROUNDING_SPLIT, where the two shapes are nearly equally close. No oracle involved."""
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    samples = [s for s in generate("single", 4 * n, "test", seed=seed) if s.scene.objects[0].shape in ("circle", "square")][:n]
    scenes, rounding = zip(*(deform_shapes(s.scene, 1.0, rng) for s in samples))
    found = det.detect(model, look(_images01(list(scenes), list(rounding)), gen))
    right = np.array([len(f) == 1 and f[0].shape == sc.objects[0].shape for f, sc in zip(found, scenes)])
    clear = np.array([abs(r[0] - ROUNDING_SPLIT) > band for r in rounding])
    return {"all": round(float(right.mean()), 3), "clear": round(float(right[clear].mean()), 3), "n": len(samples)}


def write_detector_card(out: Path, model, metrics: dict, look: GeneratedLook, eval_prompts: int = 64,
                        earlier: str | None = None) -> dict:
    """Measure the detector in `out` (`detector_quality`, `rounded_shape_accuracy`) and write its MODEL_CARD.md;
    returns the metrics with it."""
    quality = detector_quality(model, look, n=eval_prompts)
    rounded = rounded_shape_accuracy(model, look, n=eval_prompts)
    metrics = {**metrics, "threshold": det.DEFAULT_THRESHOLD, "quality": quality, "rounded_shapes": rounded}
    notes = ""
    if metrics.get("deform_fraction"):
        notes = (f" Of the circles and squares, {metrics['deform_fraction']:.0%} are drawn as rounded squares with a\n"
                 f"  corner radius uniform on [0, 0.5] of the side, labelled as the world shape each overlaps most (IoU):\n"
                 f"  a square below {ROUNDING_SPLIT:.3f}, a circle above (generative models draw such in-between shapes).")
    side = metrics["feature_side"]
    if metrics.get("fresh_tensors"):
        notes += (f"\n- Rebuilt with a {side}x{side} feature map from the earlier detector: every tensor the two backbones share\n"
                  f"  was kept; {len(metrics['fresh_tensors'])} started fresh ({', '.join(metrics['fresh_tensors'])}).")
    table = "\n".join(f"| {f} | {q['exact']:.3f} | {q['verdict_on_correct']:.3f} | {q['verdict_on_near_miss']:.3f} |"
                      for f, q in quality.items())
    _write_card(out, "Toy object detector (transformers `ConditionalDetrForObjectDetection`, ResNet backbone from config)", f"""
Finds the world's objects for the `detector` reward (GenEval-style: rules over detections, ralign/rewards/detector.py).
- Classes: the {len(det.LABELS)} colour-shape combinations; boxes give size (side) and grid cell (centre).
  {det.MAX_OBJECTS} object queries, {side}x{side} feature map, {metrics['params']:,} parameters. An object is a query whose class
  probability exceeds {det.DEFAULT_THRESHOLD} (chosen on `val` renders, see ralign/models/detector.py).
- Data: renders of generated prompts of every family and combination (split `all`), fresh each step; for
  {metrics['near_miss_fraction']:.0%} of them a near miss of the scene instead (one object recoloured, reshaped, removed,
  added, moved, resized or swapped), for layouts beyond the prompts'. Every image given the generated look:
  {look.describe()}. Targets: each object's class and box, from the scene graph.{notes}
- Training: the Conditional DETR set loss (Hungarian matching; focal class, L1 and GIoU terms, auxiliary decoder
  losses), {metrics['steps']} steps, batch {metrics['batch']}, AdamW lr {metrics['lr']}, cosine, gradient clip 0.1; wall time
  {metrics['wall_s']} s, final loss {metrics['final_loss']}.{_continued_note(earlier, "--continue-detector")}
- Quality on {eval_prompts} held-out `test` prompts per family, generated look, no oracle involved: `exact` = the
  detections are exactly the scene's objects (class, size, cell); the `detector` reward's all-correct verdict on
  the prompt's own scene (should be 1) and on a near miss of it (should be 0):

| family | exact | verdict on own scene | verdict on near miss |
| --- | --- | --- | --- |
{table}

- In-between shapes: on {rounded['n']} held-out `single` circles and squares drawn as rounded squares (corner radius
  uniform on [0, 0.5]), the detector names the world shape each overlaps most {rounded['all']:.3f} of the time;
  {rounded['clear']:.3f} with radii within 0.05 of the split ({ROUNDING_SPLIT:.3f}) left out.

How often its verdict agrees with the oracle's on *generated* images: `ralign diagnose reward --reward detector`
(benchmarks/results/detector_reward.md).
""")
    return metrics
