"""Shared fixtures: a real local Ray instance (never joins another cluster)."""

from __future__ import annotations

import os
import sys
import time

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session", autouse=True)
def ray_local():
    """One local Ray instance for the whole suite, shared: tests use it in this process, and every `ralign train` a
    test starts as a subprocess joins it through RAY_ADDRESS (the job driver's own rule inside a Ray cluster)
    instead of starting a cluster of its own (about 15-25 s each on this machine). Its CPUs are logical: a module's
    long-lived actors must not starve the jobs of later modules. The dashboard serves the state API that Ray Train
    V2's placement-group cleaner polls."""
    import ray

    last = None
    # Under load the local raylet sometimes misses its start-up deadline; a retry is enough (STACK-NOTES).
    for attempt in range(3):
        try:
            ray.init(address="local", num_cpus=8, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False,
                     runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}})
            break
        except Exception as exc:  # noqa: BLE001 - any start-up failure is retried, then re-raised
            last = exc
            ray.shutdown()
            time.sleep(3 * (attempt + 1))
    else:
        raise last
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    yield ray
    os.environ.pop("RAY_ADDRESS", None)
    ray.shutdown()

@pytest.fixture
def ralign_cli_inprocess():
    """`ralign ARGS` through typer's test runner in this process: exit code, output, and the exception a user error
    raised (the console script's `main` turns that into the one-line `error: ...`)."""
    from typer.testing import CliRunner

    from jobs.cli import app

    return lambda *args: CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def ralign_cli(capsys, monkeypatch):
    """`ralign ARGS` through `jobs.cli.main`, the console script's own function, in this process (a subprocess per
    case would spend seconds importing torch): exit code, stdout, stderr."""
    from jobs.cli import main

    from faults.cli_runs import Outcome

    def run(*args) -> Outcome:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["ralign", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return Outcome(code, captured.out, captured.err)

    return run
