"""Sampler and reward actors, and the asynchronous rollout pipeline that connects them.

The actors are thin shells: a `SamplerActor` owns a `DiffusionPolicy` and turns (ids, prompts, seeds) into
trajectories; a `RewardActor` owns a reward and scores finished rollouts. A rollout carries what the reward needs
beyond its images: the final latents always, and the cross-attention maps of the steps the request names when the
reward scores attention (CoMat); a reward that trains in the learner (CoMat's discriminator) gets the learner's
weights through `set_shared_weights`, queued like the samplers' weights. The `RolloutPipeline` (driver side) keeps
samplers busy without waiting for rewards: a finished rollout goes to a reward actor at once and its sampler gets the
next request. Three bounds make it safe to run for hours:
- at most `max_inflight_per_sampler` requests per sampler;
- at most `max_unconsumed` rollouts produced but not yet consumed by the learner (back-pressure: when the learner
  lags, samplers are simply not given new work);
- rollouts whose policy version is more than `max_staleness` behind the learner are dropped and counted.
A ledger records every rollout id as issued / produced / scored / consumed / dropped / quarantined, so tests (and
operators) can check that each is trained on at most once and none goes missing.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch

from actors.common import actor_device, set_threads, weights_from_transfer
from ralign.diffusion.attention_capture import pack_maps, select_samples, unpack_maps
from ralign.diffusion.text_encoding import token_offsets

log = logging.getLogger(__name__)


@dataclass
class RolloutRequest:
    ids: list[int]
    prompts: list[str]
    seeds: list[int]
    # Gradient algorithms: run only the no-gradient prefix, steps [0, stop_step), and hand the latents over.
    stop_step: int | None = None
    grad_steps: list[int] | None = None
    original_text: bool = False  # TextCraftor: the prefix uses the pretrained text encoder
    metrics_only: bool = False  # a full rollout scored by the reward actors for metrics, never trained on
    attention_steps: list[int] | None = None  # record these steps' cross-attention for the reward actor (CoMat)


@dataclass
class Rollout:
    """One batch of sampled chains, as numpy arrays (zero-copy through Ray's object store)."""

    ids: list[int]
    prompts: list[str]
    seeds: list[int]
    version: int
    latents: np.ndarray  # full: (B, K+1, C, H, W) float32; prefix: (B, C, H, W) at start_step
    log_probs: np.ndarray  # (B, K); empty for a prefix
    timesteps: np.ndarray  # (K,)
    images: np.ndarray | None  # (B, H, W, 3) uint8; None for a prefix
    kind: str = "full"  # full | prefix
    start_step: int = 0
    grad_steps: list[int] = field(default_factory=list)
    metrics_only: bool = False
    sample_s: float = 0.0
    scores: np.ndarray | None = None  # (B,)
    components: dict[str, np.ndarray] = field(default_factory=dict)
    score_s: float = 0.0
    # Rewards that score more than images (ralign/rewards/base.py): the recorded cross-attention maps, packed per
    # group as (steps, layers, B, side, side, tokens), and each prompt's token character spans.
    attention: dict[str, np.ndarray] | None = None
    token_offsets: list[list[tuple[int, int]]] | None = None


@ray.remote(max_restarts=-1, max_task_retries=0)
class SamplerActor:
    def __init__(self, policy_spec: dict, threads: int = 1, use_gpu: bool = False):
        set_threads(threads)
        torch.manual_seed(0)  # LoRA initialisation identical across samplers and learner
        from ralign.diffusion.policy import build_policy

        self.policy = build_policy({**policy_spec, "device": actor_device(use_gpu)})
        self.fingerprint_at_start = self.policy.base_fingerprint()

    def set_weights(self, state: dict, version: int) -> int:
        self.policy.load_trainable_state(weights_from_transfer(state), version)
        return version

    def version(self) -> int:
        return self.policy.version

    def fingerprint(self) -> str:
        return self.fingerprint_at_start

    def pid(self) -> int:
        return os.getpid()


    def rollout(self, request: RolloutRequest) -> Rollout:
        start = time.perf_counter()
        if request.stop_step is not None:
            latents = self.policy.sample_prefix(request.prompts, request.seeds, request.stop_step, request.original_text)
            return Rollout(
                ids=list(request.ids), prompts=list(request.prompts), seeds=list(request.seeds), version=self.policy.version,
                latents=latents.cpu().numpy(), log_probs=np.zeros((len(request.ids), 0), np.float32), timesteps=np.zeros(0, np.int64),
                images=None, kind="prefix", start_step=request.stop_step, grad_steps=list(request.grad_steps or []),
                sample_s=time.perf_counter() - start,
            )
        traj = self.policy.sample(request.prompts, request.seeds, attention_steps=request.attention_steps or ())
        images = (traj.images.permute(0, 2, 3, 1).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        attention = offsets = None
        if traj.attention is not None:
            attention = pack_maps(traj.attention)
            offsets = [token_offsets(self.policy.tokenizer, p) for p in request.prompts]
        return Rollout(
            ids=list(request.ids), prompts=list(request.prompts), seeds=list(request.seeds), version=self.policy.version,
            latents=traj.latents.cpu().numpy(), log_probs=traj.log_probs.cpu().numpy(), timesteps=traj.timesteps.cpu().numpy(),
            images=images, metrics_only=request.metrics_only, sample_s=time.perf_counter() - start,
            attention=attention, token_offsets=offsets,
        )


@ray.remote(max_restarts=-1, max_task_retries=0)
class RewardActor:
    def __init__(self, reward_spec: dict, threads: int = 1, use_gpu: bool = False):
        set_threads(threads)
        from ralign.rewards.registry import build_reward

        self.device = actor_device(use_gpu)
        spec = dict(reward_spec)
        deployment = spec.pop("deployment", None)
        if deployment:
            # Scores come from a running reward application (Ray Serve) instead of models in this actor.
            from actors.serve import ServedReward

            self.reward = ServedReward(deployment, expected_reward=spec["name"])
        else:
            self.reward = build_reward({**spec, "device": self.device})

    def ready(self) -> str:
        """Answers once the reward is built: a reward that cannot start (a reward server that is down, a missing
        checkpoint) fails here, at start-up, instead of on the first rollout."""
        return getattr(self.reward, "name", type(self.reward).__name__)

    def pid(self) -> int:
        return os.getpid()

    def set_shared_weights(self, state: dict[str, torch.Tensor]) -> None:
        """The learner's current weights of a reward that trains alongside the policy (CoMat's discriminator)."""
        self.reward.load_shared_weights(weights_from_transfer(state))

    @torch.no_grad()
    def score(self, rollout: Rollout) -> Rollout:
        start = time.perf_counter()
        images = torch.from_numpy(rollout.images).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        inputs = {}
        # What the sampler shipped beyond the images, for rewards that score it (a full rollout's last latents are
        # the final latents before decoding).
        if getattr(self.reward, "uses_attention", False) and rollout.attention is not None:
            inputs["attention"] = {"maps": unpack_maps(rollout.attention, self.device), "token_offsets": rollout.token_offsets}
        if getattr(self.reward, "uses_latents", False) and rollout.kind == "full":
            inputs["latents"] = torch.from_numpy(rollout.latents[:, -1]).to(self.device)
        out = self.reward(images, rollout.prompts, **inputs)
        rollout.scores = out.score.float().cpu().numpy()
        rollout.components = {k: v.float().cpu().numpy() for k, v in out.components.items()}
        rollout.attention = None  # scored: no need to carry the maps back through the object store
        rollout.score_s = time.perf_counter() - start
        return rollout


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
class PipelineConfig:
    batch_per_request: int = 4
    max_inflight_per_sampler: int = 1
    max_unconsumed: int = 8  # rollout batches produced but not yet taken by the learner
    max_staleness: int = 1  # versions
    wait_timeout_s: float = 600.0
    # A reward call running longer than this (counted from when its actor started on it) is abandoned: its samples
    # are quarantined and the actor is restarted (a hung actor would hold every request queued behind it).
    reward_timeout_s: float = 600.0
    max_score_attempts: int = 3  # scoring re-issued when a reward actor dies, at most this many attempts
    # This many reward calls failing in a row (the reward raised, or its actor cannot start) stops the run with the
    # last error: a reward server that is down is retried inside each call (ServedReward), not forever here.
    max_reward_errors: int = 3
    max_bad_fraction: float = 1.0  # quarantined / (scored + quarantined) above this stops the run ...
    min_samples_for_bad_fraction: int = 8  # ... once at least this many samples were scored
    quarantine_images: int = 256  # quarantined samples kept with their image for the quarantine artefact


class PipelineAbort(RuntimeError):
    """The pipeline cannot go on (a reward keeps failing, or too many rewards are NaN/inf); the message says why."""


class RolloutPipeline:
    """Driver-side pump: issues requests, routes finished rollouts to reward actors, hands scored ones out."""

    def __init__(self, samplers: list, rewards: list, prompt_source, cfg: PipelineConfig, plan_fn=None):
        if not samplers or not rewards:
            raise ValueError("the pipeline needs at least one sampler and one reward actor")
        self.samplers, self.rewards, self.cfg = samplers, rewards, cfg
        self.prompt_source = prompt_source  # callable(n) -> (prompts, seeds)
        # plan_fn(first_id) -> dict of RolloutRequest fields (stop_step, grad_steps, original_text, metrics_only), or None
        # for plain full rollouts (DPOK).
        self.plan_fn = plan_fn
        self.metric_rollouts: deque[Rollout] = deque(maxlen=256)
        self.ledger = Ledger()
        self.next_id = 0
        self.sampling: dict[Any, int] = {}  # ref -> sampler index
        self.scoring: dict[Any, int] = {}  # ref -> reward index
        self.reward_load = [0] * len(rewards)
        self.ready: deque[Rollout] = deque()
        self.learner_version = 0
        self.requests: dict[Any, RolloutRequest] = {}
        self.wait_s = {"learner": 0.0}
        self.metrics_pending: set[int] = set()  # ids of metrics-only requests issued and not yet scored or lost
        self.stats = {"sample_s": 0.0, "score_s": 0.0}
        # Fault handling: what a restarted actor must be given again, each scoring's input (to re-issue it) and
        # attempt count, each reward actor's queue in submission order (its head is the call it is running).
        self.latest_weights: tuple | None = None  # (object ref, version) last broadcast to the samplers
        self.latest_reward_weights = None  # object ref last shared with the reward actors
        self.score_inputs: dict[Any, tuple[Rollout, int]] = {}
        self.reward_queues: list[deque] = [deque() for _ in rewards]
        self.reward_head_since = [time.monotonic()] * len(rewards)
        self.reward_errors = 0  # consecutive failed reward calls
        self.quarantine_log: list[dict] = []  # quarantined samples not yet written out (QuarantineRecord fields)
        self.fatal: PipelineAbort | None = None
        self.draining = False
        # A restarted actor comes back with its initial weights, and calls sent while it restarts fail: until a call
        # that restores its weights succeeds it gets no work. (kind, index) -> (pending call or None, retry time).
        self.restoring: dict[tuple[str, int], tuple[Any, float]] = {}
        self.parked: deque[tuple[Rollout, int]] = deque()  # rollouts to score while every reward actor restores

    # -- bookkeeping ---------------------------------------------------------------------------------------------
    def _unconsumed(self) -> int:
        return len(self.sampling) + len(self.scoring) + len(self.ready) + len(self.parked)

    def in_flight(self) -> list:
        """Object refs of every request still with a sampler or a reward actor."""
        return list(self.sampling) + list(self.scoring)

    def issue(self) -> None:
        """Give idle samplers new requests, within the in-flight and unconsumed bounds."""
        self._advance_restores()
        self._score_parked()
        if self.draining or self.fatal is not None:
            return
        per_sampler = [0] * len(self.samplers)
        for idx in self.sampling.values():
            per_sampler[idx] += 1
        for idx, sampler in enumerate(self.samplers):
            if ("sampler", idx) in self.restoring:
                continue
            while per_sampler[idx] < self.cfg.max_inflight_per_sampler and self._unconsumed() < self.cfg.max_unconsumed:
                prompts, seeds = self.prompt_source(self.cfg.batch_per_request)
                ids = list(range(self.next_id, self.next_id + len(prompts)))
                self.next_id += len(prompts)
                request = RolloutRequest(ids, list(prompts), list(seeds), **(self.plan_fn(ids[0]) if self.plan_fn else {}))
                ref = sampler.rollout.remote(request)
                self.sampling[ref] = idx
                self.requests[ref] = request
                self.ledger.issued.update(ids)
                if request.metrics_only:
                    self.metrics_pending.update(ids)
                per_sampler[idx] += 1

    def _route(self, ref) -> None:
        if ref in self.sampling:
            sampler_idx = self.sampling.pop(ref)
            request = self.requests.pop(ref)
            try:
                rollout: Rollout = ray.get(ref)
            except ray.exceptions.RayActorError:
                # The sampler died mid-request: those ids are lost (never scored or trained on). Ray restarts it
                # with its initial weights; the latest ones are queued ahead of its next request.
                self.ledger.actor_restarts["sampler"] += 1
                self.restoring[("sampler", sampler_idx)] = (None, 0.0)
                self._lose(request, "sampler died")
                return
            except ray.exceptions.RayTaskError as exc:
                self._lose(request, f"sampler raised {exc.cause.__class__.__name__ if exc.cause else 'an error'}")
                return
            self.ledger.produced.update(rollout.ids)
            self.stats["sample_s"] += rollout.sample_s
            if rollout.kind == "prefix":
                # A gradient algorithm's prefix: its reward is computed in the learner, after the gradient steps.
                self.ledger.handed_over.update(rollout.ids)
                self.ready.append(rollout)
                return
            self._score(rollout, attempt=1)
        else:
            target = self.scoring.pop(ref)
            self.reward_load[target] -= 1
            self._left_reward_queue(target, ref)
            request = self.requests.pop(ref)
            sent, attempt = self.score_inputs.pop(ref)
            try:
                rollout = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                self._reward_actor_died(target, exc)
                if attempt < self.cfg.max_score_attempts and self.fatal is None:
                    # The rollout never got a score: score it again (on the least-loaded actor), so nothing is lost.
                    log.warning("reward actor %d died scoring %s..%s: re-scoring (attempt %d)", target, request.ids[0],
                                request.ids[-1], attempt + 1)
                    self.ledger.rescored.update(request.ids)
                    self._score(sent, attempt + 1)
                    return
                self._lose(request, f"reward actor died {attempt} times")
                return
            except ray.exceptions.RayTaskError as exc:
                self._reward_failed(exc)
                self._lose(request, f"reward raised {exc.cause.__class__.__name__ if exc.cause else 'an error'}")
                return
            self.reward_errors = 0
            self.stats["score_s"] += rollout.score_s
            self.metrics_pending.difference_update(rollout.ids)
            bad = ~np.isfinite(rollout.scores)
            for comp in rollout.components.values():
                bad |= ~np.isfinite(comp)
            self.ledger.scored.update(i for i, b in zip(rollout.ids, bad) if not b)
            if bad.any():
                self._quarantine(rollout, bad, "non-finite reward")
                self._check_bad_fraction()
                keep = ~bad
                rollout = _subset(rollout, keep)
                if not rollout.ids:
                    return
            if rollout.metrics_only:
                self.ledger.metrics_only.update(rollout.ids)
                self.metric_rollouts.append(rollout)
                return
            self.ready.append(rollout)

    def pump(self, timeout: float = 0.0) -> None:
        self.issue()
        refs = list(self.sampling) + list(self.scoring)
        if not refs:
            if self.restoring:
                time.sleep(min(timeout, 0.05))  # only restarting actors to wait for: poll them gently
            return
        done, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        for ref in done:
            self._route(ref)
        # Collect anything else already finished without blocking.
        more, _ = ray.wait([r for r in refs if r not in done], num_returns=len(refs) - len(done), timeout=0)
        for ref in more:
            self._route(ref)
        self._time_out_hung_rewards()
        self.issue()

    # -- faults --------------------------------------------------------------------------------------------------
    def _score(self, rollout: Rollout, attempt: int) -> None:
        up = [i for i in range(len(self.rewards)) if ("reward", i) not in self.restoring]
        if not up:
            self.parked.append((rollout, attempt))
            return
        target = min(up, key=lambda i: self.reward_load[i])
        self.reward_load[target] += 1
        score_ref = self.rewards[target].score.remote(rollout)
        self.scoring[score_ref] = target
        self.requests[score_ref] = RolloutRequest(rollout.ids, rollout.prompts, rollout.seeds)
        self.score_inputs[score_ref] = (rollout, attempt)
        if not self.reward_queues[target]:
            self.reward_head_since[target] = time.monotonic()
        self.reward_queues[target].append(score_ref)

    def _left_reward_queue(self, target: int, ref) -> None:
        queue = self.reward_queues[target]
        was_head = bool(queue) and queue[0] == ref
        queue.remove(ref)
        if was_head:
            self.reward_head_since[target] = time.monotonic()  # the actor starts on the next call now

    def _lose(self, request: RolloutRequest, why: str) -> None:
        log.warning("rollout %s..%s lost: %s", request.ids[0], request.ids[-1], why)
        self.ledger.lost.update(request.ids)
        self.metrics_pending.difference_update(request.ids)

    def _reward_actor_died(self, target: int, exc: Exception) -> None:
        if getattr(exc, "actor_init_failed", False):
            self._reward_failed(exc)  # it cannot even start: every call would fail the same way
            return
        if ("reward", target) not in self.restoring:
            self.ledger.actor_restarts["reward"] += 1
            self.restoring[("reward", target)] = (None, 0.0)

    def _restore_call(self, kind: str, idx: int):
        if kind == "sampler":
            sampler = self.samplers[idx]
            return sampler.set_weights.remote(*self.latest_weights) if self.latest_weights else sampler.version.remote()
        reward = self.rewards[idx]
        if self.latest_reward_weights is not None:
            return reward.set_shared_weights.remote(self.latest_reward_weights)
        return reward.ready.remote()

    def _advance_restores(self) -> None:
        now = time.monotonic()
        for key, (ref, retry_at) in list(self.restoring.items()):
            if ref is None:
                if now >= retry_at:
                    self.restoring[key] = (self._restore_call(*key), 0.0)
                continue
            if not ray.wait([ref], timeout=0)[0]:
                continue
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                if getattr(exc, "actor_init_failed", False):
                    # It cannot start again (a reward server that is down, a model file gone): stop, saying why.
                    self.fatal = self.fatal or PipelineAbort(f"a restarted {key[0]} actor cannot start: {one_line_error(exc)}")
                    del self.restoring[key]
                    continue
                self.restoring[key] = (None, now + 0.5)  # still restarting: try again shortly
                continue
            del self.restoring[key]
            log.info("%s actor %d restarted and restored", *key)

    def _score_parked(self) -> None:
        while self.parked:
            if self.fatal is not None:
                rollout, _ = self.parked.popleft()
                self._lose(RolloutRequest(rollout.ids, rollout.prompts, rollout.seeds), "the run is stopping")
            elif all(("reward", i) in self.restoring for i in range(len(self.rewards))):
                return
            else:
                self._score(*self.parked.popleft())

    def _reward_failed(self, exc: Exception) -> None:
        self.reward_errors += 1
        if self.reward_errors >= self.cfg.max_reward_errors:
            self.fatal = PipelineAbort(f"{self.reward_errors} reward calls failed in a row; the last: {one_line_error(exc)}")

    def _quarantine(self, rollout: Rollout, bad: np.ndarray, reason: str) -> None:
        ids = [i for i, b in zip(rollout.ids, bad) if b]
        self.ledger.quarantined.update(ids)
        log.warning("quarantined %d samples (%s): %s", len(ids), reason, [p for p, b in zip(rollout.prompts, bad) if b][:3])
        for k in np.nonzero(bad)[0]:
            keep_image = rollout.images is not None and len(self.quarantine_log) < self.cfg.quarantine_images
            self.quarantine_log.append({
                "id": rollout.ids[k], "prompt": rollout.prompts[k], "seed": rollout.seeds[k], "version": rollout.version,
                "reason": reason,
                "score": None if rollout.scores is None else float(rollout.scores[k]),
                "components": {c: float(v[k]) for c, v in rollout.components.items()},
                "image": rollout.images[k] if keep_image else None,
            })

    def _check_bad_fraction(self) -> None:
        bad, good = len(self.ledger.quarantined), len(self.ledger.scored)
        if bad + good >= self.cfg.min_samples_for_bad_fraction and bad / (bad + good) > self.cfg.max_bad_fraction:
            self.fatal = PipelineAbort(
                f"{bad} of {bad + good} rewards were NaN/inf or timed out ({bad / (bad + good):.0%} > "
                f"train.max_bad_reward_fraction={self.cfg.max_bad_fraction}); stopping")

    def _time_out_hung_rewards(self) -> None:
        now = time.monotonic()
        for target, queue in enumerate(self.reward_queues):
            if not queue or now - self.reward_head_since[target] <= self.cfg.reward_timeout_s:
                continue
            ref = queue[0]
            rollout, _ = self.score_inputs.pop(ref)
            self.scoring.pop(ref)
            self.requests.pop(ref)
            self.reward_load[target] -= 1
            self._left_reward_queue(target, ref)
            self.metrics_pending.difference_update(rollout.ids)
            self._quarantine(rollout, np.ones(len(rollout.ids), bool), f"reward timed out after {self.cfg.reward_timeout_s:g}s")
            # Restart the hung actor: the calls queued behind it fail and are re-scored on the restarted one.
            log.warning("reward actor %d hung for over %gs: restarting it", target, self.cfg.reward_timeout_s)
            ray.kill(self.rewards[target], no_restart=False)
            self.ledger.actor_restarts["reward"] += 1
            self.restoring[("reward", target)] = (None, time.monotonic() + 0.5)
            self._check_bad_fraction()

    # -- learner side --------------------------------------------------------------------------------------------
    def set_learner_version(self, version: int) -> None:
        self.learner_version = version

    def get(self, min_samples: int) -> list[Rollout]:
        """Scored, fresh-enough rollouts totalling at least `min_samples` samples (blocks, pumping, until then)."""
        out, count = [], 0
        start = time.perf_counter()
        while count < min_samples:
            if self.fatal is not None:
                raise self.fatal
            if time.perf_counter() - start > self.cfg.wait_timeout_s:
                raise TimeoutError(f"no scored rollouts within {self.cfg.wait_timeout_s}s: {self.ledger.summary()}")
            if not self.ready:
                self.pump(timeout=1.0)
                continue
            rollout = self.ready.popleft()
            if self.learner_version - rollout.version > self.cfg.max_staleness:
                self.ledger.dropped_stale.update(rollout.ids)
                continue
            self.ledger.consumed.extend(rollout.ids)
            out.append(rollout)
            count += len(rollout.ids)
            self.issue()
        self.wait_s["learner"] += time.perf_counter() - start
        return out

    def take(self, n: int) -> list[Rollout]:
        """Exactly `n` samples, splitting a rollout if needed; the rest of a split rollout stays at the front of the
        queue, unconsumed."""
        out, count = [], 0
        while count < n:
            for rollout in self.get(min_samples=1):
                need = n - count
                if len(rollout.ids) > need:
                    head = np.zeros(len(rollout.ids), bool)
                    head[:need] = True
                    rest = _subset(rollout, ~head)
                    rollout = _subset(rollout, head)
                    # `get` marked the whole rollout consumed: the rest goes back unconsumed.
                    for i in rest.ids:
                        self.ledger.consumed.remove(i)
                    self.ready.appendleft(rest)
                out.append(rollout)
                count += len(rollout.ids)
        return out

    def broadcast(self, state: dict[str, torch.Tensor], version: int) -> None:
        """New trainable weights to every sampler (one object-store copy shared by all)."""
        ref = ray.put(state)
        ray.get([s.set_weights.remote(ref, version) for s in self.samplers])
        self.learner_version = version
        self.latest_weights = (ref, version)

    def broadcast_async(self, state_ref, version: int) -> list:
        """Queue new weights on every sampler without waiting: each sampler applies them after the request it is
        running (actor tasks run in submission order), and every rollout records the version it used."""
        self.learner_version = version
        self.latest_weights = (state_ref, version)
        return [s.set_weights.remote(state_ref, version) for s in self.samplers]

    def share_reward_weights(self, state_ref) -> list:
        """Queue the weights of a reward that trains in the learner (CoMat's discriminator) on every reward actor."""
        self.latest_reward_weights = state_ref
        return [r.set_shared_weights.remote(state_ref) for r in self.rewards]

    def drain(self) -> None:
        """Wait for every in-flight request (issuing no new ones) so the ledger is final (at shutdown)."""
        self.draining = True
        try:
            while self.sampling or self.scoring or self.parked:
                self.pump(timeout=1.0)
        finally:
            self.draining = False
        # Produced-and-scored rollouts that no learner took are accounted as unused at shutdown.
        while self.ready:
            self.ledger.unused.update(self.ready.popleft().ids)


def one_line_error(exc: BaseException) -> str:
    """The innermost cause of a (Ray-wrapped) error as one line: its type and the last line of its message."""
    cause = getattr(exc, "cause", None) or exc.__cause__
    if isinstance(cause, BaseException) and cause is not exc:
        return one_line_error(cause)
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return f"{exc.__class__.__name__}: {lines[-1] if lines else ''}"


def _subset(rollout: Rollout, keep: np.ndarray) -> Rollout:
    idx = np.nonzero(keep)[0]
    return Rollout(
        ids=[rollout.ids[i] for i in idx], prompts=[rollout.prompts[i] for i in idx], seeds=[rollout.seeds[i] for i in idx],
        version=rollout.version, latents=rollout.latents[idx], log_probs=rollout.log_probs[idx], timesteps=rollout.timesteps,
        images=None if rollout.images is None else rollout.images[idx], kind=rollout.kind, start_step=rollout.start_step,
        grad_steps=list(rollout.grad_steps), metrics_only=rollout.metrics_only, sample_s=rollout.sample_s,
        scores=None if rollout.scores is None else rollout.scores[idx],
        components={k: v[idx] for k, v in rollout.components.items()}, score_s=rollout.score_s,
        attention=None if rollout.attention is None else select_samples(rollout.attention, idx),
        token_offsets=None if rollout.token_offsets is None else [rollout.token_offsets[i] for i in idx],
    )
