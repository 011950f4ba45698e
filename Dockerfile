# The image the KubeRay manifests in k8s/ run (head, workers, job submitter, reward servers).
#
#   docker build -t ghcr.io/ralign/ralign:0.1.0 .                                                   # CPU (toy overlay)
#   docker build --build-arg BASE_IMAGE=rayproject/ray:2.60.0-py311-gpu -t ghcr.io/ralign/ralign:0.1.0-gpu .   # GPU (sd15)
#
# Not built in CI: the development machine has no Docker engine. The Ray version must match k8s' rayVersion
# (ralign/ops/k8s/render.py RAY_VERSION). The rayproject/ray base brings what KubeRay's pods expect (bash, wget for the
# probes) and the non-root user `ray` (uid 1000, gid 100) that the manifests' securityContext names.
ARG BASE_IMAGE=rayproject/ray:2.60.0-py311
FROM ${BASE_IMAGE}
# Extra pip arguments, e.g. an index with CPU-only torch wheels for a smaller CPU image.
ARG PIP_EXTRA_ARGS=""

USER root
RUN mkdir -p /app && chown 1000:100 /app
USER 1000:100
WORKDIR /app

# Only what the package needs (no .venv, runs or MLflow stores from a working copy). The configs under jobs/configs
# are part of the image: the RayJob's entrypoint names them as /app/jobs/configs/<name>.yaml.
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 ralign ./ralign
COPY --chown=1000:100 actors ./actors
COPY --chown=1000:100 jobs ./jobs
RUN pip install --no-cache-dir ${PIP_EXTRA_ARGS} . \
    && python -c "import ralign, actors, jobs.train"

ENV PYTHONUNBUFFERED=1
