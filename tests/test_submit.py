"""`ralign submit / status / logs / stop` and `ralign serve --address` against a real Ray head started by the test on loopback (job server on
127.0.0.1): a training run submitted as a Ray job ships the project, joins that cluster, runs to completion and
logs to MLflow; a long job is stopped; a bad config is refused before anything is submitted. The job-client verbs run
through the console script's `main` in this process; `ralign serve`, which joins the cluster as a driver, runs in
its own process (this one is already connected to the suite's cluster)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "tests/configs/tiny_train.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths must fit in 107 characters
    gcs, dash = _free_port(), _free_port()
    # Every port of its own: the suite's other local Ray instance holds Ray's default agent ports, and a second
    # head on the same defaults starts without a job agent ("No available agent to submit job").
    agent_ports = [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
                   f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}"]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2", f"--temp-dir={temp}",
         "--include-dashboard=true", "--disable-usage-stats", *agent_ports],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=5):
                break
        except urllib.error.HTTPError:
            break  # answering (401 when Ray's token authentication is on: the client sends the token)
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("the Ray head did not start its job server within 180 s")
        time.sleep(1)
    yield address, f"127.0.0.1:{gcs}"
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        # A head with Serve applications takes ~35 s to stop gracefully; nothing of it is kept, so 10 s is plenty.
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def ralign_here(ralign_cli, monkeypatch):
    """The job-client verbs (submit, status, logs, stop talk to the job server over HTTP) through the console script's
    own `main` in this process, from the project root, with no RAY_ADDRESS: only --address names the cluster."""
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return ralign_cli


def _ralign(*args: str, timeout: float = 900, auth: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    if auth:
        env["RAY_AUTH_MODE"] = "token"
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def test_submitted_training_job_runs_to_completion_on_the_cluster(ray_head, ralign_here, tmp_path):
    ray_head = ray_head[0]
    db = tmp_path / "mlflow.db"
    proc = ralign_here("submit", "--address", ray_head, "--config", CONFIG, "--set", "train.iterations=2",
                       "--set", "train.eval.before_after=false", "--set", f"ray.storage_path={tmp_path / 'ray'}",
                       "--tracking-uri", f"sqlite:///{db}")
    assert proc.code == 0, proc.out[-3000:] + proc.err[-1500:]
    job_id = proc.out.strip().splitlines()[-1]
    assert job_id.startswith("raysubmit_") and f"job {job_id}: SUCCEEDED" in proc.err
    assert "MLflow run" in proc.out or "MLflow run" in proc.err  # the streamed job logs
    status = json.loads(ralign_here("status", job_id, "--address", ray_head).out)
    assert status["status"] == "SUCCEEDED" and "jobs.train" in status["entrypoint"]
    logs = ralign_here("logs", job_id, "--address", ray_head).out
    assert '"iterations": 2' in logs
    # the job joined the test's cluster (it did not start its own) and logged a finished run
    assert "Connecting to existing Ray cluster" in logs or "Connected to Ray cluster" in logs
    runs = MlflowClient(f"sqlite:///{db}").search_runs([MlflowClient(f"sqlite:///{db}").get_experiment_by_name("ralign").experiment_id])
    assert runs and runs[0].info.status == "FINISHED"


def test_a_running_job_is_stopped(ray_head, ralign_here, tmp_path):
    ray_head = ray_head[0]
    proc = ralign_here("submit", "--address", ray_head, "--config", CONFIG, "--no-follow", "--set", "train.iterations=500",
                       "--set", f"ray.storage_path={tmp_path / 'ray'}", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert proc.code == 0, proc.err[-3000:]
    job_id = proc.out.strip().splitlines()[-1]
    deadline = time.monotonic() + 120
    while json.loads(ralign_here("status", job_id, "--address", ray_head).out)["status"] == "PENDING":
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(1)
    stop = ralign_here("stop", job_id, "--address", ray_head)
    assert stop.code == 0 and "stop requested" in stop.out
    deadline = time.monotonic() + 120
    while (state := json.loads(ralign_here("status", job_id, "--address", ray_head).out)["status"]) not in ("STOPPED", "FAILED", "SUCCEEDED"):
        assert time.monotonic() < deadline, "the job did not stop within 120 s"
        time.sleep(1)
    assert state == "STOPPED"


def test_bad_config_or_unknown_job_is_one_line_and_submits_nothing(ray_head, ralign_here):
    ray_head = ray_head[0]
    proc = ralign_here("submit", "--address", ray_head, "--config", CONFIG, "--set", "train.lerning_rate=1")
    assert proc.code == 2 and proc.err.strip().count("\n") == 0 and "unknown key 'train.lerning_rate'" in proc.err
    proc = ralign_here("submit", "--address", ray_head, "--config", "/etc/hostname")
    assert proc.code == 2 and "error:" in proc.err
    proc = ralign_here("status", "raysubmit_doesnotexist", "--address", ray_head)
    assert proc.code == 2 and "raysubmit_doesnotexist" in proc.err


def test_ralign_serve_deploys_reward_servers_on_the_cluster(ray_head, tmp_path):
    import base64
    import io

    import numpy as np
    import yaml
    from PIL import Image

    port = _free_port()
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump({"http": {"host": "127.0.0.1", "port": port}, "deployments": [
        {"name": "colour", "reward": {"name": "colorfulness"}, "ray_actor_options": {"num_cpus": 0.25},
         "autoscaling": {"min_replicas": 1, "max_replicas": 1}}]}))
    # Ray >= 2.52 starts local clusters with token authentication; a client joining by address opts in like this.
    proc = _ralign("serve", "--config", str(cfg), "--address", ray_head[1], "--detach", timeout=300, auth=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"colour: POST http://127.0.0.1:{port}/colour" in proc.stdout
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), (250, 10, 10), np.uint8)).save(buf, format="PNG")
    body = json.dumps({"prompts": ["a red square"], "images": [base64.b64encode(buf.getvalue()).decode()]}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/colour", data=body, method="POST")
    with urllib.request.urlopen(req, timeout=60) as resp:
        out = json.loads(resp.read())
    assert out["reward"] == "colorfulness" and len(out["scores"]) == 1 and out["scores"][0] > 0
    bad = _ralign("serve", "--config", str(cfg), "--only", "nope", "--address", ray_head[1], "--detach", timeout=120)
    assert bad.returncode == 2 and "--only ['nope']" in bad.stderr
