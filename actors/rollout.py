"""Sampler and reward actors, and the Ray shell of the rollout pipeline that connects them.

The actors are thin: a `SamplerActor` owns a `DiffusionPolicy` and turns a request into `Chains` (or, for a gradient
algorithm, `Prefixes`); a `RewardActor` owns a reward and scores finished chains. Chains carry what the reward needs
beyond their images: the final latents always, and the cross-attention maps of the steps the request names when the
reward scores attention (CoMat); a reward that trains in the learner (CoMat's discriminator) gets the learner's
weights through `set_shared_weights`, queued like the samplers' weights.

`RolloutPipeline` is the driver side: every decision (what to issue, where a result goes, what is stale, lost or
quarantined, the ledger) is `ralign.rollout.schedule.RolloutSchedule`'s; this class only turns its orders into Ray
calls and what Ray returns (a result, a dead actor, an exception) into the schedule's events.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import ray
import torch

from actors.common import actor_device, one_line_error, set_threads, weights_from_transfer
from ralign.diffusion.attention_capture import pack_maps, unpack_maps
from ralign.diffusion.seeding import seed_lora_init
from ralign.diffusion.text_encoding import token_offsets
from ralign.rollout.batch import Chains, Prefixes, SampleBatch
from ralign.rollout.schedule import WAIT_TIMEOUT_S, Restart, Restore, RolloutRequest, RolloutSchedule, Sample, Score

log = logging.getLogger(__name__)


@ray.remote(max_restarts=-1, max_task_retries=0)
class SamplerActor:
    def __init__(self, policy_spec: dict, threads: int = 1, use_gpu: bool = False):
        set_threads(threads)
        seed_lora_init()
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

    def rollout(self, request: RolloutRequest) -> SampleBatch:
        start = time.perf_counter()
        n, version = len(request.ids), self.policy.version
        who = dict(ids=list(request.ids), prompts=list(request.prompts), seeds=list(request.seeds), versions=[version] * n)
        if request.stop_step is not None:
            latents = self.policy.sample_prefix(request.prompts, request.seeds, request.stop_step, request.original_text)
            return Prefixes(**who, latents=latents.cpu().numpy(), start_steps=[request.stop_step] * n,
                            grad_steps=[tuple(request.grad_steps)] * n, sample_s=time.perf_counter() - start)
        traj = self.policy.sample(request.prompts, request.seeds, attention_steps=request.attention_steps)
        images = (traj.images.permute(0, 2, 3, 1).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        attention = offsets = None
        if traj.attention is not None:
            attention = pack_maps(traj.attention)
            offsets = [token_offsets(self.policy.tokenizer, p) for p in request.prompts]
        return Chains(**who, latents=traj.latents.cpu().numpy(), log_probs=traj.log_probs.cpu().numpy(),
                      timesteps=traj.timesteps.cpu().numpy(), images=images, attention=attention, token_offsets=offsets,
                      metrics_only=request.metrics_only, sample_s=time.perf_counter() - start)


@ray.remote(max_restarts=-1, max_task_retries=0)
class RewardActor:
    def __init__(self, reward_spec: dict, threads: int = 1, use_gpu: bool = False):
        set_threads(threads)
        from ralign.rewards.registry import build_reward

        self.device = actor_device(use_gpu)
        self.refusal: str | None = None
        spec = dict(reward_spec)
        deployment = spec.pop("deployment", None)
        if deployment:
            # Scores come from a running reward application (Ray Serve) instead of models in this actor.
            from actors.serve import ServedReward

            try:
                self.reward = ServedReward(deployment, expected_reward=spec["name"])
            except ValueError as exc:
                # The application serves another reward. Raised from here, the error would reach the caller only
                # once this process exited, and a process holding a Serve handle took ~90 s to: `ready` and
                # `score` refuse instead, at once.
                self.refusal = str(exc)
        else:
            self.reward = build_reward({**spec, "device": self.device})

    def _refuse_if_misconfigured(self) -> None:
        if self.refusal:
            raise ValueError(self.refusal)

    def ready(self) -> str:
        """Answers once the reward is built: a reward that cannot start (a reward server that is down, a missing
        checkpoint, an application serving another reward) fails here, at start-up, instead of on the first rollout."""
        self._refuse_if_misconfigured()
        return self.reward.name

    def pid(self) -> int:
        return os.getpid()

    def set_shared_weights(self, state: dict[str, torch.Tensor]) -> None:
        """The learner's current weights of a reward that trains alongside the policy (CoMat's discriminator)."""
        self.reward.load_shared_weights(weights_from_transfer(state))

    @torch.no_grad()
    def score(self, chains: Chains) -> Chains:
        self._refuse_if_misconfigured()
        start = time.perf_counter()
        # A copy, not a wrap: arrays out of Ray's object store are read-only. Copying straight to float32 is the one copy.
        images = torch.tensor(chains.images, dtype=torch.float32, device=self.device).permute(0, 3, 1, 2) / 255.0
        inputs = {}
        # What the sampler shipped beyond the images, for rewards that score it.
        if self.reward.uses_attention and chains.attention is not None:
            inputs["attention"] = {"maps": unpack_maps(chains.attention, self.device), "token_offsets": chains.token_offsets}
        if self.reward.uses_latents:
            inputs["latents"] = torch.from_numpy(np.ascontiguousarray(chains.final_latents)).to(self.device)
        out = self.reward(images, chains.prompts, **inputs)
        chains.scores = out.score.float().cpu().numpy()
        chains.components = {k: v.float().cpu().numpy() for k, v in out.components.items()}
        chains.attention = None  # scored: no need to carry the maps back through the object store
        chains.score_s = time.perf_counter() - start
        return chains


class RolloutPipeline:
    """The schedule's orders as Ray calls. `prompt_source(first_id, n)` gives prompts and noise seeds; `plan_fn`
    the algorithm's request plans (None: full chains); `cfg` a TrainConfig (its `ray` bounds)."""

    def __init__(self, samplers: list, rewards: list, prompt_source, cfg, plan_fn=None, group_size: int = 1):
        self.samplers, self.rewards = samplers, rewards
        self.schedule = RolloutSchedule(cfg, len(samplers), len(rewards), prompt_source, plan_fn, group_size)
        self.calls: dict = {}  # object ref -> ticket (sampling or scoring)
        self.restores: dict = {}  # object ref -> (kind, index)
        self.latest_weights: tuple | None = None  # (object ref, version) last broadcast to the samplers
        self.latest_reward_weights = None  # object ref last shared with the reward actors

    # ---- what tests and the coordinator read --------------------------------------------------------------------
    @property
    def ledger(self):
        return self.schedule.ledger

    @property
    def quarantine_log(self) -> list[dict]:
        return self.schedule.quarantine_log

    @quarantine_log.setter
    def quarantine_log(self, records: list[dict]) -> None:
        self.schedule.quarantine_log = records

    @property
    def restoring(self) -> dict:
        return self.schedule.restoring

    def in_flight(self) -> list:
        """Object refs of every call still with a sampler or a reward actor."""
        return list(self.calls)

    def sampling_refs(self) -> list:
        return [ref for ref, t in self.calls.items() if t in self.schedule.sampling]

    def scoring_refs(self) -> list:
        return [ref for ref, t in self.calls.items() if t in self.schedule.scoring]

    def ids_of(self, ref) -> list[int]:
        ticket = self.calls[ref]
        if ticket in self.schedule.sampling:
            return self.schedule.sampling[ticket][1].ids
        return self.schedule.scoring[ticket].batch.ids

    # ---- orders -> calls ----------------------------------------------------------------------------------------
    def _carry_out(self, orders) -> None:
        for order in orders:
            if isinstance(order, Sample):
                self.calls[self.samplers[order.sampler].rollout.remote(order.request)] = order.ticket
            elif isinstance(order, Score):
                self.calls[self.rewards[order.reward].score.remote(order.batch)] = order.ticket
            elif isinstance(order, Restore):
                self.restores[self._restore_call(order.kind, order.index)] = (order.kind, order.index)
            elif isinstance(order, Restart):
                for ref in [r for r, t in self.calls.items() if t == order.ticket]:
                    del self.calls[ref]  # abandoned: whatever it returns is not routed
                ray.kill(self.rewards[order.reward], no_restart=False)

    def _restore_call(self, kind: str, index: int):
        if kind == "sampler":
            sampler = self.samplers[index]
            return sampler.set_weights.remote(*self.latest_weights) if self.latest_weights else sampler.version.remote()
        reward = self.rewards[index]
        if self.latest_reward_weights is not None:
            return reward.set_shared_weights.remote(self.latest_reward_weights)
        return reward.ready.remote()

    def issue(self) -> None:
        """Restores that are due, parked rollouts, and new requests for idle samplers."""
        self._check_restores()
        self._carry_out(self.schedule.orders())

    def _check_restores(self) -> None:
        if not self.restores:
            return
        done, _ = ray.wait(list(self.restores), num_returns=len(self.restores), timeout=0)
        for ref in done:
            kind, index = self.restores.pop(ref)
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                self.schedule.restore_failed(kind, index, one_line_error(exc), getattr(exc, "actor_init_failed", False))
                continue
            self.schedule.restored(kind, index)

    def _route(self, ref) -> None:
        ticket = self.calls.pop(ref)
        s = self.schedule
        sampling = ticket in s.sampling
        try:
            result = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            if sampling:
                s.sampler_died(ticket)
            else:
                self._carry_out(s.reward_died(ticket, one_line_error(exc), getattr(exc, "actor_init_failed", False)))
            return
        except ray.exceptions.RayTaskError as exc:
            why = one_line_error(exc)
            s.sampler_raised(ticket, why) if sampling else s.reward_raised(ticket, why)
            return
        if sampling:
            self._carry_out(s.sampled(ticket, result))
        else:
            s.scored(ticket, result)

    def pump(self, timeout: float = 0.0) -> None:
        self.issue()
        refs = list(self.calls)
        if not refs:
            if self.schedule.restoring:
                time.sleep(min(timeout, 0.05))  # only restarting actors to wait for: poll them gently
            return
        done, rest = ray.wait(refs, num_returns=1, timeout=timeout)
        # Collect anything else already finished without blocking.
        more, _ = ray.wait(rest, num_returns=len(rest), timeout=0) if rest else ([], [])
        for ref in done + more:
            self._route(ref)
        self._carry_out(self.schedule.hung_rewards())
        self.issue()

    # ---- the learner's side -------------------------------------------------------------------------------------
    def take(self, n: int, learner_version: int | None = None) -> SampleBatch:
        """The next `n` fresh, scored samples as one batch (blocks, pumping, until then); `learner_version` is the
        learner's policy version, against which staleness is judged."""
        start = time.perf_counter()
        while (batch := self.schedule.take(n, learner_version)) is None:
            if time.perf_counter() - start > WAIT_TIMEOUT_S:
                raise TimeoutError(f"no scored rollouts within {WAIT_TIMEOUT_S:g}s: {self.ledger.summary()}")
            self.pump(timeout=1.0)
            learner_version = None
        self.issue()
        self.schedule.stats["learner_wait_s"] += time.perf_counter() - start
        return batch

    def broadcast_async(self, state_ref, version: int) -> list:
        """Queue new weights on every sampler without waiting: each sampler applies them after the request it is
        running (actor tasks run in submission order), and every rollout records the version it used."""
        self.schedule.published(version)
        self.latest_weights = (state_ref, version)
        return [s.set_weights.remote(state_ref, version) for s in self.samplers]

    def share_reward_weights(self, state_ref) -> list:
        """Queue the weights of a reward that trains in the learner (CoMat's discriminator) on every reward actor."""
        self.latest_reward_weights = state_ref
        return [r.set_shared_weights.remote(state_ref) for r in self.rewards]

    def drain(self) -> None:
        """Wait for every in-flight call (issuing no new requests) so the ledger is final (at shutdown)."""
        self.schedule.draining = True
        try:
            while self.calls or self.schedule.parked:
                self.pump(timeout=1.0)
        finally:
            self.schedule.draining = False
        self.schedule.finish()
