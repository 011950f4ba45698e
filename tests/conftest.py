"""Shared fixtures: a real local Ray instance (never joins another cluster)."""

from __future__ import annotations

import os
import time

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def ray_local():
    import ray

    last = None
    # Under load the local raylet sometimes misses its start-up deadline; a retry is enough (STACK-NOTES).
    for attempt in range(3):
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}})
            break
        except Exception as exc:  # noqa: BLE001 - any start-up failure is retried, then re-raised
            last = exc
            ray.shutdown()
            time.sleep(3 * (attempt + 1))
    else:
        raise last
    yield ray
    ray.shutdown()


@pytest.fixture
def ralign_cli_inprocess():
    """`ralign ARGS` through typer's test runner in this process: exit code, output, and the exception a user error
    raised (the console script's `main` turns that into the one-line `error: ...`)."""
    from typer.testing import CliRunner

    from jobs.cli import app

    return lambda *args: CliRunner().invoke(app, [str(a) for a in args])
