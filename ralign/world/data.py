"""Batches of (rendered image, prompt) pairs for pretraining the toy models."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from ralign.world.prompts import FAMILIES, PromptSample
from ralign.world.prompts import stream as prompt_stream
from ralign.world.scene import render


def images_to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 HxWx3 arrays -> float tensor (B, 3, H, W) in [-1, 1], the convention of diffusers' VAEs."""
    arr = np.stack(images).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def render_samples(samples: Sequence[PromptSample]) -> torch.Tensor:
    return images_to_tensor([render(s.scene) for s in samples])


def sample_stream(
    batch_size: int,
    seed: int = 0,
    split: str = "all",
    families: Sequence[str] = FAMILIES,
    family_weights: Sequence[float] | None = None,
    chunk: int = 4096,
) -> Iterator[list[PromptSample]]:
    """Endless batches of prompt samples, families mixed by `family_weights`, deterministic in `seed`."""
    weights = np.asarray(family_weights if family_weights is not None else [1.0] * len(families), dtype=np.float64)
    weights = weights / weights.sum()
    rng = np.random.default_rng(seed)
    pools: dict = {f: None for f in families}
    left = {f: 0 for f in families}
    round_no = 0
    while True:
        picks = rng.choice(len(families), size=batch_size, p=weights)
        batch = []
        for i in picks:
            fam = families[int(i)]
            if not left[fam]:
                # A fresh stream every `chunk` prompts of a family, each round with its own generator seed; prompts
                # are drawn as they are used, so a short run pays for what it takes, not for whole chunks.
                round_no += 1
                pools[fam], left[fam] = prompt_stream(fam, split, seed=seed * 100_003 + round_no), chunk
            batch.append(next(pools[fam]))
            left[fam] -= 1
        yield batch
