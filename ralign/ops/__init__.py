"""Operations helpers: KubeRay manifests, the MLflow registry and tracking, run reports, Serve config, input checks, credential redaction."""
