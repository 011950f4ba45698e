"""What every actor shares: its share of the cores, its device, and weights as zero-copy arrays for Ray calls."""

from __future__ import annotations

import os

import numpy as np
import torch


def set_threads(threads: int) -> None:
    # Each actor gets its share of the cores; without this every actor's torch would spawn one thread per core and
    # oversubscribe the machine.
    torch.set_num_threads(max(1, threads))
    os.environ["OMP_NUM_THREADS"] = str(max(1, threads))


def actor_device(wants_gpu: bool) -> str:
    """Where an actor's models live: its GPU when Ray gave it one, else the CPU."""
    return "cuda" if wants_gpu and torch.cuda.is_available() else "cpu"


def weights_for_transfer(state: dict[str, torch.Tensor] | None) -> dict | None:
    """Weights as numpy arrays for a Ray call: Ray ships arrays as zero-copy buffers, while torch tensors go through
    torch's own pickling (bench pipeline: a third of the coordinator's busy time). Dtypes numpy lacks (bfloat16) stay
    tensors."""
    if state is None:
        return None
    return {k: v.detach().cpu().numpy() if v.dtype in _NUMPY_DTYPES else v for k, v in state.items()}


def weights_from_transfer(state: dict) -> dict[str, torch.Tensor]:
    # Arrays read from the object store are read-only views; the copy is cheap next to the pickling it replaces.
    return {k: torch.from_numpy(np.array(v)) if isinstance(v, np.ndarray) else v for k, v in state.items()}


_NUMPY_DTYPES = {torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.uint8, torch.bool}


def one_line_error(exc: BaseException) -> str:
    """The innermost cause of a (Ray-wrapped) error as one line: its type and the last line of its message."""
    cause = getattr(exc, "cause", None) or exc.__cause__
    if isinstance(cause, BaseException) and cause is not exc:
        return one_line_error(cause)
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return f"{exc.__class__.__name__}: {lines[-1] if lines else ''}"
