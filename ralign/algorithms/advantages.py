"""Per-prompt reward normalisation (DDPO / DPOK): advantages relative to other samples of the same prompt."""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Sequence

import numpy as np
import torch


class PerPromptNormalizer:
    """Keeps the last `buffer_size` rewards of each prompt; a prompt with fewer than `min_count` falls back to the
    statistics of the whole batch, so early iterations are not normalised by one or two samples."""

    def __init__(self, buffer_size: int = 32, min_count: int = 4, eps: float = 1e-6):
        self.buffer_size, self.min_count, self.eps = buffer_size, min_count, eps
        self.history: dict[str, deque] = defaultdict(lambda: deque(maxlen=buffer_size))

    def __call__(self, prompts: Sequence[str], rewards: torch.Tensor) -> torch.Tensor:
        values = rewards.detach().cpu().double().numpy()
        batch_mean, batch_std = values.mean(), values.std()
        for p, r in zip(prompts, values):
            self.history[p].append(float(r))
        adv = np.empty_like(values)
        for i, p in enumerate(prompts):
            hist = np.asarray(self.history[p])
            if len(hist) >= self.min_count:
                adv[i] = (values[i] - hist.mean()) / (hist.std() + self.eps)
            else:
                adv[i] = (values[i] - batch_mean) / (batch_std + self.eps)
        return torch.as_tensor(adv, dtype=rewards.dtype)
