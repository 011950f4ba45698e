"""DeepSpeed's CPU communication op, built once per machine and cached.

`deepspeed.initialize` on CPU loads the shared-memory comm op (`ShareMemCommBuilder`), JIT-compiling it with g++
on first use (about 40 s on an idle 2-core machine, ~14 min under load). Built inside a test or a training job that
cost would land at a random moment, and a build killed by a timeout used to leave a lock that hung every later run.
So the project builds it in its set-up step (scripts/_env.sh calls `python -m ralign.training.deepspeed_ops`), in a child
process with a time limit, into a cache directory outside the checkout that survives clean checkouts, like pip's
cache. torch >= 2.14 guards the build directory with an OS advisory lock, which the kernel releases when a build
process dies, so an interrupted build is simply redone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def default_extensions_dir() -> str:
    """One build directory per Python environment: torch's headers are the build's inputs, so two virtualenvs
    sharing one directory (a checkout's and a fresh clone's) would each find the other's build stale and rebuild
    it (~45 s) at their next first use."""
    import hashlib

    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    env_key = hashlib.sha256(str(Path(sys.prefix).resolve()).encode()).hexdigest()[:12]
    return str(Path(cache) / "ralign" / "torch_extensions" / env_key)


def configure_environment() -> str:
    """Point torch's extension cache at the project's (unless the user chose one); without a GPU, select DeepSpeed's
    CPU accelerator (its auto-detection may otherwise pick CUDA from the CUDA build of torch)."""
    import torch

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", default_extensions_dir())
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return os.environ["TORCH_EXTENSIONS_DIR"]


def _load_comm_op() -> None:
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    ShareMemCommBuilder().load(verbose=False)


def ensure_comm_op(timeout_s: float = 1800.0) -> float:
    """Build (or just load, when cached) the comm op in a child process; returns seconds taken."""
    configure_environment()
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", "from ralign.training.deepspeed_ops import _load_comm_op; _load_comm_op()"],
                          capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"building DeepSpeed's CPU comm op failed:\n{proc.stderr[-2000:]}")
    return time.time() - start


if __name__ == "__main__":
    target = configure_environment()
    try:
        took = ensure_comm_op(float(os.environ.get("RALIGN_OP_BUILD_TIMEOUT", "1800")))
    except subprocess.TimeoutExpired:
        sys.exit("error: DeepSpeed comm op build timed out; it will be retried on next set-up or first use")
    print(f"[setup] DeepSpeed CPU comm op ready in {target} ({took:.0f}s)", file=sys.stderr)
