"""A whole training run survives its processes being killed: a sampler and a reward actor (Ray restarts them, the
pipeline restores their weights), then the learner worker (Ray Train restarts the group from the last checkpoint).

The killed-processes job runs as a user runs it (`ralign train` in a process of its own, joining the suite's Ray
cluster, MLflow on sqlite); the test reads the actors' process ids from the job's log and kills them with SIGKILL, by
id, mid-run. The NaN run, whose process is not under test, runs through the CLI in this process."""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

CONFIG = Path(__file__).parents[1] / "configs" / "tiny_train.yaml"


def _logged_iterations(client: MlflowClient, run_id: str) -> list[int]:
    return [m.step for m in sorted(client.get_metric_history(run_id, "iteration"), key=lambda m: m.timestamp)]


def _cmd(tmp_path: Path, *overrides: str) -> list[str]:
    sets = [a for o in overrides for a in ("--set", o)]
    return [sys.executable, "-m", "jobs.cli", "train", "--config", str(CONFIG), "--set", f"ray.storage_path={tmp_path / 'ray'}",
            "--set", "train.eval.before_after=false", *sets, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--json", str(tmp_path / "summary.json")]


def _poisoned_word() -> tuple[str, int]:
    """A word in some but not all of the run's training prompts, and in how many of them."""
    from ralign.rollout.prompts import PromptSource
    from ralign.config import load_config
    from ralign.training.config import TrainConfig

    pool = PromptSource(load_config(TrainConfig, CONFIG)).pool
    words = sorted({w for p in pool for w in p.split() if len(w) > 3})
    word = next(w for w in words if 0 < sum(w in p.split() for p in pool) < len(pool) / 2)
    return word, sum(word in p.split() for p in pool)


def test_run_survives_killed_sampler_reward_and_learner_processes(tmp_path):
    db = tmp_path / "mlflow.db"
    out = tmp_path / "summary.json"
    word, _ = _poisoned_word()
    # Some prompts also get NaN rewards: they are quarantined (with their images) while the run goes on.
    reward = f"reward.options={{inner: {{name: colorfulness}}, nan_if_prompt_contains: ' {word}'}}"
    cmd = _cmd(tmp_path, "train.max_failures=2", "reward.name=fault_injection", reward)
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(job.stdout.readline, "")), daemon=True)
    reader.start()
    client = MlflowClient(f"sqlite:///{db}")
    deadline = time.time() + 900

    def wait_for(what: str, condition) -> None:
        while not condition():
            assert job.poll() is None, f"the job ended while waiting for {what}:\n{''.join(lines)[-4000:]}"
            assert time.time() < deadline, f"timed out waiting for {what}:\n{''.join(lines)[-4000:]}"
            time.sleep(1)

    def run_id() -> str | None:
        if not db.exists():
            return None
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        return runs[0].info.run_id if runs else None

    def iterations() -> int:
        rid = run_id()
        return max(_logged_iterations(client, rid), default=0) if rid else 0

    def pids_line() -> dict | None:
        found = [ln for ln in lines if "rollout actors up:" in ln]
        return ast.literal_eval(found[0].split("rollout actors up:", 1)[1].strip()) if found else None

    try:
        wait_for("the first iteration", lambda: pids_line() is not None and iterations() >= 1)
        pids = pids_line()
        os.kill(pids["samplers"][0], signal.SIGKILL)
        os.kill(pids["rewards"][0], signal.SIGKILL)
        # After the first checkpoint (iteration 2) the learner worker dies too: once Ray Train has registered it
        # (its checkpoint manager's snapshot is written), not only once the learner wrote it. A kill in between
        # restarts the group from scratch (covered by actors/learner.py's restart without a checkpoint).
        wait_for("iteration 3 and a registered checkpoint",
                 lambda: iterations() >= 3 and any((tmp_path / "ray").glob("*/checkpoint_manager_snapshot.json")))
        learner_pids = {int(m) for ln in lines for m in re.findall(r"\(RayTrainWorker pid=(\d+)", ln)}
        assert len(learner_pids) == 1, learner_pids
        os.kill(learner_pids.pop(), signal.SIGKILL)
        logged_at_kill = iterations()  # on a fast machine the learner may have passed the checkpoint of iteration 4
        job.wait(timeout=max(1, deadline - time.time()))
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
        reader.join(timeout=10)
    assert job.returncode == 0, "".join(lines)[-6000:]

    summary = json.loads(out.read_text())
    rid = summary["run_id"]
    # One MLflow run, every step logged once and in order, though a learner attempt died after step 3.
    assert _logged_iterations(client, rid) == [1, 2, 3, 4, 5, 6]
    run = client.get_run(rid)
    assert run.info.status == "FINISHED"
    # Ray Train restarted the group from the last checkpoint registered before the kill (every 2 iterations).
    resumed_at = int(run.data.tags["ralign.resumed_from_iteration"])
    assert resumed_at in (2, 4) and resumed_at <= logged_at_kill, (resumed_at, logged_at_kill)
    ledger = summary["ledger"]
    assert ledger["balanced"], ledger  # every id issued ended in exactly one terminal state
    # The killed actors' in-flight work is lost or re-scored, never trained on twice (the coordinator checks the
    # consumed list for repeats at shutdown); what the dead learner attempt had queued, if anything (that depends
    # on where the kill lands), is dropped and counted: the ledger balances either way.
    assert ledger["consumed"] >= 6 * 4
    state = json.loads((Path(summary["checkpoint"]) / "learner_state.json").read_text())
    assert state["iteration"] == 6
    quarantined = [a.path for a in client.list_artifacts(rid, "quarantine")]
    assert ledger["quarantined"] > 0 and len(quarantined) == 2 * ledger["quarantined"]  # a record and an image each
    record = json.loads(Path(client.download_artifacts(rid, next(p for p in quarantined if p.endswith(".json")), str(tmp_path))).read_text())
    assert f" {word}" in record["prompt"] and record["reason"] == "non-finite reward"


def test_a_run_whose_rewards_are_mostly_nan_stops_with_a_one_line_reason(ralign_cli, tmp_path):
    reward = "reward.options={inner: {name: colorfulness}, nan_if_prompt_contains: ' '}"  # every prompt
    # In this process, on the suite's Ray cluster (nothing here is about the process; it saves its start-up).
    outcome = ralign_cli(*_cmd(tmp_path, "train.max_failures=0", "reward.name=fault_injection", reward)[3:])
    assert outcome.code == 1, outcome.err[-3000:]
    last = outcome.err.strip().splitlines()[-1]
    assert re.fullmatch(r"error: training failed: PipelineAbort: \d+ of \d+ rewards were NaN/inf or timed out "
                        r"\(100% > train.max_bad_reward_fraction=0.5\); stopping", last), last
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
    assert run.info.status == "FAILED"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"pipeline_ledger.json", "quarantine"} <= artifacts
    ledger = json.loads(Path(client.download_artifacts(run.info.run_id, "pipeline_ledger.json", str(tmp_path))).read_text())
    assert ledger["balanced"] and ledger["consumed"] == 0 and ledger["quarantined"] >= 4  # nothing poisoned was trained on
