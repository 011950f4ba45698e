"""The learner group: Ray Train workers (`TorchTrainer`, gloo on CPU) each running a DeepSpeed-wrapped `Learner`.

Each worker pulls its batch from the rollout coordinator, makes one update (DeepSpeed all-reduces the gradients
across workers), and rank 0 publishes the new trainable weights (adapters or text-encoder deltas, never the whole
model) to the samplers with the next version number. Every `train.checkpoint_every` iterations all workers save
their DeepSpeed state and report it to Ray Train (rank 0 adds the safetensors weights and the learner state); a
restarted or resumed run continues from the newest checkpoint with the same MLflow run.

Metrics go to MLflow from rank 0 as they are produced. Ray Train V2 rejects Tune logger callbacks, so this uses the
MLflow client directly with the driver's tracking URI and run id. After a restart, steps already logged by the
previous attempt are not logged again (MLflow cannot delete points; step numbers stay monotone and unique).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import ray.train
import torch

from ralign.ops.tracking import RunLogger
from ralign.algorithms.registry import algorithm_class
from ralign.diffusion.seeding import seed_lora_init
from ralign.rollout.batch import Chains
from ralign.training.config import TrainConfig

log = logging.getLogger(__name__)


def evaluate_policy(policy, cfg: TrainConfig, out_dir: Path, n: int | None = None) -> dict:
    """Oracle metrics of the current policy on held-out prompts (the same path as `ralign eval`); `n` prompts per
    family (default train.eval.n_per_family)."""
    from ralign.world.evaluation import evaluate_generator

    e = cfg.train.eval
    return evaluate_generator(lambda prompts: policy.generate_images(prompts, seed=cfg.train.seed),
                              split=e.split, n=n or e.n_per_family, seed=cfg.train.seed, families=e.families, grid_dir=out_dir)


def _oracle_metrics(report: dict, prefix: str) -> dict[str, float]:
    out = {}
    for fam, m in report["families"].items():
        for key in ("all_correct", "object_recall", "binding_acc", "count_acc", "spatial_acc", "artifact_rate"):
            if m.get(key) is not None:
                out[f"{prefix}/{fam}/{key}"] = m[key]
    out[f"{prefix}/overall/all_correct"] = report["overall"]["all_correct"]
    if "fidelity" in report:
        out[f"{prefix}/kid"] = report["fidelity"]["kid"]
    return out


def _judge(policy, cfg: TrainConfig, logger: RunLogger, name: str, grids_path: str, prefix: str, step: int,
           final: bool = False) -> None:
    """Evaluate the policy on the held-out set and log the report (`NAME.json`), its grids and its metrics."""
    with tempfile.TemporaryDirectory() as tmp:
        report = evaluate_policy(policy, cfg, Path(tmp) / "grids")
        (Path(tmp) / f"{name}.json").write_text(json.dumps(report, indent=2))
        logger.artifact(Path(tmp) / f"{name}.json")
        logger.artifacts(Path(tmp) / "grids", grids_path)
    logger.metrics(_oracle_metrics(report, prefix), step=step, final=final)


def _save_batch_grid(batch: Chains, path: Path) -> None:
    from ralign.world.evaluation import write_grid

    write_grid(path, batch.prompts, list(batch.images), max_images=16)


def train_loop_per_worker(config: dict) -> None:
    """Entry point of every Ray Train worker."""
    # Imported here, not at the top: the driver imports this module only to hand this function to Ray Train, and
    # DeepSpeed and diffusers would cost it ~10 s of CPU for nothing.
    from ralign.diffusion.policy import build_policy
    from ralign.rewards.registry import build_reward
    from ralign.training.learner import Learner

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = TrainConfig.model_validate(config["cfg"])
    coordinator = config["coordinator"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.set_num_threads(cfg.ray.learner_threads or cfg.ray.threads_per_actor)
    seed_lora_init()  # the same LoRA initialisation as the sampler actors
    from actors.common import actor_device, weights_for_transfer

    device = actor_device(cfg.ray.use_gpu)
    policy = build_policy({**cfg.policy_spec(), "device": device})
    reward = build_reward(cfg.reward.spec(device)) if algorithm_class(cfg.algorithm.name).reward_in_learner else None
    try:
        ray.get(config["rollout_ready"][0])  # the samplers and reward actors, loading since before this worker started
    except Exception as exc:  # noqa: BLE001 - the driver reports the cause; retrying this worker would not fix it
        log.error("rank %d: the rollout actors could not start (%s); ending without training", rank, type(exc).__name__)
        return
    expected, mine = ray.get(coordinator.base_fingerprint.remote()), policy.base_fingerprint()
    if mine != expected:
        raise RuntimeError(
            f"learner rank {rank} loaded a different base model than the samplers ({mine} != {expected}): "
            f"did '{cfg.model.pipeline}' change on disk while the job started?"
        )
    learner = Learner(cfg, policy, reward)
    logger = RunLogger(config["tracking_uri"], config["run_id"], enabled=rank == 0)

    start_iteration = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            record = learner.load(d)
        start_iteration = record["iteration"]
        if rank == 0:
            # Samplers restart from the checkpoint's weights and prompt position; anything queued from the
            # interrupted attempt is stale and dropped (counted in the ledger).
            ray.get(coordinator.resume_from.remote(weights_for_transfer(learner.trainable_state()), learner.policy.version,
                                                   record["next_id"]))
        log.info("rank %d resumed at iteration %d (version %d)", rank, start_iteration, learner.policy.version)
        if rank == 0:
            logger.tag("ralign.resumed_from_iteration", str(start_iteration))
    elif rank == 0 and ray.get(coordinator.served_a_learner.remote()):
        # Restarted before Ray Train registered a checkpoint (a worker killed between writing its first checkpoint
        # and the controller's next poll): training starts over from the pretrained policy, and the coordinator
        # must be told so: left with the dead attempt's version and position, it never filled the fresh learner's
        # first take (seen in the killed-processes drill: the run waited until its deadline).
        ray.get(coordinator.resume_from.remote(weights_for_transfer(learner.trainable_state()), learner.policy.version, 0))
        log.info("rank 0 restarted with no checkpoint registered: training starts over at iteration 0")
        logger.tag("ralign.resumed_from_iteration", "0")

    e = cfg.train.eval
    if rank == 0 and start_iteration == 0 and e.before_after and logger.last_step < 0:
        _judge(policy, cfg, logger, "oracle_before", "eval/iteration_0000", "oracle", step=0)
        if cfg.model.init_checkpoint and e.against_pretrained:
            from ralign.diffusion.policy import pretrained_spec

            pretrained = build_policy({**pretrained_spec(cfg.policy_spec()), "device": device})
            _judge(pretrained, cfg, logger, "oracle_pretrained", "eval/pretrained", "oracle_pretrained", step=0)
            del pretrained

    for it in range(start_iteration, cfg.train.iterations):
        step = it + 1
        t0 = time.perf_counter()
        batch = ray.get(coordinator.take.remote(cfg.train.batch_size, learner.policy.version))
        t1 = time.perf_counter()
        stats = learner.update(batch)
        t2 = time.perf_counter()
        if rank == 0:
            coordinator.publish.remote(weights_for_transfer(learner.trainable_state()), learner.policy.version,
                                       weights_for_transfer(learner.reward_shared_weights()))
        stats.update(
            learn_s=t2 - t1, wait_s=t1 - t0, iteration_s=time.perf_counter() - t0,
            samples_per_s=cfg.train.batch_size * learner.world_size / max(1e-9, time.perf_counter() - t0),
            version=float(learner.policy.version),
        )
        if rank == 0:
            pipe_stats = ray.get(coordinator.stats.remote())
            ledger = pipe_stats["ledger"]
            stats.update({f"pipeline/{k}": float(v) for k, v in ledger.items()})
            # Throughput of each stage on its own (samples per second of its actors' busy time).
            if pipe_stats["sample_s"] > 0:
                stats["sampler_samples_per_s"] = ledger["produced"] / pipe_stats["sample_s"]
            if pipe_stats["score_s"] > 0:
                stats["reward_samples_per_s"] = ledger["scored"] / pipe_stats["score_s"]
            stats["learner_samples_per_s"] = cfg.train.batch_size * learner.world_size / max(1e-9, t2 - t1)
            last = step == cfg.train.iterations
            stats.update(ray.get(coordinator.metric_rollouts.remote(wait_s=cfg.ray.metric_wait_s if last else 0.0)))
            if isinstance(batch, Chains):
                for key, values in batch.components.items():
                    stats[f"reward/{key}"] = float(np.mean(values))
            logger.metrics(stats, step=step)
            logger.quarantined(ray.get(coordinator.quarantine_records.remote()))
        quarantined_in_update = learner.take_quarantined()  # every rank takes part (a gather)
        if rank == 0:
            logger.quarantined(quarantined_in_update)
            if cfg.tracking.log_images_every and isinstance(batch, Chains) and batch.images is not None and step % cfg.tracking.log_images_every == 0:
                with tempfile.TemporaryDirectory() as tmp:
                    _save_batch_grid(batch, Path(tmp) / f"rollouts_{step:04d}.png")
                    logger.artifacts(tmp, "rollouts")
            coordinator.report.remote({"iteration": step, "of": cfg.train.iterations, "reward_mean": stats.get("reward_mean"),
                                       "kl": stats.get("kl"), "loss": stats.get("loss", stats.get("policy_loss"))})
        if e.every and step % e.every == 0 and step < cfg.train.iterations and rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                report = evaluate_policy(policy, cfg, Path(tmp) / "grids", n=e.curve_n_per_family)
                logger.artifacts(Path(tmp) / "grids", f"eval/iteration_{step:04d}")
            logger.metrics(_oracle_metrics(report, "oracle"), step=step)
        last = step == cfg.train.iterations
        if step % cfg.train.checkpoint_every == 0 or last:
            next_id = ray.get(coordinator.stats.remote())["next_id"] if rank == 0 else 0
            with tempfile.TemporaryDirectory() as tmp:
                learner.save(tmp, extra={"next_id": next_id, "run_id": config["run_id"]})
                if rank == 0 and last:
                    logger.artifact(Path(tmp) / "trainable.safetensors", "checkpoint")
                    logger.artifact(Path(tmp) / "learner_state.json", "checkpoint")
                ray.train.report({"iteration": step, "reward_mean": stats.get("reward_mean")},
                                 checkpoint=ray.train.Checkpoint.from_directory(tmp))

    if rank == 0 and e.before_after:
        _judge(policy, cfg, logger, "oracle_after", f"eval/iteration_{cfg.train.iterations:04d}", "oracle",
               step=cfg.train.iterations, final=True)
