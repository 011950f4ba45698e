"""The rollout coordinator: one Ray actor that owns the sampler and reward actors and the asynchronous pipeline
between them, and serves batches to the learner workers.

Learner workers (Ray Train) call `take(n)` for their next batch and rank 0 calls `publish(weights, version)` after
each update; a background thread keeps the pipeline moving in between, so samplers and reward actors work while
the learners compute. What each sampler request asks for is decided here:
- DPOK: full chains with log-probabilities, scored by the reward actors;
- gradient algorithms (ReFL, DRaFT, AlignProp, interval): the no-gradient prefix of the chain up to the first step
  that needs gradient (`algorithm.prefix_on_samplers`), handed to the learner, which runs the gradient-carrying
  suffix and its differentiable reward itself; every `ray.metric_rollout_every`-th request is instead a full
  rollout scored by the reward actors, for metrics only (with cross-attention maps recorded at the steps the learner
  would capture, when the reward scores attention).
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import ray
import torch

from actors.rollout import PipelineConfig, RewardActor, RolloutPipeline, SamplerActor, one_line_error
from ralign.training.learner import draw_gradient_steps
from ralign.rewards.registry import needs_attention
from ralign.training.config import GRADIENT_ALGORITHMS, TrainConfig
from ralign.world.prompts import generate_mixed

log = logging.getLogger(__name__)


class PromptSource:
    """Training prompts as a pure function of the sample id: a fixed pool of `prompts.unique_prompts` prompts of the
    configured families and split, visited in a fresh seeded order each pass; the noise seed of sample i is derived
    from i. A resumed run continues from its next id and sees exactly the prompts it would have seen."""

    def __init__(self, cfg: TrainConfig):
        p = cfg.prompts
        self.pool = [s.prompt for s in generate_mixed(p.unique_prompts, split=p.split, seed=p.seed, families=tuple(p.families))]
        self.seed = p.seed
        self.noise_seed = cfg.train.seed
        self._orders: dict[int, np.ndarray] = {}

    def prompt(self, sample_id: int) -> str:
        epoch, pos = divmod(sample_id, len(self.pool))
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.pool))}
        return self.pool[int(self._orders[epoch][pos])]

    def seed_of(self, sample_id: int) -> int:
        return self.noise_seed * 1_000_003 + sample_id


def request_plan(cfg: TrainConfig):
    """plan(first_id) -> the extra fields of a sampler request (none for DPOK), deterministic in the id."""
    name = cfg.algorithm.name
    if name not in GRADIENT_ALGORITHMS:
        return None
    every = cfg.ray.metric_rollout_every
    per = cfg.ray.request_batch
    # A reward that scores cross-attention (CoMat) gets, with each metrics rollout, the maps of as many steps as the
    # learner captures, drawn the way the learner draws them: from that chain's gradient steps.
    record_attention = needs_attention(cfg.reward.name, cfg.reward.options)
    # TextCraftor: a text-encoder-training backprop run starts its chain with the original encoder.
    original = name != "refl" and cfg.algorithm.backprop.original_text_prefix and cfg.model.policy.text_encoder != "frozen"

    def plan(first_id: int) -> dict:
        request_no = first_id // per
        generator = torch.Generator().manual_seed(cfg.train.seed * 7_919 + request_no)
        grad = draw_gradient_steps(cfg, generator)
        if every and request_no % every == every - 1:
            if not record_attention:
                return {"metrics_only": True}
            order = torch.randperm(len(grad), generator=generator)[: cfg.algorithm.backprop.attention_steps].tolist()
            return {"metrics_only": True, "attention_steps": sorted(grad[i] for i in order)}
        stop = min(grad) if cfg.algorithm.prefix_on_samplers else 0
        return {"stop_step": stop, "grad_steps": grad, "original_text": original and stop > 0}

    return plan


# One call at a time, in submission order (a threaded actor would not keep order): a learner's `publish` then
# `take` must reach the samplers in that order, so the next request is sampled with the new weights. The pump
# runs in a plain background thread, so rollouts keep moving while a call waits.
@ray.remote(num_cpus=0, max_concurrency=1, max_restarts=0)
class RolloutCoordinator:
    def __init__(self, cfg_data: dict, next_id: int = 0, version: int = 0):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.cfg = cfg = TrainConfig.model_validate(cfg_data)
        r = cfg.ray
        spec = cfg.policy_spec()
        self.samplers = [
            SamplerActor.options(num_cpus=r.sampler_cpus, num_gpus=r.sampler_gpus).remote(spec, r.threads_per_actor, r.sampler_gpus > 0)
            for _ in range(r.samplers)
        ]
        reward_spec = {"name": cfg.reward.name, **cfg.reward.options}
        if cfg.reward.deployment:
            reward_spec["deployment"] = cfg.reward.deployment
        self.rewards = [
            RewardActor.options(num_cpus=r.reward_cpus, num_gpus=r.reward_gpus).remote(reward_spec, r.threads_per_actor, r.reward_gpus > 0)
            for _ in range(r.reward_actors)
        ]
        self.prompts = PromptSource(cfg)
        if cfg.ray.request_batch > cfg.train.batch_size:
            raise ValueError("ray.request_batch must not exceed train.batch_size")
        self.pipeline = RolloutPipeline(
            self.samplers, self.rewards, self._prompt_batch,
            PipelineConfig(batch_per_request=r.request_batch, max_inflight_per_sampler=r.max_inflight_per_sampler,
                           max_unconsumed=cfg.unconsumed_bound(), max_staleness=r.max_staleness,
                           reward_timeout_s=r.reward_timeout_s, max_score_attempts=r.max_score_attempts,
                           max_reward_errors=r.max_reward_errors, max_bad_fraction=cfg.train.max_bad_reward_fraction,
                           min_samples_for_bad_fraction=cfg.train.batch_size),
            plan_fn=request_plan(cfg),
        )
        self.pipeline.next_id = next_id
        self.pipeline.learner_version = version
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.progress: dict = {"iteration": 0}
        self.pending_weights: list = []
        self.thread = threading.Thread(target=self._pump_forever, daemon=True)
        self.thread.start()

    def ready(self) -> str:
        """Wait until the samplers have loaded their models; returns the base model's fingerprint, which every
        sampler must share (the learners check theirs against it)."""
        prints = set(ray.get([s.fingerprint.remote() for s in self.samplers]))
        if len(prints) != 1:
            raise RuntimeError(f"sampler actors loaded different base models (fingerprints {sorted(prints)})")
        self.fingerprint = prints.pop()
        try:
            ray.get([r.ready.remote() for r in self.rewards])
        except ray.exceptions.RayActorError as exc:
            raise RuntimeError(f"a reward actor could not start: {one_line_error(exc)}") from None
        return self.fingerprint

    def actor_pids(self) -> dict[str, list[int]]:
        """Process ids of the sampler and reward actors (operators and fault drills kill them by id)."""
        return {"samplers": ray.get([s.pid.remote() for s in self.samplers]), "rewards": ray.get([r.pid.remote() for r in self.rewards])}

    def quarantine_records(self) -> list[dict]:
        """Quarantined samples since the last call (prompt, seed, reason, scores, image), for the run's artefacts."""
        with self.lock:
            records, self.pipeline.quarantine_log = self.pipeline.quarantine_log, []
        return records

    def base_fingerprint(self) -> str:
        return self.fingerprint

    def _prompt_batch(self, n: int):
        first = self.pipeline.next_id
        ids = range(first, first + n)
        return [self.prompts.prompt(i) for i in ids], [self.prompts.seed_of(i) for i in ids]

    def _pump_forever(self) -> None:
        # Block in `ray.wait` outside the lock (a learner's `take` or `publish` is never held up by it) and route
        # under the lock only once something finished. A short poll loop here cost about half a core on 2 cores
        # (bench pipeline, `ray_process_cpu_s`), taken from the sampler and learner.
        while not self.stopped.is_set():
            with self.lock:
                try:
                    self.pipeline.issue()
                except Exception:  # noqa: BLE001 - the pump must survive one bad request; the ledger records it
                    log.exception("rollout pump: issuing")
                refs = self.pipeline.in_flight()
            if not refs:
                self.stopped.wait(0.05)  # nothing in flight: back-pressure, or every request is with the learner
                continue
            ray.wait(refs, num_returns=1, timeout=0.25, fetch_local=False)
            with self.lock:
                try:
                    self.pipeline.pump(timeout=0)
                except Exception:  # noqa: BLE001 - the pump must survive one bad routing; the ledger records losses
                    log.exception("rollout pump")

    # ---- learner side ------------------------------------------------------------------------------------------
    def take(self, n: int, learner_version: int | None = None) -> dict:
        """The next `n` samples for one learner worker, as numpy arrays (zero-copy through the object store).
        `learner_version` is the learner's current policy version: staleness is judged against it."""
        start = time.perf_counter()
        with self.lock:
            if learner_version is not None:
                self.pipeline.learner_version = max(self.pipeline.learner_version, int(learner_version))
            rollouts = self.pipeline.take(n)
        batch = _merge(rollouts)
        batch["wait_s"] = time.perf_counter() - start
        return batch

    def publish(self, state: dict, version: int, reward_state: dict | None = None) -> None:
        """New trainable weights from the learner (rank 0) go to every sampler, without waiting for them; the weights
        of a reward that trains in the learner (CoMat's discriminator) go to every reward actor the same way."""
        ref = ray.put(state)
        with self.lock:
            self.pending_weights = self.pipeline.broadcast_async(ref, version)
            if reward_state:
                self.pending_weights += self.pipeline.share_reward_weights(ray.put(reward_state))

    def resume_from(self, state: dict, version: int, next_id: int) -> None:
        """A learner restarted from a checkpoint: whatever was sampled for the interrupted attempt is dropped
        (counted), ids continue past both the checkpoint's and this coordinator's, samplers get the weights."""
        with self.lock:
            self.pipeline.drain()  # in-flight requests finish; they and the queued ones are never trained on
            self.pipeline.ledger.dropped_stale.update(self.pipeline.ledger.unused)
            self.pipeline.ledger.unused.clear()
            self.pipeline.next_id = max(self.pipeline.next_id, int(next_id))
            ref = ray.put(state)
            ray.get(self.pipeline.broadcast_async(ref, version))

    def report(self, progress: dict) -> None:
        self.progress = dict(progress)

    def get_progress(self) -> dict:
        return dict(self.progress)

    def metric_rollouts(self, wait_s: float = 0.0) -> dict:
        """Rewards of the metrics-only rollouts finished since the last call (gradient algorithms). With `wait_s`,
        first wait (up to that long) for the metrics rollouts already issued to be scored: the last iteration's
        figures then cover every one of them."""
        deadline = time.monotonic() + wait_s
        with self.lock:
            waiting = set(self.pipeline.metrics_pending)
        while waiting and time.monotonic() < deadline:
            time.sleep(0.05)  # the pump thread moves them along meanwhile
            with self.lock:
                waiting &= self.pipeline.metrics_pending
        with self.lock:
            rollouts = list(self.pipeline.metric_rollouts)
            self.pipeline.metric_rollouts.clear()
        if not rollouts:
            return {}
        scores = np.concatenate([r.scores for r in rollouts])
        out = {"rollout_reward_mean": float(scores.mean()), "rollout_reward_n": float(len(scores))}
        for key in rollouts[0].components:
            out[f"rollout_reward/{key}"] = float(np.concatenate([r.components[key] for r in rollouts]).mean())
        return out

    def stats(self) -> dict:
        with self.lock:
            p = self.pipeline
            return {
                "ledger": p.ledger.summary(), "next_id": p.next_id, "learner_version": p.learner_version,
                "sample_s": p.stats["sample_s"], "score_s": p.stats["score_s"], "learner_wait_s": p.wait_s["learner"],
            }

    def ledger_check(self) -> dict:
        with self.lock:
            self.pipeline.ledger.check()
            return self.pipeline.ledger.summary()

    def shutdown(self) -> dict:
        """Stop pumping, finish in-flight requests (so the ledger is final) and return the ledger summary."""
        self.stopped.set()
        self.thread.join(timeout=30)
        with self.lock:
            self.pipeline.drain()
            self.pipeline.ledger.check()
            summary = self.pipeline.ledger.summary()
            summary["balanced"] = self.pipeline.ledger.terminal() == self.pipeline.ledger.issued
        for actor in self.samplers + self.rewards:
            ray.kill(actor)
        return summary


def _merge(rollouts) -> dict:
    """Concatenate rollouts into one batch dict; gradient-algorithm prefixes keep one plan per request."""
    kind = rollouts[0].kind
    out = {
        "kind": kind,
        "ids": [i for r in rollouts for i in r.ids],
        "prompts": [p for r in rollouts for p in r.prompts],
        "seeds": [s for r in rollouts for s in r.seeds],
        "versions": [r.version for r in rollouts for _ in r.ids],
        "latents": np.concatenate([r.latents for r in rollouts]),
    }
    if kind == "full":
        out.update(
            log_probs=np.concatenate([r.log_probs for r in rollouts]),
            timesteps=rollouts[0].timesteps,
            scores=np.concatenate([r.scores for r in rollouts]),
            components={k: np.concatenate([r.components[k] for r in rollouts]) for k in rollouts[0].components},
            images=np.concatenate([r.images for r in rollouts]),
        )
    else:
        out["plans"] = [(r.start_step, list(r.grad_steps), len(r.ids)) for r in rollouts]
    return out
