"""The rollout schedule: which sampler gets which request, where a finished rollout goes, what is dropped, lost or
quarantined, and the ledger that proves every sample is trained on at most once. No Ray here: the Ray shell
(actors/rollout.py) carries out the orders this returns and reports back what happened, so every rule below is
tested in-process (tests/test_rollout_schedule.py).

Three bounds make a run safe for hours:
- at most `ray.max_inflight_per_sampler` requests per sampler;
- at most `max_unconsumed` request batches in flight or queued (back-pressure: when the learner lags,
  samplers are simply not given new work);
- rollouts more than `ray.max_staleness` policy versions behind the learner are dropped and counted.
Faults: a sampler that dies loses its request (its ids are `lost`) and gets no work until its weights are restored;
a reward actor that dies mid-call has the rollout scored again (at most `ray.max_score_attempts` attempts); a call
running longer than `ray.reward_timeout_s` is abandoned (its samples quarantined, its actor restarted); non-finite
scores are quarantined; too many of those, or `ray.max_reward_errors` failed reward calls in a row, stop the run.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ralign.rollout.batch import Chains, Prefixes, SampleBatch

log = logging.getLogger(__name__)

WAIT_TIMEOUT_S = 600.0  # the learner waits at most this long for its next batch
QUARANTINE_IMAGES = 256  # quarantined samples kept with their image for the quarantine artefact
RESTORE_RETRY_S = 0.5  # a restarting actor is asked again this often


class PipelineAbort(RuntimeError):
    """The pipeline cannot go on (a reward keeps failing, or too many rewards are NaN/inf); the message says why."""


@dataclass
class RolloutRequest:
    """One sampler call: these samples, and what the algorithm asks of them (ralign/algorithms/base.py RequestPlan)."""

    ids: list[int]
    prompts: list[str]
    seeds: list[int]
    stop_step: int | None = None  # run only the no-gradient prefix [0, stop_step) and hand the latents over
    grad_steps: tuple[int, ...] = ()
    original_text: bool = False  # TextCraftor: the prefix uses the pretrained text encoder
    metrics_only: bool = False  # a full rollout scored by the reward actors for metrics, never trained on
    attention_steps: tuple[int, ...] = ()  # record these steps' cross-attention for the reward actor (CoMat)


# ---- orders for the shell ----------------------------------------------------------------------------------------
@dataclass
class Sample:
    ticket: int
    sampler: int
    request: RolloutRequest


@dataclass
class Score:
    ticket: int
    reward: int
    batch: Chains


@dataclass
class Restore:
    """Give a restarted actor what it must hold before it gets work (the latest weights), or check it is up."""

    kind: str  # "sampler" | "reward"
    index: int


@dataclass
class Restart:
    """Kill a hung reward actor so that Ray restarts it; its abandoned call (`ticket`) is no longer waited for."""

    reward: int
    ticket: int


@dataclass
class Ledger:
    issued: set[int] = field(default_factory=set)
    produced: set[int] = field(default_factory=set)
    scored: set[int] = field(default_factory=set)
    consumed: list[int] = field(default_factory=list)  # a list, so a double consumption would show
    dropped_stale: set[int] = field(default_factory=set)
    quarantined: set[int] = field(default_factory=set)
    lost: set[int] = field(default_factory=set)
    handed_over: set[int] = field(default_factory=set)  # prefixes for gradient algorithms: the learner scores them
    metrics_only: set[int] = field(default_factory=set)  # full rollouts scored for metrics, never trained on
    unused: set[int] = field(default_factory=set)  # produced and scored, still queued when the run ended
    # Not terminal states: ids whose scoring was re-issued because their reward actor died (each is scored once:
    # the first attempt never returned), and how often an actor death was seen.
    rescored: set[int] = field(default_factory=set)
    actor_restarts: dict[str, int] = field(default_factory=lambda: {"sampler": 0, "reward": 0})

    def check(self) -> None:
        """Every consumed id was scored (or is a handed-over prefix), none twice; nothing consumed was dropped."""
        if len(self.consumed) != len(set(self.consumed)):
            raise AssertionError("a rollout was consumed twice")
        consumed = set(self.consumed)
        if not consumed <= self.scored | self.handed_over:
            raise AssertionError("a rollout was consumed without a score")
        if consumed & self.metrics_only:
            raise AssertionError("a metrics-only rollout was trained on")
        if consumed & (self.dropped_stale | self.quarantined | self.lost):
            raise AssertionError("a dropped rollout was consumed")
        if self.scored & (self.quarantined | self.lost):
            raise AssertionError("a rollout was both scored and quarantined or lost")

    def summary(self) -> dict[str, int]:
        return {
            "issued": len(self.issued), "produced": len(self.produced), "scored": len(self.scored),
            "consumed": len(self.consumed), "dropped_stale": len(self.dropped_stale),
            "quarantined": len(self.quarantined), "lost": len(self.lost), "handed_over": len(self.handed_over),
            "metrics_only": len(self.metrics_only), "unused": len(self.unused), "rescored": len(self.rescored),
            "sampler_restarts": self.actor_restarts["sampler"], "reward_restarts": self.actor_restarts["reward"],
        }

    def terminal(self) -> set[int]:
        return set(self.consumed) | self.dropped_stale | self.quarantined | self.lost | self.metrics_only | self.unused


@dataclass
class _Scoring:
    reward: int
    batch: Chains
    attempt: int


class RolloutSchedule:
    """`cfg` is a TrainConfig (its `ray` section and the bad-reward limit); `prompts(first_id, n)` gives the prompts
    and noise seeds of samples first_id..first_id+n-1; `plan(request_no)` the algorithm's RequestPlan (None: full
    chains); `group_size` samples share a prompt and are never split; `clock` is injectable for tests."""

    def __init__(self, cfg, n_samplers: int, n_rewards: int, prompts: Callable[[int, int], tuple[list[str], list[int]]],
                 plan: Callable[[int], object] | None = None, group_size: int = 1, clock: Callable[[], float] = time.monotonic):
        if n_samplers < 1 or n_rewards < 1:
            raise ValueError("the pipeline needs at least one sampler and one reward actor")
        self.ray = cfg.ray
        self.max_unconsumed = cfg.unconsumed_bound()
        self.max_bad_fraction = cfg.train.max_bad_reward_fraction
        self.per_iteration = cfg.train.batch_size * cfg.ray.learners  # samples all learners take per policy version
        self.final_version = cfg.train.iterations  # the policy's version after the last update (one per iteration)
        self.min_samples_for_bad_fraction = cfg.train.batch_size
        self.n_samplers, self.n_rewards = n_samplers, n_rewards
        self.prompts, self.plan, self.group_size, self.clock = prompts, plan, group_size, clock
        self.ledger = Ledger()
        self.next_id = 0
        self.learner_version = 0
        self.taken_at_version = 0  # samples handed to learners since the policy reached `learner_version`
        self.learner_short = 0  # samples a waiting learner still lacks for the batch it asked for
        self.issued_version: dict[int, int] = {}  # sampling ticket -> policy version when it was issued
        self._tickets = 0
        self.sampling: dict[int, tuple[int, RolloutRequest]] = {}  # ticket -> (sampler, request)
        self.scoring: dict[int, _Scoring] = {}
        self.reward_queues: list[deque[int]] = [deque() for _ in range(n_rewards)]  # tickets, in submission order
        self.reward_head_since = [clock()] * n_rewards  # when each actor started on the call at its queue's head
        self.ready: deque[SampleBatch] = deque()
        self.parked: deque[tuple[Chains, int]] = deque()  # to score once some reward actor is back
        self.taking: list[SampleBatch] = []  # consumed for the learner's next batch, not yet handed out
        self.metric_batches: deque[Chains] = deque(maxlen=256)
        self.metrics_pending: set[int] = set()  # ids of metrics-only requests issued and not yet scored or lost
        self.stats = {"sample_s": 0.0, "score_s": 0.0, "learner_wait_s": 0.0}
        # A restarted actor comes back with its initial weights, and calls sent while it restarts fail: until a
        # restore succeeds it gets no work. (kind, index) -> when to try (None: a restore call is in flight).
        self.restoring: dict[tuple[str, int], float | None] = {}
        self.reward_errors = 0  # consecutive failed reward calls
        self.quarantine_log: list[dict] = []
        self.fatal: PipelineAbort | None = None
        self.draining = False

    # ---- bookkeeping ------------------------------------------------------------------------------------------
    def unconsumed(self) -> int:
        """Request batches in flight, queued or parked (what back-pressure bounds). What the learner's next batch has
        already taken is consumed: counting it would starve a learner whose batch spans more requests than the bound."""
        return len(self.sampling) + len(self.scoring) + len(self.ready) + len(self.parked)

    def usable_room(self) -> int:
        """Samples a request issued now could still be trained on: the takes of this policy version and the next
        `max_staleness` ones, less what they have taken and what is already on its way. Without this bound an
        on-policy run (max_staleness 0) keeps its samplers busy while the learner updates, on rollouts that the
        update makes stale (measured: 576 of 1280 samples dropped in the quickstart)."""
        taking = sum(len(b) for b in self.taking)
        versions = min(self.ray.max_staleness + 1, self.final_version - self.learner_version)  # none after the last update
        return versions * self.per_iteration - self.taken_at_version - taking - self._coming()

    def _coming(self) -> int:
        """Samples sampled, scored or waiting that are fresh enough for the learner's next take."""
        s, v = self.ray.max_staleness, self.learner_version
        coming = sum(len(req.ids) for t, (_, req) in self.sampling.items()
                     if not req.metrics_only and self.issued_version.get(t, v) >= v - s)
        scored_later = [sc.batch for sc in self.scoring.values()] + [b for b, _ in self.parked]
        waiting = [b for b in scored_later if not b.metrics_only] + list(self.ready)  # `ready` holds no metrics rollouts
        return coming + sum(len(b) for b in waiting if min(b.versions) >= v - s)

    def published(self, version: int) -> None:
        """The learner's new weights (version) are on their way to the samplers: what is issued from now on uses them."""
        if version > self.learner_version:
            self.learner_version, self.taken_at_version = int(version), 0

    def _ticket(self) -> int:
        self._tickets += 1
        return self._tickets

    def _lose(self, ids: Sequence[int], why: str) -> None:
        log.warning("rollout %s..%s lost: %s", ids[0], ids[-1], why)
        self.ledger.lost.update(ids)
        self.metrics_pending.difference_update(ids)

    # ---- what to do next --------------------------------------------------------------------------------------
    def orders(self) -> list:
        """Restores that are due, parked rollouts to score, and new requests for idle samplers (within the bounds)."""
        out: list = []
        now = self.clock()
        for key, retry_at in list(self.restoring.items()):
            if retry_at is not None and now >= retry_at:
                self.restoring[key] = None
                out.append(Restore(*key))
        while self.parked:
            if self.fatal is not None:
                batch, _ = self.parked.popleft()
                self._lose(batch.ids, "the run is stopping")
            elif all(("reward", i) in self.restoring for i in range(self.n_rewards)):
                break
            else:
                out.append(self._score(*self.parked.popleft()))
        if self.draining or self.fatal is not None:
            return out
        per_sampler = [0] * self.n_samplers
        for sampler, _ in self.sampling.values():
            per_sampler[sampler] += 1
        for idx in range(self.n_samplers):
            if ("sampler", idx) in self.restoring:
                continue
            while (per_sampler[idx] < self.ray.max_inflight_per_sampler and self.unconsumed() < self.max_unconsumed
                   and (self.usable_room() > 0 or self.learner_short > self._coming())):
                out.append(self._issue(idx))
                per_sampler[idx] += 1
        return out

    def _issue(self, sampler: int) -> Sample:
        n = self.ray.request_batch
        ids = list(range(self.next_id, self.next_id + n))
        self.next_id += n
        prompts, seeds = self.prompts(ids[0], n)
        plan = self.plan(ids[0] // n) if self.plan else None
        fields = {} if plan is None else {"stop_step": plan.stop_step, "grad_steps": tuple(plan.grad_steps),
                                          "original_text": plan.original_text, "metrics_only": plan.metrics_only,
                                          "attention_steps": tuple(plan.attention_steps)}
        request = RolloutRequest(ids, list(prompts), list(seeds), **fields)
        ticket = self._ticket()
        self.sampling[ticket] = (sampler, request)
        self.issued_version[ticket] = self.learner_version
        self.ledger.issued.update(ids)
        if request.metrics_only:
            self.metrics_pending.update(ids)
        return Sample(ticket, sampler, request)

    def _done_sampling(self, ticket: int) -> tuple[int, RolloutRequest]:
        self.issued_version.pop(ticket, None)
        return self.sampling.pop(ticket)

    def _score(self, batch: Chains, attempt: int) -> Score | None:
        up = [i for i in range(self.n_rewards) if ("reward", i) not in self.restoring]
        if not up:
            self.parked.append((batch, attempt))
            return None
        target = min(up, key=lambda i: len(self.reward_queues[i]))
        ticket = self._ticket()
        self.scoring[ticket] = _Scoring(target, batch, attempt)
        if not self.reward_queues[target]:
            self.reward_head_since[target] = self.clock()
        self.reward_queues[target].append(ticket)
        return Score(ticket, target, batch)

    def _left_reward_queue(self, target: int, ticket: int) -> None:
        queue = self.reward_queues[target]
        was_head = bool(queue) and queue[0] == ticket
        queue.remove(ticket)
        if was_head:
            self.reward_head_since[target] = self.clock()  # the actor starts on the next call now

    # ---- what happened: samplers ------------------------------------------------------------------------------
    def sampled(self, ticket: int, batch: SampleBatch) -> list:
        """A sampler returned its rollout; returns the scoring order, if any."""
        self._done_sampling(ticket)
        self.ledger.produced.update(batch.ids)
        self.stats["sample_s"] += batch.sample_s
        if isinstance(batch, Prefixes):
            # A gradient algorithm's prefix: its reward is computed in the learner, after the gradient steps.
            self.ledger.handed_over.update(batch.ids)
            self.ready.append(batch)
            return []
        order = self._score(batch, attempt=1)
        return [order] if order else []

    def sampler_died(self, ticket: int) -> None:
        """Its request is lost (never scored or trained on). Ray restarts it with its initial weights; it gets no
        work until the latest ones are restored."""
        sampler, request = self._done_sampling(ticket)
        self.ledger.actor_restarts["sampler"] += 1
        self.restoring[("sampler", sampler)] = self.clock()
        self._lose(request.ids, "sampler died")

    def sampler_raised(self, ticket: int, why: str) -> None:
        _, request = self._done_sampling(ticket)
        self._lose(request.ids, f"sampler raised {why}")

    # ---- what happened: reward actors -------------------------------------------------------------------------
    def scored(self, ticket: int, batch: Chains) -> None:
        s = self.scoring.pop(ticket)
        self._left_reward_queue(s.reward, ticket)
        self.reward_errors = 0
        self.stats["score_s"] += batch.score_s
        self.metrics_pending.difference_update(batch.ids)
        bad = ~np.isfinite(np.asarray(batch.scores, dtype=float))
        for comp in batch.components.values():
            bad |= ~np.isfinite(np.asarray(comp, dtype=float))
        self.ledger.scored.update(i for i, b in zip(batch.ids, bad) if not b)
        if bad.any():
            self._quarantine(batch, bad, "non-finite reward")
            self._check_bad_fraction()
            batch = batch.select(~bad)
            if not len(batch):
                return
        if batch.metrics_only:
            self.ledger.metrics_only.update(batch.ids)
            self.metric_batches.append(batch)
            return
        self.ready.append(batch)

    def reward_died(self, ticket: int, why: str, cannot_start: bool = False) -> list:
        """The reward actor died during the call (or, `cannot_start`, could not even be built): the rollout is
        scored again on the least-loaded actor, up to the attempt limit; returns that scoring order."""
        s = self.scoring.pop(ticket)
        self._left_reward_queue(s.reward, ticket)
        if cannot_start:
            self._reward_failed(why)  # every call would fail the same way
        elif ("reward", s.reward) not in self.restoring:
            self.ledger.actor_restarts["reward"] += 1
            self.restoring[("reward", s.reward)] = self.clock()
        if s.attempt < self.ray.max_score_attempts and self.fatal is None:
            log.warning("reward actor %d died scoring %s..%s: re-scoring (attempt %d)", s.reward, s.batch.ids[0],
                        s.batch.ids[-1], s.attempt + 1)
            self.ledger.rescored.update(s.batch.ids)
            order = self._score(s.batch, s.attempt + 1)
            return [order] if order else []
        self._lose(s.batch.ids, f"reward actor died {s.attempt} times")
        return []

    def reward_raised(self, ticket: int, why: str) -> None:
        s = self.scoring.pop(ticket)
        self._left_reward_queue(s.reward, ticket)
        self._reward_failed(why)
        self._lose(s.batch.ids, f"reward raised {why.split(':')[0]}")

    def _reward_failed(self, why: str) -> None:
        self.reward_errors += 1
        # The first reason to stop is the one reported: calls already in flight may fail after it.
        if self.fatal is None and self.reward_errors >= self.ray.max_reward_errors:
            self.fatal = PipelineAbort(f"{self.reward_errors} reward calls failed in a row; the last: {why}")

    def hung_rewards(self) -> list[Restart]:
        """Reward calls running longer than the timeout: their samples are quarantined, their actor restarted
        (the calls queued behind it then fail and are scored again on the restarted one)."""
        out = []
        now = self.clock()
        for target, queue in enumerate(self.reward_queues):
            if not queue or now - self.reward_head_since[target] <= self.ray.reward_timeout_s:
                continue
            ticket = queue[0]
            s = self.scoring.pop(ticket)
            self._left_reward_queue(target, ticket)
            self.metrics_pending.difference_update(s.batch.ids)
            self._quarantine(s.batch, np.ones(len(s.batch), bool), f"reward timed out after {self.ray.reward_timeout_s:g}s")
            log.warning("reward actor %d hung for over %gs: restarting it", target, self.ray.reward_timeout_s)
            self.ledger.actor_restarts["reward"] += 1
            self.restoring[("reward", target)] = now + RESTORE_RETRY_S
            self._check_bad_fraction()
            out.append(Restart(target, ticket))
        return out

    # ---- what happened: restores ------------------------------------------------------------------------------
    def restored(self, kind: str, index: int) -> None:
        del self.restoring[(kind, index)]
        log.info("%s actor %d restarted and restored", kind, index)

    def restore_failed(self, kind: str, index: int, why: str, cannot_start: bool) -> None:
        if cannot_start:
            # It cannot start again (a reward server that is down, a model file gone): stop, saying why.
            self.fatal = self.fatal or PipelineAbort(f"a restarted {kind} actor cannot start: {why}")
            del self.restoring[(kind, index)]
        else:
            self.restoring[(kind, index)] = self.clock() + RESTORE_RETRY_S  # still restarting: try again shortly

    # ---- quarantine -------------------------------------------------------------------------------------------
    def _quarantine(self, batch: Chains, bad: np.ndarray, reason: str) -> None:
        ids = [i for i, b in zip(batch.ids, bad) if b]
        self.ledger.quarantined.update(ids)
        log.warning("quarantined %d samples (%s): %s", len(ids), reason, [p for p, b in zip(batch.prompts, bad) if b][:3])
        for k in np.nonzero(bad)[0]:
            keep_image = batch.images is not None and len(self.quarantine_log) < QUARANTINE_IMAGES
            self.quarantine_log.append({
                "id": batch.ids[k], "prompt": batch.prompts[k], "seed": batch.seeds[k], "version": batch.versions[k],
                "reason": reason,
                "score": None if batch.scores is None else float(batch.scores[k]),
                "components": {c: float(v[k]) for c, v in batch.components.items()},
                "image": batch.images[k] if keep_image else None,
            })

    def _check_bad_fraction(self) -> None:
        bad, good = len(self.ledger.quarantined), len(self.ledger.scored)
        if bad + good >= self.min_samples_for_bad_fraction and bad / (bad + good) > self.max_bad_fraction:
            self.fatal = PipelineAbort(
                f"{bad} of {bad + good} rewards were NaN/inf or timed out ({bad / (bad + good):.0%} > "
                f"train.max_bad_reward_fraction={self.max_bad_fraction}); stopping")

    # ---- the learner's side -----------------------------------------------------------------------------------
    def take(self, n: int, learner_version: int | None = None) -> SampleBatch | None:
        """The learner's next `n` samples as one batch once enough fresh ones are scored (None: not yet). Fresh
        rollouts are consumed as they become ready (so back-pressure never starves the learner); one is split only
        between groups, the rest staying queued, unconsumed. Raises the pipeline's fatal error, if any."""
        if self.fatal is not None:
            raise self.fatal
        if learner_version is not None:
            self.published(learner_version)
        count = sum(len(b) for b in self.taking)
        while count < n and self.ready:
            batch = self.ready.popleft()
            if self.learner_version - min(batch.versions) > self.ray.max_staleness:
                self.ledger.dropped_stale.update(batch.ids)
                continue
            need = n - count
            if len(batch) > need:
                cut = self._group_cut(batch, need)
                if cut == 0:  # its first group does not fit: hand out what is there
                    self.ready.appendleft(batch)
                    break
                self.ready.appendleft(batch.select(range(cut, len(batch))))
                batch = batch.select(range(cut))
            self.ledger.consumed.extend(batch.ids)
            self.taking.append(batch)
            count += len(batch)
        full = count >= n or (count and self.ready and self._group_cut(self.ready[0], n - count) == 0)
        if not full:
            # What the learner lacks is issued even beyond the room (after a learner restart it takes a version's
            # batch a second time).
            self.learner_short = n - count
            return None
        self.learner_short = 0
        out, self.taking = type(self.taking[0]).concat(self.taking), []
        self.taken_at_version += len(out)
        return out

    def _group_cut(self, batch: SampleBatch, need: int) -> int:
        """The largest split point <= need that does not cut a group of samples of one prompt."""
        if self.group_size == 1:
            return need
        groups = [i // self.group_size for i in batch.ids]
        cut = need
        while 0 < cut < len(batch) and groups[cut] == groups[cut - 1]:
            cut -= 1
        return cut

    def in_flight(self) -> bool:
        return bool(self.sampling or self.scoring or self.parked)

    def finish(self) -> None:
        """At shutdown (after the in-flight calls are done): what no learner took is accounted as unused."""
        for batch in self.taking:
            for i in batch.ids:
                self.ledger.consumed.remove(i)
            self.ready.appendleft(batch)
        self.taking = []
        while self.ready:
            self.ledger.unused.update(self.ready.popleft().ids)

    def start_at(self, next_id: int, learner_version: int) -> None:
        """Continue a run: sample ids from `next_id` (rounded up to a request boundary, where a new request and
        group begins) and judge staleness against `learner_version`."""
        step = self.ray.request_batch
        self.next_id = -(-max(self.next_id, int(next_id)) // step) * step
        self.learner_version, self.taken_at_version = int(learner_version), 0

    def abandon_unused(self) -> None:
        """After a learner restart (and a drain): what was produced for the interrupted attempt is never trained
        on; it is counted as dropped-stale."""
        self.ledger.dropped_stale.update(self.ledger.unused)
        self.ledger.unused.clear()
        self.taken_at_version = 0  # the restarted learner takes its batches again

    def summary(self) -> dict:
        return {"ledger": self.ledger.summary(), "next_id": self.next_id, "learner_version": self.learner_version,
                "sample_s": self.stats["sample_s"], "score_s": self.stats["score_s"],
                "learner_wait_s": self.stats["learner_wait_s"]}

    def final_ledger(self) -> dict:
        """The checked ledger at the end of a run (call after the in-flight calls are done)."""
        self.ledger.check()
        return {**self.ledger.summary(), "balanced": self.ledger.terminal() == self.ledger.issued}

    def take_metric_batches(self) -> list[Chains]:
        out = list(self.metric_batches)
        self.metric_batches.clear()
        return out
