"""The rollout coordinator: one Ray actor that owns the sampler and reward actors and the asynchronous pipeline
between them, and serves batches to the learner workers.

Learner workers (Ray Train) call `take(n)` for their next batch and rank 0 calls `publish(weights, version)` after
each update; a background thread keeps the pipeline moving in between, so samplers and reward actors work while
the learners compute. What each sampler request asks for is the algorithm's `request_plan` (full chains scored by
the reward actors, or a gradient algorithm's no-gradient prefixes handed to the learners plus metrics rollouts), and
how many consecutive samples share a prompt its `samples_per_prompt`.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import ray

from actors.common import one_line_error
from actors.rollout import RewardActor, RolloutPipeline, SamplerActor
from ralign.algorithms.registry import build_algorithm
from ralign.rollout.batch import SampleBatch
from ralign.rollout.prompts import PromptSource
from ralign.training.config import TrainConfig

log = logging.getLogger(__name__)


# One call at a time, in submission order (a threaded actor would not keep order): a learner's `publish` then
# `take` must reach the samplers in that order, so the next request is sampled with the new weights. The pump
# runs in a plain background thread, so rollouts keep moving while a call waits.
@ray.remote(num_cpus=0, max_concurrency=1, max_restarts=0)
class RolloutCoordinator:
    def __init__(self, cfg_data: dict, next_id: int = 0, version: int = 0):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.cfg = cfg = TrainConfig.model_validate(cfg_data)
        r = cfg.ray
        if r.request_batch > cfg.train.batch_size:
            raise ValueError("ray.request_batch must not exceed train.batch_size")
        spec = cfg.policy_spec()
        self.samplers = [
            SamplerActor.options(num_cpus=r.sampler_cpus, num_gpus=r.sampler_gpus).remote(spec, r.threads_per_actor, r.sampler_gpus > 0)
            for _ in range(r.samplers)
        ]
        self.rewards = [
            RewardActor.options(num_cpus=r.reward_cpus, num_gpus=r.reward_gpus).remote(cfg.reward.spec(served=True), r.threads_per_actor, r.reward_gpus > 0)
            for _ in range(r.reward_actors)
        ]
        # What each request asks for (full chains, or prefixes and metrics rollouts) is the algorithm's decision.
        algorithm = build_algorithm(cfg)
        self.group_size = algorithm.samples_per_prompt
        self.pipeline = RolloutPipeline(self.samplers, self.rewards, PromptSource(cfg, self.group_size, algorithm.shares_initial_noise), cfg,
                                        plan_fn=algorithm.request_plan, group_size=self.group_size)
        self.pipeline.schedule.start_at(next_id, version)
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
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:  # died starting, or refused
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
    def take(self, n: int, learner_version: int | None = None) -> SampleBatch:
        """The next `n` samples for one learner worker (numpy arrays: zero-copy through the object store).
        `learner_version` is the learner's current policy version: staleness is judged against it."""
        with self.lock:
            return self.pipeline.take(n, learner_version)

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
            self.pipeline.schedule.abandon_unused()
            # Ids continue past both attempts' (a new request and group begins there).
            self.pipeline.schedule.start_at(next_id, version)
            ref = ray.put(state)
            ray.get(self.pipeline.broadcast_async(ref, version))

    def served_a_learner(self) -> bool:
        """Whether a learner has taken a batch from this coordinator: a learner group that starts with no checkpoint
        and finds this true was restarted before Ray Train registered any checkpoint."""
        with self.lock:
            return bool(self.pipeline.schedule.ledger.consumed)

    def report(self, progress: dict) -> None:
        self.progress = dict(progress)

    def get_progress(self) -> dict:
        return dict(self.progress)

    def metric_rollouts(self, wait_s: float = 0.0) -> dict:
        """Rewards of the metrics-only rollouts finished since the last call (gradient algorithms). With `wait_s`,
        first wait (up to that long) for the metrics rollouts already issued to be scored: the last iteration's
        figures then cover every one of them."""
        deadline = time.monotonic() + wait_s
        schedule = self.pipeline.schedule
        with self.lock:
            waiting = set(schedule.metrics_pending)
        while waiting and time.monotonic() < deadline:
            time.sleep(0.05)  # the pump thread moves them along meanwhile
            with self.lock:
                waiting &= schedule.metrics_pending
        with self.lock:
            rollouts = schedule.take_metric_batches()
        if not rollouts:
            return {}
        scores = np.concatenate([r.scores for r in rollouts])
        out = {"rollout_reward_mean": float(scores.mean()), "rollout_reward_n": float(len(scores))}
        for key in rollouts[0].components:
            out[f"rollout_reward/{key}"] = float(np.concatenate([r.components[key] for r in rollouts]).mean())
        return out

    def stats(self) -> dict:
        with self.lock:
            return self.pipeline.schedule.summary()

    def shutdown(self) -> dict:
        """Stop pumping, finish in-flight requests (so the ledger is final) and return the ledger summary."""
        self.stopped.set()
        self.thread.join(timeout=30)
        with self.lock:
            self.pipeline.drain()
            summary = self.pipeline.schedule.final_ledger()
        for actor in self.samplers + self.rewards:
            ray.kill(actor)
        return summary
