"""`ralign train` end to end on the suite's local Ray cluster: Ray Train + DeepSpeed learner, MLflow on sqlite.

Jobs run through the CLI in this process (a subprocess would spend seconds importing what the suite has imported),
except where the process itself is under test: the resume test kills a first job's whole process group after its
first checkpoint and continues the same MLflow run with `--resume`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

CONFIG = Path(__file__).parent / "configs" / "tiny_train.yaml"
# The same tiny job on a flow-matching model (StableDiffusion3Pipeline, MMDiT transformer, Flow-GRPO's SDE).
FLOW = ("--set", "model.pipeline=tiny-random-flow")


def _cmd(tmp_path: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "jobs.cli", "train", "--config", str(CONFIG),
        "--set", f"ray.storage_path={tmp_path / 'ray'}",
        "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
        *extra,
    ]


def _train(cli, tmp_path: Path, *extra: str) -> dict:
    """`ralign train` on the tiny config in this process; returns the summary it wrote."""
    out = tmp_path / "summary.json"
    result = cli(*_cmd(tmp_path, *extra, "--json", str(out))[3:])  # without `python -m jobs.cli`
    assert result.exit_code == 0, (result.output[-4000:], result.exception)
    return json.loads(out.read_text())


def _iterations(client: MlflowClient, run_id: str) -> list[int]:
    return [m.step for m in sorted(client.get_metric_history(run_id, "iteration"), key=lambda m: m.timestamp)]


def test_refl_job_hands_prefixes_to_the_learner(ralign_cli_inprocess, tmp_path):
    summary = _train(ralign_cli_inprocess, tmp_path, "--set", "algorithm.name=refl", "--set", "algorithm.refl.late_step_max=2",
                     "--set", "train.iterations=3", "--set", "ray.metric_rollout_every=2", "--set", "train.eval.before_after=false")
    ledger = summary["ledger"]
    assert ledger["balanced"] and ledger["lost"] == 0
    assert ledger["handed_over"] > 0 and ledger["metrics_only"] > 0  # prefixes to the learner, full rollouts to rewards
    assert summary["oracle_before"] is None and summary["oracle_after"] is None
    client = MlflowClient(summary["tracking_uri"])
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["algorithm.name"] == "refl"
    assert "rollout_reward_mean" in run.data.metrics and "reward_mean" in run.data.metrics
    assert _iterations(client, summary["run_id"]) == [1, 2, 3]

    # `ralign report` of the same run (in-process: a subprocess would cost seconds of imports).
    import re

    from ralign.ops.report import build_report

    index = build_report(summary["run_id"], tracking_uri=summary["tracking_uri"], out_dir=tmp_path / "report")
    page = index.read_text(encoding="utf-8")
    srcs = re.findall(r'<img[^>]* src="([^"]+)"', page)
    assert all((index.parent / s).is_file() for s in srcs)
    assert {"plots/rewards.png", "plots/timings.png"} <= set(srcs)
    assert "No KL logged: refl" in page  # ReFL has no KL term; stated on the page, not an error
    assert "No evaluation grids logged" in page  # train.eval.before_after=false
    assert "report/index.html" in {a.path for a in client.list_artifacts(summary["run_id"], "report")}


def test_flow_model_dpok_job_survives_a_killed_driver_and_resumes_the_same_run(ralign_cli_inprocess, tmp_path):
    # On the flow-matching policy (the UNet one goes through the same kills in tests/faults/test_run_faults.py).
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    first = subprocess.Popen(_cmd(tmp_path, *FLOW), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    run_id = None
    deadline = time.time() + 900
    try:
        # Wait until the first checkpoint (iteration 2) is behind us, then kill the job mid-run. "Behind us" means
        # registered by Ray Train (its checkpoint manager's snapshot is written), not only written by the learner:
        # a kill between the two leaves a checkpoint directory that a resume cannot see.
        while time.time() < deadline and first.poll() is None:
            time.sleep(1)
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()]) if (tmp_path / "mlflow.db").exists() else []
            if runs:
                run_id = runs[0].info.run_id
                registered = any((tmp_path / "ray").glob("*/checkpoint_manager_snapshot.json"))
                if registered and max(_iterations(client, run_id), default=0) >= 3:
                    break
        assert first.poll() is None, f"the first job ended early:\n{first.stdout.read()[-3000:]}"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    logged_before_kill = _iterations(client, run_id)
    assert logged_before_kill[:4] == [0, 1, 2, 3]  # 0: the evaluation before training

    summary = _train(ralign_cli_inprocess, tmp_path, "--resume", run_id)
    assert summary["run_id"] == run_id and summary["iterations"] == 6
    assert client.get_run(run_id).data.params["model.pipeline"] == "tiny-random-flow"  # the resumed run's own config
    # Same run, every iteration logged once, in order: no repeated or skipped step numbers.
    assert _iterations(client, run_id) == [0, 1, 2, 3, 4, 5, 6]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    resumed_at = int(run.data.tags["ralign.resumed_from_iteration"])
    assert resumed_at in (2, 4) and resumed_at <= max(logged_before_kill)
    assert summary["ledger"]["balanced"] and summary["ledger"]["lost"] == 0
    assert summary["reward_first"] is not None and summary["reward_last"] is not None
    assert summary["oracle_before"]["families"]["single"]["n"] == 2  # from the first attempt
    assert summary["oracle_after"]["families"]["binding"]["n"] == 2
    state = json.loads((Path(summary["checkpoint"]) / "learner_state.json").read_text())
    assert state["iteration"] == 6 and state["run_id"] == run_id
    from ralign.diffusion.policy import policy_from_checkpoint

    resumed = policy_from_checkpoint(summary["checkpoint"])
    assert resumed.family == "flow" and resumed.version == state["version"]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "oracle_before.json", "oracle_after.json", "checkpoint", "pipeline_ledger.json", "rollouts"} <= artifacts
    kl = client.get_metric_history(run_id, "kl")
    assert kl and all(m.value >= 0 for m in kl)


@pytest.mark.parametrize("override, message", [
    ("model.policy.eta=0", "dpok needs model.policy.eta > 0"),
    ("reward.name=nope", "reward.name='nope' is not a known reward"),
    ("train.micro_batch=3", "must be a multiple of train.micro_batch=3"),
    ("train.lr=-1", "'train.lr'"),
])
def test_train_rejects_bad_configs_in_one_line(ralign_cli, tmp_path, override, message):
    outcome = ralign_cli(*_cmd(tmp_path, "--set", override)[3:])  # the console script's main: its exit code
    assert outcome.code == 2
    assert outcome.err.strip().count("\n") == 0 and message in outcome.err, outcome.err
    assert not (tmp_path / "mlflow.db").exists()  # nothing was started or written


def test_resuming_a_run_that_never_checkpointed_is_refused(ralign_cli, tmp_path):
    from jobs.train import _open_run
    from ralign.config import load_config
    from ralign.training.config import TrainConfig

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(TrainConfig, str(CONFIG), [f"ray.storage_path={tmp_path / 'ray'}"])
    client, run_id, *_ = _open_run(cfg, None, uri)
    client.set_terminated(run_id, status="FAILED")  # it died before iteration 2, its first checkpoint
    outcome = ralign_cli("train", "--resume", run_id, "--tracking-uri", uri)
    assert outcome.code == 2 and outcome.err.strip().count("\n") == 0, outcome.err
    assert f"--resume {run_id}: it stopped before its first checkpoint (iteration 2" in outcome.err, outcome.err
    assert client.get_run(run_id).info.status == "FAILED"  # left as it was, not reopened


def test_two_grpo_learner_workers_share_each_update_of_a_flow_model(ralign_cli_inprocess, tmp_path):
    summary = _train(ralign_cli_inprocess, tmp_path, *FLOW, "--set", "ray.learners=2", "--set", "ray.learner_cpus=0.5", "--set", "train.iterations=2",
                     "--set", "algorithm.name=grpo", "--set", "algorithm.grpo.group_size=2", "--set", "algorithm.grpo.skip_last_steps=1",
                     "--set", "train.eval.before_after=false")
    # Each of the 2 workers trained on its own 4 samples (2 groups of 2) per iteration: 16 samples, each exactly once.
    assert summary["ledger"]["consumed"] == 2 * 2 * 4 and summary["ledger"]["balanced"]
    client = MlflowClient(summary["tracking_uri"])
    assert _iterations(client, summary["run_id"]) == [1, 2]
    run = client.get_run(summary["run_id"])
    assert run.data.params["algorithm.name"] == "grpo"
    # The advantages' scale is gathered over both workers; the adapters moved (KL to the reference above 0).
    assert run.data.metrics["advantage_abs_mean"] > 0 and run.data.metrics["kl"] > 0
    samples_per_s = client.get_metric_history(summary["run_id"], "learner_samples_per_s")
    assert len(samples_per_s) == 2 and all(m.value > 0 for m in samples_per_s)


def test_a_run_from_an_earlier_stage_is_also_judged_against_the_pretrained_model(ralign_cli_inprocess, tmp_path):
    """A staged method's "before" is its earlier stage; the pretrained model is judged too, on the same prompts and
    noise, so the claim and the reward-hacking check cover every stage."""
    import torch
    from safetensors.torch import save_file

    from ralign.diffusion.policy import build_policy

    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    torch.manual_seed(0)
    policy = build_policy({"pipeline": "tiny-random", "seed": 0, "policy": {"unet_lora_rank": 2, "steps": 3, "guidance": 3.0}})
    moved = {k: (v + 0.5 * torch.randn_like(v)).contiguous() for k, v in policy.trainable_state().items()}
    save_file(moved, str(stage1 / "trainable.safetensors"))
    summary = _train(ralign_cli_inprocess, tmp_path, "--set", f"model.init_checkpoint={stage1}", "--set", "train.iterations=2",
                     "--set", "ray.max_staleness=0")
    pretrained, before = summary["oracle_pretrained"], summary["oracle_before"]
    assert pretrained is not None and pretrained["per_prompt"].keys() == before["per_prompt"].keys()
    assert [e["prompts"] for e in pretrained["per_prompt"].values()] == [e["prompts"] for e in before["per_prompt"].values()]
    # The stage's weights change the images: the pretrained model's differ from the stage's on the same noise.
    assert pretrained["fidelity"]["kid"] != before["fidelity"]["kid"]
    change = summary["oracle_change_vs_pretrained"]
    assert change["overall"]["n"] == summary["oracle_change"]["overall"]["n"] == 4
    assert isinstance(summary["reward_hacking_vs_pretrained"], list)
    client = MlflowClient(summary["tracking_uri"])
    run = client.get_run(summary["run_id"])
    assert "ralign.reward_hacking_vs_pretrained" in run.data.tags
    assert "oracle_change_vs_pretrained/overall/all_correct" in run.data.metrics
    assert any(a.path == "eval/pretrained" for a in client.list_artifacts(summary["run_id"], "eval"))

    from ralign.ops.report import build_report

    page = build_report(summary["run_id"], tracking_uri=summary["tracking_uri"], out_dir=tmp_path / "report").read_text(encoding="utf-8")
    assert "Against the pretrained model" in page
