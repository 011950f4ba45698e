"""`ralign bench pipeline`: the same training iteration three ways, on the same models and samples per iteration.

1. Each stage alone, in this process with all cores and no orchestration: sampling a batch of chains, scoring it,
   one learner update. The slowest of the three bounds any pipeline of them: the compute limit.
2. Sequential: sample -> reward -> learn in a loop in this process, what a single-script user writes.
3. The Ray pipeline: `ralign train` itself (sampler and reward actors, coordinator, Ray Train learner, MLflow), its
   per-iteration times read back from MLflow.

Reported besides samples/s: pipeline iteration time / slowest stage; the same stages at one thread each and the
bound they put on any pipeline here (max of the slowest one-thread stage and the one-thread total over the cores); the waiting time of each stage in the
pipeline (learner: waiting for batches; samplers / reward actors: wall time not spent computing); the Ray overhead
per rollout, measured by sending the same payloads the pipeline sends (a rollout there and back twice: sampler ->
coordinator -> reward actor -> coordinator -> learner; and the adapter weights once per iteration) through an echo
actor, as a fraction of an iteration; and the peak RSS of every process (/proc VmHWM, sampled while it runs).
The first `warmup` iterations of each mode are left out of its rates (model loading, first-call allocations).
"""

from __future__ import annotations

import logging
import os
import re
import statistics
import tempfile
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)


def _vm_hwm_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class ProcessPeaks:
    """Peak RSS of this process and of every Ray worker process (by its `ray::Name` title), sampled in a thread."""

    def __init__(self, interval_s: float = 0.5):
        self.interval_s, self.peaks = interval_s, {}
        self.cpu_s: dict[int, tuple[str, float]] = {}  # pid -> (name, user + system CPU seconds, last seen)
        self._stop = threading.Event()

    @staticmethod
    def _cpu_seconds(pid: str) -> float | None:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return None

    def cpu_by_name(self) -> dict[str, float]:
        """CPU seconds each kind of Ray process used while sampled (all processes of a name summed)."""
        out: dict[str, float] = {}
        for name, seconds in self.cpu_s.values():
            out[name] = round(out.get(name, 0.0) + seconds, 2)
        return out

    def _scan(self) -> None:
        me = _vm_hwm_mb(os.getpid())
        if me is not None:
            self.peaks["driver"] = max(self.peaks.get("driver", 0.0), me)
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    title = f.read().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            m = re.match(r"ray::([A-Za-z_]+)", title)
            if not m or m.group(1) in ("IDLE",):
                continue
            hwm = _vm_hwm_mb(int(entry))
            if hwm is not None:
                self.peaks[m.group(1)] = max(self.peaks.get(m.group(1), 0.0), hwm)
            cpu = self._cpu_seconds(entry)
            if cpu is not None:
                self.cpu_s[int(entry)] = (m.group(1), cpu)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._scan()
            time.sleep(self.interval_s)

    def __enter__(self) -> "ProcessPeaks":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _in_process(cfg, iterations: int, warmup: int, threads: int) -> tuple[dict, dict]:
    """Stage-alone and sequential timings, in this process."""
    import torch

    from jobs.bench.common import PeakSampler
    from ralign.diffusion.seeding import seed_lora_init
    from ralign.rollout.batch import Chains
    from ralign.rollout.prompts import PromptSource
    from ralign.training.learner import Learner
    from ralign.diffusion.policy import build_policy
    from ralign.rewards.registry import build_reward

    torch.set_num_threads(threads)
    seed_lora_init()
    policy = build_policy(cfg.policy_spec())
    reward = build_reward(cfg.reward.spec())
    learner = Learner(cfg, policy, reward)
    source = PromptSource(cfg)
    n = cfg.train.batch_size

    def batch_ids(it: int) -> tuple[list[str], list[int]]:
        return source(it * n, n)

    def sample(prompts, seeds):
        return learner.policy.sample(prompts, seeds)

    def score(traj, prompts):
        with torch.no_grad():
            return reward(traj.images, prompts).score

    def learn(traj, scores, prompts, seeds):
        batch = Chains(list(range(n)), prompts, seeds, [learner.policy.version] * n, latents=traj.latents,
                       log_probs=traj.log_probs, timesteps=traj.timesteps, scores=scores)
        return learner.update(batch)

    def time_stages(first_batch: int, count: int, skip: int) -> dict[str, float]:
        """Mean seconds of each stage over `count` iterations, the first `skip` left out (warm-up)."""
        times: dict[str, list[float]] = {"sample": [], "reward": [], "learn": []}
        for it in range(count):
            prompts, seeds = batch_ids(first_batch + it)
            t0 = time.perf_counter()
            traj = sample(prompts, seeds)
            t1 = time.perf_counter()
            scores = score(traj, prompts)
            t2 = time.perf_counter()
            learn(traj, scores, prompts, seeds)
            if it >= skip:
                for stage, seconds in (("sample", t1 - t0), ("reward", t2 - t1), ("learn", time.perf_counter() - t2)):
                    times[stage].append(seconds)
        return {k: statistics.mean(v) for k, v in times.items()}

    sequential_s = []
    with PeakSampler(interval_s=0.02) as mem:
        # Stages alone: each timed on its own (the learner's input is the batch just sampled and scored).
        stage_mean = time_stages(0, warmup + iterations, warmup)
        # Sequential: the same loop as one unit, timed end to end (fresh prompts).
        for it in range(warmup + iterations):
            prompts, seeds = batch_ids(1000 + it)
            t0 = time.perf_counter()
            traj = sample(prompts, seeds)
            learn(traj, score(traj, prompts), prompts, seeds)
            if it >= warmup:
                sequential_s.append(time.perf_counter() - t0)
        # The same stages with one thread each: the CPU-seconds an iteration costs, which bound any pipeline on
        # this machine (the pipeline's actors run one thread each on their share of the cores).
        torch.set_num_threads(1)
        one_thread = time_stages(2000, warmup // 2 + max(2, iterations // 2), warmup // 2)
        torch.set_num_threads(threads)
    return ({"stage_s": stage_mean, "sequential_iteration_s": statistics.mean(sequential_s),
             "stage_s_one_thread": one_thread},
            {"in_process": round(mem.peak, 1)})


def _busy_work(seconds_budget: float, queue) -> None:
    """One thread of the kind of work the stages do (convolutions + matmuls), timed; for `core_contention`."""
    import torch

    torch.set_num_threads(1)
    x, w = torch.randn(8, 64, 32, 32), torch.randn(64, 64, 3, 3)
    a = torch.randn(256, 256)
    for _ in range(3):  # warm-up
        torch.nn.functional.conv2d(x, w, padding=1)
    t0, n = time.perf_counter(), 0
    while n < 40:
        torch.nn.functional.conv2d(x, w, padding=1)
        a = torch.tanh(a @ a.T / 256)
        n += 1
    queue.put(time.perf_counter() - t0)


def core_contention(processes: int = 2) -> dict:
    """How much one single-threaded compute process slows down when `processes` run at once: 1.0 means the cores
    are independent; more means they share execution units or memory bandwidth, which bounds any pipeline that runs
    its stages side by side."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")

    def timed(count: int) -> float:
        queue = ctx.Queue()
        procs = [ctx.Process(target=_busy_work, args=(0.0, queue)) for _ in range(count)]
        for p in procs:
            p.start()
        times = [queue.get(timeout=600) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        return statistics.mean(times)

    alone = statistics.median([timed(1) for _ in range(3)])
    together = statistics.median([timed(processes) for _ in range(3)])
    return {"processes": processes, "alone_s": alone, "together_s": together, "slowdown": together / alone}


def _ray_overhead(cfg, state: dict, rollout_payload, rollouts_per_iteration: int, repeats: int = 20) -> dict:
    """Seconds of Ray transfer + scheduling per rollout and per weight broadcast, timed with an echo actor."""
    import ray

    from actors.common import weights_for_transfer

    @ray.remote(num_cpus=0)
    class Echo:
        def echo(self, x):
            return x

        def take(self, x) -> int:
            return 1

    echo = Echo.remote()
    ray.get(echo.take.remote(0))

    def timed(fn) -> float:
        fn()
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples)

    roundtrip = timed(lambda: ray.get(echo.echo.remote(rollout_payload)))
    weights = timed(lambda: ray.get(echo.take.remote(ray.put(weights_for_transfer(state)))))
    ray.kill(echo)
    return {"rollout_roundtrip_s": roundtrip, "per_rollout_s": 2 * roundtrip, "weights_broadcast_s": weights,
            "rollouts_per_iteration": rollouts_per_iteration}


def run(config: str | Path, iterations: int, overrides: list[str] | None = None, warmup: int = 2, threads: int | None = None) -> dict:
    from mlflow.tracking import MlflowClient

    from jobs.bench.common import machine
    from jobs.train import train
    from ralign.config import UserError, load_config
    from ralign.training.config import TrainConfig

    if iterations < 1:
        raise UserError("--iterations must be at least 1")
    threads = threads or os.cpu_count() or 1
    cfg = load_config(TrainConfig, config, [*(overrides or []), f"train.iterations={warmup + iterations}",
                                            "train.eval.before_after=false", "train.eval.every=0", "tracking.log_images_every=0",
                                            f"train.checkpoint_every={warmup + iterations}"])
    from ralign.algorithms.base import RolloutAlgorithm
    from ralign.algorithms.registry import algorithm_class

    if not issubclass(algorithm_class(cfg.algorithm.name), RolloutAlgorithm):
        raise UserError(f"bench pipeline measures separate sample / reward / learn stages: algorithm.name="
                         f"{cfg.algorithm.name} scores inside the learner; use a config whose algorithm learns from "
                         "scored rollouts (e.g. DPOK)")
    n = cfg.train.batch_size
    log.info("bench pipeline: stages alone and sequential, in-process (%d + %d warm-up iterations of %d samples)", iterations, warmup, n)
    in_proc, peaks = _in_process(cfg, iterations, warmup, threads)

    contention = core_contention(min(2, os.cpu_count() or 1))
    log.info("bench pipeline: single-thread work slows down %.2fx when %d processes run at once", contention["slowdown"], contention["processes"])
    log.info("bench pipeline: the Ray pipeline (ralign train)")
    with tempfile.TemporaryDirectory() as tmp:
        cfg.ray.storage_path = str(Path(tmp) / "ray")
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        import ray

        embedded = ray.is_initialized()  # a caller's connection (e.g. the test suite's cluster) is left open
        with ProcessPeaks() as procs:
            summary = train(cfg, tracking_uri=uri, progress=False)
        client = MlflowClient(uri)

        def history(key: str) -> list[float]:
            points = sorted(client.get_metric_history(summary["run_id"], key), key=lambda m: m.step)
            return [m.value for m in points if m.step > warmup]

        iteration_s, wait_s, learn_s = history("iteration_s"), history("wait_s"), history("learn_s")
        every = sorted(client.get_metric_history(summary["run_id"], "iteration_s"), key=lambda m: m.step)
        run_wall = sum(m.value for m in every)  # all iterations, warm-up included (the busy totals below are too)
        last = client.get_run(summary["run_id"]).data.metrics
        # Busy seconds of the sampler / reward actors over the run, from their cumulative counters.
        sample_busy = last.get("pipeline/produced", 0) / last["sampler_samples_per_s"] if last.get("sampler_samples_per_s") else None
        reward_busy = last.get("pipeline/scored", 0) / last["reward_samples_per_s"] if last.get("reward_samples_per_s") else None
        # Ray overhead: the same payloads as the pipeline's, through an echo actor on the same cluster.
        import torch

        from ralign.diffusion.policy import build_policy

        policy = build_policy(cfg.policy_spec())
        traj = policy.sample(["a red circle"] * cfg.ray.request_batch, list(range(cfg.ray.request_batch)))
        payload = {"latents": traj.latents.numpy(), "log_probs": traj.log_probs.numpy(),
                   "images": (traj.images.permute(0, 2, 3, 1) * 255).to(torch.uint8).numpy()}
        overhead = _ray_overhead(cfg, policy.trainable_state(), payload, max(1, n // cfg.ray.request_batch))
        if not embedded:
            ray.shutdown()

    iter_mean = statistics.mean(iteration_s)
    stage = in_proc["stage_s"]
    slowest = max(stage.values())
    one = in_proc["stage_s_one_thread"]
    bound = max(max(one.values()), sum(one.values()) / (os.cpu_count() or 1))
    per_iteration_overhead = overhead["per_rollout_s"] * overhead["rollouts_per_iteration"] + overhead["weights_broadcast_s"]
    wait = {"learner": statistics.mean(wait_s)}
    # Samplers and reward actors: seconds per iteration (per actor) not spent computing, over the whole run.
    if sample_busy is not None:
        wait["sampler"] = max(0.0, run_wall * cfg.ray.samplers - sample_busy) / cfg.ray.samplers / len(every)
    if reward_busy is not None:
        wait["reward"] = max(0.0, run_wall * cfg.ray.reward_actors - reward_busy) / cfg.ray.reward_actors / len(every)
    result = {
        "benchmark": "pipeline", "machine": machine(), "config": str(config), "overrides": list(overrides or []),
        "iterations": iterations, "warmup_iterations": warmup, "samples_per_iteration": n, "threads_in_process": threads,
        "samples_per_s": {
            "sample_stage": n / stage["sample"], "reward_stage": n / stage["reward"], "learn_stage": n / stage["learn"],
            "sequential": n / in_proc["sequential_iteration_s"], "pipeline": n / iter_mean,
        },
        "stage_s": stage,
        "stage_s_one_thread": one,
        # No pipeline of these stages on this machine can beat either bound: the slowest stage at one thread (a
        # stage is one actor), or all stages' one-thread CPU-seconds spread over every core.
        "pipeline_bound_s": bound,
        "core_contention": contention,
        # The same bound with the measured slowdown of side-by-side single-thread work on this machine.
        "pipeline_bound_contended_s": bound * contention["slowdown"],
        "ratio_iteration_vs_bound": iter_mean / bound,
        "ratio_bound_vs_sequential": bound / in_proc["sequential_iteration_s"],
        "pipeline_learn_s": statistics.mean(learn_s),
        # The same comparison inside the one pipeline run: iteration time over the learner's own update time in it.
        # Immune to the machine's speed drifting between the in-process phase and the pipeline phase (on this
        # shared VM, single-thread speed changed by up to 1.5x between runs minutes apart).
        "ratio_iteration_vs_learn_in_pipeline": iter_mean / statistics.mean(learn_s),
        "sequential_iteration_s": in_proc["sequential_iteration_s"],
        "pipeline_iteration_s": iter_mean,
        "ratio_pipeline_vs_sequential": in_proc["sequential_iteration_s"] / iter_mean,
        "ratio_iteration_vs_slowest_stage": iter_mean / slowest,
        "slowest_stage": max(stage, key=stage.get),
        "ray_overhead_s_per_iteration": per_iteration_overhead,
        "ray_overhead_fraction": per_iteration_overhead / iter_mean,
        "ray_overhead": overhead,
        "wait_s": wait,
        # CPU seconds per kind of Ray process over the whole run (model loading and start-up included): what
        # besides the three stages takes the cores.
        "ray_process_cpu_s": procs.cpu_by_name(),
        "pipeline_run_wall_s": run_wall,
        "peak_rss_mb": {**peaks, **{k: round(v, 1) for k, v in procs.peaks.items()}},
        "ledger": summary.get("ledger", {}),
        "run_id": summary["run_id"],
    }
    return result
