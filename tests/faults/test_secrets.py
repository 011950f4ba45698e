"""No secret reaches MLflow params, tags, the logged config or the logs: credentials live in the environment
(MLflow's, cloud storage's, Ray's token), and the run records only the config. Credentials written into a tracking
URI are refused where a URI enters (config file, --tracking-uri of train / compare / submit) and never echoed.

Cheap on purpose: `jobs.train._open_run` is the step that writes params, tags and config.yaml for `ralign train`,
called here against a sqlite store in tmp_path instead of a whole training run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from jobs.train import _open_run
from ralign.config import ConfigError, load_config, parse_config, redact_credentials
from ralign.training.config import TrainConfig

from .cli_runs import REPO

SECRETS = {
    "MLFLOW_TRACKING_USERNAME": "svc-ralign-3141",
    "MLFLOW_TRACKING_PASSWORD": "pw-0f9c7d1e5b",
    "MLFLOW_TRACKING_TOKEN": "tok-77ab12cd90",
    "AWS_ACCESS_KEY_ID": "AKIAFAULTSUITE0001",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-5e6f7a8b9c",
    "RAY_AUTH_TOKEN": "ray-token-d4c3b2a1",
    "HF_TOKEN": "hf_faultsuite123456",
}


def _everything_recorded(client: MlflowClient, run_id: str, tmp_path) -> str:
    run = client.get_run(run_id)
    texts = [f"{k}={v}" for k, v in {**run.data.params, **run.data.tags}.items()]
    config = client.download_artifacts(run_id, "config.yaml", str(tmp_path / "download"))
    texts.append(open(config, encoding="utf-8").read())
    texts.append(run.info.run_name or "")
    return "\n".join(texts)


def test_a_run_records_no_environment_secret(tmp_path, monkeypatch, caplog, capfd):
    monkeypatch.chdir(tmp_path)  # the store's default artefact root (./mlruns) lands here
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    caplog.set_level(logging.DEBUG)
    cfg = load_config(TrainConfig, REPO / "jobs/configs/quickstart.yaml", [f"ray.storage_path={tmp_path / 'ray'}"])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client, run_id, _, ray_name, storage = _open_run(cfg, None, uri)
    # Resuming reads the logged config back and may add to the run: still nothing from the environment. (A run is
    # resumable once Ray Train has registered a checkpoint; its snapshot file says so.)
    (Path(storage) / ray_name).mkdir(parents=True)
    (Path(storage) / ray_name / "checkpoint_manager_snapshot.json").write_text(
        json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_0", "metrics": {"iteration": 2}}}))
    _, resumed, again, _, _ = _open_run(None, run_id, uri, ["train.iterations=3"])
    assert resumed == run_id and again.train.iterations == 3
    recorded = _everything_recorded(client, run_id, tmp_path)
    assert "train.lr" in recorded and "tracking.tracking_uri" in recorded  # the config is there, in full
    out, err = capfd.readouterr()
    logs = "\n".join(r.getMessage() for r in caplog.records)
    for name, value in SECRETS.items():
        for where, text in (("MLflow", recorded), ("logs", logs), ("stdout", out), ("stderr", err)):
            assert value not in text, f"{name}'s value reached the {where}"


@pytest.mark.parametrize("uri", ["https://bob:pw-0f9c7d1e5b@mlflow.example:5000", "http://svc:pw-0f9c7d1e5b@10.0.0.7/mlflow"])
def test_a_password_in_the_config_uri_is_refused_and_not_repeated(uri):
    with pytest.raises(ConfigError) as err:
        parse_config(TrainConfig, {"tracking": {"tracking_uri": uri}})
    assert "MLFLOW_TRACKING_PASSWORD" in str(err.value) and "pw-0f9c7d1e5b" not in str(err.value)


def test_a_token_in_the_config_uri_is_refused():
    with pytest.raises(ConfigError, match="holds credentials"):
        parse_config(TrainConfig, {"tracking": {"tracking_uri": "https://tok-77ab12cd90@mlflow.example"}})


def test_redaction_covers_every_userinfo_form():
    for uri in ("https://u:p@h", "https://tok@h/x", "HTTP://u:p@h", "databricks://tok@workspace"):
        assert redact_credentials(f"see {uri} now").count("***@") == 1
    assert redact_credentials("sqlite:////mnt/a@b/mlflow.db") == "sqlite:////mnt/a@b/mlflow.db"  # a path, not userinfo


def test_credential_named_options_are_not_recorded_as_params():
    from jobs.train import flat_params

    params = flat_params({"reward": {"name": "caption", "options": {"api_key": "sk-0f9c7d1e5b", "weight": 0.5,
                                                                   "inner": {"hf_token": "hf_0f9c7d1e5b"}}}})
    assert params["reward.options.api_key"] == "***" and params["reward.options.inner.hf_token"] == "***"
    assert params["reward.options.weight"] == "0.5" and params["reward.name"] == "caption"
    assert not any("0f9c7d1e5b" in v for v in params.values())


def test_a_submitted_job_gets_no_secret_of_the_shell_unless_named(monkeypatch):
    from jobs.submit import job_runtime_env

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw-0f9c7d1e5b")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-0f9c7d1e5b")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert "0f9c7d1e5b" not in repr(job_runtime_env())  # Ray would show it in the job's info
    assert job_runtime_env(["MLFLOW_TRACKING_TOKEN"])["env_vars"]["MLFLOW_TRACKING_TOKEN"] == "tok-0f9c7d1e5b"
    with pytest.raises(ConfigError, match="--forward-env HF_TOKEN: not set"):
        job_runtime_env(["HF_TOKEN"])
