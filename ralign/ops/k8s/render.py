"""KubeRay manifests for training (a `RayJob`) and the reward servers (a `RayService`), rendered from the project's own
configs, and their validation.

`ralign k8s render --out k8s` writes a kustomize tree:

    k8s/base/                       rendered from --config (default jobs/configs/quickstart.yaml) and --serve-config
      kustomization.yaml
      configmap-mlflow.yaml         MLFLOW_TRACKING_URI (credentials come from the Secret `ralign-mlflow`, never here)
      pvc-shared.yaml               the ReadWriteMany volume every training pod mounts at /mnt/shared
      rayjob-train.yaml             RayJob `ralign-train`: head + `cpu` and `gpu` worker groups, autoscaling
      rayservice-rewards.yaml       RayService `ralign-rewards`: serveConfigV2 generated from the Serve YAML
    k8s/overlays/<name>/            one per --overlay NAME=CONFIG (default toy=quickstart.yaml, sd15=sd15.yaml)
      kustomization.yaml            resources: ../../base, `images:` (the tag), JSON 6902 patches
      patch-<file>.yaml             the difference between the base and this config's own rendering

An overlay's patches are computed, not written by hand: the overlay's config is rendered in full and diffed against
the base, so `kubectl apply -k k8s/overlays/sd15` yields exactly what rendering sd15.yaml directly would. Since no
kustomize binary is needed to check that, `build_kustomization` applies the three kustomize features the tree uses
(resources, images, JSON 6902 patches) itself, and the tests compare it with `kubectl kustomize` where one exists.

Sizing rule (documented here, applied by `train_worker_groups` / `serve_worker_groups`):

* Each Ray actor the job starts is one item of (CPUs, GPUs): `ray.samplers` x (sampler_cpus, sampler_gpus),
  `ray.reward_actors` x (reward_cpus, reward_gpus), `ray.learners` x (learner_cpus, 1 if use_gpu else 0). The rollout
  coordinator and Ray Train's controller take 0 CPUs and run on the head, which advertises num-cpus 0 so that no
  actor lands next to the GCS and the driver.
* Items with GPUs go to the `gpu` group, the others to the `cpu` group. A GPU pod has max(1, ceil(largest GPU
  share)) GPUs and, for every kind of GPU item, room for as many of them as its GPUs hold (e.g. 2 reward actors of
  0.5 GPU and 2 CPUs need 4 CPUs); a CPU pod has max(2, ceil(largest CPU share)) CPUs. Memory is 4 GiB per CPU.
  Requests equal limits (Guaranteed QoS; Ray reads its resources from the limits).
* `maxReplicas` of a group is the number of its pods a first-fit-decreasing packing of its items needs;
  `minReplicas` (and the initial `replicas`) is 0: the in-tree autoscaler starts pods when the job asks for actors
  and removes them when idle. A group without items keeps maxReplicas 0 (an overlay raises it).
* The RayService does the same with each Serve deployment's `autoscaling.max_replicas` x `ray_actor_options`
  (minReplicas from `min_replicas`, so the minimum number of reward replicas is always placed).

What is validated (`validate_manifest`): RayJob / RayService against the KubeRay v1.7.0 CRDs' openAPIV3Schema with
plain jsonschema (`x-kubernetes-int-or-string` mapped, unknown fields rejected wherever the schema lists
properties; CEL rules are not evaluated), core kinds with `kubernetes-validate` (strict, Kubernetes 1.30), and the
project's own rules: the entrypoint is `python -m jobs.train --config <a repo config> ...` and that config (with its
--set overrides) loads as a TrainConfig; serveConfigV2 passes Ray's `ServeDeploySchema` and every application's args
round-trip through the ServeConfig models; every container has CPU and memory requests and limits and runs as a
named non-root uid without privilege escalation, with all capabilities dropped and the runtime's default seccomp
profile; no Service is LoadBalancer or NodePort, no container has a hostPort and no ingress is enabled; the MLflow
tracking URI comes from a ConfigMap/Secret reference and no env value or ConfigMap holds a credential; no Secret with
values is part of the tree.

Exposure: the head's dashboard (8265) and the Serve proxy (8000) listen on the pod IP because the KubeRay operator
and the job submitter reach them through the head's ClusterIP Service (binding the dashboard to 127.0.0.1 would
break job submission and RayService updates). Nothing is exposed outside the cluster: ClusterIP only, no ingress,
no LoadBalancer/NodePort; reach them with `kubectl port-forward`.
"""

from __future__ import annotations

import copy
import math
import re
import shlex
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

import yaml

from ralign.config import ConfigError, load_config

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_CONFIG = "jobs/configs/quickstart.yaml"
DEFAULT_SERVE_CONFIG = "jobs/configs/serve_rewards.yaml"
DEFAULT_OVERLAYS = {"toy": "jobs/configs/quickstart.yaml", "sd15": "jobs/configs/sd15.yaml", "sd35": "jobs/configs/sd35.yaml"}
DEFAULT_IMAGE = "ghcr.io/ralign/ralign:0.1.0"  # built from the top-level Dockerfile; GPU configs use the tag + "-gpu"
RAY_VERSION = "2.60.0"  # the Ray in the image (Dockerfile's base image)
IMAGE_WORKDIR = PurePosixPath("/app")  # where the Dockerfile copies the repository (configs included)
RUN_AS_USER, RUN_AS_GROUP = 1000, 100  # the `ray` user of the rayproject/ray images
SHARED_MOUNT = "/mnt/shared"
SHARED_PVC = "ralign-shared"
SHARED_STORAGE = f"{SHARED_MOUNT}/ralign/ray_train"
SHARED_MLFLOW = f"sqlite:///{SHARED_MOUNT}/ralign/mlflow.db"
MLFLOW_CONFIGMAP = "ralign-mlflow"
MLFLOW_SECRET = "ralign-mlflow"
MLFLOW_SECRET_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
TRACKING_ARG = '"${MLFLOW_TRACKING_URI}"'  # expanded by the shell Ray runs the entrypoint in
TRAIN_JOB = "ralign-train"
REWARDS_SERVICE = "ralign-rewards"
K8S_VERSION = "1.30"  # oldest Kubernetes the core objects are checked against
MEMORY_GIB_PER_CPU = 4
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayService": "ray.io_rayservices.yaml"}
CRD_HOWTO = ("copy ray.io_rayjobs.yaml and ray.io_rayservices.yaml from helm-chart/kuberay-operator/crds/ of KubeRay "
             "release v1.7.0 (repository ray-project/kuberay, tag v1.7.0; or `helm pull kuberay/kuberay-operator "
             "--version 1.7.0 --untar` and take its crds/) into that directory, or point RALIGN_KUBERAY_CRDS at them")
KUSTOMIZE_API = "kustomize.config.k8s.io/v1beta1"
GENERATED_NOTE = "# Generated by `ralign k8s render` (ralign/ops/k8s/render.py) from {sources}.\n# Do not edit: change the configs and re-render; tests/test_k8s.py checks that this tree is in sync.\n"


class ManifestError(ConfigError):
    """A manifest that would be rejected (or is unsafe); the message names the file, kind, field path and problem."""


class CRDsMissing(ManifestError):
    """The KubeRay CRDs needed for schema validation are not on this machine."""


# ----------------------------------------------------------------------------------------------------------- helpers


def repo_relative(path: str | Path) -> PurePosixPath:
    """A config's path inside the repository (the image carries the repository at IMAGE_WORKDIR)."""
    p = Path(path)
    resolved = (p if p.is_absolute() else Path.cwd() / p).resolve()
    try:
        return PurePosixPath(resolved.relative_to(REPO_ROOT).as_posix())
    except ValueError:
        raise ConfigError(f"{path}: a config rendered into manifests must live inside the repository ({REPO_ROOT}), "
                          "which the image carries at /app") from None


def _quantity(cpus: float) -> str:
    return str(int(cpus)) if float(cpus).is_integer() else f"{int(round(cpus * 1000))}m"


def _resources(cpus: float, memory_gib: float, gpus: int = 0) -> dict:
    amount = {"cpu": _quantity(cpus), "memory": f"{int(memory_gib)}Gi"}
    limits = dict(amount, **({"nvidia.com/gpu": str(gpus)} if gpus else {}))
    return {"requests": dict(amount), "limits": limits}


def _container_security() -> dict:
    return {"runAsNonRoot": True, "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _pod_security() -> dict:
    return {"runAsNonRoot": True, "runAsUser": RUN_AS_USER, "runAsGroup": RUN_AS_GROUP, "fsGroup": RUN_AS_GROUP,
            "seccompProfile": {"type": "RuntimeDefault"}}


def _labels(component: str) -> dict:
    return {"app.kubernetes.io/name": "ralign", "app.kubernetes.io/part-of": "ralign", "app.kubernetes.io/component": component}


def _pack(items: list[tuple[float, float]], pod_cpus: float, pod_gpus: float) -> int:
    """Pods of (pod_cpus, pod_gpus) that a first-fit-decreasing packing of (cpus, gpus) items needs."""
    free: list[list[float]] = []
    for cpus, gpus in sorted(items, key=lambda it: (it[1], it[0]), reverse=True):
        for pod in free:
            if pod[0] + 1e-9 >= cpus and pod[1] + 1e-9 >= gpus:
                pod[0] -= cpus
                pod[1] -= gpus
                break
        else:
            free.append([pod_cpus - cpus, pod_gpus - gpus])
    return len(free)


def _group_shapes(items: list[tuple[float, float]]) -> dict[str, dict]:
    """The `cpu` and `gpu` worker groups for a list of (cpus, gpus) items (see the module docstring)."""
    cpu_items = [it for it in items if it[1] == 0]
    gpu_items = [it for it in items if it[1] > 0]
    cpu_pod = max(2, math.ceil(max((c for c, _ in cpu_items), default=0)))
    gpu_pod_gpus = max(1, math.ceil(max((g for _, g in gpu_items), default=1)))
    gpu_pod_cpus = max([math.ceil(c * max(1, math.floor(gpu_pod_gpus / g + 1e-9))) for c, g in gpu_items] or [4])
    return {
        "cpu": {"cpus": cpu_pod, "gpus": 0, "max": _pack(cpu_items, cpu_pod, 0)},
        "gpu": {"cpus": gpu_pod_cpus, "gpus": gpu_pod_gpus, "max": _pack(gpu_items, gpu_pod_cpus, gpu_pod_gpus)},
    }


def train_actor_items(cfg) -> list[tuple[float, float]]:
    """(CPUs, GPUs) of every actor a training run starts (sampler, reward and learner actors)."""
    r = cfg.ray
    return ([(r.sampler_cpus, r.sampler_gpus)] * r.samplers + [(r.reward_cpus, r.reward_gpus)] * r.reward_actors
            + [(r.learner_cpus, 1.0 if r.use_gpu else 0.0)] * r.learners)


def train_worker_groups(cfg) -> dict[str, dict]:
    shapes = _group_shapes(train_actor_items(cfg))
    for shape in shapes.values():
        shape["min"] = 0
    return shapes


def serve_worker_groups(serve_cfg) -> dict[str, dict]:
    def items(attr: str) -> list[tuple[float, float]]:
        out = []
        for d in serve_cfg.deployments:
            out += [(d.ray_actor_options.num_cpus, d.ray_actor_options.num_gpus)] * getattr(d.autoscaling, attr)
        return out

    shapes = _group_shapes(items("max_replicas"))
    mins = items("min_replicas")
    for name, shape in shapes.items():
        own = [it for it in mins if (it[1] > 0) == (name == "gpu")]
        shape["min"] = _pack(own, shape["cpus"], shape["gpus"])
    if shapes["gpu"]["max"] == 0:
        del shapes["gpu"]  # the reward servers need no GPU group unless a deployment asks for GPUs
    return shapes


# ------------------------------------------------------------------------------------------------------- rendering


def in_cluster_overrides(cfg) -> list[str]:
    """--set overrides the RayJob adds so a config written for a laptop runs on the cluster: join the RayJob's own
    cluster (ray.address=auto) and keep Ray Train checkpoints on the shared volume when the path is local."""
    extra = []
    if cfg.ray.address != "auto":
        extra.append("ray.address=auto")
    storage = cfg.ray.storage_path
    if "://" not in storage and not storage.startswith(SHARED_MOUNT + "/"):
        extra.append(f"ray.storage_path={SHARED_STORAGE}")
    return extra


def cluster_tracking_uri(cfg) -> str:
    """A tracking server URI is kept; a local store (sqlite / file / path) moves to the shared volume, where the driver
    and the learners on other pods all reach it."""
    uri = cfg.tracking.tracking_uri
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    return SHARED_MLFLOW if scheme in ("", "sqlite", "file") else uri


def _hub_id(pipeline: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", pipeline)) and not pipeline.startswith((".", "/"))


def _mlflow_env() -> list[dict]:
    env = [{"name": "MLFLOW_TRACKING_URI", "valueFrom": {"configMapKeyRef": {"name": MLFLOW_CONFIGMAP, "key": "MLFLOW_TRACKING_URI"}}}]
    env += [{"name": k, "valueFrom": {"secretKeyRef": {"name": MLFLOW_SECRET, "key": k, "optional": True}}} for k in MLFLOW_SECRET_KEYS]
    return env


def _ray_container(name: str, image: str, cpus: float, gpus: int, env: list[dict], mounts: list[dict], ports: list[tuple[str, int]]) -> dict:
    c: dict[str, Any] = {"name": name, "image": image, "imagePullPolicy": "IfNotPresent"}
    if ports:
        c["ports"] = [{"name": n, "containerPort": p} for n, p in ports]
    c["env"] = env
    c["resources"] = _resources(cpus, cpus * MEMORY_GIB_PER_CPU, gpus)
    c["securityContext"] = _container_security()
    c["volumeMounts"] = mounts
    return c


def _pod_template(component: str, containers: list[dict], volumes: list[dict], gpu: bool = False) -> dict:
    spec: dict[str, Any] = {"securityContext": _pod_security(), "containers": containers, "volumes": volumes}
    if gpu:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"metadata": {"labels": _labels(component)}, "spec": spec}


def _cluster_spec(component: str, image: str, groups: dict[str, dict], head_cpus: int, env: list[dict],
                  shared: bool, ports: list[tuple[str, int]], worker_ports: list[tuple[str, int]]) -> dict:
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    if shared:
        volumes.append({"name": "shared", "persistentVolumeClaim": {"claimName": SHARED_PVC}})
        mounts.append({"name": "shared", "mountPath": SHARED_MOUNT})
    head = {
        "serviceType": "ClusterIP",
        "enableIngress": False,
        # num-cpus 0: no actor is placed beside the GCS, the dashboard and the job's driver.
        "rayStartParams": {"num-cpus": "0"},
        "template": _pod_template(component, [_ray_container("ray-head", image, head_cpus, 0, env, mounts, ports)], volumes),
    }
    workers = []
    for name, g in groups.items():
        container = _ray_container("ray-worker", image, g["cpus"], g["gpus"], env, mounts, worker_ports)
        workers.append({
            "groupName": name,
            "replicas": g["min"],
            "minReplicas": g["min"],
            "maxReplicas": g["max"],
            "rayStartParams": {},  # KubeRay derives num-cpus / num-gpus from the container limits
            "template": _pod_template(component, [container], copy.deepcopy(volumes), gpu=g["gpus"] > 0),
        })
    return {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {
            "upscalingMode": "Default",
            "idleTimeoutSeconds": 60,
            "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"cpu": "500m", "memory": "512Mi"}},
            "securityContext": _container_security(),
        },
        "headGroupSpec": head,
        "workerGroupSpecs": workers,
    }


def train_entrypoint(config_rel: PurePosixPath, overrides: list[str]) -> str:
    args = ["python", "-m", "jobs.train", "--config", str(IMAGE_WORKDIR / config_rel)]
    for item in overrides:
        args += ["--set", item]
    return shlex.join(args) + " --tracking-uri " + TRACKING_ARG


def render_rayjob(config_rel: PurePosixPath, cfg, overrides: list[str], image: str) -> dict:
    env = _mlflow_env() + [{"name": "HF_HUB_OFFLINE", "value": "0" if _hub_id(cfg.model.pipeline) else "1"}]
    submitter = {
        "name": "ray-job-submitter", "image": image, "imagePullPolicy": "IfNotPresent",
        "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
        "securityContext": _container_security(),
    }
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": TRAIN_JOB, "labels": _labels("train")},
        "spec": {
            "entrypoint": train_entrypoint(config_rel, overrides),
            "submissionMode": "K8sJobMode",
            "backoffLimit": 0,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 300,
            "submitterPodTemplate": {
                "metadata": {"labels": _labels("train-submitter")},
                "spec": {"restartPolicy": "Never", "securityContext": _pod_security(), "containers": [submitter]},
            },
            "rayClusterSpec": _cluster_spec("train", image, train_worker_groups(cfg), 2, env, shared=True,
                                            ports=[("gcs-server", 6379), ("dashboard", 8265), ("client", 10001)], worker_ports=[]),
        },
    }


def render_rayservice(serve_cfg, image: str) -> dict:
    serve_yaml = yaml.safe_dump(serve_cfg.to_serve_deploy_dict(), sort_keys=False, width=4096)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": REWARDS_SERVICE, "labels": _labels("rewards")},
        "spec": {
            "serveConfigV2": serve_yaml,
            "rayClusterConfig": _cluster_spec("rewards", image, serve_worker_groups(serve_cfg), 1,
                                              [{"name": "HF_HUB_OFFLINE", "value": "1"}], shared=False,
                                              ports=[("gcs-server", 6379), ("dashboard", 8265), ("client", 10001), ("serve", serve_cfg.http.port)],
                                              worker_ports=[("serve", serve_cfg.http.port)]),
        },
    }


def render_configmap(cfg) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": MLFLOW_CONFIGMAP, "labels": _labels("train")},
            "data": {"MLFLOW_TRACKING_URI": cluster_tracking_uri(cfg)}}


def render_pvc() -> dict:
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": SHARED_PVC, "labels": _labels("train")},
            "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "50Gi"}}}}


def load_serve_config(path: str | Path):
    from ralign.ops.serve_config import ServeConfig

    # Inside a pod the Serve proxy must listen on the pod IP; the Service in front of it is ClusterIP only.
    return load_config(ServeConfig, path, ["http.host=0.0.0.0"])


def render_manifests(config: str | Path, serve_config: str | Path, overrides: list[str] | None = None,
                     image: str = DEFAULT_IMAGE) -> dict[str, dict]:
    """The manifests of one training config (file name -> object), with the image given."""
    from ralign.training.config import TrainConfig

    cfg = load_config(TrainConfig, config, overrides or [])
    rel = repo_relative(config)
    extra = in_cluster_overrides(cfg)
    if extra:  # the overrides must still give a valid config
        cfg = load_config(TrainConfig, config, [*(overrides or []), *extra])
    return {
        "configmap-mlflow.yaml": render_configmap(cfg),
        "pvc-shared.yaml": render_pvc(),
        "rayjob-train.yaml": render_rayjob(rel, cfg, [*(overrides or []), *extra], image),
        "rayservice-rewards.yaml": render_rayservice(load_serve_config(serve_config), image),
    }


def _gpu_config(docs: dict[str, dict]) -> bool:
    groups = docs["rayjob-train.yaml"]["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    return any(g["maxReplicas"] > 0 and "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"] for g in groups)


def _split_image(image: str) -> tuple[str, str]:
    name, sep, tag = image.rpartition(":")
    if not sep or "/" in tag:
        raise ConfigError(f"--image {image!r}: expected NAME:TAG")
    return name, tag


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # every manifest spelled out in full, no &anchors
        return True


def _str_presenter(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str_presenter)


def dump_yaml(data: Any, note: str = "") -> str:
    return note + yaml.dump(data, Dumper=_Dumper, sort_keys=False, width=4096)


def _pointer(parts: Iterable[Any]) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def json_patch(a: Any, b: Any, path: tuple = ()) -> list[dict]:
    """RFC 6902 operations that turn `a` into `b` (lists of equal length are patched per item, others replaced).
    A `test` of the item's name / groupName guards every list index, so a patch never edits the wrong item."""
    if type(a) is not type(b):
        return [{"op": "replace", "path": _pointer(path), "value": b}]
    if isinstance(a, dict):
        ops = [{"op": "remove", "path": _pointer(path + (k,))} for k in a if k not in b]
        for k, v in b.items():
            ops += json_patch(a[k], v, path + (k,)) if k in a else [{"op": "add", "path": _pointer(path + (k,)), "value": v}]
        return ops
    if isinstance(a, list):
        if len(a) != len(b):
            return [{"op": "replace", "path": _pointer(path), "value": b}]
        ops = []
        for i, (x, y) in enumerate(zip(a, b)):
            sub = json_patch(x, y, path + (i,))
            key = next((k for k in ("groupName", "name") if isinstance(x, dict) and k in x and x.get(k) == y.get(k)), None)
            if sub and key:
                sub.insert(0, {"op": "test", "path": _pointer(path + (i, key)), "value": x[key]})
            ops += sub
        return ops
    return [] if a == b else [{"op": "replace", "path": _pointer(path), "value": b}]


def render_tree(config: str | Path = DEFAULT_CONFIG, serve_config: str | Path = DEFAULT_SERVE_CONFIG,
                overlays: dict[str, str | Path] | None = None, overrides: list[str] | None = None,
                image: str = DEFAULT_IMAGE) -> dict[str, str]:
    """Every file of the kustomize tree (relative path -> text): base/ from `config`, overlays/<name>/ from each
    overlay's config as the base plus JSON patches; GPU configs get the image tag + '-gpu'."""
    overlays = dict(DEFAULT_OVERLAYS if overlays is None else overlays)
    image_name, tag = _split_image(image)
    for name in overlays:
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name):
            raise ConfigError(f"--overlay {name!r}: an overlay name is lower-case letters, digits, '-' and '_'")
    sets = "".join(f" --set {s}" for s in overrides or [])
    base = render_manifests(config, serve_config, overrides, image)
    files: dict[str, str] = {}
    note = GENERATED_NOTE.format(sources=f"{repo_relative(config)} and {repo_relative(serve_config)}{sets}")
    for fname, doc in base.items():
        files[f"base/{fname}"] = dump_yaml(doc, note)
    files["base/kustomization.yaml"] = dump_yaml({"apiVersion": KUSTOMIZE_API, "kind": "Kustomization", "resources": list(base)}, note)
    for name, ov_config in overlays.items():
        docs = render_manifests(ov_config, serve_config, overrides, image)
        ov_note = GENERATED_NOTE.format(sources=f"{repo_relative(ov_config)} and {repo_relative(serve_config)}{sets}")
        kust: dict[str, Any] = {"apiVersion": KUSTOMIZE_API, "kind": "Kustomization", "resources": ["../../base"],
                                "images": [{"name": image_name, "newTag": tag + ("-gpu" if _gpu_config(docs) else "")}]}
        patches = []
        for fname, doc in docs.items():
            ops = json_patch(base[fname], doc)
            if ops:
                pname = f"patch-{fname}"
                files[f"overlays/{name}/{pname}"] = dump_yaml(ops, ov_note)
                api = doc["apiVersion"]
                target = {"group": api.split("/")[0], "version": api.split("/")[1]} if "/" in api else {"version": api}
                patches.append({"path": pname, "target": {**target, "kind": doc["kind"], "name": doc["metadata"]["name"]}})
        if patches:
            kust["patches"] = patches
        files[f"overlays/{name}/kustomization.yaml"] = dump_yaml(kust, ov_note)
    return files


def write_tree(files: dict[str, str], out: str | Path) -> list[Path]:
    """Write the rendered files. Stale .yaml files in the directories written (base/, overlays/<name>/) are removed:
    those directories are generated. Other overlay directories are left alone."""
    out = Path(out)
    dirs = {(out / rel).parent for rel in files}
    for d in dirs:
        if d.is_dir():
            for old in d.glob("*.yaml"):
                if old.relative_to(out).as_posix() not in files:
                    old.unlink()
    written = []
    for rel, text in sorted(files.items()):
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
