"""Faults in the rollout pipeline, on a real local Ray cluster with real sampler and reward actors.

Processes are killed or frozen with real signals (SIGKILL, SIGSTOP) by their process id, as a lost node or a stuck
process would; NaN rewards and a reward that keeps raising come from `fault_injection`, a real reward wrapped to
fail on cue. After each fault the exactly-once ledger must balance: every issued id ends in one terminal state, none
is trained on twice, nothing scored is also counted lost or quarantined.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import ray

from actors.common import weights_for_transfer
from actors.rollout import RewardActor, RolloutPipeline, SamplerActor
from ralign.rollout.schedule import PipelineAbort

from rollout_prompts import PROMPTS, SPEC, PromptCycle, pipeline_config  # tests/ is on the path (rootdir conftest)


def _balanced(pipe: RolloutPipeline) -> None:
    pipe.drain()
    ledger = pipe.ledger
    ledger.check()
    assert ledger.terminal() == ledger.issued
    assert len(ledger.consumed) == len(set(ledger.consumed))


def _pump_until(pipe: RolloutPipeline, condition, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"condition not reached in {timeout_s}s: {pipe.ledger.summary()}"
        pipe.pump(timeout=0.2)


def _stuck(refs) -> list:
    """The calls among `refs` that have not finished half a second after their actor was frozen: they cannot."""
    refs = list(refs)
    return ray.wait(refs, num_returns=len(refs), timeout=0.5)[1] if refs else []


def _new_pid(actor, old: int, timeout_s: float = 120.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            pid = ray.get(actor.pid.remote(), timeout=30)
            if pid != old:
                return pid
        except ray.exceptions.RayActorError:
            pass  # still restarting
        time.sleep(0.5)
    raise AssertionError("the actor did not restart")


def test_killed_sampler_and_reward_actor_lose_nothing_twice(ray_local):
    from ralign.diffusion.policy import build_policy

    sampler = SamplerActor.options(num_cpus=0.5).remote(SPEC)
    reward = RewardActor.options(num_cpus=0.25).remote({"name": "colorfulness"})
    sampler_pid, reward_pid = ray.get([sampler.pid.remote(), reward.pid.remote()])
    pipe = RolloutPipeline([sampler], [reward], PromptCycle(),
                           pipeline_config(request_batch=2, max_inflight_per_sampler=1, max_unconsumed=3))
    weights = {k: v + 0.01 for k, v in build_policy(SPEC).trainable_state().items()}
    pipe.broadcast_async(ray.put(weights_for_transfer(weights)), version=3)
    assert len(pipe.take(2))

    # A sampler killed with a request in flight. Frozen first (SIGSTOP), so what is in flight cannot finish.
    os.kill(sampler_pid, signal.SIGSTOP)
    _pump_until(pipe, lambda: bool(_stuck(pipe.sampling_refs())))
    lost_ids = {i for ref in _stuck(pipe.sampling_refs()) for i in pipe.ids_of(ref)}
    os.kill(sampler_pid, signal.SIGKILL)
    _pump_until(pipe, lambda: lost_ids <= pipe.ledger.lost)
    # Ray restarts it with its initial weights; the pipeline gives it no work until the latest ones are restored.
    _pump_until(pipe, lambda: not pipe.restoring)
    assert _new_pid(sampler, sampler_pid) != sampler_pid
    assert ray.get(sampler.version.remote(), timeout=60) == 3
    assert pipe.ledger.actor_restarts["sampler"] == 1

    # A reward actor killed while scoring: the rollout is scored again (on the restarted actor), once.
    os.kill(reward_pid, signal.SIGSTOP)
    _pump_until(pipe, lambda: bool(_stuck(pipe.scoring_refs())))
    in_scoring = {i for ref in _stuck(pipe.scoring_refs()) for i in pipe.ids_of(ref)}
    os.kill(reward_pid, signal.SIGKILL)
    _pump_until(pipe, lambda: in_scoring <= pipe.ledger.scored)
    assert in_scoring <= pipe.ledger.rescored and not in_scoring & pipe.ledger.lost
    assert pipe.ledger.actor_restarts["reward"] >= 1

    taken = pipe.take(4)
    assert np.isfinite(taken.scores).all() and all(v == 3 for v in taken.versions)
    _balanced(pipe)
    assert pipe.ledger.lost == lost_ids  # the sampler's request, and nothing else
    for actor in (sampler, reward):
        ray.kill(actor)


def test_a_hung_reward_times_out_its_samples_are_quarantined_and_it_restarts(ray_local):
    sampler = SamplerActor.options(num_cpus=0.5).remote(SPEC)
    reward = RewardActor.options(num_cpus=0.25).remote({"name": "colorfulness"})
    reward_pid = ray.get(reward.pid.remote())
    pipe = RolloutPipeline([sampler], [reward], PromptCycle(),
                           pipeline_config(request_batch=2, max_unconsumed=3, reward_timeout_s=3.0))
    os.kill(reward_pid, signal.SIGSTOP)  # stuck, as a process blocked on a dead file system or a driver bug is
    _pump_until(pipe, lambda: bool(pipe.ledger.quarantined))
    assert _new_pid(reward, reward_pid) != reward_pid
    records = pipe.quarantine_log
    assert {r["id"] for r in records} == pipe.ledger.quarantined
    assert all(r["reason"] == "reward timed out after 3s" and r["prompt"] in PROMPTS for r in records)
    assert all(r["image"].ndim == 3 and r["image"].shape[-1] == 3 and r["image"].dtype == np.uint8 for r in records)
    # Work goes on with the restarted actor; what was queued behind the hung call is scored, not lost.
    taken = pipe.take(4)
    assert len(taken.ids) >= 4 and np.isfinite(taken.scores).all()
    _balanced(pipe)
    assert not pipe.ledger.lost and not set(pipe.ledger.consumed) & pipe.ledger.quarantined
    for actor in (sampler, reward):
        ray.kill(actor)


def test_nan_rewards_are_quarantined_with_their_images_and_too_many_stop_the_run(ray_local, tmp_path):
    from ralign.rollout.quarantine import write_quarantine

    sampler = SamplerActor.options(num_cpus=0.5).remote(SPEC)
    spec = {"name": "fault_injection", "inner": {"name": "colorfulness"}, "nan_if_prompt_contains": "blue"}
    reward = RewardActor.options(num_cpus=0.25).remote(spec)
    pipe = RolloutPipeline([sampler], [reward], PromptCycle(), pipeline_config(request_batch=3, max_unconsumed=2))
    taken = pipe.take(6)
    assert all("blue" not in p for p in taken.prompts)  # the update never sees a poisoned sample
    assert pipe.ledger.quarantined and np.isfinite(taken.scores).all()
    files = write_quarantine(pipe.quarantine_log, tmp_path)
    import json

    record = json.loads(next(f for f in files if f.suffix == ".json").read_text())
    assert record["prompt"] == "two blue squares" and record["score"] == "nan" and record["reason"] == "non-finite reward"
    assert (tmp_path / record["image_file"]).is_file()
    _balanced(pipe)

    # One prompt in three is poisoned: above a 20 % limit the run stops, saying why.
    strict = RolloutPipeline([sampler], [reward], PromptCycle(),
                             pipeline_config(request_batch=3, max_unconsumed=2, max_bad_fraction=0.2, min_samples=6))
    with pytest.raises(PipelineAbort, match=r"rewards were NaN/inf or timed out \(33% > train.max_bad_reward_fraction=0.2\)"):
        for _ in range(10):
            strict.take(3)
    _balanced(strict)
    for actor in (sampler, reward):
        ray.kill(actor)


def test_a_reward_that_keeps_failing_stops_the_run_with_its_error(ray_local):
    sampler = SamplerActor.options(num_cpus=0.5).remote(SPEC)
    spec = {"name": "fault_injection", "inner": {"name": "colorfulness"}, "raise_if_prompt_contains": "a"}
    reward = RewardActor.options(num_cpus=0.25).remote(spec)
    pipe = RolloutPipeline([sampler], [reward], PromptCycle(), pipeline_config(request_batch=2, max_reward_errors=3))
    with pytest.raises(PipelineAbort, match=r"3 reward calls failed in a row; the last: InjectedRewardFailure: injected reward failure"):
        pipe.take(2)
    _balanced(pipe)
    assert len(pipe.ledger.lost) >= 6 and not pipe.ledger.consumed
    for actor in (sampler, reward):
        ray.kill(actor)


def test_a_reward_server_that_is_down_is_a_clear_error_at_start(ray_local):
    # `reward.deployment` names an application that is not running: the actor cannot build its client.
    reward = RewardActor.options(num_cpus=0.25).remote({"name": "colorfulness", "deployment": "no-such-app"})
    with pytest.raises(ray.exceptions.RayActorError) as info:
        ray.get(reward.ready.remote(), timeout=120)
    from actors.common import one_line_error

    message = one_line_error(info.value)
    assert "no-such-app" in message or "Serve" in message, message
    assert "\n" not in message
