"""Submitting training runs to a Ray cluster as Ray jobs (the Jobs API, `JobSubmissionClient`), and watching them.

`submit` validates the config here first (a typo fails in a second on the laptop, not after the cluster pulled the
job), then ships the project as the job's `working_dir` (without the venv, run outputs and caches) and runs
`python -m jobs.train --config ... --set ...` on the cluster. MLflow settings travel as environment variables of the
job: the tracking URI, and credentials only when they are set in the submitting shell, never as MLflow params.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
from collections.abc import Callable
from pathlib import Path

from ralign.config import ConfigError, load_config, refuse_credentials
from ralign.training.config import TrainConfig

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# What never goes to the cluster: environments, outputs, VCS data, caches (Ray refuses working dirs over its limit).
EXCLUDES = [".venv", ".git", "runs", "mlruns", "outputs", "**/__pycache__", ".pytest_cache", "*.db", "benchmarks/results/compare*_montages"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def _local_auth_token() -> str | None:
    """Ray's token for clusters with token authentication (Ray >= 2.52 enables it for new local clusters):
    $RAY_AUTH_TOKEN, the file at $RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    return path.read_text().strip() if path.is_file() else None


def _client(address: str):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        try:
            return JobSubmissionClient(address)
        except AuthenticationError:
            # The server wants a token: send ours, and only to a server that asked for one.
            token = _local_auth_token()
            if token is None:
                raise ConfigError(f"the Ray job server at {address} requires a token: set RAY_AUTH_TOKEN or "
                                  "RAY_AUTH_TOKEN_PATH (see `ray get-auth-token`)") from None
            return JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
    except AuthenticationError:
        raise ConfigError(f"the Ray job server at {address} refused our token (RAY_AUTH_TOKEN / ~/.ray/auth_token)") from None
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"cannot reach the Ray job server at {address}: {str(exc).splitlines()[0]}") from None


def build_entrypoint(config: str | Path, overrides: list[str], tracking_uri: str | None) -> str:
    """The job's command line, with the config path relative to the shipped project."""
    path = Path(config).resolve()
    try:
        rel = path.relative_to(PROJECT_ROOT)
    except ValueError:
        raise ConfigError(f"{config}: the config must live inside the project ({PROJECT_ROOT}) so it ships with the job") from None
    parts = ["python", "-m", "jobs.train", "--config", rel.as_posix()]
    for item in overrides:
        parts += ["--set", item]
    if tracking_uri:
        parts += ["--tracking-uri", tracking_uri]
    return shlex.join(parts)


def connect(address: str, runtime_env: dict | None = None) -> None:
    """`ray.init` on an existing cluster, with a one-line error when it fails. Ray sends no auth token to an explicit
    address unless RAY_AUTH_MODE=token is set (and the token is in RAY_AUTH_TOKEN or ~/.ray/auth_token); the mode
    is fixed for the process once chosen, so it is the caller's setting, not a retry here."""
    import ray

    try:
        ray.init(address=address, runtime_env=runtime_env)
    except ConnectionError as exc:
        ray.shutdown()
        hint = "" if os.environ.get("RAY_AUTH_MODE") else \
            " (a cluster with token authentication needs RAY_AUTH_MODE=token and its token in RAY_AUTH_TOKEN or ~/.ray/auth_token)"
        raise ConfigError(f"cannot connect to the Ray cluster at {address}: {str(exc).splitlines()[0]}{hint}") from None


def job_runtime_env(forward_env: list[str] | None = None) -> dict:
    """The job's runtime env: the project as working_dir, fixed settings, and only the variables named."""
    # RAY_OVERRIDE_JOB_RUNTIME_ENV: the training driver adds its own env vars (DeepSpeed op cache, ...) to its
    # workers; without it Ray refuses any key the job's runtime env also sets instead of combining the two.
    env = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1",
           "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}
    for name in forward_env or []:
        if not os.environ.get(name):
            raise ConfigError(f"--forward-env {name}: not set in this environment")
        env[name] = os.environ[name]
    return {"working_dir": str(PROJECT_ROOT), "excludes": EXCLUDES, "env_vars": env}


def submit(address: str, config: str | Path, overrides: list[str] | None = None, tracking_uri: str | None = None,
           job_id: str | None = None, agent_wait_s: float = 120.0, forward_env: list[str] | None = None) -> str:
    """Validate, submit, return the job id. `forward_env` names variables of this shell to give the job: nothing is
    forwarded unless named, because Ray keeps a job's environment in its job info, which anyone who can reach the
    dashboard or the job API can read (on a shared cluster, credentials belong to the cluster: a Kubernetes Secret)."""
    overrides = list(overrides or [])
    if tracking_uri is not None:
        # It would be part of the job's entrypoint, which the Ray dashboard and `ralign status` show to anyone.
        refuse_credentials(tracking_uri, "--tracking-uri")
    cfg = load_config(TrainConfig, config, overrides)  # one-line ConfigError on any problem
    if tracking_uri is None and cfg.tracking.tracking_uri.startswith(("http://", "https://", "databricks")):
        tracking_uri = cfg.tracking.tracking_uri
    runtime_env = job_runtime_env(forward_env)
    client = _client(address)
    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            return client.submit_job(entrypoint=build_entrypoint(config, overrides, tracking_uri), runtime_env=runtime_env,
                                     submission_id=job_id, metadata={"project": "ralign", "config": Path(config).name})
        except (RuntimeError, OSError) as exc:
            # A cluster that has just started answers before its job agent is up ("No available agent to submit
            # job", or the connection dropped while the agent starts): wait for it, bounded; any other refusal is
            # the user's to fix. (requests raises OSError subclasses for dropped connections.)
            starting = "No available agent" in str(exc) or isinstance(exc, OSError)
            if not starting or time.monotonic() > deadline:
                raise ConfigError(f"the Ray job server at {address} refused the job: {str(exc).splitlines()[0]}") from None
            time.sleep(2)


def status(address: str, job_id: str) -> dict:
    client = _client(address)
    try:
        info = client.get_job_info(job_id)
    except RuntimeError as exc:
        raise ConfigError(f"job {job_id}: {str(exc).splitlines()[0]}") from None
    return {"job_id": job_id, "status": str(info.status.value if hasattr(info.status, "value") else info.status),
            "message": info.message, "entrypoint": info.entrypoint, "start_time": info.start_time, "end_time": info.end_time}


def stop(address: str, job_id: str) -> bool:
    client = _client(address)
    try:
        return bool(client.stop_job(job_id))
    except RuntimeError as exc:
        raise ConfigError(f"job {job_id}: {str(exc).splitlines()[0]}") from None


def logs(address: str, job_id: str) -> str:
    client = _client(address)
    try:
        return client.get_job_logs(job_id)
    except RuntimeError as exc:
        raise ConfigError(f"job {job_id}: {str(exc).splitlines()[0]}") from None


def follow(address: str, job_id: str, write: Callable[[str], None] = lambda s: print(s, end="", flush=True),
           timeout_s: float | None = None) -> str:
    """Stream the job's logs until it ends (or `timeout_s`); returns its final status."""
    client = _client(address)

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            write(lines)

    try:
        asyncio.run(asyncio.wait_for(tail(), timeout=timeout_s))
    except asyncio.TimeoutError:
        pass
    deadline = time.monotonic() + 30  # the log stream can close a moment before the status is final
    while True:
        state = status(address, job_id)["status"]
        if state in TERMINAL or time.monotonic() > deadline:
            return state
        time.sleep(0.5)
