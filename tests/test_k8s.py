"""The KubeRay manifests in k8s/: valid against the KubeRay v1.7.0 CRDs and Kubernetes' own schemas, safe (non-root,
nothing exposed, no credentials), consistent with the configs they are rendered from, and in sync with
`ralign k8s render --out k8s`. Broken manifests must fail with a message that names the field."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ralign.config import ConfigError
from ralign.ops import k8s
from ralign.ops.k8s import render as k8s_render

K8S = k8s.REPO_ROOT / "k8s"
RENDER_CMD = ["k8s", "render", "--out"]


def _crds_or_skip() -> Path:
    d = k8s.crd_dir()
    missing = [f for f in k8s.CRD_FILES.values() if not (d / f).is_file()]
    if missing:
        pytest.skip(f"KubeRay CRDs {missing} not found in {d}: {k8s.CRD_HOWTO}")
    return d


@pytest.fixture(scope="module")
def crds() -> Path:
    return _crds_or_skip()


def _load(rel: str) -> dict:
    return yaml.safe_load((K8S / rel).read_text(encoding="utf-8"))


def _by_key(docs: list[dict]) -> dict:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def _ralign(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], capture_output=True, text=True, timeout=600, cwd=k8s.REPO_ROOT)


# ------------------------------------------------------------------------------------- (a) the committed tree is valid


def test_committed_tree_validates(crds):
    checked = k8s.validate_tree(K8S, crds)
    # 4 files of the base, then what base, toy, sd15 and sd35 build to (4 objects each)
    assert len(checked) == 20, checked
    assert sum("overlays/sd15 (kustomize build)" in c for c in checked) == 4
    assert sum("overlays/sd35 (kustomize build)" in c for c in checked) == 4


def test_core_objects_validate_without_crds(tmp_path, monkeypatch):
    monkeypatch.setenv("RALIGN_KUBERAY_CRDS", str(tmp_path))  # not needed for core kinds
    for rel in ("base/configmap-mlflow.yaml", "base/pvc-shared.yaml"):
        k8s.validate_manifest(_load(rel), rel)


def test_every_kustomization_references_existing_files():
    for kfile in K8S.glob("**/kustomization.yaml"):
        kust = yaml.safe_load(kfile.read_text())
        assert kust["apiVersion"] == k8s.KUSTOMIZE_API and kust["kind"] == "Kustomization"
        for res in kust.get("resources", []):
            assert (kfile.parent / res).exists(), f"{kfile}: {res}"
        for patch in kust.get("patches", []):
            assert (kfile.parent / patch["path"]).is_file(), f"{kfile}: {patch['path']}"


def test_overlays_build_to_their_own_configs_rendering():
    """What `kubectl apply -k k8s/overlays/NAME` applies is what rendering NAME's config directly gives."""
    name, tag = k8s.DEFAULT_IMAGE.rsplit(":", 1)
    for overlay, config in k8s.DEFAULT_OVERLAYS.items():
        built = _by_key(k8s.build_kustomization(K8S / "overlays" / overlay))
        gpu = overlay in ("sd15", "sd35")
        direct = _by_key(k8s.render_manifests(config, k8s.DEFAULT_SERVE_CONFIG, image=f"{name}:{tag}{'-gpu' if gpu else ''}").values())
        assert built == direct, overlay
        assert f"--config /app/{config}" in built[("RayJob", k8s.TRAIN_JOB)]["spec"]["entrypoint"]


def test_kubectl_kustomize_agrees_with_the_builtin_build():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("no kubectl on this machine; the built-in build (resources, images, JSON 6902 patches) is checked alone")
    for d in ("base", "overlays/toy", "overlays/sd15", "overlays/sd35"):
        proc = subprocess.run([kubectl, "kustomize", str(K8S / d)], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0 and "unknown command" in proc.stderr:
            pytest.skip(f"this kubectl has no kustomize: {proc.stderr.strip()[:200]}")
        assert proc.returncode == 0, proc.stderr
        assert _by_key(list(yaml.safe_load_all(proc.stdout))) == _by_key(k8s.build_kustomization(K8S / d)), d


def test_job_shape_follows_the_configs():
    base = _load("base/rayjob-train.yaml")["spec"]
    assert base["shutdownAfterJobFinishes"] is True and base["ttlSecondsAfterFinished"] > 0
    rcs = base["rayClusterSpec"]
    assert rcs["enableInTreeAutoscaling"] is True and rcs["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in rcs["workerGroupSpecs"]}
    # quickstart: 1 sampler (0.5 CPU) + 1 reward actor (0.5) + 1 learner (1.0) fit one 2-CPU pod; no GPU
    assert groups["cpu"]["maxReplicas"] == 1 and groups["gpu"]["maxReplicas"] == 0 and groups["gpu"]["minReplicas"] == 0
    assert groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"] == {"cpu": "2", "memory": "8Gi"}
    sd15 = _by_key(k8s.build_kustomization(K8S / "overlays" / "sd15"))
    gpu = {g["groupName"]: g for g in sd15[("RayJob", k8s.TRAIN_JOB)]["spec"]["rayClusterSpec"]["workerGroupSpecs"]}["gpu"]
    # sd15: 4 learners (8 CPU, 1 GPU) + 4 samplers (4 CPU, 1 GPU) + 2 reward actors (2 CPU, 0.5 GPU) -> 4 + 4 + 1 pods
    assert gpu["maxReplicas"] == 9 and gpu["minReplicas"] == 0
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"] == {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"}
    assert gpu["template"]["spec"]["containers"][0]["image"] == k8s.DEFAULT_IMAGE + "-gpu"
    assert sd15[("ConfigMap", k8s.MLFLOW_CONFIGMAP)]["data"]["MLFLOW_TRACKING_URI"] == "http://mlflow.mlflow.svc:5000"
    sd35 = _by_key(k8s.build_kustomization(K8S / "overlays" / "sd35"))
    spec = sd35[("RayJob", k8s.TRAIN_JOB)]["spec"]
    groups = {g["groupName"]: g for g in spec["rayClusterSpec"]["workerGroupSpecs"]}
    # sd35 (Flow-GRPO's scale): 8 learners + 16 samplers (1 GPU each) + 4 reward actors (0.5 GPU) -> 8 + 16 + 2 pods,
    # and the hub id of SD3.5-Medium needs the hub (HF_HUB_OFFLINE=0)
    assert groups["gpu"]["maxReplicas"] == 26 and groups["cpu"]["maxReplicas"] == 0
    env = {e["name"]: e["value"] for e in groups["gpu"]["template"]["spec"]["containers"][0]["env"] if "value" in e}
    assert env["HF_HUB_OFFLINE"] == "0"


def test_packing():
    assert k8s_render._pack([(1.0, 0), (0.5, 0), (0.5, 0)], 2, 0) == 1
    assert k8s_render._pack([(2, 0.5)] * 3, 4, 1) == 2
    assert k8s_render._pack([], 2, 0) == 0


def test_rayservice_serves_the_serve_yaml():
    from ralign.ops.serve_config import ServeConfig
    from ralign.config import load_config

    spec = _load("base/rayservice-rewards.yaml")["spec"]
    cfg = load_config(ServeConfig, k8s.REPO_ROOT / k8s.DEFAULT_SERVE_CONFIG, ["http.host=0.0.0.0"])
    assert yaml.safe_load(spec["serveConfigV2"]) == cfg.to_serve_deploy_dict()
    assert spec["rayClusterConfig"]["headGroupSpec"]["serviceType"] == "ClusterIP"


def test_dockerfile_matches_the_manifests():
    text = (k8s.REPO_ROOT / "Dockerfile").read_text()
    assert f"rayproject/ray:{k8s.RAY_VERSION}-py311" in text
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] == str(k8s.RUN_AS_USER)
    assert f"WORKDIR {k8s.IMAGE_WORKDIR}" in text


# ---------------------------------------------------------------------------- (b) broken manifests fail readably


def _job_group(doc, i=0):
    return doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][i]


def _head_container(doc):
    return doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def _misspell(doc):
    g = _job_group(doc)
    g["minReplica"] = g.pop("minReplicas")


def _replace_entry(old, new):
    def edit(doc):
        doc["spec"]["entrypoint"] = doc["spec"]["entrypoint"].replace(old, new)
    return edit


JOB_BREAKS = {
    "misspelled field": (_misspell, ["workerGroupSpecs[0]", "'minReplica' was unexpected"]),
    "missing groupName": (lambda d: _job_group(d, 1).pop("groupName"), ["workerGroupSpecs[1]", "'groupName' is a required property"]),
    "wrong type": (lambda d: _job_group(d).update(maxReplicas="two"), ["workerGroupSpecs[0].maxReplicas", "'two' is not of type 'integer'"]),
    "bad enum": (lambda d: d["spec"]["rayClusterSpec"]["autoscalerOptions"].update(upscalingMode="Fast"), ["upscalingMode", "'Fast' is not one of"]),
    "root container": (lambda d: _head_container(d)["securityContext"].update(runAsUser=0), ["containers[0].securityContext.runAsUser: 0 is root"]),
    "privilege escalation": (lambda d: _head_container(d)["securityContext"].update(allowPrivilegeEscalation=True), ["allowPrivilegeEscalation: must be false"]),
    "no limits": (lambda d: _head_container(d)["resources"].pop("limits"), ["headGroupSpec.template.spec.containers[0].resources.limits: missing cpu, memory"]),
    "LoadBalancer head": (lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"].update(serviceType="LoadBalancer"), ["serviceType: LoadBalancer"]),
    "bad config key": (_replace_entry("ray.address=auto", "ray.adress=auto"), ["spec.entrypoint", "unknown key 'ray.adress'"]),
    "missing config": (_replace_entry("quickstart.yaml", "nowhere.yaml"), ["spec.entrypoint", "nowhere.yaml: config file not found"]),
    "other program": (_replace_entry("-m jobs.train", "-m jobs.other"), ["must start with 'python -m jobs.train'"]),
    "plaintext password": (lambda d: _head_container(d)["env"].append({"name": "MLFLOW_TRACKING_PASSWORD", "value": "hunter2"}),
                           ["(MLFLOW_TRACKING_PASSWORD): a credential in a plain env value"]),
    "plain tracking uri": (lambda d: _head_container(d)["env"].__setitem__(0, {"name": "MLFLOW_TRACKING_URI", "value": "http://x"}),
                           ["(MLFLOW_TRACKING_URI): take it from the ConfigMap/Secret with valueFrom"]),
    "kept after finish": (lambda d: d["spec"].update(shutdownAfterJobFinishes=False), ["spec.shutdownAfterJobFinishes: must be true"]),
    "no autoscaling": (lambda d: d["spec"]["rayClusterSpec"].update(enableInTreeAutoscaling=False), ["enableInTreeAutoscaling: must be true"]),
}


@pytest.mark.parametrize("case", list(JOB_BREAKS))
def test_broken_rayjob_is_rejected_with_the_field_named(crds, case):
    edit, expected = JOB_BREAKS[case]
    doc = _load("base/rayjob-train.yaml")
    edit(doc)
    with pytest.raises(k8s.ManifestError) as err:
        k8s.validate_manifest(doc, "broken/rayjob-train.yaml", crds)
    msg = str(err.value)
    assert msg.startswith("broken/rayjob-train.yaml: RayJob ralign-train: "), msg
    for part in expected:
        assert part in msg, msg


def _serve_text(old, new, count=1):
    def edit(doc):
        doc["spec"]["serveConfigV2"] = doc["spec"]["serveConfigV2"].replace(old, new, count)
    return edit


SERVICE_BREAKS = {
    "out of range": (_serve_text("max_batch_size: 16", "max_batch_size: 1000"), ["applications[0].args", "max_batch_size"]),
    "hand-edited key": (_serve_text("route_prefix", "route_prefx"), ["unexpected /applications/0/route_prefx"]),
    "loopback proxy": (_serve_text("host: 0.0.0.0", "host: 127.0.0.1", -1), ["http_options.host: must be 0.0.0.0"]),
    "not yaml": (lambda d: d["spec"].update(serveConfigV2="applications: [\n"), ["spec.serveConfigV2: invalid YAML"]),
    "NodePort serve": (lambda d: d["spec"].update(serveService={"spec": {"type": "NodePort"}}), ["spec.serveService.spec.type: NodePort"]),
    "misspelled group field": (lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].update(maxReplica=3), ["'maxReplica' was unexpected"]),
}


@pytest.mark.parametrize("case", list(SERVICE_BREAKS))
def test_broken_rayservice_is_rejected_with_the_field_named(crds, case):
    edit, expected = SERVICE_BREAKS[case]
    doc = _load("base/rayservice-rewards.yaml")
    edit(doc)
    with pytest.raises(k8s.ManifestError) as err:
        k8s.validate_manifest(doc, "broken/rayservice.yaml", crds)
    msg = str(err.value)
    assert msg.startswith("broken/rayservice.yaml: RayService ralign-rewards: "), msg
    for part in expected:
        assert part in msg, msg


CORE_BREAKS = {
    "LoadBalancer service": ({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "dash"},
                              "spec": {"type": "LoadBalancer", "ports": [{"port": 8265}]}}, ["Service dash: spec.type: LoadBalancer"]),
    "misspelled core field": ({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "dash"}, "spec": {"portz": [{"port": 1}]}},
                              ["Service dash: spec: Additional properties are not allowed ('portz' was unexpected)"]),
    "wrong core type": ({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"A": 1}}, ["data.A: 1 is not of type 'string'"]),
    "credential in configmap": ({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"},
                                 "data": {"MLFLOW_TRACKING_URI": "https://me:pw@mlflow"}}, ["data.MLFLOW_TRACKING_URI: looks like a credential"]),
    "secret with values": ({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "stringData": {"MLFLOW_TRACKING_PASSWORD": "x"}},
                           ["a Secret with values must not be committed"]),
    "bad name": ({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "Bad_Name"}}, ["metadata.name: must be a DNS-1123 label"]),
}


@pytest.mark.parametrize("case", list(CORE_BREAKS))
def test_broken_core_object_is_rejected(case):
    doc, expected = CORE_BREAKS[case]
    with pytest.raises(k8s.ManifestError) as err:
        k8s.validate_manifest(copy.deepcopy(doc), "broken/core.yaml")
    for part in ["broken/core.yaml: ", *expected]:
        assert part in str(err.value), str(err.value)


def test_broken_overlay_is_rejected(tmp_path):
    tree = tmp_path / "k8s"
    shutil.copytree(K8S, tree)
    patch = tree / "overlays" / "sd15" / "patch-rayjob-train.yaml"
    ops = yaml.safe_load(patch.read_text())
    patch.write_text(yaml.safe_dump([{"op": "test", "path": "/spec/rayClusterSpec/workerGroupSpecs/1/groupName", "value": "tpu"}] + ops))
    with pytest.raises(k8s.ManifestError, match=r"patch-rayjob-train.yaml: operation 0: test of /spec/rayClusterSpec/workerGroupSpecs/1/groupName failed"):
        k8s.build_kustomization(tree / "overlays" / "sd15")
    patch.unlink()
    with pytest.raises(k8s.ManifestError, match=r"patches\[\d\]: patch file 'patch-rayjob-train.yaml' does not exist"):
        k8s.build_kustomization(tree / "overlays" / "sd15")
    (tree / "overlays" / "toy" / "kustomization.yaml").write_text("resources: [../../base]\nnamePrefix: x-\n")
    with pytest.raises(k8s.ManifestError, match=r"fields \['namePrefix'\] are not supported"):
        k8s.build_kustomization(tree / "overlays" / "toy")


# ---------------------------------------------------------------------------------------- (c) in sync, CLI works


def test_cli_render_reproduces_the_committed_tree(tmp_path):
    out = tmp_path / "k8s"
    proc = _ralign(*RENDER_CMD, str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rendered = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    committed = sorted(p.relative_to(K8S).as_posix() for p in K8S.rglob("*") if p.is_file())
    assert rendered == committed, "k8s/ is out of sync: run `ralign k8s render --out k8s`"
    for rel in rendered:
        assert (out / rel).read_bytes() == (K8S / rel).read_bytes(), f"k8s/{rel} is out of sync: run `ralign k8s render --out k8s`"


def test_cli_bad_config_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ray: {samplerz: 2}\n")
    proc = _ralign(*RENDER_CMD, str(tmp_path / "out"), "--config", str(bad))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "unknown key 'ray.samplerz'" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_config_outside_the_repo_is_refused(tmp_path):
    outside = tmp_path / "q.yaml"
    shutil.copy(k8s.REPO_ROOT / k8s.DEFAULT_CONFIG, outside)
    with pytest.raises(ConfigError, match="must live inside the repository"):
        k8s.render_manifests(outside, k8s.REPO_ROOT / k8s.DEFAULT_SERVE_CONFIG)


# --------------------------------------------------------------------------------------- (d) CRDs not on the machine


def test_missing_crds_say_where_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("RALIGN_KUBERAY_CRDS", str(tmp_path / "none"))
    with pytest.raises(k8s.CRDsMissing) as err:
        k8s.validate_manifest(_load("base/rayjob-train.yaml"), "k8s/base/rayjob-train.yaml")
    assert "helm-chart/kuberay-operator/crds/" in str(err.value) and "v1.7.0" in str(err.value)
