"""Batches of (rendered image, prompt) pairs for pretraining the toy models."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from ralign.world.prompts import FAMILIES, PromptSample, generate
from ralign.world.scene import render


def images_to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 HxWx3 arrays -> float tensor (B, 3, H, W) in [-1, 1], the convention of diffusers' VAEs."""
    arr = np.stack(images).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def tensor_to_images(x: torch.Tensor) -> list[np.ndarray]:
    """Inverse of `images_to_tensor` (values are clamped to [-1, 1] first)."""
    arr = ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return list(arr.permute(0, 2, 3, 1).cpu().numpy())


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
    pools = {f: [] for f in families}
    round_no = 0
    while True:
        picks = rng.choice(len(families), size=batch_size, p=weights)
        batch = []
        for i in picks:
            fam = families[int(i)]
            if not pools[fam]:
                # Fresh prompts per round: each round uses its own generator seed, so no prompt list is held in memory.
                round_no += 1
                pools[fam] = generate(fam, chunk, split, seed=seed * 100_003 + round_no)
                pools[fam].reverse()
            batch.append(pools[fam].pop())
        yield batch
