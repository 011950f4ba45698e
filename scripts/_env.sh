# Sourced by scripts/ralign and scripts/test: creates .venv on first use and installs the project with the pinned
# stack (requirements/ci-lock.txt). Re-installs only when the lock or pyproject.toml changed (stamp = their hash).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RALIGN_VENV:-$ROOT/.venv}"
LOCK="$ROOT/requirements/ci-lock.txt"
STAMP="$VENV/.ralign-install-stamp"
want="$(cat "$LOCK" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing the pinned stack into $VENV (first run: a few minutes; pip's cache makes later runs fast)" >&2
  start=$(date +%s)
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade "pip>=24" wheel "setuptools>=69"
  # torch first: DeepSpeed's setup.py imports torch, so it is built without isolation against this torch.
  "$VENV/bin/python" -m pip install -q -c "$LOCK" torch torchvision
  "$VENV/bin/python" -m pip install -q --no-build-isolation -c "$LOCK" -e "$ROOT[dev]"
  # DeepSpeed's CPU comm op: compiled once into a cache outside the checkout (ralign/training/deepspeed_ops.py).
  # The venv's bin first, as at run time: the build records which ninja made it, and a build by the system's ninja
  # is redone (~50 s) by the first DeepSpeed engine that runs with the venv's.
  PATH="$VENV/bin:$PATH" DS_ACCELERATOR=cpu "$VENV/bin/python" -m ralign.training.deepspeed_ops
  echo "$want" > "$STAMP"
  echo "[setup] done in $(( $(date +%s) - start ))s" >&2
fi
export PATH="$VENV/bin:$PATH"
export HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true RAY_USAGE_STATS_ENABLED=0
# TORCH_EXTENSIONS_DIR: left to ralign/training/deepspeed_ops.py, which keys the build cache on this venv.
