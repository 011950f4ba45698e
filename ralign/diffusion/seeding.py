"""Every seeding rule of the project, in one place.

Reproducibility rests on a few rules: a sample's noise depends only on its own seed (never on the batch it falls
in or the device it runs on), a chain's step noise only on the seeds of its batch, and every random choice of a
run (prompt order, gradient steps, LoRA initialisation) on the run's seed and the position of what it decides.
A resumed run, a prefix handed from a sampler to a learner, and an evaluation repeated on another machine then see
exactly the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Large primes that keep derived seeds apart: seed * PRIME + index never collides for index < PRIME.
_SAMPLE_PRIME = 1_000_003
_STREAM_PRIME = 7_919
# Sampler actors and learners build the same policy separately; the same seed gives them the same fresh LoRA
# factors, so version 0 is one policy everywhere.
LORA_INIT_SEED = 0


def sample_seed(run_seed: int, index: int) -> int:
    """The noise seed of the `index`-th sample of a run (training sample id, or evaluation image number)."""
    return int(run_seed) * _SAMPLE_PRIME + int(index)


def request_generator(run_seed: int, request_no: int) -> torch.Generator:
    """The random choices made for one sampler request (which denoising steps carry gradient)."""
    return torch.Generator().manual_seed(int(run_seed) * _STREAM_PRIME + int(request_no))


def learner_generator(run_seed: int, rank: int) -> torch.Generator:
    """A learner worker's own random choices (timestep subsets, gradient steps drawn in-process)."""
    return torch.Generator().manual_seed(int(run_seed) + _STREAM_PRIME * int(rank))


def step_generator(seeds: Sequence[int]) -> torch.Generator:
    """Step noise from one generator seeded by the batch's seeds: reproducible chains for a given seed list, and a
    prefix run elsewhere (a sampler actor) continues exactly as the full chain would."""
    return torch.Generator().manual_seed(int(sum(int(s) * _SAMPLE_PRIME**i for i, s in enumerate(seeds)) % 2**63))


def initial_noise(shape: Sequence[int], seeds: Sequence[int], dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """x_T for each sample from its own seed (drawn on CPU), so a sample depends neither on its batch nor its device."""
    noise = torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s)), dtype=dtype) for s in seeds])
    return noise.to(device)


def seed_lora_init() -> None:
    """Seed torch's global generator before a policy adds its adapters (see LORA_INIT_SEED)."""
    torch.manual_seed(LORA_INIT_SEED)
