"""Every reward runs the same in a Ray reward actor as in-process (same scores, same named components), including the
CoMat terms that score more than images: a sampler actor records the cross-attention maps of the requested steps and
ships them, with the final latents and token spans, in the rollout; the discriminator scores with the weights the
learner hands over."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.rollout import RewardActor, SamplerActor
from ralign.rollout.batch import Chains
from ralign.rollout.schedule import RolloutRequest
from ralign.diffusion.policy import build_policy
from ralign.rewards.registry import build_reward
from ralign.diffusion.text_encoding import token_offsets
from ralign.world.prompts import generate
from ralign.world.scene import render

COMAT = {"name": "weighted", "terms": [{"name": "caption", "weight": 1.0},
                                        {"name": "grounded_attention", "weight": 1.0, "token_weight": 1.0, "pixel_weight": 1.0},
                                        {"name": "fidelity", "weight": 1.0, "lora_rank": 2}]}
POLICY = {"pipeline": "base", "unet_lora_rank": 2, "steps": 4, "eta": 1.0, "guidance": 3.0}


def _as_images(rollout_images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rollout_images).permute(0, 3, 1, 2).float() / 255.0


@pytest.mark.parametrize("spec", [{"name": "clip_score"}, {"name": "preference"}, {"name": "decomposed_preference", "w": 0.3},
                                  {"name": "caption"}], ids=["clip_score", "preference", "decomposed", "caption"])
def test_reward_actor_scores_like_the_in_process_reward(ray_local, spec):
    samples = generate("binding", 4, split="test", seed=3)
    images = np.stack([render(s.scene) for s in samples])
    rollout = Chains(ids=[0, 1, 2, 3], prompts=[s.prompt for s in samples], seeds=[0, 1, 2, 3], versions=[0] * 4,
                      latents=np.zeros((4, 1, 4, 8, 8), np.float32), log_probs=np.zeros((4, 0), np.float32),
                      timesteps=np.zeros(0, np.int64), images=images)
    actor = RewardActor.options(num_cpus=0.5).remote(spec)
    scored = ray_local.get(actor.score.remote(rollout))
    with torch.no_grad():
        local = build_reward(spec)(_as_images(images), rollout.prompts)
    np.testing.assert_allclose(scored.scores, local.score.numpy(), rtol=1e-4, atol=1e-5)
    assert set(scored.components) == set(local.components)
    ray_local.kill(actor)


def test_comat_terms_score_in_a_reward_actor_from_what_the_sampler_ships(ray_local):
    prompts = ["a red circle to the left of a blue square", "three green triangles"]
    request = RolloutRequest(ids=[0, 1], prompts=prompts, seeds=[5, 6], metrics_only=True, attention_steps=[1, 3])
    sampler = SamplerActor.options(num_cpus=0.5).remote(POLICY)
    rollout = ray_local.get(sampler.rollout.remote(request))
    # maps of both requested steps, every recorded layer, both samples, over the toy encoder's 24 token positions
    assert rollout.attention and all(a.shape[0] == 2 and a.shape[2] == 2 and a.shape[-1] == 24 for a in rollout.attention.values())
    assert [len(o) for o in rollout.token_offsets] == [12, 5]  # one word per token, plus start and end tokens
    assert rollout.token_offsets[1][1] == (0, 5)  # "three"

    actor = RewardActor.options(num_cpus=0.5).remote(COMAT)
    local = build_reward(COMAT)
    # before the hand-over (below), the actor scores with its own initial discriminator
    stale = ray_local.get(actor.score.remote(rollout))
    # The learner's discriminator has moved on from its initialisation; the actor scores with its current weights.
    latents = torch.from_numpy(rollout.latents[:, -1])
    for _ in range(3):
        local.adversarial_update(torch.randn_like(latents), latents)
    ray_local.get(actor.set_shared_weights.remote(local.shared_weights()))
    scored = ray_local.get(actor.score.remote(rollout))

    # the same chain in-process: same maps, same token spans, same final latents
    torch.manual_seed(0)
    policy = build_policy(POLICY)
    traj = policy.sample(prompts, [5, 6], attention_steps=[1, 3])
    # The sampler ships images as 8-bit; the in-process chain's images are those up to rounding, and the terms that
    # read images (the captioner's NLL) are compared on the images the actor received.
    shipped = _as_images(rollout.images)
    assert float((shipped - traj.images).abs().max()) <= 0.5 / 255 + 1e-6
    with torch.no_grad():
        expected = local(shipped, prompts, latents=traj.latents[:, -1],
                         attention={"maps": traj.attention, "token_offsets": [token_offsets(policy.tokenizer, p) for p in prompts]})
    assert "skipped_terms" not in scored.components and set(scored.components) == set(expected.components)
    for key in ("grounded_attention/token_loss", "grounded_attention/pixel_loss", "fidelity/adv_g_loss", "caption"):
        np.testing.assert_allclose(scored.components[key], expected.components[key].numpy(), rtol=1e-3, atol=1e-5, err_msg=key)
    np.testing.assert_allclose(scored.scores, expected.score.numpy(), rtol=1e-3, atol=1e-4)
    assert np.all(scored.components["grounded_attention/token_loss"] > 0)
    assert scored.attention is None  # not carried back once scored

    # before the hand-over the actor's discriminator differed: the scores show it used the learner's weights
    assert not np.allclose(stale.components["fidelity/adv_g_loss"], scored.components["fidelity/adv_g_loss"])
    with pytest.raises(Exception, match="do not match"):
        ray_local.get(actor.set_shared_weights.remote({"0.bogus": torch.zeros(1)}))
    # A rollout that did not record attention still scores the other terms and says what it left out.
    plain = ray_local.get(sampler.rollout.remote(RolloutRequest(ids=[2], prompts=prompts[:1], seeds=[7], metrics_only=True)))
    partial = ray_local.get(actor.score.remote(plain))
    assert partial.components["skipped_terms"].tolist() == [1.0]
    for a in (sampler, actor):
        ray_local.kill(a)
