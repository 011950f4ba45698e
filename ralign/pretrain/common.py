"""What every toy model's pretraining shares: progress lines, the learning-rate schedule, parameter counts and the
machine a model card names."""

from __future__ import annotations

import logging
import math
import platform
import time

import numpy as np
import torch

log = logging.getLogger(__name__)


def machine_description() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"



class Progress:
    """A log line every `every` steps with loss, speed and time left (tqdm bars are unreadable in CI logs)."""

    def __init__(self, name: str, total: int, every: int):
        self.name, self.total, self.every = name, total, every
        self.start = time.time()
        self.losses: list[float] = []

    def step(self, i: int, loss: float) -> None:
        self.losses.append(loss)
        if (i + 1) % self.every == 0 or i + 1 == self.total:
            elapsed = time.time() - self.start
            rate = (i + 1) / elapsed
            recent = float(np.mean(self.losses[-self.every :]))
            log.info(
                "%s step %d/%d loss %.4f  %.2f it/s  %.0fs left", self.name, i + 1, self.total, recent, rate,
                (self.total - i - 1) / rate,
            )

    @property
    def wall_s(self) -> float:
        return time.time() - self.start


def cosine_lr(optimizer: torch.optim.Optimizer, total: int, warmup: int = 100) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def descend(loss: torch.Tensor, parameters, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler, max_norm: float = 1.0) -> float:
    """One optimiser step of a pretraining loop: backward, gradient-norm clipping, step, schedule; the loss value for
    `Progress.step`."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
