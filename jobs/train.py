"""`ralign train`: the RL fine-tuning job. Submit it to a Ray cluster, or run it with a local one (the default).

The driver (this file) creates or reopens the MLflow run, starts the rollout coordinator (which starts the sampler
and reward actors), and runs the learner group as a Ray Train `TorchTrainer`. It shows a progress bar fed by the
coordinator, and when training ends it closes the pipeline, checks its exactly-once ledger, and writes a summary.

    python -m jobs.train --config jobs/configs/quickstart.yaml [--set train.iterations=5] [--resume RUN_ID]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from ralign.config import ConfigError, dump_config, load_config, parse_config, refuse_credentials
from ralign.ops.credentials import redact_credentials
from ralign.training.config import TrainConfig

log = logging.getLogger("ralign.train")

RAY_RUN_TAG = "ralign.ray_train_name"
STORAGE_TAG = "ralign.ray_storage_path"


def absolute_tracking_uri(uri: str) -> str:
    """Ray workers do not share the driver's working directory: make a relative sqlite / file store absolute."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    if "://" not in uri:
        return str(Path(uri).resolve())
    return uri


def flat_params(data: dict, prefix: str = "") -> dict[str, str]:
    """The config as MLflow params. Free-form sections (`reward.options`, `deepspeed.extra`) could hold a key named
    like a credential: its value is never recorded."""
    from ralign.ops.credentials import is_credential_name

    out = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if is_credential_name(k) and v not in (None, "", {}):
            out[key] = "***"
        elif isinstance(v, dict) and v:
            out.update(flat_params(v, key + "."))
        else:
            out[key] = json.dumps(v) if not isinstance(v, str) else v
    return out


def _init_ray(cfg: TrainConfig) -> bool:
    """Connect to (or start) Ray; False when this process was already connected (a caller that embeds `train`,
    e.g. the test suite, keeps its connection: `train` must not shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    env = {"env_vars": {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "MLFLOW_DISABLE_TELEMETRY")
                        if k in os.environ}}
    # Inside a Ray job (`ralign submit`) RAY_ADDRESS names the cluster the job runs on: join it, never start another.
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=env)
        return True
    last = None
    for attempt in range(3):  # a loaded machine sometimes misses the raylet start-up deadline (STACK-NOTES)
        try:
            # The dashboard serves the state API, which Ray Train V2's placement-group cleaner polls (without it
            # that cleaner logs a warning every few seconds and cannot free a dead controller's resources).
            # Loopback only: nothing is exposed outside the machine.
            ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                     runtime_env=env)
            return True
        except Exception as exc:  # noqa: BLE001 - retried, then re-raised
            last = exc
            ray.shutdown()
            time.sleep(3 * (attempt + 1))
    raise last


def _open_run(cfg: TrainConfig | None, resume: str | None, tracking_uri: str, overrides: list[str] | None = None):
    """A new MLflow run with the config as params, or the run to resume with its own logged config (plus any
    `--set` overrides, e.g. more iterations). Returns (client, run_id, cfg, Ray Train run name, storage path)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    if resume:
        try:
            run = client.get_run(resume)
        except mlflow.exceptions.MlflowException:
            raise ConfigError(f"--resume {resume}: no such MLflow run at {tracking_uri}") from None
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(resume, "config.yaml", tmp)
            cfg = parse_config(TrainConfig, yaml.safe_load(Path(path).read_text()), source=f"run {resume} config.yaml", overrides=overrides)
        if RAY_RUN_TAG not in run.data.tags:
            raise ConfigError(f"--resume {resume}: that run was not started by `ralign train`")
        ray_name, storage = run.data.tags[RAY_RUN_TAG], run.data.tags[STORAGE_TAG]
        if not _has_registered_checkpoint(Path(storage) / ray_name):
            # Ray Train would start it from iteration 0 and log over the old run's steps.
            raise ConfigError(f"--resume {resume}: it stopped before its first checkpoint (iteration "
                              f"{cfg.train.checkpoint_every}; none registered under {Path(storage) / ray_name}): start a new run")
        client.update_run(resume, status="RUNNING")
        return client, resume, cfg, ray_name, storage
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(cfg.tracking.experiment)
    run = client.create_run(exp_id, run_name=cfg.tracking.run_name or f"{cfg.algorithm.name}-{cfg.reward.name}")
    run_id = run.info.run_id
    storage = str(Path(cfg.ray.storage_path).resolve())
    ray_name = f"ralign-{run_id[:12]}"
    params = flat_params(cfg.model_dump(mode="json"))
    from mlflow.entities import Param

    items = [Param(k, v[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])
    client.set_tag(run_id, RAY_RUN_TAG, ray_name)
    client.set_tag(run_id, STORAGE_TAG, storage)
    client.set_tag(run_id, "ralign.algorithm", cfg.algorithm.name)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.yaml").write_text(dump_config(cfg))
        client.log_artifact(run_id, str(Path(tmp) / "config.yaml"))
    return client, run_id, cfg, ray_name, storage


def _has_registered_checkpoint(ray_run_dir: Path) -> bool:
    """Whether Ray Train's checkpoint manager of this run has a checkpoint it would restore (its snapshot file is
    written with the first registered checkpoint)."""
    snapshot = ray_run_dir / "checkpoint_manager_snapshot.json"
    try:
        return bool(json.loads(snapshot.read_text()).get("latest_checkpoint_result"))
    except (OSError, ValueError, AttributeError):
        return False


def _announce_rollout_actors(coordinator, rollout_ready) -> None:
    import ray

    try:
        ray.get(rollout_ready)
    except Exception:  # noqa: BLE001 - the run reports it (train())
        return
    # Process ids, so an operator (or a fault drill) can find the rollout actors of this run on its nodes.
    log.info("rollout actors up: %s", ray.get(coordinator.actor_pids.remote()))


def _progress(coordinator, total: int, done: threading.Event) -> None:
    import ray
    from tqdm import tqdm

    bar = tqdm(total=total, desc="train", unit="it", dynamic_ncols=True, file=sys.stderr, mininterval=1.0)
    shown = 0
    while not done.is_set():
        try:
            p = ray.get(coordinator.get_progress.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - the bar is cosmetic; the job's outcome comes from trainer.fit()
            p = {}
        it = int(p.get("iteration", 0))
        if it > shown:
            bar.update(it - shown)
            shown = it
        post = {k: f"{v:.4g}" for k, v in p.items() if k in ("reward_mean", "kl", "loss") and isinstance(v, float)}
        if post:
            bar.set_postfix(post, refresh=False)
        done.wait(2.0)
    bar.close()


def summarize(client, run_id: str, cfg: TrainConfig, checkpoint: str | None, tracking_uri: str) -> dict:
    history = sorted(client.get_metric_history(run_id, "reward_mean"), key=lambda m: m.step)
    values = [m.value for m in history]
    k = max(1, len(values) // 10)
    oracle = {"oracle_pretrained": None}
    for name in ("oracle_before", "oracle_after") + (("oracle_pretrained",) if cfg.model.init_checkpoint else ()):
        try:
            with tempfile.TemporaryDirectory() as tmp:
                oracle[name] = json.loads(Path(client.download_artifacts(run_id, f"{name}.json", tmp)).read_text())
        except Exception:  # noqa: BLE001 - not evaluated (train.eval.before_after=false)
            oracle[name] = None
    summary = {
        "run_id": run_id,
        "tracking_uri": tracking_uri,
        "algorithm": cfg.algorithm.name,
        "reward": cfg.reward.name,
        "iterations": cfg.train.iterations,
        "reward_first": sum(values[:k]) / k if values else None,
        "reward_last": sum(values[-k:]) / k if values else None,
        "oracle_before": oracle["oracle_before"],
        "oracle_after": oracle["oracle_after"],
        "oracle_change": None,
        "reward_hacking": [],
        # Runs that started from model.init_checkpoint: the pretrained model on the same prompts and noise.
        "oracle_pretrained": oracle["oracle_pretrained"],
        "oracle_change_vs_pretrained": None,
        "reward_hacking_vs_pretrained": [],
        "checkpoint": checkpoint,
    }
    before, after = oracle["oracle_before"], oracle["oracle_after"]
    if before and after and "per_prompt" in before and "per_prompt" in after:
        record_oracle_change(client, run_id, summary)
    return summary


def record_oracle_change(client, run_id: str, summary: dict) -> None:
    """The paired change (same prompts, same noise) from before training to after, with its intervals, and the
    reward-hacking verdict (training reward up, held-out all-correct down), into the summary and the MLflow run; for a
    run that started from an earlier stage, the same against the pretrained model (`_vs_pretrained`)."""
    from mlflow.entities import Metric

    from ralign.ops.tracking import REWARD_HACKING_TAG, VS_PRETRAINED
    from ralign.world.stats import compare_evaluations, reward_hacking

    starts = [("", "against the model before training", summary["oracle_before"])]
    pretrained = summary.get("oracle_pretrained")
    if pretrained and "per_prompt" in pretrained:
        starts.append((VS_PRETRAINED, "against the pretrained model", pretrained))
    now, step = int(time.time() * 1000), summary["iterations"]
    for suffix, label, start in starts:
        change = compare_evaluations(start, summary["oracle_after"])
        hacked = reward_hacking(summary["reward_first"], summary["reward_last"], change)
        summary[f"oracle_change{suffix}"], summary[f"reward_hacking{suffix}"] = change, hacked
        client.log_dict(run_id, change, f"oracle_change{suffix}.json")
        metrics = []
        for scope, c in [("overall", change["overall"]), *change["families"].items()]:
            metrics += [Metric(f"oracle_change{suffix}/{scope}/all_correct", c["diff"], now, step),
                        Metric(f"oracle_change{suffix}/{scope}/ci_low", c["ci"][0], now, step),
                        Metric(f"oracle_change{suffix}/{scope}/ci_high", c["ci"][1], now, step)]
        client.log_batch(run_id, metrics=metrics)
        client.set_tag(run_id, f"{REWARD_HACKING_TAG}{suffix}", ",".join(hacked) if hacked else "none")
        if hacked:
            log.warning("reward hacking (%s): the training reward rose (%.4f -> %.4f) while held-out all-correct fell on %s",
                        label, summary["reward_first"], summary["reward_last"], ", ".join(hacked))


def train(cfg: TrainConfig | None, resume: str | None = None, tracking_uri: str | None = None, progress: bool = True,
          overrides: list[str] | None = None) -> dict:
    """Run (or resume) one training job to the end; returns the summary. When resuming, `cfg` may be None: the
    run's own config is used, with `overrides` applied."""
    if cfg is None and not resume:
        raise ConfigError("a config is needed to start a run")
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from actors.coordinator import RolloutCoordinator
    from actors.learner import train_loop_per_worker
    from ralign.ops.tracking import RunLogger

    from ralign.training.deepspeed_ops import configure_environment

    configure_environment()  # before Ray starts, so every worker inherits the op cache location
    uri = absolute_tracking_uri(tracking_uri or (cfg.tracking.tracking_uri if cfg else TrainConfig().tracking.tracking_uri))
    client, run_id, cfg, ray_name, storage = _open_run(cfg, resume, uri, overrides)
    log.info("MLflow run %s at %s", run_id, redact_credentials(uri))
    connected_here = _init_ray(cfg)
    coordinator = RolloutCoordinator.remote(cfg.model_dump(mode="json"))
    # The rollout actors load their models while Ray Train starts its worker group (each ~15 s on a toy run); the
    # learners wait for this reference before their first request, and the driver reports its failure.
    rollout_ready = coordinator.ready.remote()
    threading.Thread(target=_announce_rollout_actors, args=(coordinator, rollout_ready), daemon=True).start()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "coordinator": coordinator, "rollout_ready": [rollout_ready],
                           "run_id": run_id, "tracking_uri": uri},
        scaling_config=ScalingConfig(num_workers=cfg.ray.learners, use_gpu=cfg.ray.use_gpu, resources_per_worker={"CPU": cfg.ray.learner_cpus}),
        torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
        run_config=RunConfig(
            name=ray_name, storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    done = threading.Event()
    bar = threading.Thread(target=_progress, args=(coordinator, cfg.train.iterations, done), daemon=True)
    if progress:
        bar.start()
    status, failure = "FAILED", None
    try:
        result = trainer.fit()
        # Learners end without training when the rollout actors could not start; that is the run's failure.
        ray.get(rollout_ready)
        status = "FINISHED"
    except Exception as exc:  # noqa: BLE001 - re-raised below as one line, after the run is closed
        failure = exc
    finally:
        done.set()
        ledger = ray.get(coordinator.shutdown.remote())
        client.log_dict(run_id, ledger, "pipeline_ledger.json")
        RunLogger(uri, run_id, enabled=True).quarantined(ray.get(coordinator.quarantine_records.remote()))
        client.set_terminated(run_id, status=status)
        ray.kill(coordinator)  # it has stopped its samplers and reward actors; an embedding process lives on
        if bar.is_alive():
            bar.join(timeout=5)
    if failure is not None:
        log.error("training failed", exc_info=failure)
        if connected_here:
            ray.shutdown()  # Ray flushes the workers' forwarded logs now, so the one-line reason comes after them
        raise TrainingFailed(training_failure(failure)) from failure
    checkpoint = result.checkpoint.path if result.checkpoint else None
    summary = summarize(client, run_id, cfg, checkpoint, uri)
    summary["ledger"] = ledger
    return summary


class TrainingFailed(RuntimeError):
    """The run failed (its MLflow run is closed as FAILED, its ledger logged); the message is the cause, one line."""


def training_failure(exc: BaseException) -> str:
    """Why a run failed, in one line: Ray Train wraps a worker's error (which may itself wrap the coordinator's)."""
    from actors.common import one_line_error

    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        exc = next(iter(failures.values()))
    return one_line_error(exc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="jobs/configs/quickstart.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--resume", default=None)
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--json", dest="json_out", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.tracking_uri is not None:
            refuse_credentials(args.tracking_uri, "--tracking-uri")  # it would be logged and shown with the job
        cfg = None if args.resume else load_config(TrainConfig, args.config, args.overrides)
        summary = train(cfg, resume=args.resume, tracking_uri=args.tracking_uri, overrides=args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingFailed as exc:
        print(f"error: training failed: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(summary, indent=2)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
