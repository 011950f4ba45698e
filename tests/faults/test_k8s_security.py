"""Every pod the KubeRay manifests create runs as a non-root user without privilege escalation, with all capabilities
dropped and the runtime's default seccomp profile; nothing (dashboard 8265, Serve 8000, anything) is exposed outside
the cluster; MLflow credentials come from the Secret, never from a literal value.

Walked here: the committed tree k8s/ (every file and what every kustomization builds to) and a fresh rendering of
every training config in jobs/configs/, so a config that would render an unsafe pod fails too. The validator's own
rules (`ralign k8s validate`) are in tests/test_k8s.py; here the new ones are checked to fire. The image itself runs
as uid 1000 (Dockerfile `USER 1000:100`, checked by tests/test_k8s.py::test_dockerfile_matches_the_manifests).
"""

from __future__ import annotations

import copy
import re

import pytest

from ralign.ops import k8s

CONFIGS = sorted(p for p in (k8s.REPO_ROOT / "jobs" / "configs").glob("*.yaml")
                 if not p.name.startswith("serve") and not p.stem.endswith("_sft"))
CREDENTIAL = re.compile(r"PASSWORD|PASSWD|TOKEN|SECRET|CREDENTIAL|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|AUTH", re.I)
EXPOSING = ("NodePort", "LoadBalancer")


def _committed_docs() -> list[tuple[str, dict]]:
    docs = []
    for kfile in sorted((k8s.REPO_ROOT / "k8s").glob("**/kustomization.yaml")):
        for path in sorted(kfile.parent.glob("*.yaml")):
            if path.name != "kustomization.yaml" and not path.name.startswith("patch-"):
                docs += [(str(path), d) for d in k8s.load_yaml_docs(path)]
        docs += [(f"{kfile.parent} (build)", d) for d in k8s.build_kustomization(kfile.parent)]
    return docs


def _rendered_docs() -> list[tuple[str, dict]]:
    serve = k8s.REPO_ROOT / k8s.DEFAULT_SERVE_CONFIG
    return [(f"{c.name} (render)", d) for c in CONFIGS for d in k8s.render_manifests(c, serve).values()]


ALL_DOCS = _committed_docs() + _rendered_docs()


def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """Every pod template in a RayJob / RayService: head and worker groups, and the job's submitter."""
    spec = doc.get("spec") or {}
    out = []
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig")
    if cluster:
        out.append(("head", cluster["headGroupSpec"]["template"]))
        out += [(f"worker {g['groupName']}", g["template"]) for g in cluster.get("workerGroupSpecs") or []]
    if "submitterPodTemplate" in spec:
        out.append(("submitter", spec["submitterPodTemplate"]))
    return out


def test_the_walk_sees_every_kind_of_pod():
    kinds = {(doc["kind"], name.split()[0]) for _, doc in ALL_DOCS for name, _ in pod_templates(doc)}
    assert kinds == {("RayJob", "head"), ("RayJob", "worker"), ("RayJob", "submitter"), ("RayService", "head"), ("RayService", "worker")}
    assert len(CONFIGS) >= 8


def test_every_pod_runs_unprivileged():
    for source, doc in ALL_DOCS:
        _every_pod_runs_unprivileged(source, doc)


def _every_pod_runs_unprivileged(source: str, doc: dict) -> None:
    for name, template in pod_templates(doc):
        pod = template["spec"]
        pod_sc = pod["securityContext"]
        assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] > 0 and pod_sc.get("runAsGroup", 1) > 0, (source, name)
        assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}, (source, name)
        assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), (source, name)
        assert not any("hostPath" in v for v in pod.get("volumes") or []), (source, name)
        for c in pod.get("initContainers", []) + pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and not sc.get("privileged"), (source, name, c["name"])
            assert sc["capabilities"] == {"drop": ["ALL"]}, (source, name, c["name"])
            assert sc.get("runAsUser", pod_sc["runAsUser"]) > 0 and sc.get("runAsNonRoot", True) is True
            assert not any("hostPort" in p for p in c.get("ports") or []), (source, name, c["name"])
    cluster = (doc.get("spec") or {}).get("rayClusterSpec") or (doc.get("spec") or {}).get("rayClusterConfig")
    if cluster:  # the autoscaler sidecar KubeRay adds to the head pod
        sc = cluster["autoscalerOptions"]["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}


def test_nothing_is_exposed_outside_the_cluster():
    for source, doc in ALL_DOCS:
        _nothing_is_exposed_outside_the_cluster(source, doc)


def _nothing_is_exposed_outside_the_cluster(source: str, doc: dict) -> None:
    assert doc["kind"] not in ("Ingress", "Route", "Gateway", "HTTPRoute"), source
    spec = doc.get("spec") or {}
    if doc["kind"] == "Service":
        assert spec.get("type", "ClusterIP") == "ClusterIP" and not spec.get("externalIPs"), source
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig")
    if cluster:
        head = cluster["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP" and head.get("enableIngress") is False, source
        assert ((head.get("headService") or {}).get("spec") or {}).get("type", "ClusterIP") == "ClusterIP", source
        # The dashboard and Serve ports are declared (KubeRay's ClusterIP services route to them), never exposed.
        ports = {p["containerPort"] for c in head["template"]["spec"]["containers"] for p in c.get("ports") or []}
        assert 8265 in ports
    if doc["kind"] == "RayService":
        assert ((spec.get("serveService") or {}).get("spec") or {}).get("type", "ClusterIP") == "ClusterIP", source


def test_credentials_come_from_secrets_only():
    for source, doc in ALL_DOCS:
        _credentials_come_from_secrets_only(source, doc)


def _credentials_come_from_secrets_only(source: str, doc: dict) -> None:
    if doc["kind"] == "Secret":
        assert not doc.get("data") and not doc.get("stringData"), source
    if doc["kind"] == "ConfigMap":
        for key, value in (doc.get("data") or {}).items():
            assert not CREDENTIAL.search(key) and not re.search(r"://[^/\s@]+@", str(value)), (source, key)
    for name, template in pod_templates(doc):
        for c in template["spec"]["containers"]:
            for e in c.get("env") or []:
                if CREDENTIAL.search(e["name"]):
                    assert "value" not in e and "secretKeyRef" in e["valueFrom"], (source, name, e["name"])
                    assert e["valueFrom"]["secretKeyRef"]["name"] == k8s.MLFLOW_SECRET
                assert not re.search(r"://[^/\s@]+@", str(e.get("value", ""))), (source, name, e["name"])
            for src in c.get("envFrom") or []:
                assert "secretRef" in src or not CREDENTIAL.search(str(src)), (source, name)
    if doc["kind"] == "RayJob":
        head_env = {e["name"]: e for e in pod_templates(doc)[0][1]["spec"]["containers"][0]["env"]}
        assert {k for k in head_env if k.startswith("MLFLOW_TRACKING_") and k != "MLFLOW_TRACKING_URI"} == set(k8s.MLFLOW_SECRET_KEYS)
        assert "MLFLOW_TRACKING_URI" not in doc["spec"]["entrypoint"].replace('"${MLFLOW_TRACKING_URI}"', "")


def _head(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]


BREAKS = {
    "seccomp unconfined": (lambda d: _head(d)["securityContext"].update(seccompProfile={"type": "Unconfined"}),
                           "seccompProfile.type: Unconfined; use RuntimeDefault"),
    "seccomp unset": (lambda d: _head(d)["securityContext"].pop("seccompProfile"), "seccompProfile.type: unset"),
    "capabilities kept": (lambda d: _head(d)["containers"][0]["securityContext"].pop("capabilities"), "capabilities.drop: must include ALL"),
    "capability added": (lambda d: _head(d)["containers"][0]["securityContext"]["capabilities"].update(add=["NET_ADMIN"]),
                         "capabilities.add: must be empty"),
    "no uid": (lambda d: _head(d)["securityContext"].pop("runAsUser"), "runAsUser: not set here or in the pod's securityContext"),
    "host port": (lambda d: _head(d)["containers"][0]["ports"][1].update(hostPort=8265), "ports[1].hostPort: exposes the port on the node"),
    "NodePort dashboard": (lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"].update(serviceType="NodePort"),
                           "serviceType: NodePort exposes the dashboard outside the cluster"),
    "dashboard ingress": (lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"].update(enableIngress=True), "enableIngress: must be false"),
    "literal token": (lambda d: _head(d)["containers"][0]["env"].append({"name": "MLFLOW_TRACKING_TOKEN", "value": "abc"}),
                      "(MLFLOW_TRACKING_TOKEN): a credential in a plain env value"),
}


@pytest.mark.parametrize("case", list(BREAKS))
def test_the_validator_refuses_each_unsafe_change(case):
    crds = k8s.crd_dir()
    if not all((crds / f).is_file() for f in k8s.CRD_FILES.values()):
        pytest.skip(f"KubeRay CRDs not found in {crds}: {k8s.CRD_HOWTO}")
    doc = copy.deepcopy(next(d for s, d in ALL_DOCS if d["kind"] == "RayJob"))
    k8s.validate_manifest(doc, "rayjob", crds)  # as rendered: valid
    edit, needle = BREAKS[case]
    edit(doc)
    with pytest.raises(k8s.ManifestError) as err:
        k8s.validate_manifest(doc, "rayjob", crds)
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_service_and_ingress_objects_are_refused():
    for doc, needle in [
        ({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "dash"},
          "spec": {"type": "LoadBalancer", "ports": [{"port": 8265}], "selector": {"app": "x"}}}, "only ClusterIP is allowed"),
        ({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "dash"},
          "spec": {"defaultBackend": {"service": {"name": "ralign-train-head-svc", "port": {"number": 8265}}}}}, "kind Ingress"),
    ]:
        with pytest.raises(k8s.ManifestError, match=re.escape(needle)):
            k8s.validate_manifest(doc, "extra.yaml")
