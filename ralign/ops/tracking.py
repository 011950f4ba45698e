"""MLflow tracking: which store, a client that refuses a store that does not exist, one-line MLflow errors, and the
run logger the learner (rank 0) and the training driver write metrics and artefacts with."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from ralign.config import UserError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # `ralign train`'s default store
# `ralign train`'s reward-hacking verdict, a run tag ("none" or the families), written at a run's end and read by
# `ralign soup`; a run from an earlier stage also gets the verdict against its pretrained model (tag + VS_PRETRAINED).
REWARD_HACKING_TAG = "ralign.reward_hacking"
VS_PRETRAINED = "_vs_pretrained"


class TrackingError(UserError):
    """An MLflow store or run the user named does not exist or cannot be read; one line."""


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else `ralign train`'s default store."""
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def tracking_client(tracking_uri: str, error: type[TrackingError] = TrackingError):
    """An MlflowClient for an existing store (`error` is raised, naming it, when a sqlite store does not exist)."""
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///"):  # MLflow would silently create an empty store (e.g. ./mlflow.db)
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        if not db.is_file():
            raise error(f"no MLflow store at {tracking_uri} ({db.resolve()} does not exist); "
                        "pass --tracking-uri or set MLFLOW_TRACKING_URI")

    # Credentials for a server come from MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN, read by MLflow itself.
    return MlflowClient(tracking_uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri)


def mlflow_message(exc: Exception) -> str:
    text = getattr(exc, "message", None) or str(exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


def is_not_found(exc: Exception) -> bool:
    return getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


class RunLogger:
    """MLflow logging for one run from one process; skips steps an earlier attempt already logged."""

    def __init__(self, tracking_uri: str, run_id: str, enabled: bool):
        self.enabled = enabled
        self.run_id = run_id
        self.last_step = -1
        if not enabled:
            return
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)
        history = self.client.get_metric_history(run_id, "iteration")
        self.last_step = max((m.step for m in history), default=-1)

    def metrics(self, values: dict[str, float], step: int, final: bool = False) -> None:
        """Log one iteration's metrics. `final` metrics (the closing evaluation) are logged once, at the last
        iteration's step, without the `iteration` marker."""
        if not self.enabled or (step <= self.last_step and not final):
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in values.items() if v is not None and np.isfinite(v)]
        if not final:
            batch.append(Metric("iteration", float(step), now, step))
            self.last_step = step
        self.client.log_batch(self.run_id, metrics=batch)

    def tag(self, key: str, value: str) -> None:
        if self.enabled:
            self.client.set_tag(self.run_id, key, value)

    def artifacts(self, local_dir: str | Path, artifact_path: str) -> None:
        if self.enabled:
            self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def artifact(self, local_file: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self.client.log_artifact(self.run_id, str(local_file), artifact_path)

    def quarantined(self, records: list[dict]) -> None:
        """Quarantined samples (prompt, reason, image) to the run's `quarantine/` artefacts."""
        if not self.enabled or not records:
            return
        import tempfile

        from ralign.rollout.quarantine import write_quarantine

        with tempfile.TemporaryDirectory() as tmp:
            write_quarantine(records, tmp)
            self.artifacts(tmp, "quarantine")
