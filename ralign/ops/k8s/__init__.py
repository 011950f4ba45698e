"""KubeRay manifests: `render` (RayJob / RayService / overlays from the configs), `kustomize` (the three kustomize
features the tree uses, without a binary) and `validate` (CRD and Kubernetes schemas, the project's own rules)."""

from ralign.ops.k8s.kustomize import build_kustomization, load_yaml_docs
from ralign.ops.k8s.render import (
    CRD_FILES, CRD_HOWTO, DEFAULT_CONFIG, DEFAULT_IMAGE, DEFAULT_OVERLAYS, DEFAULT_SERVE_CONFIG, IMAGE_WORKDIR,
    KUSTOMIZE_API, MLFLOW_CONFIGMAP, MLFLOW_SECRET, MLFLOW_SECRET_KEYS, RAY_VERSION, REPO_ROOT, RUN_AS_USER, TRAIN_JOB,
    CRDsMissing, ManifestError, render_manifests, render_tree, write_tree,
)
from ralign.ops.k8s.validate import crd_dir, validate_manifest, validate_tree

__all__ = [
    "CRD_FILES", "CRD_HOWTO", "DEFAULT_CONFIG", "DEFAULT_IMAGE", "DEFAULT_OVERLAYS", "DEFAULT_SERVE_CONFIG", "IMAGE_WORKDIR",
    "KUSTOMIZE_API", "MLFLOW_CONFIGMAP", "MLFLOW_SECRET", "MLFLOW_SECRET_KEYS", "RAY_VERSION", "REPO_ROOT", "RUN_AS_USER",
    "TRAIN_JOB", "CRDsMissing", "ManifestError", "build_kustomization", "crd_dir", "load_yaml_docs", "render_manifests",
    "render_tree", "validate_manifest", "validate_tree", "write_tree",
]
