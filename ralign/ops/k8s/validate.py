"""Validation of rendered manifests: KubeRay CRD schemas, Kubernetes schemas, and the project's own rules (what the
entrypoint runs, security contexts, exposure, credentials). ralign/ops/k8s/render.py's docstring lists every rule."""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

import yaml

from ralign.config import ConfigError, load_config
from ralign.ops.credentials import has_credentials, is_credential_name
from ralign.ops.k8s.kustomize import build_kustomization, load_yaml_docs
from ralign.ops.k8s.render import CRD_FILES, CRD_HOWTO, IMAGE_WORKDIR, K8S_VERSION, REPO_ROOT, CRDsMissing, ManifestError, json_patch



def crd_dir() -> Path:
    env = os.environ.get("RALIGN_KUBERAY_CRDS")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "kuberay-crds"


def _int_or_string_and_closed(node: Any) -> Any:
    """A CRD's structural schema as plain JSON Schema: int-or-string accepts both, listed properties are closed."""
    if isinstance(node, list):
        return [_int_or_string_and_closed(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _int_or_string_and_closed(v) for k, v in node.items()
           if not k.startswith("x-kubernetes-") or k in ("x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields")}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out.pop("anyOf", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    preserve = out.pop("x-kubernetes-preserve-unknown-fields", False)
    if "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    out.pop("nullable", None)
    return out


_VALIDATORS: dict[tuple[str, str], Any] = {}


def _crd_validator(kind: str, crds: Path):
    key = (kind, str(crds))
    if key not in _VALIDATORS:
        import jsonschema

        path = crds / CRD_FILES[kind]
        if not path.is_file():
            raise CRDsMissing(f"KubeRay CRD {path} not found: {CRD_HOWTO}")
        crd = yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        versions = {v["name"]: v for v in crd["spec"]["versions"]}
        if crd["spec"]["names"]["kind"] != kind or "v1" not in versions:
            raise ManifestError(f"{path}: not the ray.io/v1 {kind} CRD")
        schema = _int_or_string_and_closed(versions["v1"]["schema"]["openAPIV3Schema"])
        _VALIDATORS[key] = jsonschema.Draft7Validator(schema)
    return _VALIDATORS[key]


def _json_path(parts: Iterable[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<root>"


def _schema_problems(doc: dict, crds: Path | None) -> list[str]:
    kind = doc.get("kind")
    if kind in CRD_FILES:
        if doc.get("apiVersion") != "ray.io/v1":
            return [f"apiVersion: expected ray.io/v1, got {doc.get('apiVersion')!r}"]
        validator = _crd_validator(kind, crds or crd_dir())
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
        return [f"{_json_path(e.absolute_path)}: {e.message}" for e in errors]
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{_json_path(e.path)}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"no Kubernetes {K8S_VERSION} schema: {e.message}"]
    return []


def _check_container(c: dict, pod_sc: dict, where: str, problems: list[str]) -> None:
    res = c.get("resources") or {}
    for section in ("requests", "limits"):
        missing = [r for r in ("cpu", "memory") if r not in (res.get(section) or {})]
        if missing:
            problems.append(f"{where}.resources.{section}: missing {', '.join(missing)} (every container needs requests and limits)")
    _check_security(c.get("securityContext") or {}, pod_sc, where, problems)
    for i, port in enumerate(c.get("ports") or []):
        if "hostPort" in port:
            problems.append(f"{where}.ports[{i}].hostPort: exposes the port on the node, outside the cluster's Services")
    for i, e in enumerate(c.get("env") or []):
        _check_env(e, f"{where}.env[{i}]", problems)


def _check_security(sc: dict, pod_sc: dict, where: str, problems: list[str]) -> None:
    non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
    user = sc.get("runAsUser", pod_sc.get("runAsUser"))
    if non_root is not True:
        problems.append(f"{where}.securityContext.runAsNonRoot: must be true (here or in the pod's securityContext)")
    if user == 0:
        problems.append(f"{where}.securityContext.runAsUser: 0 is root")
    elif user is None:
        problems.append(f"{where}.securityContext.runAsUser: not set here or in the pod's securityContext (name the image's non-root uid)")
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{where}.securityContext.allowPrivilegeEscalation: must be false")
    if sc.get("privileged"):
        problems.append(f"{where}.securityContext.privileged: must not be true")
    caps = sc.get("capabilities") or {}
    if "ALL" not in (caps.get("drop") or []):
        problems.append(f"{where}.securityContext.capabilities.drop: must include ALL")
    if caps.get("add"):
        problems.append(f"{where}.securityContext.capabilities.add: must be empty, got {caps['add']}")
    profile = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
    if profile not in ("RuntimeDefault", "Localhost"):
        problems.append(f"{where}.securityContext.seccompProfile.type: {profile or 'unset'}; use RuntimeDefault "
                        "(here or in the pod's securityContext)")


def _check_env(e: dict, where: str, problems: list[str]) -> None:
    name, value = e.get("name", ""), e.get("value")
    if name == "MLFLOW_TRACKING_URI" and "valueFrom" not in e:
        problems.append(f"{where} (MLFLOW_TRACKING_URI): take it from the ConfigMap/Secret with valueFrom, not a plain value")
    if isinstance(value, str) and value and (is_credential_name(name) or has_credentials(value)):
        problems.append(f"{where} ({name}): a credential in a plain env value; use valueFrom.secretKeyRef")


def _check_pod(template: dict, where: str, problems: list[str]) -> list[dict]:
    spec = template.get("spec") or {}
    pod_sc = spec.get("securityContext") or {}
    if pod_sc.get("runAsUser") == 0:
        problems.append(f"{where}.spec.securityContext.runAsUser: 0 is root")
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            problems.append(f"{where}.spec.{key}: must not be true")
    containers = []
    for kind in ("initContainers", "containers"):
        for i, c in enumerate(spec.get(kind) or []):
            _check_container(c, pod_sc, f"{where}.spec.{kind}[{i}]", problems)
            containers.append(c)
    return containers


def _check_cluster(rcs: dict, where: str, problems: list[str]) -> list[dict]:
    head = rcs.get("headGroupSpec") or {}
    if head.get("serviceType") in ("LoadBalancer", "NodePort"):
        problems.append(f"{where}.headGroupSpec.serviceType: {head['serviceType']} exposes the dashboard outside the cluster; use ClusterIP")
    if head.get("enableIngress"):
        problems.append(f"{where}.headGroupSpec.enableIngress: must be false (no dashboard outside the cluster)")
    svc_type = ((head.get("headService") or {}).get("spec") or {}).get("type")
    if svc_type in ("LoadBalancer", "NodePort"):
        problems.append(f"{where}.headGroupSpec.headService.spec.type: {svc_type} exposes the head outside the cluster")
    if not rcs.get("enableInTreeAutoscaling"):
        problems.append(f"{where}.enableInTreeAutoscaling: must be true")
    auto = rcs.get("autoscalerOptions") or {}
    if rcs.get("enableInTreeAutoscaling"):
        res = auto.get("resources") or {}
        if not all(r in (res.get(s) or {}) for s in ("requests", "limits") for r in ("cpu", "memory")):
            problems.append(f"{where}.autoscalerOptions.resources: the autoscaler container needs cpu/memory requests and limits")
        _check_security(auto.get("securityContext") or {}, (head.get("template") or {}).get("spec", {}).get("securityContext") or {},
                        f"{where}.autoscalerOptions", problems)
    head_containers = _check_pod(head.get("template") or {}, f"{where}.headGroupSpec.template", problems)
    for i, g in enumerate(rcs.get("workerGroupSpecs") or []):
        _check_pod(g.get("template") or {}, f"{where}.workerGroupSpecs[{i}].template", problems)
        if g.get("minReplicas", 0) > g.get("maxReplicas", 0):
            problems.append(f"{where}.workerGroupSpecs[{i}]: minReplicas {g.get('minReplicas')} > maxReplicas {g.get('maxReplicas')}")
    return head_containers


def check_entrypoint(entrypoint: str) -> list[str]:
    """The RayJob runs `python -m jobs.train --config /app/<repo config> [--set k=v ...] [--tracking-uri ...]`; the
    config must exist in the repository and load, with its overrides, as a TrainConfig."""
    from ralign.training.config import TrainConfig

    where = "spec.entrypoint"
    try:
        argv = shlex.split(entrypoint)
    except ValueError as exc:
        return [f"{where}: not a shell command line ({exc})"]
    if argv[:3] != ["python", "-m", "jobs.train"]:
        return [f"{where}: must start with 'python -m jobs.train', got {' '.join(argv[:3])!r}"]
    config, sets, problems = None, [], []
    i = 3
    while i < len(argv):
        opt = argv[i]
        if opt in ("--config", "--set", "--tracking-uri") and i + 1 < len(argv):
            val = argv[i + 1]
            if opt == "--config":
                config = val
            elif opt == "--set":
                sets.append(val)
            elif val not in ("$MLFLOW_TRACKING_URI", "${MLFLOW_TRACKING_URI}"):
                problems.append(f"{where}: --tracking-uri must be $MLFLOW_TRACKING_URI (from the ConfigMap), got {val!r}")
            i += 2
        else:
            return [f"{where}: unexpected argument {opt!r} (jobs.train takes --config, --set, --tracking-uri here)"]
    if config is None:
        return [f"{where}: no --config"]
    path = PurePosixPath(config)
    if not path.is_relative_to(IMAGE_WORKDIR):
        return [f"{where}: --config {config} is not under {IMAGE_WORKDIR}, where the image carries the repository"]
    local = REPO_ROOT / path.relative_to(IMAGE_WORKDIR)
    try:
        load_config(TrainConfig, local, sets)
    except ConfigError as exc:
        problems.append(f"{where}: --config {config} does not load: {exc}")
    return problems


def check_serve_config(text: Any) -> list[str]:
    """serveConfigV2 must pass Ray Serve's own schema and be exactly what ServeConfig makes of its applications' args."""
    from pydantic import ValidationError

    from ralign.ops.serve_config import SERVE_IMPORT_PATH, HttpSection, RewardDeployment, ServeConfig

    where = "spec.serveConfigV2"
    if not isinstance(text, str):
        return [f"{where}: must be a YAML string"]
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        return [f"{where}: invalid YAML: {exc}"]
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(data)
    except ValidationError as exc:
        return [f"{where}: Ray Serve rejects it: " + "; ".join(f"{_json_path(e['loc'])}: {e['msg']}" for e in exc.errors())]
    problems, deployments, limits = [], [], None
    for i, app in enumerate(data.get("applications") or []):
        at = f"{where}.applications[{i}]"
        if app.get("import_path") != SERVE_IMPORT_PATH:
            problems.append(f"{at}.import_path: expected {SERVE_IMPORT_PATH}, got {app.get('import_path')!r}")
            continue
        args = app.get("args") or {}
        try:
            deployments.append(RewardDeployment.model_validate(args.get("deployment")))
            lim = HttpSection.model_validate(args.get("limits"))
        except ValidationError as exc:
            problems.append(f"{at}.args: " + "; ".join(f"{_json_path(e['loc'])}: {e['msg']}" for e in exc.errors()))
            continue
        if limits is not None and lim != limits:
            problems.append(f"{at}.args.limits: differs from the other applications' (one http section for all)")
        limits = lim
    if problems or not deployments:
        return problems or [f"{where}: no applications"]
    try:
        rebuilt = ServeConfig(http=limits, deployments=deployments).to_serve_deploy_dict()
    except ValidationError as exc:
        return [f"{where}: " + "; ".join(e["msg"] for e in exc.errors())]
    ops = json_patch(json.loads(json.dumps(rebuilt)), json.loads(json.dumps(data)))
    ops = [op for op in ops if op["op"] != "test"]
    if ops:
        words = {"remove": "missing", "add": "unexpected", "replace": "differs at"}
        diff = ", ".join(f"{words[op['op']]} {op['path']}" for op in ops[:3])
        problems.append(f"{where}: not what ServeConfig.to_serve_deploy_dict() makes of its own args ({diff}); "
                        "edited by hand? change the Serve YAML and re-render")
    if (data.get("http_options") or {}).get("host") != "0.0.0.0":
        problems.append(f"{where}.http_options.host: must be 0.0.0.0 in a pod (the ClusterIP Service reaches the proxy on the pod IP)")
    return problems


def _semantic_problems(doc: dict) -> list[str]:
    kind, spec, problems = doc.get("kind"), doc.get("spec") or {}, []
    if kind == "RayJob":
        if spec.get("shutdownAfterJobFinishes") is not True:
            problems.append("spec.shutdownAfterJobFinishes: must be true (the cluster is deleted after the job)")
        if "ttlSecondsAfterFinished" not in spec:
            problems.append("spec.ttlSecondsAfterFinished: missing")
        if spec.get("submissionMode", "K8sJobMode") not in ("K8sJobMode", "HTTPMode", "SidecarMode"):
            problems.append(f"spec.submissionMode: {spec.get('submissionMode')!r} is not one of K8sJobMode, HTTPMode, SidecarMode")
        if "clusterSelector" in spec:
            problems.append("spec.clusterSelector: the training job brings its own cluster (rayClusterSpec)")
        head = _check_cluster(spec.get("rayClusterSpec") or {}, "spec.rayClusterSpec", problems)
        if "submitterPodTemplate" in spec:
            _check_pod(spec["submitterPodTemplate"], "spec.submitterPodTemplate", problems)
        problems += check_entrypoint(spec.get("entrypoint") or "")
        if "MLFLOW_TRACKING_URI" in (spec.get("entrypoint") or "") and head:
            env = {e.get("name"): e for e in head[0].get("env") or []}
            if "valueFrom" not in env.get("MLFLOW_TRACKING_URI", {}):
                problems.append("spec.rayClusterSpec.headGroupSpec.template.spec.containers[0].env: the entrypoint uses "
                                "$MLFLOW_TRACKING_URI; define it with valueFrom.configMapKeyRef")
    elif kind == "RayService":
        _check_cluster(spec.get("rayClusterConfig") or {}, "spec.rayClusterConfig", problems)
        svc_type = ((spec.get("serveService") or {}).get("spec") or {}).get("type")
        if svc_type in ("LoadBalancer", "NodePort"):
            problems.append(f"spec.serveService.spec.type: {svc_type} exposes the Serve port outside the cluster; use ClusterIP")
        problems += check_serve_config(spec.get("serveConfigV2"))
    elif kind == "Service":
        if spec.get("type", "ClusterIP") not in ("ClusterIP",):
            problems.append(f"spec.type: {spec.get('type')} exposes the service outside the cluster; only ClusterIP is allowed")
        if spec.get("externalIPs"):
            problems.append("spec.externalIPs: must be empty")
    elif kind == "Ingress":
        problems.append("kind Ingress: nothing is exposed outside the cluster; use kubectl port-forward")
    elif kind == "Secret":
        if doc.get("data") or doc.get("stringData"):
            problems.append("data: a Secret with values must not be committed; create it with kubectl create secret")
    elif kind == "ConfigMap":
        for key, value in (doc.get("data") or {}).items():
            if is_credential_name(key) or (isinstance(value, str) and has_credentials(value)):
                problems.append(f"data.{key}: looks like a credential; keep it in a Secret")
    return problems


def validate_manifest(doc: Any, source: str = "<manifest>", crds: str | Path | None = None) -> None:
    """Raise ManifestError naming source, kind/name, and each offending field's path with its message."""
    if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
        raise ManifestError(f"{source}: not a Kubernetes object (needs apiVersion and kind)")
    name = (doc.get("metadata") or {}).get("name")
    label = f"{source}: {doc['kind']} {name or '<unnamed>'}"
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 63:
        raise ManifestError(f"{label}: metadata.name: must be a DNS-1123 label (lower-case letters, digits, '-')")
    problems = _schema_problems(doc, Path(crds) if crds else None)
    if not problems:  # the project's rules assume a structurally valid object
        problems = _semantic_problems(doc)
    if problems:
        raise ManifestError(f"{label}: " + "; ".join(problems))


def validate_tree(root: str | Path, crds: str | Path | None = None) -> list[str]:
    """Validate every manifest file under root/base and what every kustomization (base, overlays/*) builds to.
    Returns one line per object checked; raises ManifestError on the first bad file."""
    root = Path(root)
    checked = []
    kustomizations = sorted(root.glob("**/kustomization.yaml"))
    if not kustomizations:
        raise ManifestError(f"{root}: no kustomization.yaml found (render the tree with `ralign k8s render --out {root}`)")
    for kfile in kustomizations:
        directory = kfile.parent
        for path in sorted(directory.glob("*.yaml")):
            if path.name == "kustomization.yaml" or path.name.startswith("patch-"):
                continue
            for i, doc in enumerate(load_yaml_docs(path)):
                validate_manifest(doc, str(path) + (f"[{i}]" if i else ""), crds)
                checked.append(f"{path}: {doc['kind']} {doc['metadata']['name']}")
        for doc in build_kustomization(directory):
            validate_manifest(doc, f"{directory} (kustomize build)", crds)
            checked.append(f"{directory} (kustomize build): {doc['kind']} {doc['metadata']['name']}")
    return checked
