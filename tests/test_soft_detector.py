"""The `soft_detector` reward: the detector reward's rules relaxed into differentiable functions of the detector's
outputs. Checked on hand-made detector outputs (the prompt's own scene passes every relaxed check, each near miss
fails one), and on the committed detector (gradient reaches the image; own renders score above near misses)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ralign.models.detector import LABELS, MAX_OBJECTS
from ralign.pretrain.rewards import NEAR_MISSES, near_miss_scene
from ralign.rewards.detector import read_prompt
from ralign.rewards.registry import build_reward, is_differentiable
from ralign.rewards.soft_detector import SoftDetectorReward, soft_checks
from ralign.world.data import images_to_tensor
from ralign.world.prompts import FAMILIES, generate
from ralign.world.scene import SIZES, Scene, cell_center, render


def exact_outputs(scene: Scene) -> tuple[torch.Tensor, torch.Tensor]:
    """What an exact detector's soft detections would be: one query per object, fully of its class, with its box."""
    detected = torch.zeros(MAX_OBJECTS, len(LABELS))
    boxes = torch.full((MAX_OBJECTS, 4), 10.0)
    for q, (o, (dx, dy)) in enumerate(zip(scene.objects, scene.jitter or [(0.0, 0.0)] * len(scene.objects))):
        cx, cy = cell_center(o.row, o.col)
        detected[q, LABELS.index(o.combo)] = 1.0
        boxes[q] = torch.tensor([cx + dx, cy + dy, SIZES[o.size], SIZES[o.size]])
    return detected, boxes


def relaxed(prompt: str, scene: Scene) -> dict[str, list[float]]:
    wanted, relations = read_prompt(prompt)
    return {k: [float(v) for v in values] for k, values in soft_checks(*exact_outputs(scene), wanted, relations).items()}


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "long"])
def test_the_prompts_scene_passes_every_relaxed_check_and_each_near_miss_fails_one(family):
    rng = np.random.default_rng(5)
    for sample in generate(family, 10, "train", seed=3):
        own = relaxed(sample.prompt, sample.scene)
        assert all(v > 0.8 for values in own.values() for v in values), (sample.prompt, own)
        for kind in NEAR_MISSES[family]:
            miss = relaxed(sample.prompt, near_miss_scene(sample, kind, rng))
            assert min(v for values in miss.values() for v in values) <= 0.75 + 1e-6, (sample.prompt, kind, miss)


def test_relaxed_checks_by_hand():
    sample = generate("spatial", 1, "test", seed=1)[0]
    wanted, relations = read_prompt(sample.prompt)
    detected, boxes = exact_outputs(sample.scene)
    checks = soft_checks(detected, boxes, wanted, relations, position_scale=3.0)
    (first, second) = sample.scene.objects
    axis = 0 if relations[0][1] in ("to the left of", "to the right of") else 1
    centres = boxes[:2, axis]
    gap = (centres[1] - centres[0]) if relations[0][1] in ("to the left of", "above") else (centres[0] - centres[1])
    assert checks["relation"][0].item() == pytest.approx(torch.sigmoid((gap - 64 / 3 / 2) / 3.0).item())
    assert [c.item() for c in checks["count"]] == [1.0, 1.0] and checks["nothing_else"][0].item() == 1.0
    # Half a detection of an unnamed class costs exp(-0.5); a soft count of 1.5 for a single object, half of it.
    detected[5, LABELS.index(next(l for l in LABELS if l not in {o.combo for o in sample.scene.objects}))] = 0.5
    detected[6, LABELS.index(first.combo)] = 0.5
    checks = soft_checks(detected, boxes, wanted, relations)
    assert checks["nothing_else"][0].item() == pytest.approx(np.exp(-0.5))
    assert checks["count"][0].item() == pytest.approx(0.5)


def test_the_committed_detector_gives_image_gradients_and_ranks_renders_above_near_misses():
    reward = build_reward({"name": "soft_detector"})
    assert isinstance(reward, SoftDetectorReward) and is_differentiable("soft_detector")
    rng = np.random.default_rng(2)
    samples = [s for f in ("binding", "counting", "spatial", "size") for s in generate(f, 8, "test", seed=13)]
    misses = [near_miss_scene(s, NEAR_MISSES[s.family][k % len(NEAR_MISSES[s.family])], rng) for k, s in enumerate(samples)]
    prompts = [s.prompt for s in samples]
    images = ((images_to_tensor([render(s.scene) for s in samples]) + 1) / 2).requires_grad_(True)
    own = reward(images, prompts)
    own.score.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    wrong = reward((images_to_tensor([render(m) for m in misses]) + 1) / 2, prompts)
    assert (own.score.detach() > wrong.score).float().mean() >= 0.8
    assert set(own.components) == {"soft_detector", "count", "size", "relation", "nothing_else"}


def test_a_prompt_without_objects_is_nan_and_bad_settings_are_refused():
    reward = SoftDetectorReward()
    out = reward(torch.full((1, 3, 64, 64), 0.9), ["a plain grey picture."])
    assert torch.isnan(out.score[0])
    with pytest.raises(ValueError, match="sharpness must be > 0"):
        SoftDetectorReward(sharpness=0.0)
    with pytest.raises(ValueError, match="threshold must be in"):
        SoftDetectorReward(threshold=0.0)
