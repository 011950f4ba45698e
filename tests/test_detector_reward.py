"""The GenEval-style `detector` reward: its own prompt reader, its rules over detections, the committed toy detector,
and the detector's pretraining."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from ralign.models.detector import LABELS, Detection, build_detector, feature_map_side, load_detector
from ralign.pretrain.rewards import NEAR_MISSES, near_miss_scene
from ralign.rewards.clip_score import TOY_DIR
from ralign.rewards.detector import DetectorReward, check, read_prompt, score_detections
from ralign.world.data import images_to_tensor
from ralign.world.prompts import FAMILIES, generate
from ralign.world.scene import SIZES, Scene, cell_center, render


def perfect_detections(scene: Scene) -> list[Detection]:
    """What an exact detector reports for a scene: each object's class and box from the scene graph."""
    out = []
    for o, (dx, dy) in zip(scene.objects, scene.jitter or [(0.0, 0.0)] * len(scene.objects)):
        cx, cy = cell_center(o.row, o.col)
        out.append(Detection(o.color, o.shape, 0.99, cx + dx, cy + dy, SIZES[o.size], SIZES[o.size]))
    return out


def passes(prompt: str, found: list[Detection]) -> bool:
    return score_detections(prompt, found)[1] == 1.0


@pytest.mark.parametrize("family", FAMILIES)
def test_the_reader_finds_each_prompts_objects_and_relation(family):
    for sample in generate(family, 20, "test", seed=11):
        wanted, relations = read_prompt(sample.prompt)
        want = sorted((o.color, o.shape, o.size if family in ("size", "long") else None) for o in sample.scene.objects)
        got = sorted((w.color, w.shape, w.size) for w in wanted for _ in range(w.count))
        assert got == want, sample.prompt
        assert (len(relations) == 1) == (family == "spatial"), (sample.prompt, relations)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_rules_pass_the_prompts_scene_and_fail_every_near_miss(family):
    rng = np.random.default_rng(4)
    for sample in generate(family, 12, "train", seed=8):
        assert passes(sample.prompt, perfect_detections(sample.scene)), sample.prompt
        for kind in NEAR_MISSES[family]:
            wrong = near_miss_scene(sample, kind, rng)
            assert not passes(sample.prompt, perfect_detections(wrong)), (sample.prompt, kind)


def test_the_score_is_graded_and_a_prompt_without_objects_is_nan():
    sample = generate("counting", 1, "test", seed=3)[0]
    wanted, relations = read_prompt(sample.prompt)
    n = wanted[0].count
    missing_one = near_miss_scene(sample, "remove", np.random.default_rng(0))
    checks = check(wanted, relations, perfect_detections(missing_one))
    assert checks["count"] == [1 - 1 / n] and checks["nothing_else"] == [1.0]  # one of n missing: partly right
    out = DetectorReward()((images_to_tensor([render(sample.scene)] * 2) + 1) / 2, [sample.prompt, "a plain grey picture."])
    assert torch.isfinite(out.score[0]) and out.components["all_correct"][0] in (0.0, 1.0)
    assert torch.isnan(out.score[1]) and torch.isnan(out.components["all_correct"][1])  # nothing to check: quarantined, never a 0


def test_the_committed_detector_sees_held_out_renders():
    reward = DetectorReward()
    rng = np.random.default_rng(9)
    samples = [s for f in ("binding", "counting", "spatial", "size") for s in generate(f, 16, "test", seed=21)]
    misses = [near_miss_scene(s, NEAR_MISSES[s.family][k % len(NEAR_MISSES[s.family])], rng) for k, s in enumerate(samples)]
    prompts = [s.prompt for s in samples]
    own = reward((images_to_tensor([render(s.scene) for s in samples]) + 1) / 2, prompts)
    wrong = reward((images_to_tensor([render(m) for m in misses]) + 1) / 2, prompts)
    assert own.components["all_correct"].mean() >= 0.8
    assert wrong.components["all_correct"].mean() <= 0.2
    assert (own.score > wrong.score).float().mean() >= 0.8


def test_a_directory_that_is_not_a_detector_is_one_line(tmp_path):
    from ralign.config import MissingPathError
    from ralign.models.weights import CheckpointError

    with pytest.raises(MissingPathError, match="not a detector directory"):
        DetectorReward(path=tmp_path)
    shutil.copytree(TOY_DIR / "detector", tmp_path / "other")
    config = (tmp_path / "other" / "config.json").read_text().replace('"red circle"', '"crimson circle"')
    (tmp_path / "other" / "config.json").write_text(config)
    with pytest.raises(CheckpointError, match="a detector of other classes"):
        load_detector(tmp_path / "other")
    with pytest.raises(ValueError, match="threshold must be in"):
        DetectorReward(threshold=1.5)


def test_detector_pretraining_writes_a_loadable_model_and_card(tmp_path):
    from ralign.pretrain.detector import scene_targets, train_detector

    sample = generate("spatial", 1, "train", seed=2)[0]
    target = scene_targets(sample.scene)
    assert [LABELS[i] for i in target["class_labels"].tolist()] == [o.combo for o in sample.scene.objects]
    assert torch.all((target["boxes"] > 0) & (target["boxes"] < 1))
    shutil.copytree(TOY_DIR / "base" / "vae", tmp_path / "base" / "vae")
    # the finer backbone (stride 4) trains, saves and loads through the same code as the shipped one (stride 8)
    metrics = train_detector(tmp_path / "detector", steps=2, batch=4, eval_prompts=4, feature_stride=4)
    assert metrics["steps"] == 2 and set(metrics["quality"]) == set(FAMILIES)
    model = load_detector(tmp_path / "detector")
    assert feature_map_side(model) == 16 and feature_map_side(load_detector(TOY_DIR / "detector")) == 8
    assert model.model.backbone(torch.zeros(1, 3, 64, 64), torch.ones(1, 64, 64, dtype=torch.long))[0][-1][0].shape[-1] == 16
    assert metrics["fresh_tensors"] == []
    card = (tmp_path / "detector" / "MODEL_CARD.md").read_text()
    assert "verdict on near miss" in card and "round trip through the base VAE" in card and "16x16 feature map" in card
    with pytest.raises(ValueError, match="feature stride must be one of"):
        build_detector(feature_stride=2)


def test_in_between_shapes_are_drawn_and_labelled_by_the_shape_they_overlap_most():
    import numpy as np

    from ralign.pretrain.detector import ROUNDING_SPLIT, deform_shapes
    from ralign.world.scene import Scene, SceneObject, render

    circle, square = SceneObject("red", "circle", "large", 1, 1), SceneObject("red", "square", "large", 1, 1)
    still = ((0.0, 0.0),)
    # the renderer's ends of the rounding are the world's own shapes, exactly
    assert np.array_equal(render(Scene((square,), still), rounding=[0.5]), render(Scene((circle,), still)))
    assert np.array_equal(render(Scene((circle,), still), rounding=[0.0]), render(Scene((square,), still)))
    with pytest.raises(ValueError, match="corner radius is 0 to 0.5"):
        render(Scene((circle,), still), rounding=[0.7])
    # the split is where a rounded square's IoU with the square equals its IoU with the inscribed circle
    cover = 1 - (4 - np.pi) * ROUNDING_SPLIT ** 2
    assert cover == pytest.approx((np.pi / 4) / cover)
    rng = np.random.default_rng(0)
    triangle = SceneObject("blue", "triangle", "small", 0, 0)
    for _ in range(50):
        scene, rounding = deform_shapes(Scene((circle, triangle), ((0.0, 0.0), (0.0, 0.0))), 1.0, rng)
        assert rounding[1] is None and scene.objects[1] == triangle
        assert scene.objects[0].shape == ("square" if rounding[0] < ROUNDING_SPLIT else "circle")
    scene, rounding = deform_shapes(Scene((circle,), still), 0.0, rng)
    assert rounding == [None] and scene.objects == (circle,)


def test_detector_rebuilt_with_a_finer_map_keeps_every_shared_tensor():
    from ralign.models.detector import with_feature_stride

    shipped = load_detector(TOY_DIR / "detector")
    finer, fresh = with_feature_stride(shipped, 4)
    assert feature_map_side(finer) == 16 and fresh and all("input_projection" in k for k in fresh)
    old = shipped.state_dict()
    for name, tensor in finer.state_dict().items():
        if name not in fresh:
            assert torch.equal(tensor, old[name]), name
    assert not any("stages.1" in k for k in finer.state_dict())  # stage 2, the stride-8 map, is gone


def test_detector_continued_on_in_between_shapes_keeps_its_card(tmp_path):
    from ralign.pretrain.detector import train_detector

    shutil.copytree(TOY_DIR / "base" / "vae", tmp_path / "base" / "vae")
    shutil.copytree(TOY_DIR / "detector", tmp_path / "detector")
    before = {k: v.clone() for k, v in load_detector(tmp_path / "detector").state_dict().items()}
    metrics = train_detector(tmp_path / "detector", continue_steps=2, batch=4, lr=1e-5, deform_fraction=0.5, eval_prompts=4)
    assert metrics["continued"] and metrics["steps"] == 2 and set(metrics["rounded_shapes"]) == {"all", "clear", "n"}
    after = load_detector(tmp_path / "detector").state_dict()
    assert any(not torch.equal(before[k], v) for k, v in after.items())
    card = (tmp_path / "detector" / "MODEL_CARD.md").read_text()
    assert "rounded squares" in card and "its card said:" in card and "In-between shapes" in card
    # continued with another stride: rebuilt from the shared tensors, and said so on the card
    metrics = train_detector(tmp_path / "detector", continue_steps=2, batch=4, lr=1e-5, eval_prompts=4, feature_stride=4)
    assert metrics["feature_side"] == 16 and metrics["fresh_tensors"]
    assert feature_map_side(load_detector(tmp_path / "detector")) == 16
    assert "Rebuilt with a 16x16 feature map" in (tmp_path / "detector" / "MODEL_CARD.md").read_text()
