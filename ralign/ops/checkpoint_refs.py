"""Where a checkpoint reference points: a local directory, `runs:/RUN_ID/PATH`, `models:/NAME@ALIAS` or
`models:/NAME/VERSION`, and the download of its files. Kept apart from the registry's promotion rules so that
readers of checkpoints (export, generate, eval) do not depend on promotion, and promotion may use them."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ralign.ops.credentials import redact_credentials
from ralign.ops.tracking import TrackingError, is_not_found, mlflow_message, resolve_tracking_uri, tracking_client

CHECKPOINT_DIR = "checkpoint"  # a finished run's checkpoint artefact directory
CHECKPOINT_FILES = ("trainable.safetensors", "learner_state.json")


class RegistryError(TrackingError):
    """A registry problem the user can fix (no such run / model / alias, run not finished, ...); one line."""


def _client(tracking_uri: str):
    return tracking_client(tracking_uri, RegistryError)



def is_mlflow_uri(ref: str | os.PathLike) -> bool:
    return str(ref).startswith(("models:/", "runs:/"))


def _model_version_source(client, ref: str, uri: str) -> str:
    """models:/NAME@ALIAS or models:/NAME/VERSION -> the version's download URI."""
    from mlflow.exceptions import MlflowException

    body = ref[len("models:/"):].strip("/")
    if "@" in body:
        name, _, alias = body.rpartition("@")
        version = None
    else:
        name, _, version = body.rpartition("/")
        alias = None
        if not name or not version.isdigit():
            raise RegistryError(f"{ref}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    try:
        rm = client.get_registered_model(name)
    except MlflowException as exc:
        if is_not_found(exc):
            raise RegistryError(f"{ref}: no registered model {name!r} at {redact_credentials(uri)}") from None
        raise RegistryError(f"{ref}: {mlflow_message(exc)}") from None
    if alias is not None:
        if alias not in rm.aliases:
            known = ", ".join(f"{a} -> v{v}" for a, v in sorted(rm.aliases.items())) or "none"
            raise RegistryError(f"{ref}: registered model {name!r} has no alias {alias!r} (aliases: {known})")
        version = str(client.get_model_version_by_alias(name, alias).version)
    try:
        client.get_model_version(name, version)
        return client.get_model_version_download_uri(name, version)
    except MlflowException as exc:
        if is_not_found(exc):
            raise RegistryError(f"{ref}: registered model {name!r} has no version {version}") from None
        raise RegistryError(f"{ref}: {mlflow_message(exc)}") from None


def download_checkpoint(ref: str, dst: str | Path, tracking_uri: str | None = None) -> Path:
    """Download the checkpoint files (and only those) that an MLflow URI names into `dst`; returns `dst`.

    The registered version is resolved with a client bound to the given tracking/registry URI, not through
    `mlflow.artifacts.download_artifacts("models:/...")`, which (MLflow 3.17) looks the name up in the *global*
    registry URI and, when that is unset, in ./mlflow.db of the working directory."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(tracking_uri)
    client = _client(uri)
    source = _model_version_source(client, ref, uri) if ref.startswith("models:/") else ref
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for fname in CHECKPOINT_FILES:
        try:
            if source.startswith("runs:/"):
                run_id, _, path = source[len("runs:/"):].strip("/").partition("/")
                local = client.download_artifacts(run_id, f"{path}/{fname}".lstrip("/"), str(dst))
            else:
                local = mlflow.artifacts.download_artifacts(artifact_uri=f"{source.rstrip('/')}/{fname}", dst_path=str(dst),
                                                            tracking_uri=uri)
        except MlflowException as exc:
            if is_not_found(exc) or "not found" in mlflow_message(exc).lower() or "No such file" in str(exc):
                raise RegistryError(f"{ref} is not a ralign checkpoint (or does not exist): {fname} not found at {source}") from None
            raise RegistryError(f"{ref}: download failed: {mlflow_message(exc)}") from None
        except OSError as exc:
            raise RegistryError(f"{ref} is not a ralign checkpoint (or does not exist): {fname}: {exc.strerror or exc}") from None
        if Path(local).resolve() != (dst / fname).resolve():  # keep the flat layout policy_from_checkpoint expects
            Path(local).replace(dst / fname)
    return dst


@contextmanager
def local_checkpoint(ref: str | os.PathLike, tracking_uri: str | None = None) -> Iterator[Path]:
    """A local checkpoint directory for `ref`: the path itself, or an MLflow URI's files in a temporary directory
    that is removed on exit."""
    if not is_mlflow_uri(ref):
        yield Path(ref)
        return
    with tempfile.TemporaryDirectory(prefix="ralign-checkpoint-") as tmp:
        yield download_checkpoint(str(ref), tmp, tracking_uri)
