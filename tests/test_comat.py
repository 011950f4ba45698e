"""CoMat's pieces: attribute-concentration losses on hand-made tensors, noun-phrase entities and their tokens,
attention capture on a real diffusers UNet, the grounded segmenter, the caption reward, the discriminator, the
weighted objective, and one CoMat update end to end on a tiny policy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ralign.algorithms.backprop_chain import BackpropSettings, backprop_update, frozen_model_latents
from ralign.algorithms.draft import draft_steps
from ralign.algorithms.interval import interval_steps
from ralign.diffusion.attention_capture import AttentionStore
from ralign.models.toy_t2i import tiny_random_pipeline
from ralign.diffusion.policy import DiffusionPolicy, PolicyConfig
from ralign.rewards.grounded_attention import concentration_losses, pixel_loss, resize_masks, token_loss
from ralign.rewards.registry import build_reward
from ralign.diffusion.sampler import guided_noise
from ralign.rewards.text_parsing import entity_token_indices, parse_entities
from ralign.world.prompts import generate
from ralign.world.scene import render


# ---- losses on hand-made tensors ------------------------------------------------------------------------------------

def _attention(side: int, tokens: int, inside: torch.Tensor, token: int, mass: float) -> torch.Tensor:
    """(side, side, tokens) softmax-like map: `mass` of each pixel on `token` where `inside`, the rest on token 0."""
    a = torch.zeros(side, side, tokens)
    a[..., 0] = 1.0
    a[inside, token] = mass
    a[inside, 0] = 1.0 - mass
    return a


def test_token_loss_is_zero_when_all_attention_lies_inside_the_mask():
    mask = torch.zeros(1, 4, 4)
    mask[0, 1:3, 1:3] = 1
    attn = _attention(4, 5, mask[0].bool(), token=2, mass=0.7)
    assert token_loss(attn, mask, [[2]]).item() == pytest.approx(0.0, abs=1e-6)


def test_token_loss_hand_value_for_half_inside():
    mask = torch.zeros(1, 2, 2)
    mask[0, 0, :] = 1  # top row is the object
    attn = torch.zeros(2, 2, 3)
    attn[..., 0] = 1.0
    attn[0, 0, 1], attn[1, 1, 1] = 0.5, 0.5  # token 1: one unit inside, one outside -> fraction inside 0.5
    attn[0, 0, 0], attn[1, 1, 0] = 0.5, 0.5
    assert token_loss(attn, mask, [[1]]).item() == pytest.approx(0.25)
    # two tokens of one entity: mean over its tokens; token 2 has no attention anywhere -> fraction 0 -> loss 1
    assert token_loss(attn, mask, [[1, 2]]).item() == pytest.approx((0.25 + 1.0) / 2)


def test_pixel_loss_on_an_all_zero_mask():
    """A missing object: BCE against zeros is −mean log(1 − Σ_k A_k), so zero attention costs nothing."""
    mask = torch.zeros(1, 2, 2)
    attn = torch.zeros(2, 2, 3)
    attn[..., 0] = 1.0
    assert pixel_loss(attn, mask, [[1, 2]]).item() == pytest.approx(0.0, abs=1e-5)
    attn[..., 1] = 0.5
    attn[..., 0] = 0.5
    assert pixel_loss(attn, mask, [[1, 2]]).item() == pytest.approx(-math.log(0.5), rel=1e-5)


def test_pixel_loss_hand_value_and_entities_are_averaged():
    mask = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    attn = torch.zeros(2, 2, 2)
    attn[..., 0] = 1.0
    attn[0, 0] = torch.tensor([0.2, 0.8])
    # pixel (0,0): target 1, p = 0.8; the rest: target 0, p ~ 0
    expected = -math.log(0.8) / 4
    assert pixel_loss(attn, mask, [[1]]).item() == pytest.approx(expected, rel=1e-4)
    two = torch.cat([mask, torch.zeros(1, 2, 2)])
    # entity 2 (token 0, missing object): p = 0.2 at (0,0) and ~1 (clamped at 1 − 1e-6) elsewhere, all against 0
    missing = (-math.log(0.8) + 3 * -math.log(1e-6)) / 4
    assert pixel_loss(attn, two, [[1], [0]]).item() == pytest.approx((expected + missing) / 2, rel=1e-2)


def test_masks_are_resized_and_binarised_like_comat():
    mask = torch.zeros(1, 64, 64)
    mask[0, 10:14, 10:14] = 1  # a 4x4 object: one cell of an 8x8 grid, partially
    small = resize_masks(mask, 8)
    assert set(small.unique().tolist()) <= {0.0, 1.0}
    assert small[0, 1, 1] == 1 and small.sum() >= 1 and small[0, 6, 6] == 0


def test_concentration_losses_sum_layers_groups_and_steps():
    mask = torch.zeros(1, 8, 8)
    mask[0, :4] = 1
    attn = _attention(8, 4, mask[0].bool(), token=1, mass=1.0)
    step = {"up_8": [attn, attn]}
    t1, p1 = concentration_losses([step], mask, [[1]])
    t2, p2 = concentration_losses([step, step], mask, [[1]])
    assert t1.item() == pytest.approx(0.0, abs=1e-6) and p2.item() == pytest.approx(2 * p1.item(), rel=1e-6)
    outside = _attention(8, 4, ~mask[0].bool(), token=1, mass=1.0)
    t3, _ = concentration_losses([{"up_8": [outside, outside]}], mask, [[1]])
    assert t3.item() == pytest.approx(2.0, rel=1e-5)  # two layers, each (1 − 0)²


# ---- entities --------------------------------------------------------------------------------------------------------

def test_lexicon_entities_and_token_positions():
    from transformers import AutoTokenizer

    from ralign.models.pipeline import TOY_MODELS_DIR

    tok = AutoTokenizer.from_pretrained(str(TOY_MODELS_DIR / "base" / "tokenizer"))
    cases = {
        "a red circle to the left of a blue square": [("red circle", "red circle"), ("blue square", "blue square")],
        "three green triangles": [("three green triangles", "green triangle")],
        "a large red circle and a small blue square": [("large red circle", "red circle"), ("small blue square", "blue square")],
        "a picture of a yellow circle": [("yellow circle", "yellow circle")],
        "the background is plain and light grey. every shape is drawn in a flat colour.": [],
    }
    for prompt, expected in cases.items():
        ents = parse_entities(prompt, "lexicon")
        assert [(e.text, e.segment_phrase) for e in ents] == expected
        ids = tok(prompt).input_ids
        for e, positions in zip(ents, entity_token_indices(tok, prompt, ents)):
            assert tok.convert_ids_to_tokens([ids[k] for k in positions]) == e.text.split()


def test_spacy_parser_gives_the_lexicon_entities_when_installed():
    try:
        ents = parse_entities("a red circle to the left of a blue square", "spacy")
    except RuntimeError as exc:
        pytest.skip(str(exc))
    assert [e.text for e in ents] == ["red circle", "blue square"]


# ---- attention capture -----------------------------------------------------------------------------------------------

def _policy(**kw) -> DiffusionPolicy:
    policy = DiffusionPolicy(tiny_random_pipeline(), PolicyConfig(unet_lora_rank=4, steps=4, **kw))
    with torch.no_grad():
        for name, p in policy.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return policy


def test_recording_processor_computes_what_the_default_processor_computes():
    policy = _policy()
    cond, uncond = policy.encode(["a red circle", "two blue squares"])
    x = torch.randn(2, *policy.latent_shape())
    with torch.no_grad():
        plain = guided_noise(policy.unet, x, 500, cond, uncond, 3.0)
    store = AttentionStore(policy.unet)
    with torch.no_grad(), store.capture():
        recorded = guided_noise(policy.unet, x, 500, cond, uncond, 3.0)
    torch.testing.assert_close(recorded, plain, rtol=1e-4, atol=1e-5)
    maps = store.maps(2)
    assert set(maps) == {"mid_4", "up_8"}  # tiny UNet: mid block at 4x4, the cross-attention up block at 8x8
    for group, items in maps.items():
        side = int(group.split("_")[1])
        for m in items:
            assert m.shape == (2, side, side, cond.shape[1])
            torch.testing.assert_close(m.sum(-1), torch.ones(2, side, side))
    # processors restored: the next call records nothing
    store.clear()
    with torch.no_grad():
        guided_noise(policy.unet, x, 500, cond, uncond, 3.0)
    assert not store.recorded


# ---- rewards ---------------------------------------------------------------------------------------------------------

def _renders(family: str, n: int, split: str = "test"):
    samples = generate(family, n, split=split, seed=5)
    images = torch.from_numpy(np.stack([render(s.scene) for s in samples])).permute(0, 3, 1, 2).float() / 255
    return samples, images


def test_toy_grounded_segmenter_finds_present_objects_and_not_absent_ones():
    from ralign.models.grounded_segmenter import build_grounded_segmenter

    seg = build_grounded_segmenter({"backend": "toy"})
    samples, images = _renders("single", 16)
    present = [f"{s.scene.objects[0].color} {s.scene.objects[0].shape}" for s in samples]
    absent = [("blue" if s.scene.objects[0].color != "blue" else "red") + " " + s.scene.objects[0].shape for s in samples]
    found = seg.masks(images, present).flatten(1).sum(1) > 0
    false = seg.masks(images, absent).flatten(1).sum(1) > 0
    assert found.float().mean() >= 0.8 and false.float().mean() <= 0.3
    with pytest.raises(ValueError, match="one phrase per image"):
        seg.masks(images, present[:-1])


def test_detector_grounded_segmenter_tells_the_colour_shape_pair_apart():
    """Asked for an absent "red circle" next to a red square, the grounded pair (detector boxes, CLIPSeg mask inside
    them) gives no mask; CLIPSeg alone segments the square."""
    from ralign.models.grounded_segmenter import _phrase_class, build_grounded_segmenter
    from ralign.pretrain.rewards import absent_combo
    from ralign.world.scene import object_mask

    grounded, clipseg = build_grounded_segmenter({"backend": "toy_grounded"}), build_grounded_segmenter({"backend": "toy"})
    samples, images = _renders("binding", 24)
    rng = np.random.default_rng(0)
    present = [f"{s.scene.objects[0].color} {s.scene.objects[0].shape}" for s in samples]
    shared = [" ".join(absent_combo(s.scene.objects, rng, shared=True)) for s in samples]
    got = grounded.masks(images, present)
    truth = torch.stack([torch.from_numpy(np.maximum.reduce([object_mask(o, j) for o, j in zip(s.scene.objects, s.scene.jitter)
                                                             if o.combo == s.scene.objects[0].combo]) > 0.5) for s in samples])
    iou = ((got > 0) & truth).flatten(1).sum(1) / ((got > 0) | truth).flatten(1).sum(1).clamp(min=1)
    assert iou.mean() >= 0.7
    assert (grounded.masks(images, shared).flatten(1).sum(1) > 0).float().mean() <= 0.1
    assert (clipseg.masks(images, shared).flatten(1).sum(1) > 0).float().mean() >= 0.5  # why the pair is needed
    assert _phrase_class("circles") == (None, "circle") and _phrase_class("red square") == ("red", "square")
    with pytest.raises(ValueError, match="names none of this world's shapes"):
        grounded.masks(images[:1], ["red balloon"])
    with pytest.raises(ValueError, match="one phrase per image"):
        grounded.masks(images, present[:-1])


def test_caption_reward_is_per_sample_prompt_nll_and_prefers_the_right_prompt():
    reward = build_reward({"name": "caption"})
    samples, images = _renders("binding", 16)
    right = reward(images, [s.prompt for s in samples])
    wrong = reward(images, [samples[(i + 1) % 16].prompt for i in range(16)])
    assert right.score.shape == (16,)
    torch.testing.assert_close(right.score, -right.components["caption_nll"])
    assert (right.score > wrong.score).float().mean() >= 0.7
    # per sample: one image's score does not depend on the rest of the batch
    torch.testing.assert_close(reward(images[:1], [samples[0].prompt]).score, right.score[:1], rtol=1e-4, atol=1e-4)


def test_discriminator_learns_to_separate_and_round_trips_through_safetensors(tmp_path):
    reward = build_reward({"name": "fidelity", "lora_rank": 4, "lr": 3e-3})
    torch.manual_seed(0)
    real = torch.randn(4, 4, 8, 8) * 0.5
    fake = torch.randn(4, 4, 8, 8) * 0.5 + 1.5
    first = reward.adversarial_update(real, fake)
    for _ in range(9):
        last = reward.adversarial_update(real, fake)
    assert last["discriminator_loss"] < 0.7 * first["discriminator_loss"] and last["discriminator_accuracy"] > 0.8
    out = reward(torch.zeros(4, 3, 64, 64), [""] * 4, latents=fake)
    assert out.score.shape == (4,) and (out.score <= 0).all()
    torch.testing.assert_close(out.components["adv_g_loss"], -out.score)
    reward.save_state(tmp_path)
    again = build_reward({"name": "fidelity", "lora_rank": 4, "lr": 3e-3, "seed": 1})
    again.load_state(tmp_path)
    torch.testing.assert_close(again(torch.zeros(4, 3, 64, 64), [""] * 4, latents=fake).score, out.score)
    assert again.updates == reward.updates == 10
    # the next step continues with the saved Adam moments: both copies take the same step
    a, b = reward.adversarial_update(real, fake), again.adversarial_update(real, fake)
    assert a["discriminator_loss"] == pytest.approx(b["discriminator_loss"], rel=1e-5)


def test_weighted_reward_sums_terms_and_skips_what_needs_the_chain():
    spec = {"name": "weighted", "terms": [{"name": "clip_score", "weight": 2.0}, {"name": "preference", "weight": 0.5},
                                          {"name": "grounded_attention", "weight": 1.0}]}
    reward = build_reward(spec)
    samples, images = _renders("single", 4)
    prompts = [s.prompt for s in samples]
    out = reward(images, prompts)
    clip, pref = build_reward({"name": "clip_score"})(images, prompts), build_reward({"name": "preference"})(images, prompts)
    torch.testing.assert_close(out.score, 2.0 * clip.score + 0.5 * pref.score)
    assert out.components["skipped_terms"].eq(1).all() and "clip_score" in out.components
    with pytest.raises(ValueError, match="twice"):
        build_reward({"name": "weighted", "terms": [{"name": "caption", "weight": 1}, {"name": "caption", "weight": 1}]})


# ---- one CoMat update --------------------------------------------------------------------------------------------

def test_comat_update_trains_the_unet_through_caption_attention_and_adversarial_terms():
    torch.manual_seed(0)
    policy = _policy()
    reward = build_reward({"name": "weighted", "terms": [
        {"name": "caption", "weight": 1.0},
        {"name": "grounded_attention", "weight": 1.0, "token_weight": 1.0, "pixel_weight": 1.0},
        {"name": "fidelity", "weight": 1.0, "lora_rank": 2},
    ]})
    # the toy discriminator is built from the toy base UNet; this policy is the tiny random one, so swap in a
    # discriminator over the tiny UNet (same latent shape) to keep the test small
    from ralign.rewards.fidelity import LatentDiscriminator

    fidelity = next(r for _, r in reward.terms if r.name == "fidelity")
    empty = policy.encode([""])[0].detach()
    fidelity.model = LatentDiscriminator(policy.unet, empty, 0, 2)
    fidelity.optimizer = torch.optim.AdamW(list(fidelity.model.trainable().values()), lr=1e-4, betas=(0.0, 0.999))
    cfg = BackpropSettings(interval=2, attention_steps=2)
    grads = {}
    g = torch.Generator().manual_seed(3)
    stats = backprop_update(policy, ["a red circle to the left of a blue square", "three green triangles"], [1, 2], reward, cfg,
                            interval_steps(policy.cfg.steps, 2, g), generator=g)
    for name, p in policy.unet.named_parameters():
        if p.requires_grad and p.grad is not None:
            grads[name] = p.grad.norm().item()
    assert grads and max(grads.values()) > 0
    for key in ("reward/caption", "reward/grounded_attention/token_loss", "reward/grounded_attention/pixel_loss",
                "reward/fidelity/adv_g_loss", "discriminator_loss"):
        assert key in stats and math.isfinite(stats[key]), key
    assert "reward/skipped_terms" not in stats


def test_frozen_model_latents_ignore_the_adapters():
    policy = _policy()
    a = frozen_model_latents(policy, ["a red circle"], [4])
    with torch.no_grad():
        for name, p in policy.unet.named_parameters():
            if "lora_B" in name:
                p.mul_(3.0)
    torch.testing.assert_close(frozen_model_latents(policy, ["a red circle"], [4]), a)


def test_attention_rewards_refuse_segment_encoding_and_dpok():
    from ralign.config import parse_config
    from ralign.training.config import TrainConfig

    terms = [{"name": "caption", "weight": 1.0}, {"name": "grounded_attention", "weight": 1.0}]
    with pytest.raises(Exception, match="algorithm.name=dpok cannot use them"):
        parse_config(TrainConfig, {"algorithm": {"name": "dpok"}, "reward": {"name": "weighted", "options": {"terms": terms}}})
    with pytest.raises(Exception, match="needs model.policy.text_encoding=plain"):
        parse_config(TrainConfig, {"algorithm": {"name": "draft"}, "model": {"policy": {"text_encoding": "segment"}},
                                   "reward": {"name": "weighted", "options": {"terms": terms}}})
    policy = _policy(text_encoding="segment")
    reward = build_reward({"name": "weighted", "terms": terms})
    with pytest.raises(ValueError, match="segment encoding"):
        backprop_update(policy, ["a red circle"], [0], reward, BackpropSettings(k=1), draft_steps(policy.cfg.steps, 1))
