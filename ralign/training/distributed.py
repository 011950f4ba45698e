"""The torch.distributed default group, when a launcher (Ray Train, the learner's own one-process group) made one."""

from __future__ import annotations


def active_dist():
    """`torch.distributed` if its default process group is initialised, else None (single process, no launcher)."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None
