"""The committed toy reward models load offline through the library loaders and beat chance on held-out renders."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from transformers import BlipForConditionalGeneration, CLIPSegForImageSegmentation

from ralign.models import captioner as cap
from ralign.models import reward_clip as rc
from ralign.models import segmenter as seg
from ralign.pretrain.rewards import corrupt
from ralign.rewards.clip_score import TOY_DIR, ClipScoreReward, PreferenceReward
from ralign.world.data import images_to_tensor
from ralign.world.prompts import FAMILIES, generate
from ralign.world.scene import object_mask, render

SAMPLES = [s for f in ("single", "binding", "spatial", "counting") for s in generate(f, 4, "test", seed=77)]
PROMPTS = [s.prompt for s in SAMPLES]


def images01(samples):
    return (images_to_tensor([render(s.scene) for s in samples]) + 1) / 2


def test_reward_clip_ranks_the_right_prompt_first():
    model, tok = rc.load_reward_clip(TOY_DIR / "reward_clip")
    with torch.no_grad():
        sims = rc.encode_images(model, images01(SAMPLES)) @ rc.encode_texts(model, tok, PROMPTS).T
    assert torch.isfinite(sims).all()
    hits = np.mean([PROMPTS[int(sims[i].argmax())] == PROMPTS[i] for i in range(len(PROMPTS))])
    assert hits >= 0.5  # chance is 1/16


def test_clip_rewards_are_differentiable_in_the_images():
    images = images01(SAMPLES[:4]).requires_grad_(True)
    for reward in (ClipScoreReward(), PreferenceReward()):
        out = reward(images, PROMPTS[:4])
        assert out.score.shape == (4,)
        out.score.sum().backward()
        assert images.grad is not None and images.grad.abs().sum() > 0
        images.grad = None


@pytest.mark.parametrize("kind", ["noise", "blur", "wrong_attribute", "missing_object", "extra_object"])
def test_preference_prefers_clean_renders(kind):
    reward = PreferenceReward()
    rng = np.random.default_rng(0)
    good = images01(SAMPLES)
    bad = (images_to_tensor([corrupt(s, kind, rng) for s in SAMPLES]) + 1) / 2
    with torch.no_grad():
        wins = (reward(good, PROMPTS).score > reward(bad, PROMPTS).score).float().mean()
    assert wins >= 0.6, kind


def test_captioner_loads_with_transformers_and_scores_per_sample(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = BlipForConditionalGeneration.from_pretrained(TOY_DIR / "captioner", local_files_only=True)
    model, tok = cap.load_captioner(TOY_DIR / "captioner")
    images = images01(SAMPLES).requires_grad_(True)
    right = cap.caption_nll(model, tok, images, PROMPTS)
    assert right.shape == (len(PROMPTS),) and torch.isfinite(right).all()
    right.sum().backward()
    assert images.grad.abs().sum() > 0
    with torch.no_grad():
        wrong = cap.caption_nll(model, tok, images.detach(), PROMPTS[1:] + PROMPTS[:1])
        alone = cap.caption_nll(model, tok, images.detach()[:1], PROMPTS[:1])
    assert torch.allclose(alone[0], right[0].detach(), rtol=1e-4, atol=1e-4)  # per-sample: independent of the batch
    assert (right.detach() < wrong).float().mean() >= 0.7


def test_segmenter_finds_the_named_object(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    CLIPSegForImageSegmentation.from_pretrained(TOY_DIR / "segmenter", local_files_only=True)
    model, tok = seg.load_segmenter(TOY_DIR / "segmenter")
    samples = SAMPLES[:8]
    phrases = [f"{s.scene.objects[0].color} {s.scene.objects[0].shape}" for s in samples]
    probs = seg.segment(model, tok, images01(samples), phrases)
    assert probs.shape == (8, 64, 64) and (probs >= 0).all() and (probs <= 1).all()
    ious = []
    for s, p in zip(samples, probs.numpy()):
        target = np.zeros((64, 64), bool)
        for o, j in zip(s.scene.objects, s.scene.jitter):
            if o.combo == s.scene.objects[0].combo:
                target |= object_mask(o, j) > 0.5
        pred = p > 0.5
        ious.append((pred & target).sum() / max(1, (pred | target).sum()))
    assert np.mean(ious) > 0.3


def test_truncated_weights_are_a_clear_error(tmp_path):
    broken = tmp_path / "reward_clip"
    shutil.copytree(TOY_DIR / "reward_clip", broken)
    weights = broken / rc.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="cannot read weights"):
        rc.load_reward_clip(broken)
    with pytest.raises(FileNotFoundError, match="not a reward CLIP directory"):
        rc.load_reward_clip(tmp_path)


@pytest.mark.parametrize("family", ["single", "binding", "counting", "spatial", "size", "long"])
def test_every_near_miss_contradicts_its_prompt(family):
    # The reward's hard negatives are built from the scene graph alone; the oracle (evaluation only) confirms here
    # that each kind really makes the image wrong for its prompt while the prompt's own scene is right.
    from ralign.pretrain.rewards import NEAR_MISSES, near_miss_scene
    from ralign.world import oracle

    rng = np.random.default_rng(3)
    for sample in generate(family, 6, "train", seed=5):
        assert oracle.judge(sample.prompt, render(sample.scene)).all_correct, sample.prompt
        for kind in NEAR_MISSES[family]:
            wrong = near_miss_scene(sample, kind, rng)
            assert not oracle.judge(sample.prompt, render(wrong)).all_correct, (sample.prompt, kind, wrong)


def test_reward_clip_pretraining_writes_a_loadable_model_and_card(tmp_path):
    from ralign.pretrain.rewards import train_reward_clip

    # Beside a pipeline's VAE, as `ralign world pretrain` lays the models out, so the generated look uses it.
    shutil.copytree(TOY_DIR / "base" / "vae", tmp_path / "base" / "vae")
    metrics = train_reward_clip(tmp_path / "reward_clip", steps=2, batch=8, eval_prompts=8)
    model, tok = rc.load_reward_clip(tmp_path / "reward_clip")
    assert metrics["steps"] == 2 and set(metrics["near_miss_accuracy"]) == set(metrics["retrieval_top1"])
    card = (tmp_path / "reward_clip" / "MODEL_CARD.md").read_text()
    assert "near-miss accuracy" in card and "round trip through the base VAE" in card
    assert torch.isfinite(rc.encode_texts(model, tok, PROMPTS[:2])).all()
    # continued training starts from those weights and keeps the earlier card's account
    before = {k: v.clone() for k, v in model.state_dict().items()}
    metrics = train_reward_clip(tmp_path / "reward_clip", continue_steps=1, batch=8, lr=1e-4, eval_prompts=8)
    assert metrics["continued"] and metrics["steps"] == 1
    after, _ = rc.load_reward_clip(tmp_path / "reward_clip")
    assert any(not torch.equal(before[k], v) for k, v in after.state_dict().items())
    assert "its card said:" in (tmp_path / "reward_clip" / "MODEL_CARD.md").read_text() and "near-miss accuracy" in card


def test_captioner_near_miss_training_writes_a_loadable_model_and_card(tmp_path):
    from ralign.pretrain.rewards import train_captioner

    shutil.copytree(TOY_DIR / "base" / "vae", tmp_path / "base" / "vae")
    shutil.copytree(TOY_DIR / "captioner", tmp_path / "captioner")
    before = {k: v.clone() for k, v in cap.load_captioner(tmp_path / "captioner")[0].state_dict().items()}
    metrics = train_captioner(tmp_path / "captioner", continue_steps=2, batch=4, lr=1e-4, near_misses_per_image=2, eval_prompts=4)
    assert metrics["continued"] and metrics["steps"] == 2 and metrics["near_misses_per_image"] == 2
    assert set(metrics["near_miss_accuracy"]) == set(metrics["families"])
    model, tok = cap.load_captioner(tmp_path / "captioner")
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    card = (tmp_path / "captioner" / "MODEL_CARD.md").read_text()
    assert "Bradley-Terry on the NLL" in card and "near-miss accuracy" in card and "its card said:" in card
    assert "round trip through the base VAE" in card


def test_preference_pairs_take_near_misses_of_their_own_family():
    from ralign.pretrain.rewards import CORRUPTIONS, NEAR_MISSES, _pair_batch

    samples = [s for f in ("binding", "counting", "spatial", "size") for s in generate(f, 3, "test", seed=1)]
    good, bad, kinds = _pair_batch(samples, np.random.default_rng(0), near_miss_fraction=1.0)
    assert all(k in NEAR_MISSES[s.family] for s, k in zip(samples, kinds))
    assert good.shape == bad.shape and all(not torch.equal(g, b) for g, b in zip(good, bad))
    _, _, kinds = _pair_batch(samples, np.random.default_rng(0), near_miss_fraction=0.0)
    assert set(kinds) <= set(CORRUPTIONS)


def test_preference_near_miss_training_writes_a_loadable_model_and_card(tmp_path):
    from ralign.pretrain.rewards import train_preference

    shutil.copytree(TOY_DIR / "base" / "vae", tmp_path / "base" / "vae")
    shutil.copytree(TOY_DIR / "preference", tmp_path / "preference")
    before = {k: v.clone() for k, v in rc.load_reward_clip(tmp_path / "preference")[0].state_dict().items()}
    metrics = train_preference(tmp_path / "preference", continue_steps=2, batch=4, lr=1e-4, near_miss_fraction=0.5, eval_prompts=4)
    assert metrics["continued"] and metrics["steps"] == 2 and set(metrics["near_miss_accuracy"]) == set(FAMILIES)
    model, _ = rc.load_reward_clip(tmp_path / "preference")
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    card = (tmp_path / "preference" / "MODEL_CARD.md").read_text()
    assert "near miss of the prompt's scene" in card and "its card said:" in card and "round trip through the base VAE" in card


def test_shared_absent_phrases_name_a_missing_object_that_shares_a_colour():
    import numpy as np

    from ralign.pretrain.rewards import absent_combo, _segmentation_example
    from ralign.world.prompts import generate

    rng = np.random.default_rng(0)
    for sample in generate("binding", 40, "test", seed=3):
        present = {o.combo for o in sample.scene.objects}
        colour, shape = absent_combo(sample.scene.objects, rng, shared=True)
        assert (colour, shape) not in present
        assert colour in {c for c, _ in present}  # binding scenes always leave a colour-sharing absent pair
    # with every absent phrase shared, an absent phrase's target is empty and a present one's is not
    for sample in generate("binding", 40, "test", seed=4):
        phrase, mask = _segmentation_example(sample, rng, shared_absent=1.0)
        named = tuple(phrase.split()) if len(phrase.split()) == 2 else None
        if named is not None:
            assert (mask.sum() > 0) == (named in {o.combo for o in sample.scene.objects})


def test_segmenter_continued_with_shared_absent_phrases_writes_a_loadable_model_and_card(tmp_path):
    from ralign.pretrain.rewards import train_segmenter

    shutil.copytree(TOY_DIR / "base" / "vae", tmp_path / "base" / "vae")
    shutil.copytree(TOY_DIR / "segmenter", tmp_path / "segmenter")
    before = {k: v.clone() for k, v in seg.load_segmenter(tmp_path / "segmenter")[0].state_dict().items()}
    metrics = train_segmenter(tmp_path / "segmenter", continue_steps=2, batch=4, lr=1e-4, shared_absent=0.5, generated_look=True)
    assert metrics["continued"] and metrics["steps"] == 2
    assert 0.0 <= metrics["false_detection_rate_shared"] <= 1.0 and 0.0 <= metrics["iou_present"] <= 1.0
    model, _ = seg.load_segmenter(tmp_path / "segmenter")
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    card = (tmp_path / "segmenter" / "MODEL_CARD.md").read_text()
    assert "share the colour of an object" in card and "its card said:" in card and "round trip through the base VAE" in card
