"""`ralign promote` and `models:/NAME@ALIAS` loading against a real `mlflow server` (sqlite backend, local artefact
root) on loopback. The runs are logged here with the layout `ralign train` gives them (config.yaml, a real tiny
checkpoint of the toy base model, oracle_after.json, oracle metrics), not trained, to keep the file to minutes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from ralign.ops.model_registry import (
    RegistryError,
    download_checkpoint,
    eval_identity,
    metric_value,
    promote,
)
from ralign.ops.credentials import redact_credentials

SERVER_START_S = 300  # `mlflow server` took 2-3 minutes to answer /health on a loaded 2-core machine
FAMILIES = ["single", "binding", "counting", "spatial", "size", "long"]
CONFIG = {
    "model": {"pipeline": "base", "policy": {"unet_lora_rank": 2, "steps": 2}},
    "algorithm": {"name": "dpok"},
    "reward": {"name": "clip_score"},
    "train": {"iterations": 2, "eval": {"n_per_family": 16}},
    "tracking": {"tracking_uri": "sqlite:///mlflow.db"},
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server and every process it spawned (uvicorn, job runners: all in its own process group). Its store
    is a temporary directory, so a graceful stop buys nothing: SIGKILL after 3 s (a graceful one took ~20 s)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader
            os.killpg(proc.pid, 0)  # raises once no process of the group is left
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    log_path = root / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}: {log_path.read_text(errors='replace')[-2000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer /health in {SERVER_START_S}s: {log_path.read_text(errors='replace')[-2000:]}")
            time.sleep(1.0)
        yield url
    finally:
        _stop(proc)


def _config(**eval_overrides) -> dict:
    from ralign.config import parse_config
    from ralign.training.config import TrainConfig

    data = json.loads(json.dumps(CONFIG))
    data["train"]["eval"].update(eval_overrides)
    return parse_config(TrainConfig, data).model_dump(mode="json")


def _write_checkpoint(config: dict, directory: Path, scale: float = 0.05) -> tuple[Path, dict]:
    """A real checkpoint of `config`'s policy with its LoRA perturbed (trained-looking), in the learner's file layout."""
    from safetensors.torch import save_file

    from ralign.config import parse_config
    from ralign.diffusion.policy import build_policy
    from ralign.training.config import TrainConfig

    cfg = parse_config(TrainConfig, config)
    torch.manual_seed(0)
    policy = build_policy(cfg.policy_spec())
    state = {k: v + scale * torch.randn_like(v) for k, v in policy.trainable_state().items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "trainable.safetensors"),
              metadata={"version": "2", "iteration": "2"})
    (directory / "learner_state.json").write_text(json.dumps({"iteration": 2, "version": 2, "policy_spec": cfg.policy_spec()}))
    return directory, state


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The toy base model with a rank-2 UNet LoRA."""
    return _write_checkpoint(CONFIG, tmp_path_factory.mktemp("checkpoint"))


@pytest.fixture(scope="module")
def flow_checkpoint(tmp_path_factory):
    """A tiny flow-matching model (StableDiffusion3Pipeline) with a rank-2 transformer LoRA."""
    config = {**CONFIG, "model": {"pipeline": "tiny-random-flow", "policy": {"unet_lora_rank": 2, "steps": 2, "eval_steps": 3}}}
    return _write_checkpoint(config, tmp_path_factory.mktemp("flow_checkpoint"), scale=0.3)


def _report(all_correct: float, artifact_rate: float = 0.1, config: dict | None = None) -> dict:
    e = (config or _config())["train"]["eval"]
    fam = {"n": e["n_per_family"], "object_recall": 0.8, "binding_acc": 0.6, "count_acc": 0.5, "spatial_acc": None,
           "size_acc": None, "all_correct": all_correct, "artifact_rate": artifact_rate}
    return {"families": {f: dict(fam) for f in e["families"]}, "overall": {**fam, "n": e["n_per_family"] * len(e["families"])},
            "fidelity": {"kid": 1.5, "artifact_rate": artifact_rate, "off_palette_fraction": 0.01},
            "split": e["split"], "n_per_family": e["n_per_family"], "seed": 0, "generate_s": 1.0}


def _log_run(url: str, checkpoint_dir: Path | None, all_correct: float, artifact_rate: float = 0.1, status: str = "FINISHED",
             oracle: bool = True, **eval_overrides) -> str:
    """An MLflow run laid out like one `ralign train` finished."""
    import yaml
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(url)
    exp = client.get_experiment_by_name("ralign")
    exp_id = exp.experiment_id if exp else client.create_experiment("ralign")
    config = _config(**eval_overrides)
    run_id = client.create_run(exp_id, run_name="dpok-clip_score").info.run_id
    client.set_tag(run_id, "ralign.algorithm", "dpok")
    report = _report(all_correct, artifact_rate, config)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        client.log_artifact(run_id, str(Path(tmp) / "config.yaml"))
        if oracle:
            (Path(tmp) / "oracle_after.json").write_text(json.dumps(report, indent=2))
            client.log_artifact(run_id, str(Path(tmp) / "oracle_after.json"))
    if checkpoint_dir is not None:
        for f in ("trainable.safetensors", "learner_state.json"):
            client.log_artifact(run_id, str(checkpoint_dir / f), "checkpoint")
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric("oracle/overall/all_correct", all_correct, now, 2)])
    if status != "RUNNING":
        client.set_terminated(run_id, status=status)
    return run_id


def test_metric_paths_eval_identity_and_redaction(tmp_path):
    report = _report(0.4)
    assert metric_value(report, "overall.all_correct") == ("overall.all_correct", 0.4)
    assert metric_value(report, "oracle/binding/all_correct") == ("families.binding.all_correct", 0.4)
    assert metric_value(report, "kid") == ("fidelity.kid", 1.5)
    with pytest.raises(RegistryError, match="not a number"):
        metric_value(report, "binding.spatial_acc")  # None: the metric does not apply to that family
    assert eval_identity(report, _config()) != eval_identity(_report(0.4, config=_config(n_per_family=8)), _config(n_per_family=8))
    assert redact_credentials("https://alice:s3cret@mlflow.example.com/x") == "https://***@mlflow.example.com/x"
    assert redact_credentials("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    with pytest.raises(RegistryError, match="no MLflow store"):  # rather than silently creating an empty one
        download_checkpoint("models:/x@champion", tmp_path / "x", tracking_uri=f"sqlite:///{tmp_path / 'missing.db'}")
    assert not (tmp_path / "missing.db").exists()


def test_champion_challenger_and_aliases(server, checkpoint):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(server, registry_uri=server)
    name = "toy-dpok"
    first = _log_run(server, checkpoint[0], 0.40)
    r = promote(first, name, tracking_uri=server)
    assert (r.action, r.version, r.new_version, r.metric, r.direction) == ("champion", "1", True, "overall.all_correct", "higher")
    assert "no champion yet" in r.reason

    tags = client.get_model_version(name, "1").tags
    assert tags["ralign.base_model"] == "base" and tags["ralign.run_id"] == first and tags["ralign.algorithm"] == "dpok"
    assert tags["ralign.reward"] == "clip_score" and float(tags["ralign.oracle.overall.all_correct"]) == 0.40
    assert tags["ralign.eval_set"] == "split=test n_per_family=16 seed=0 families=" + ",".join(sorted(FAMILIES))
    assert len(tags["ralign.eval_digest"]) == 16 and len(tags["ralign.config_digest"]) == 16
    assert client.get_model_version(name, "1").source == f"runs:/{first}/checkpoint"

    again = promote(first, name, tracking_uri=server)  # idempotent: the run's version is reused, nothing moves
    assert (again.action, again.version, again.new_version) == ("unchanged", "1", False)
    assert len(client.search_model_versions(f"name='{name}'")) == 1

    worse = promote(_log_run(server, checkpoint[0], 0.405), name, tracking_uri=server)  # better, but within the margin
    assert (worse.action, worse.version, worse.champion_before) == ("challenger", "2", "1")
    assert "0.4050 does not beat champion v1's 0.4000 by the margin 0.01" in worse.reason
    assert client.get_registered_model(name).aliases == {"champion": "1", "challenger": "2"}

    better = promote(_log_run(server, checkpoint[0], 0.45), name, tracking_uri=server)
    assert (better.action, better.version, better.champion_value) == ("champion", "3", 0.40)
    assert client.get_registered_model(name).aliases == {"champion": "3", "challenger": "2"}
    assert client.get_model_version(name, "3").tags["ralign.previous_champion"] == "1"
    assert client.get_model_version(name, "1").tags["ralign.run_id"] == first  # the old champion keeps its version

    other = promote(_log_run(server, checkpoint[0], 0.95, n_per_family=8), name, tracking_uri=server)
    assert other.action == "challenger" and "different eval set" in other.reason and "n_per_family=8" in other.reason
    assert client.get_registered_model(name).aliases == {"champion": "3", "challenger": "4"}
    assert "different eval set" in client.get_model_version(name, "4").tags["ralign.promotion"]

    # A gain below a bigger margin keeps the champion; the same run promoted again with a smaller margin reuses its
    # version, takes the champion alias and gives up the challenger alias.
    late = _log_run(server, checkpoint[0], 0.47)
    assert promote(late, name, margin=0.05, tracking_uri=server).action == "challenger"
    assert client.get_registered_model(name).aliases == {"champion": "3", "challenger": "5"}
    moved = promote(late, name, margin=0.0, tracking_uri=server)
    assert (moved.action, moved.version, moved.new_version, moved.champion_before) == ("champion", "5", False, "3")
    assert client.get_registered_model(name).aliases == {"champion": "5"}

    # Aliases only: no version was moved to a (deprecated) stage; no tag holds the tracking URI.
    versions = client.search_model_versions(f"name='{name}'")
    assert len(versions) == 5 and {v.current_stage for v in versions} == {"None"}
    assert not any("127.0.0.1" in str(v) for mv in versions for v in mv.tags.values())


def test_lower_is_better_metric(server, checkpoint):
    name = "toy-artifacts"
    assert promote(_log_run(server, checkpoint[0], 0.4, artifact_rate=0.30), name, metric="fidelity.artifact_rate",
                   tracking_uri=server).action == "champion"
    # The model's metric is remembered (ralign.metric tag); artifact_rate is lower-is-better by default.
    higher = promote(_log_run(server, checkpoint[0], 0.9, artifact_rate=0.35), name, tracking_uri=server)
    assert (higher.action, higher.metric, higher.direction) == ("challenger", "fidelity.artifact_rate", "lower")
    assert "lower is better" in higher.reason
    lower = promote(_log_run(server, checkpoint[0], 0.1, artifact_rate=0.10), name, tracking_uri=server)
    assert (lower.action, lower.version) == ("champion", "3")


def test_refuses_runs_that_cannot_be_promoted(server, checkpoint):
    from mlflow.tracking import MlflowClient

    name = "toy-refused"
    with pytest.raises(RegistryError, match="RUNNING, not FINISHED"):
        promote(_log_run(server, checkpoint[0], 0.5, status="RUNNING"), name, tracking_uri=server)
    with pytest.raises(RegistryError, match="FAILED, not FINISHED"):
        promote(_log_run(server, checkpoint[0], 0.5, status="FAILED"), name, tracking_uri=server)
    with pytest.raises(RegistryError, match="no oracle_after.json"):
        promote(_log_run(server, checkpoint[0], 0.5, oracle=False), name, tracking_uri=server)
    with pytest.raises(RegistryError, match="no checkpoint"):
        promote(_log_run(server, None, 0.5), name, tracking_uri=server)
    with pytest.raises(RegistryError, match="no MLflow run"):
        promote("0" * 32, name, tracking_uri=server)
    with pytest.raises(RegistryError, match="not a number in oracle_after.json"):
        promote(_log_run(server, checkpoint[0], 0.5), name, metric="overall.nonsense", tracking_uri=server)
    assert MlflowClient(server, registry_uri=server).search_model_versions(f"name='{name}'") == []


def test_download_by_alias_version_and_run(server, checkpoint, tmp_path):
    from ralign.diffusion.policy import policy_from_checkpoint

    name = "toy-load"
    run_id = _log_run(server, checkpoint[0], 0.3)
    promote(run_id, name, tracking_uri=server)
    for i, ref in enumerate((f"models:/{name}@champion", f"models:/{name}/1", f"runs:/{run_id}/checkpoint")):
        local = download_checkpoint(ref, tmp_path / str(i), tracking_uri=server)
        assert sorted(p.name for p in local.iterdir() if p.is_file()) == ["learner_state.json", "trainable.safetensors"]
    loaded = policy_from_checkpoint(tmp_path / "0").trainable_state()
    assert loaded.keys() == checkpoint[1].keys() and all(torch.equal(loaded[k], checkpoint[1][k]) for k in loaded)
    with pytest.raises(RegistryError, match="no registered model 'nope'"):
        download_checkpoint("models:/nope@champion", tmp_path / "x", tracking_uri=server)
    with pytest.raises(RegistryError, match="has no version 7"):
        download_checkpoint(f"models:/{name}/7", tmp_path / "x", tracking_uri=server)


def test_cli_promote_then_generate_from_champion(server, checkpoint, tmp_path, ralign_cli, monkeypatch):
    run_id = _log_run(server, checkpoint[0], 0.6)
    # The console script's own `main` in this process, in the user's directory, with no tracking URI in the
    # environment (only the --tracking-uri option may name the server).
    monkeypatch.chdir(tmp_path)
    for key in [k for k in os.environ if k.startswith("MLFLOW_TRACKING_")]:
        monkeypatch.delenv(key)

    outcome = ralign_cli("promote", "--run", run_id, "--name", "toy-cli", "--tracking-uri", server, "--json", str(tmp_path / "p.json"))
    assert outcome.code == 0, outcome.err[-2000:]
    result = json.loads((tmp_path / "p.json").read_text())
    assert (result["action"], result["version"]) == ("champion", "1") and "alias 'champion' -> v1" in outcome.out

    outcome = ralign_cli("generate", "--checkpoint", "models:/toy-cli@champion", "--tracking-uri", server, "--prompt", "a red circle",
                         "--prompt", "two blue squares", "--steps", "2", "--out", str(tmp_path / "gen"))
    assert outcome.code == 0, outcome.err[-2000:]
    assert (tmp_path / "gen" / "0000.png").is_file() and (tmp_path / "gen" / "0001.png").is_file() and (tmp_path / "gen" / "grid.png").is_file()

    outcome = ralign_cli("generate", "--checkpoint", "models:/toy-cli@nope", "--tracking-uri", server, "--prompt", "a red circle",
                         "--out", str(tmp_path / "bad"))
    error = outcome.one_line_error()
    assert "no alias 'nope'" in error and "champion -> v1" in error, outcome.err[-2000:]
    assert "Traceback" not in outcome.err
    assert not (tmp_path / "mlflow.db").exists()  # nothing fell back to a local store in the working directory


def test_eval_takes_a_checkpoint_in_all_three_forms(server, checkpoint, tmp_path, monkeypatch):
    """`ralign eval --checkpoint` reads a directory, runs:/RUN_ID/checkpoint and models:/NAME@ALIAS alike: the same
    weights give the same verdicts on the same prompts."""
    from typer.testing import CliRunner

    from jobs.cli import app
    from ralign.ops.model_registry import promote

    run_id = _log_run(server, checkpoint[0], 0.6)
    promote(run_id, "toy-eval", tracking_uri=server)
    monkeypatch.chdir(tmp_path)
    reports = {}
    for name, ref in (("dir", str(checkpoint[0])), ("run", f"runs:/{run_id}/checkpoint"), ("alias", "models:/toy-eval@champion")):
        out = tmp_path / f"{name}.json"
        result = CliRunner().invoke(app, ["eval", "--checkpoint", ref, "--tracking-uri", server, "--n", "2", "--steps", "2",
                                          "--families", "single,binding", "--json", str(out)])
        assert result.exit_code == 0, result.output
        reports[name] = json.loads(out.read_text())
        assert reports[name]["checkpoint"] == ref and reports[name]["steps"] == 2
        assert "all-correct" in result.output and "[" in result.output  # rates with their intervals
    assert reports["dir"]["per_prompt"] == reports["run"]["per_prompt"] == reports["alias"]["per_prompt"]
    lo, hi = reports["dir"]["overall"]["all_correct_ci"]
    assert lo <= reports["dir"]["overall"]["all_correct"] <= hi
    bad = CliRunner().invoke(app, ["eval", "--checkpoint", "models:/toy-eval@nope", "--tracking-uri", server, "--n", "1"])
    assert bad.exit_code != 0 and "no alias 'nope'" in str(bad.exception or bad.output)


def test_a_registered_version_is_usable_with_diffusers_and_mlflow_alone(server, checkpoint, tmp_path, monkeypatch):
    """The README's three lines: download the champion with MLflow, load the base model and the LoRA with diffusers;
    the images equal ralign's own at the same seeds."""
    import mlflow
    import numpy as np

    from ralign.diffusion.policy import base_pipeline, policy_from_checkpoint
    from ralign.models.pipeline import generate_images
    from ralign.ops.model_registry import promote

    run_id = _log_run(server, checkpoint[0], 0.7)
    promote(run_id, "toy-diffusers", tracking_uri=server)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    mlflow.set_tracking_uri(server)
    path = mlflow.artifacts.download_artifacts("models:/toy-diffusers@champion", dst_path=str(tmp_path / "dl"))
    pipe = base_pipeline({"pipeline": "base"})
    pipe.load_lora_weights(f"{path}/diffusers_lora", weight_name="pytorch_lora_weights.safetensors")
    pipe.set_progress_bar_config(disable=True)
    theirs = generate_images(pipe, ["a red circle"], steps=2, guidance=3.0, seed=1)
    ours = policy_from_checkpoint(checkpoint[0]).generate_images(["a red circle"], seed=1)
    assert float(np.abs(theirs[0].astype(float) - ours[0].astype(float)).max()) <= 2
    assert (Path(path) / "diffusers_lora" / "README.md").is_file()


def test_a_flow_model_is_promoted_generated_from_and_usable_with_diffusers(server, flow_checkpoint, tmp_path, ralign_cli, monkeypatch):
    """The registry path of the UNet checkpoints above, for a flow-matching policy: promote, `generate` from
    models:/NAME@champion, and the exported LoRA in diffusers' StableDiffusion3Pipeline gives ralign's own images."""
    import mlflow
    import numpy as np

    from ralign.diffusion.policy import base_pipeline, policy_from_checkpoint
    from ralign.diffusion.flow_policy import FlowPolicy
    from ralign.diffusion.settings import PolicyConfig

    run_id = _log_run(server, flow_checkpoint[0], 0.6)
    monkeypatch.chdir(tmp_path)
    outcome = ralign_cli("promote", "--run", run_id, "--name", "toy-flow", "--tracking-uri", server)
    assert outcome.code == 0, outcome.err[-2000:]
    outcome = ralign_cli("generate", "--checkpoint", "models:/toy-flow@champion", "--tracking-uri", server,
                         "--prompt", "a red circle", "--out", str(tmp_path / "gen"))
    assert outcome.code == 0, outcome.err[-2000:]
    assert (tmp_path / "gen" / "0000.png").is_file()

    mlflow.set_tracking_uri(server)
    path = mlflow.artifacts.download_artifacts("models:/toy-flow@champion", dst_path=str(tmp_path / "dl"))
    pipe = base_pipeline({"pipeline": "tiny-random-flow"})
    pipe.load_lora_weights(f"{path}/diffusers_lora", weight_name="pytorch_lora_weights.safetensors")
    theirs = FlowPolicy(pipe, PolicyConfig(unet_lora_rank=0, steps=2, eval_steps=3)).generate_images(["a red circle"], seed=1)
    trained = policy_from_checkpoint(flow_checkpoint[0])
    ours = trained.generate_images(["a red circle"], seed=1)
    with trained.reference():
        base = trained.generate_images(["a red circle"], seed=1)
    assert float(np.abs(theirs[0].astype(float) - ours[0].astype(float)).max()) <= 2
    assert float(np.abs(base[0].astype(float) - ours[0].astype(float)).max()) > 2  # the LoRA does change the images
