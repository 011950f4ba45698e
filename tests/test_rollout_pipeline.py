"""The asynchronous rollout pipeline on a real local Ray cluster: exactly-once delivery, back-pressure, staleness."""

from __future__ import annotations

import numpy as np
import pytest

from actors.rollout import RewardActor, RolloutPipeline, SamplerActor

from rollout_prompts import SPEC, PromptCycle, pipeline_config  # tests/ is on the path (rootdir conftest)


@pytest.fixture(scope="module")
def actors(ray_local):
    samplers = [SamplerActor.options(num_cpus=0.5).remote(SPEC) for _ in range(2)]
    rewards = [RewardActor.options(num_cpus=0.5).remote({"name": "colorfulness"})]
    return samplers, rewards


def test_every_rollout_delivered_once_under_backpressure(actors):
    samplers, rewards = actors
    cfg = pipeline_config(request_batch=2, max_inflight_per_sampler=2, max_unconsumed=3)
    pipe = RolloutPipeline(samplers, rewards, PromptCycle(), cfg)
    seen_unconsumed = []
    original_pump = pipe.pump

    def pump(timeout=0.0):
        original_pump(timeout)
        seen_unconsumed.append(pipe.schedule.unconsumed())

    pipe.pump = pump
    consumed = []
    for _ in range(4):
        r = pipe.take(2)
        assert r.scores is not None and np.isfinite(r.scores).all()
        assert r.latents.shape[1] == 3 and r.images.dtype == np.uint8
        consumed += r.ids
    assert max(seen_unconsumed) <= cfg.ray.max_unconsumed  # back-pressure held
    pipe.drain()
    ledger = pipe.ledger
    ledger.check()
    assert len(consumed) == len(set(consumed)) == len(ledger.consumed)
    # every issued id ended in exactly one terminal state
    terminal = set(ledger.consumed) | ledger.dropped_stale | ledger.quarantined | ledger.lost | ledger.unused
    assert terminal == ledger.issued == ledger.terminal()
    assert ledger.produced == ledger.issued and not ledger.lost


def test_stale_rollouts_are_dropped_and_counted(actors):
    samplers, rewards = actors
    pipe = RolloutPipeline(samplers, rewards, PromptCycle(), pipeline_config(request_batch=2, max_staleness=1, max_unconsumed=4))
    pipe.take(2)  # version 0 rollouts, learner at 0: fresh
    while len(pipe.schedule.ready) < 2:  # let old-version rollouts pile up
        pipe.pump(timeout=1.0)
    import ray
    ray.get([s.set_weights.remote({}, 2) for s in samplers])
    # The learner moved on without broadcasting: queued version-0 rollouts are too old for a learner at version 2.
    batch = pipe.take(2, learner_version=2)
    assert all(v == 2 for v in batch.versions)
    assert len(pipe.ledger.dropped_stale) >= 4
    pipe.drain()
    pipe.ledger.check()
    assert pipe.ledger.terminal() == pipe.ledger.issued


def test_broadcast_updates_sampler_weights(actors):
    import ray
    import torch

    samplers, rewards = actors
    from actors.common import weights_for_transfer

    pipe = RolloutPipeline(samplers, rewards, PromptCycle(), pipeline_config())
    state = ray.get(samplers[0].__ray_call__.remote(lambda self: self.policy.trainable_state()))
    new_state = {k: torch.full_like(v, 0.01) for k, v in state.items()}
    ray.get(pipe.broadcast_async(ray.put(weights_for_transfer(new_state)), version=7))
    assert ray.get([s.version.remote() for s in samplers]) == [7, 7]
    got = ray.get(samplers[1].__ray_call__.remote(lambda self: self.policy.trainable_state()))
    assert all(torch.equal(got[k], new_state[k]) for k in state)


def test_take_returns_exact_batches_and_keeps_the_rest_unconsumed(actors):
    samplers, rewards = actors
    pipe = RolloutPipeline(samplers, rewards, PromptCycle(), pipeline_config(request_batch=3, max_unconsumed=2))
    taken = []
    for _ in range(3):
        batch = pipe.take(2)  # requests of 3 samples are split 2 + 1, the 1 stays queued
        assert len(batch.ids) == 2
        taken += batch.ids
    assert len(taken) == len(set(taken)) == len(pipe.ledger.consumed)
    pipe.drain()
    pipe.ledger.check()
    assert pipe.ledger.terminal() == pipe.ledger.issued
