"""The MLflow model registry for ralign checkpoints: `ralign promote` and `models:/NAME@ALIAS` in `ralign generate`.

A model version's source is the `checkpoint/` artefact directory of a finished `ralign train` run
(`runs:/RUN_ID/checkpoint`: `trainable.safetensors` + `learner_state.json`, whose `policy_spec` names the base model
and the policy settings, so it loads on its own). MLflow's `mlflow.diffusers` flavour is not used: it stores one LoRA
file in diffusers' `load_lora_weights` layout and rebuilds a stock diffusers pipeline, which cannot represent a tuned
text encoder (TextCraftor), segment encoding (LongAlign) or the policy's sampling settings, all of which the
checkpoint's own layout carries.

Promotion uses aliases and tags only (registry stages are deprecated): the `champion` alias moves to a candidate
only if it beats the current champion on the chosen oracle metric by a margin, and only when both were evaluated
on the same eval set (same split, prompts per family, families and seed: the `ralign.eval_digest` tag). Otherwise
the candidate gets the `challenger` alias and the reason is returned. Nothing secret goes into tags: the tracking
URI is never recorded, and printed URIs have their user:password part removed.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from ralign.ops.checkpoint_refs import CHECKPOINT_DIR, CHECKPOINT_FILES, RegistryError, download_checkpoint, is_mlflow_uri, local_checkpoint  # noqa: F401 - re-exported
from ralign.ops.credentials import redact_credentials
from ralign.ops.tracking import is_not_found, mlflow_message, resolve_tracking_uri, tracking_client

CHAMPION, CHALLENGER = "champion", "challenger"
DEFAULT_METRIC = "overall.all_correct"
LOWER_IS_BETTER = ("artifact_rate", "kid", "off_palette_fraction")
MAX_METRIC_TAGS = 64
TAG = "ralign."  # prefix of every tag this module writes
METRIC_TAG = TAG + "oracle."  # + a metric path of oracle_after.json, e.g. ralign.oracle.overall.all_correct

_RUN_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass
class PromotionResult:
    name: str
    version: str
    run_id: str
    action: str  # "champion" (alias moved here), "challenger" (alias set here), "unchanged" (already champion)
    reason: str
    metric: str
    direction: str  # "higher" or "lower" is better
    margin: float
    value: float
    champion_before: str | None  # the champion's version before this promotion
    champion_value: float | None
    new_version: bool  # False when the run was registered under this name already (the version is reused)
    eval_set: str
    tracking_uri: str  # credentials removed

    def message(self) -> str:
        what = "registered" if self.new_version else "already registered"
        head = f"run {self.run_id} {what} as {self.name} version {self.version} ({self.metric} = {self.value:.4f})"
        if self.action == CHAMPION:
            return f"{head}; alias '{CHAMPION}' -> v{self.version}: {self.reason}"
        if self.action == CHALLENGER:
            return f"{head}; alias '{CHALLENGER}' -> v{self.version}, champion stays v{self.champion_before}: {self.reason}"
        return f"{head}; unchanged: {self.reason}"

    def to_dict(self) -> dict:
        return {**asdict(self), "message": self.message()}


# ---------------------------------------------------------------------------------------------------------------
# URIs and clients
# ---------------------------------------------------------------------------------------------------------------

def _client(tracking_uri: str):
    return tracking_client(tracking_uri, RegistryError)


# ---------------------------------------------------------------------------------------------------------------
# Metrics, eval-set identity, digests
# ---------------------------------------------------------------------------------------------------------------

def _metric_path(report: dict, metric: str) -> list[str]:
    """'overall.all_correct', 'binding.all_correct', 'families.binding.all_correct', 'fidelity.kid' or the MLflow
    metric key 'oracle/binding/all_correct' -> a key path into oracle_after.json."""
    parts = [p for p in re.split(r"[./]", metric.strip()) if p]
    if parts and parts[0] == "oracle":
        parts = parts[1:]
    if parts == ["kid"]:
        parts = ["fidelity", "kid"]
    if parts and parts[0] not in report and parts[0] in report.get("families", {}):
        parts = ["families", *parts]
    return parts


def flatten_metrics(report: dict, limit: int = MAX_METRIC_TAGS) -> dict[str, float]:
    """Numeric oracle metrics of a report as {'overall.all_correct': 0.41, 'families.binding.count_acc': ...}."""
    out: dict[str, float] = {}

    def walk(node, prefix):
        for k, v in node.items():
            if k == "n":
                continue
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{prefix}{k}"] = float(v)

    for section in ("overall", "fidelity", "unseen_combos", "families"):
        if isinstance(report.get(section), dict):
            walk(report[section], f"{section}.")
    return dict(list(out.items())[:limit])


def metric_value(report: dict, metric: str) -> tuple[str, float]:
    """(canonical metric path, value) of `metric` in an oracle report; RegistryError naming the valid ones."""
    parts = _metric_path(report, metric)
    node = report
    for p in parts:
        node = node.get(p) if isinstance(node, dict) else None
    if not parts or not isinstance(node, (int, float)) or isinstance(node, bool):
        known = ", ".join(list(flatten_metrics(report))[:12])
        raise RegistryError(f"metric {metric!r} is not a number in oracle_after.json; e.g. {known}")
    return ".".join(parts), float(node)


def metric_direction(metric: str, direction: str = "auto") -> str:
    if direction not in ("auto", "higher", "lower"):
        raise RegistryError(f"direction must be auto, higher or lower, not {direction!r}")
    if direction != "auto":
        return direction
    return "lower" if metric.rsplit(".", 1)[-1] in LOWER_IS_BETTER else "higher"


def _digest(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def eval_identity(report: dict, config: dict) -> dict:
    """What fixes the eval set: split, prompts per family, families and seed (prompts and noise). Taken from the
    report itself (what the evaluation ran), falling back to the config's train.eval section."""
    train = config.get("train", {}) if isinstance(config, dict) else {}
    ev = train.get("eval", {}) if isinstance(train, dict) else {}
    families = report.get("families")
    return {
        "split": report.get("split", ev.get("split")),
        "n_per_family": report.get("n_per_family", ev.get("n_per_family")),
        "seed": report.get("seed", train.get("seed")),
        "families": sorted(families) if isinstance(families, dict) else sorted(ev.get("families") or []),
    }


def _describe_eval(identity: dict) -> str:
    return (f"split={identity['split']} n_per_family={identity['n_per_family']} seed={identity['seed']} "
            f"families={','.join(identity['families'])}")


def config_digest(config: dict) -> str:
    """Digest of the training config without its tracking section (URIs and run names say nothing about the model)."""
    return _digest({k: v for k, v in config.items() if k != "tracking"})


# ---------------------------------------------------------------------------------------------------------------
# Promotion
# ---------------------------------------------------------------------------------------------------------------

def _read_run(client, run_id: str, uri: str) -> tuple[object, dict, dict]:
    """The run, its oracle_after.json and its config.yaml; checks that it finished and has a checkpoint."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if is_not_found(exc):
            raise RegistryError(f"no MLflow run {run_id} at {redact_credentials(uri)}") from None
        raise RegistryError(f"cannot read run {run_id}: {mlflow_message(exc)}") from None
    if run.info.status != "FINISHED":
        raise RegistryError(f"run {run_id} is {run.info.status}, not FINISHED: only a finished run can be promoted")
    present = {Path(f.path).name for f in client.list_artifacts(run_id, CHECKPOINT_DIR)}
    missing = [f for f in CHECKPOINT_FILES if f not in present]
    if missing:
        raise RegistryError(f"run {run_id} has no checkpoint to register ({CHECKPOINT_DIR}/{missing[0]} is missing)")
    top = {f.path for f in client.list_artifacts(run_id)}
    for needed, why in (("oracle_after.json", "it was not evaluated (train.eval.before_after=false?)"),
                        ("config.yaml", "it was not started by `ralign train`")):
        if needed not in top:
            raise RegistryError(f"run {run_id} has no {needed}: {why}")
    with tempfile.TemporaryDirectory() as tmp:
        report = json.loads(Path(client.download_artifacts(run_id, "oracle_after.json", tmp)).read_text(encoding="utf-8"))
        config = yaml.safe_load(Path(client.download_artifacts(run_id, "config.yaml", tmp)).read_text(encoding="utf-8")) or {}
    return run, report, config


def version_tags(run_id: str, report: dict, config: dict) -> dict[str, str]:
    """Tags of a new model version: base model reference, algorithm, reward, policy, digests, oracle metrics."""
    model = config.get("model", {})
    policy = model.get("policy", {})
    identity = eval_identity(report, config)
    tags = {
        TAG + "run_id": run_id,
        TAG + "base_model": str(model.get("pipeline", "base")),
        TAG + "algorithm": str(config.get("algorithm", {}).get("name", "")),
        TAG + "reward": str(config.get("reward", {}).get("name", "")),  # the name only: options may hold endpoints
        TAG + "unet_lora_rank": str(policy.get("unet_lora_rank", "")),
        TAG + "text_encoder": str(policy.get("text_encoder", "")),
        TAG + "text_encoding": str(policy.get("text_encoding", "")),
        TAG + "config_digest": config_digest(config),
        TAG + "eval_set": _describe_eval(identity),
        TAG + "eval_digest": _digest(identity),
    }
    tags.update({METRIC_TAG + k: repr(v) for k, v in flatten_metrics(report).items()})
    return tags


def _registered_model(client, name: str, create: bool):
    """The registered model `name`; None if it does not exist and not `create`."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if not is_not_found(exc):
            raise RegistryError(f"cannot read registered model {name!r}: {mlflow_message(exc)}") from None
    if not create:
        return None
    try:
        client.create_registered_model(name, description="ralign checkpoints (see `ralign promote`)")
    except MlflowException as exc:
        if getattr(exc, "error_code", None) != "RESOURCE_ALREADY_EXISTS":  # created concurrently: fine
            raise RegistryError(f"cannot create registered model {name!r}: {mlflow_message(exc)}") from None
    return client.get_registered_model(name)


EXPORT_DIRS = {"lora": "diffusers_lora", "pipeline": "diffusers_pipeline"}


def log_exports(client, run_id: str, uri: str) -> list[str]:
    """Put the checkpoint's diffusers exports beside it in the run (`checkpoint/diffusers_lora/`, and where the text
    encoder was tuned `checkpoint/diffusers_pipeline/`), so a registered version is usable with diffusers and MLflow
    alone. Returns the directories written (none already there is written again)."""
    from ralign.ops.export import export_checkpoint

    present = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(run_id, CHECKPOINT_DIR)}
    with tempfile.TemporaryDirectory() as tmp:
        state = json.loads(Path(client.download_artifacts(run_id, f"{CHECKPOINT_DIR}/learner_state.json", tmp)).read_text())
    policy = (state.get("policy_spec") or {}).get("policy") or {}
    wanted = []
    if policy.get("unet_lora_rank", 8) > 0 or policy.get("text_encoder") == "lora":
        wanted.append("lora")
    if policy.get("text_encoder") == "full":
        wanted.append("pipeline")
    written = []
    for fmt in wanted:
        if EXPORT_DIRS[fmt] in present:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            try:
                export_checkpoint(f"runs:/{run_id}/{CHECKPOINT_DIR}", Path(tmp) / fmt, fmt, uri)
            except Exception as exc:  # noqa: BLE001 - said as one line; nothing is registered
                raise RegistryError(f"cannot export run {run_id}'s checkpoint as {fmt} for the registry: {exc}") from None
            client.log_artifacts(run_id, str(Path(tmp) / fmt), f"{CHECKPOINT_DIR}/{EXPORT_DIRS[fmt]}")
        written.append(EXPORT_DIRS[fmt])
    return written


def _champion_value(client, version, metric: str) -> float | None:
    tag = version.tags.get(METRIC_TAG + metric)
    if tag is not None:
        return float(tag)
    # Not among the tagged metrics (e.g. registered with a bounded tag set): read the champion's own report.
    if not version.run_id:
        return None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            report = json.loads(Path(client.download_artifacts(version.run_id, "oracle_after.json", tmp)).read_text())
        return metric_value(report, metric)[1]
    except Exception:  # noqa: BLE001 - the champion's run or report is gone: no comparison possible
        return None


def promote(run_id: str, name: str, metric: str | None = None, margin: float = 0.01, direction: str = "auto",
            tracking_uri: str | None = None) -> PromotionResult:
    """Register run `run_id`'s checkpoint as a version of registered model `name` (or reuse the version it already
    has there) and move the `champion` alias to it if it beats the current champion by more than `margin` on
    `metric` (a path into oracle_after.json; default: the registered model's `ralign.metric` tag, else
    overall.all_correct) on the same eval set; otherwise set `challenger` on it. Returns what happened and why."""
    from mlflow.exceptions import MlflowException

    if not _RUN_ID.match(run_id or ""):
        raise RegistryError(f"--run {run_id!r} is not an MLflow run id")
    if not name or not name.strip() or "'" in name:
        raise RegistryError(f"--name {name!r} is not a usable registered model name")
    if margin < 0:
        raise RegistryError(f"margin must be >= 0, not {margin}")
    uri = resolve_tracking_uri(tracking_uri)
    client = _client(uri)
    run, report, config = _read_run(client, run_id, uri)

    rm = _registered_model(client, name, create=False)
    # Everything is checked before anything is written: a bad metric leaves no trace in the registry.
    metric, value = metric_value(report, metric or (rm.tags.get(TAG + "metric") if rm else None) or DEFAULT_METRIC)
    direction = metric_direction(metric, direction)
    rm = rm or _registered_model(client, name, create=True)
    if TAG + "metric" not in rm.tags:  # the first promotion fixes the model's default metric
        client.set_registered_model_tag(name, TAG + "metric", metric)

    tags = version_tags(run_id, report, config)
    try:
        existing = sorted((v for v in client.search_model_versions(f"run_id='{run_id}'") if v.name == name), key=lambda v: int(v.version))
        if existing:
            version, new = existing[0], False
        else:
            log_exports(client, run_id, uri)
            version = client.create_model_version(name, f"runs:/{run_id}/{CHECKPOINT_DIR}", run_id=run_id, tags=tags,
                                                  description=f"{tags[TAG + 'algorithm']} / {tags[TAG + 'reward']} on {tags[TAG + 'base_model']}")
            new = True
        rm = client.get_registered_model(name)
        champion = client.get_model_version_by_alias(name, CHAMPION) if CHAMPION in rm.aliases else None
    except MlflowException as exc:
        raise RegistryError(f"registering run {run_id} as {name!r} failed: {mlflow_message(exc)}") from None
    v = str(version.version)
    eval_digest = version.tags.get(TAG + "eval_digest", tags[TAG + "eval_digest"])
    eval_set = version.tags.get(TAG + "eval_set", tags[TAG + "eval_set"])
    better = "higher" if direction == "higher" else "lower"

    champ_v, champ_value = (str(champion.version), None) if champion is not None else (None, None)
    if champion is None:
        action, reason = CHAMPION, "no champion yet"
    elif champ_v == v:
        action, reason = "unchanged", "it is already the champion"
    elif champion.tags.get(TAG + "eval_digest") != eval_digest:
        action = CHALLENGER
        reason = (f"not comparable with champion v{champ_v}: evaluated on a different eval set "
                  f"({eval_set} vs {champion.tags.get(TAG + 'eval_set', 'unknown')})")
    else:
        champ_value = _champion_value(client, champion, metric)
        if champ_value is None:
            action, reason = CHALLENGER, f"champion v{champ_v} has no value for {metric} to compare with"
        else:
            gain = (value - champ_value) if direction == "higher" else (champ_value - value)
            if gain > margin:
                action = CHAMPION
                reason = f"{value:.4f} beats champion v{champ_v}'s {champ_value:.4f} by more than the margin {margin:g} ({better} is better)"
            else:
                action = CHALLENGER
                reason = f"{value:.4f} does not beat champion v{champ_v}'s {champ_value:.4f} by the margin {margin:g} ({better} is better)"

    try:
        if action == CHAMPION:
            client.set_registered_model_alias(name, CHAMPION, v)
            if champ_v is not None:
                client.set_model_version_tag(name, v, TAG + "previous_champion", champ_v)
            if rm.aliases.get(CHALLENGER) == v:
                client.delete_registered_model_alias(name, CHALLENGER)
        elif action == CHALLENGER:
            client.set_registered_model_alias(name, CHALLENGER, v)
        if action != "unchanged":
            client.set_model_version_tag(name, v, TAG + "promotion", f"{action}: {reason}"[:4000])
    except MlflowException as exc:
        raise RegistryError(f"setting the {action} alias on {name} v{v} failed: {mlflow_message(exc)}") from None
    return PromotionResult(name=name, version=v, run_id=run_id, action=action, reason=reason, metric=metric,
                           direction=direction, margin=margin, value=value, champion_before=champ_v,
                           champion_value=champ_value, new_version=new, eval_set=eval_set, tracking_uri=redact_credentials(uri))
