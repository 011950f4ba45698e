"""The rollout schedule's rules without Ray: orders in, events out, and the ledger balanced after every fault."""

from __future__ import annotations

import numpy as np
import pytest

from ralign.algorithms.base import RequestPlan
from ralign.rollout.batch import Chains, Prefixes
from ralign.rollout.schedule import PipelineAbort, Restart, Restore, RolloutSchedule, Sample, Score

from rollout_prompts import PromptCycle, pipeline_config  # tests/ is on the path (rootdir conftest)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def chains(request, version: int = 0, scores=None) -> Chains:
    n = len(request.ids)
    return Chains(list(request.ids), list(request.prompts), list(request.seeds), [version] * n,
                  latents=np.zeros((n, 3, 4, 2, 2), np.float32), log_probs=np.zeros((n, 2), np.float32),
                  timesteps=np.array([10, 5]), images=np.zeros((n, 4, 4, 3), np.uint8),
                  scores=None if scores is None else np.asarray(scores, float), metrics_only=request.metrics_only)


def scored(batch: Chains, scores=None) -> Chains:
    batch.scores = np.asarray(scores if scores is not None else np.arange(len(batch), dtype=float) / 10)
    return batch


def of(orders, kind):
    return [o for o in orders if isinstance(o, kind)]


def balanced(s: RolloutSchedule) -> None:
    """Let every call still in flight return (as the shell's drain does), then check the ledger."""
    s.draining = True
    for ticket, (_, request) in list(s.sampling.items()):
        for order in s.sampled(ticket, chains(request)):
            s.scored(order.ticket, scored(order.batch))
    for ticket, scoring in list(s.scoring.items()):
        s.scored(ticket, scored(scoring.batch))
    s.finish()
    s.ledger.check()
    assert s.ledger.terminal() == s.ledger.issued


def test_backpressure_bounds_what_is_issued_and_take_consumes_each_sample_once():
    s = RolloutSchedule(pipeline_config(request_batch=2, max_inflight_per_sampler=2, max_unconsumed=3), 2, 1, PromptCycle())
    first = of(s.orders(), Sample)
    assert len(first) == 3 and s.unconsumed() == 3  # 2 + 1: the unconsumed bound, not the in-flight one, binds
    assert of(s.orders(), Sample) == []
    taken = []
    for _ in range(6):
        pending = of(s.orders(), Sample) + first
        first = []
        for order in pending:
            (score,) = s.sampled(order.ticket, chains(order.request))
            s.scored(score.ticket, scored(score.batch))
        batch = s.take(2)
        assert batch is not None and len(batch) == 2 and s.unconsumed() <= 3
        taken += batch.ids
    assert len(taken) == len(set(taken)) == len(s.ledger.consumed)
    balanced(s)


def test_on_policy_samplers_wait_for_the_new_weights_instead_of_sampling_stale_rollouts():
    cfg = pipeline_config(request_batch=2, max_inflight_per_sampler=4, max_unconsumed=8, max_staleness=0, iterations=3)
    s = RolloutSchedule(cfg, 1, 1, PromptCycle())  # train.batch_size 8: 4 requests per policy version
    for version in range(3):
        pending = []
        while s.take(8, learner_version=version) is None:  # asked for after every rollout: it arrives part by part
            pending += of(s.orders(), Sample)
            assert pending, "the learner waits for samples that were never issued"
            order = pending.pop(0)
            (score,) = s.sampled(order.ticket, chains(order.request, version))
            s.scored(score.ticket, scored(score.batch))
        assert not pending and not s.sampling  # a waiting learner got what it lacked, not more
        # The learner updates now: anything sampled before it publishes would be one version too old.
        assert of(s.orders(), Sample) == []
        s.published(version + 1)
    assert len(s.ledger.consumed) == 24 and not s.ledger.dropped_stale
    # After the run's last update (train.iterations=3 here) nothing more is sampled for training.
    s.published(cfg.train.iterations)
    assert of(s.orders(), Sample) == [] and not s.ledger.issued - set(s.ledger.consumed)
    balanced(s)


def test_a_learner_that_restarts_is_never_left_waiting():
    s = RolloutSchedule(pipeline_config(request_batch=2, max_inflight_per_sampler=4, max_staleness=0), 1, 1, PromptCycle())
    for order in of(s.orders(), Sample):
        (score,) = s.sampled(order.ticket, chains(order.request))
        s.scored(score.ticket, scored(score.batch))
    assert s.take(8, learner_version=0) is not None
    # The learner died before publishing and comes back at version 0: it asks for the same version's batch again.
    s.abandon_unused()
    assert s.take(8, learner_version=0) is None and of(s.orders(), Sample)
    balanced(s)


def test_a_rollout_is_split_only_at_group_boundaries():
    s = RolloutSchedule(pipeline_config(request_batch=4, max_unconsumed=4), 1, 1, PromptCycle(), group_size=2)
    for order in of(s.orders(), Sample):
        (score,) = s.sampled(order.ticket, chains(order.request))
        # a NaN breaks the first group of the first request down to one sample
        values = [float("nan"), 0.1, 0.2, 0.3] if order.request.ids[0] == 0 else None
        s.scored(score.ticket, scored(score.batch, values))
    batch = s.take(2)
    assert batch.ids == [1]  # the incomplete group alone: the next group would not fit whole
    assert s.take(2).ids == [2, 3]


def test_stale_rollouts_are_dropped_and_counted():
    s = RolloutSchedule(pipeline_config(request_batch=2, max_staleness=1, max_unconsumed=4), 1, 1, PromptCycle())
    for order in of(s.orders(), Sample):
        (score,) = s.sampled(order.ticket, chains(order.request, version=0))
        s.scored(score.ticket, scored(score.batch))
    assert s.take(2, learner_version=2) is None  # everything queued is version 0: two versions behind
    assert len(s.ledger.dropped_stale) == 4 and not s.ledger.consumed
    balanced(s)


def test_a_dead_sampler_loses_its_request_and_gets_work_only_after_its_weights_are_restored():
    clock = Clock()
    s = RolloutSchedule(pipeline_config(request_batch=2, max_inflight_per_sampler=1, max_unconsumed=3), 1, 1, PromptCycle(), clock=clock)
    (order,) = of(s.orders(), Sample)
    s.sampler_died(order.ticket)
    assert s.ledger.lost == set(order.request.ids) and s.ledger.actor_restarts["sampler"] == 1
    orders = s.orders()
    assert of(orders, Restore) == [Restore("sampler", 0)] and not of(orders, Sample)  # no work until restored
    s.restore_failed("sampler", 0, "RayActorError: restarting", cannot_start=False)
    clock.now += 1.0
    assert of(s.orders(), Restore) == [Restore("sampler", 0)]  # tried again
    s.restored("sampler", 0)
    (order,) = of(s.orders(), Sample)
    (score,) = s.sampled(order.ticket, chains(order.request))
    s.scored(score.ticket, scored(score.batch))
    balanced(s)


def test_a_dead_reward_actor_has_its_rollout_rescored_once_then_lost():
    s = RolloutSchedule(pipeline_config(request_batch=2, max_inflight_per_sampler=1, max_unconsumed=3, max_score_attempts=2),
                        1, 2, PromptCycle())
    (order,) = of(s.orders(), Sample)
    (score,) = s.sampled(order.ticket, chains(order.request))
    (again,) = s.reward_died(score.ticket, "RayActorError: died")
    assert again.reward == 1  # the other actor: the first one is restarting
    assert s.ledger.rescored == set(order.request.ids)
    assert s.reward_died(again.ticket, "RayActorError: died") == []  # the second attempt was the last
    assert s.ledger.lost == set(order.request.ids) and not s.ledger.scored
    balanced(s)


def test_rollouts_wait_parked_while_every_reward_actor_restores():
    s = RolloutSchedule(pipeline_config(request_batch=2, max_inflight_per_sampler=1, max_unconsumed=3), 1, 1, PromptCycle())
    (order,) = of(s.orders(), Sample)
    (score,) = s.sampled(order.ticket, chains(order.request))
    assert s.reward_died(score.ticket, "RayActorError: died") == []  # nowhere to score it
    assert len(s.parked) == 1
    orders = s.orders()
    assert of(orders, Restore) == [Restore("reward", 0)] and not of(orders, Score)
    s.restored("reward", 0)
    (rescore,) = of(s.orders(), Score)
    s.scored(rescore.ticket, scored(rescore.batch))
    assert s.take(2).ids == order.request.ids
    balanced(s)


def test_a_hung_reward_call_is_quarantined_and_its_actor_restarted():
    clock = Clock()
    s = RolloutSchedule(pipeline_config(request_batch=2, max_inflight_per_sampler=1, max_unconsumed=3, reward_timeout_s=5.0),
                        1, 1, PromptCycle(), clock=clock)
    (order,) = of(s.orders(), Sample)
    s.sampled(order.ticket, chains(order.request))
    clock.now = 4.0
    assert s.hung_rewards() == []
    clock.now = 6.0
    (restart,) = s.hung_rewards()
    assert restart.reward == 0 and restart.ticket not in s.scoring
    assert s.ledger.quarantined == set(order.request.ids)
    assert {r["reason"] for r in s.quarantine_log} == {"reward timed out after 5s"}
    balanced(s)


def test_nan_scores_are_quarantined_and_too_many_stop_the_run():
    s = RolloutSchedule(pipeline_config(request_batch=3, max_unconsumed=2, max_bad_fraction=0.2, min_samples=6), 1, 1, PromptCycle())
    with pytest.raises(PipelineAbort, match=r"2 of 6 rewards were NaN/inf or timed out \(33% > train.max_bad_reward_fraction=0.2\)"):
        for _ in range(3):
            for order in of(s.orders(), Sample):
                (score,) = s.sampled(order.ticket, chains(order.request))
                s.scored(score.ticket, scored(score.batch, [0.1, float("nan"), 0.3]))
            s.take(2)
    assert all(not np.isfinite(r["score"]) for r in s.quarantine_log)
    balanced(s)


def test_failing_rewards_stop_the_run_after_the_limit():
    # Four calls in flight, all failing: the run stops at the third, and the one that fails after it (it was already
    # running) does not change the reason reported.
    s = RolloutSchedule(pipeline_config(request_batch=2, max_inflight_per_sampler=4, max_unconsumed=4, max_reward_errors=3),
                        1, 1, PromptCycle())
    orders = of(s.orders(), Sample)
    assert len(orders) == 4
    for i, order in enumerate(orders):
        (score,) = s.sampled(order.ticket, chains(order.request))
        s.reward_raised(score.ticket, f"InjectedRewardFailure: boom {i}")
    with pytest.raises(PipelineAbort, match="^3 reward calls failed in a row; the last: InjectedRewardFailure: boom 2$"):
        s.take(2)
    assert of(s.orders(), Sample) == []  # a stopping run issues nothing
    assert len(s.ledger.lost) == 8
    balanced(s)


def test_gradient_plans_shape_requests_and_prefixes_skip_the_reward_actors():
    plans = {0: RequestPlan(stop_step=3, grad_steps=(3,)), 1: RequestPlan(metrics_only=True)}
    s = RolloutSchedule(pipeline_config(request_batch=2, max_inflight_per_sampler=2, max_unconsumed=4), 1, 1, PromptCycle(),
                        plan=lambda no: plans[no % 2])
    prefix_order, metrics_order = of(s.orders(), Sample)
    assert prefix_order.request.stop_step == 3 and prefix_order.request.grad_steps == (3,)
    assert metrics_order.request.metrics_only and metrics_order.request.stop_step is None
    r = prefix_order.request
    prefixes = Prefixes(list(r.ids), r.prompts, r.seeds, [0, 0], np.zeros((2, 4, 2, 2), np.float32), [3, 3], [(3,), (3,)])
    assert s.sampled(prefix_order.ticket, prefixes) == []  # handed over: the learner scores it
    (score,) = s.sampled(metrics_order.ticket, chains(metrics_order.request))
    s.scored(score.ticket, scored(score.batch))
    assert s.metrics_pending == set() and len(s.take_metric_batches()) == 1
    batch = s.take(2)
    assert isinstance(batch, Prefixes) and batch.ids == list(r.ids)
    assert s.ledger.handed_over == set(r.ids) and s.ledger.metrics_only == set(metrics_order.request.ids)
    balanced(s)


def test_a_batch_larger_than_the_backpressure_bound_is_still_filled():
    s = RolloutSchedule(pipeline_config(request_batch=3, max_unconsumed=2), 1, 1, PromptCycle())
    batch = None
    while batch is None:
        for order in of(s.orders(), Sample):
            (score,) = s.sampled(order.ticket, chains(order.request))
            s.scored(score.ticket, scored(score.batch, [0.1, float("nan"), 0.3]))
        batch = s.take(6)
    assert len(batch) == 6 and np.isfinite(batch.scores).all()
    balanced(s)


def test_a_resumed_run_continues_at_a_request_boundary_and_drops_what_it_had():
    s = RolloutSchedule(pipeline_config(request_batch=4, max_unconsumed=2), 1, 1, PromptCycle(), group_size=2)
    for order in of(s.orders(), Sample):
        (score,) = s.sampled(order.ticket, chains(order.request))
        s.scored(score.ticket, scored(score.batch))
    s.finish()  # the interrupted attempt's rollouts are left over
    s.abandon_unused()
    s.start_at(next_id=9, learner_version=3)
    assert s.next_id == 12 and s.learner_version == 3  # 9 rounded up to the next request of 4
    assert s.ledger.dropped_stale == set(range(8)) and s.final_ledger()["balanced"]
    (order, *_) = of(s.orders(), Sample)
    assert order.request.ids[0] == 12


def _serve_until_taken(s: RolloutSchedule, n: int, learner_version: int, rounds: int = 20):
    """Sample and score whatever the schedule orders until the learner's take of `n` fills (None after `rounds`)."""
    for _ in range(rounds):
        batch = s.take(n, learner_version=learner_version)
        if batch is not None:
            return batch
        for order in of(s.orders(), Sample):
            (score,) = s.sampled(order.ticket, chains(order.request, version=s.issued_version[order.ticket]))
            s.scored(score.ticket, scored(score.batch))
    return None


def test_a_learner_restarted_before_any_checkpoint_starts_over_and_is_served():
    # The coordinator's `served_a_learner` is true once anything was consumed; the restarted learner group (no
    # checkpoint registered yet) then calls resume_from(..., next_id=0) at version 0, which is this sequence.
    s = RolloutSchedule(pipeline_config(request_batch=4, max_inflight_per_sampler=2, max_staleness=0), 1, 1, PromptCycle())
    assert not s.ledger.consumed
    for version in (0, 1, 2):  # the first attempt trains three iterations, then dies
        assert _serve_until_taken(s, 8, learner_version=version) is not None
    assert s.ledger.consumed
    s.abandon_unused()
    s.start_at(next_id=0, learner_version=0)
    first = _serve_until_taken(s, 8, learner_version=0)
    assert first is not None and min(first.ids) >= 24  # fresh ids: nothing of the first attempt is trained on twice
    assert set(first.versions) == {0}
    assert _serve_until_taken(s, 8, learner_version=1) is not None
    balanced(s)
