"""Every reward that scores finished images runs the same in a Ray reward actor as in-process (same scores, same
named components); the CoMat objective in an actor scores its image terms and says which chain terms it skipped."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.rollout import RewardActor, Rollout
from ralign.rewards.registry import build_reward
from ralign.world.prompts import generate
from ralign.world.scene import render

COMAT = {"name": "weighted", "terms": [{"name": "caption", "weight": 1.0}, {"name": "grounded_attention", "weight": 1.0},
                                        {"name": "fidelity", "weight": 1.0}]}


@pytest.mark.parametrize("spec", [{"name": "clip_score"}, {"name": "preference"}, {"name": "decomposed_preference", "w": 0.3},
                                  {"name": "caption"}, COMAT], ids=["clip_score", "preference", "decomposed", "caption", "comat"])
def test_reward_actor_scores_like_the_in_process_reward(ray_local, spec):
    samples = generate("binding", 4, split="test", seed=3)
    images = np.stack([render(s.scene) for s in samples])
    rollout = Rollout(ids=[0, 1, 2, 3], prompts=[s.prompt for s in samples], seeds=[0, 1, 2, 3], version=0,
                      latents=np.zeros((4, 1, 4, 8, 8), np.float32), log_probs=np.zeros((4, 0), np.float32),
                      timesteps=np.zeros(0, np.int64), images=images)
    actor = RewardActor.options(num_cpus=0.5).remote(spec)
    scored = ray_local.get(actor.score.remote(rollout))
    with torch.no_grad():
        local = build_reward(spec)(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0, rollout.prompts)
    np.testing.assert_allclose(scored.scores, local.score.numpy(), rtol=1e-4, atol=1e-5)
    assert set(scored.components) == set(local.components)
    if spec is COMAT:
        assert (scored.components["skipped_terms"] == 2).all() and "caption/caption_nll" in scored.components
    ray_local.kill(actor)
