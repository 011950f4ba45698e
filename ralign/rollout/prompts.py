"""The training prompt stream: prompts and noise seeds as a pure function of the sample id."""

from __future__ import annotations

import numpy as np

from ralign.diffusion.seeding import sample_seed
from ralign.world.prompts import generate_mixed


class PromptSource:
    """A fixed pool of `prompts.unique_prompts` prompts of the configured families and split, visited in a fresh
    seeded order each pass; `group_size` consecutive samples share a prompt (GRPO-style groups), each with its own
    noise seed, or with `shared_noise` the seed of its group's first sample (DanceGRPO's shared initial noise: the
    group starts from one x_T and differs only by the chain's step noise, which the policy's log-probabilities
    account for). A resumed run continues from its next id and sees exactly the prompts it would have seen."""

    def __init__(self, cfg, group_size: int = 1, shared_noise: bool = False):
        p = cfg.prompts
        self.pool = [s.prompt for s in generate_mixed(p.unique_prompts, split=p.split, seed=p.seed, families=tuple(p.families))]
        self.seed = p.seed
        self.noise_seed = cfg.train.seed
        self.group_size = group_size
        self.shared_noise = shared_noise
        self._orders: dict[int, np.ndarray] = {}

    def prompt(self, sample_id: int) -> str:
        epoch, pos = divmod(sample_id // self.group_size, len(self.pool))
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.pool))}
        return self.pool[int(self._orders[epoch][pos])]

    def seed_of(self, sample_id: int) -> int:
        if self.shared_noise:
            sample_id -= sample_id % self.group_size
        return sample_seed(self.noise_seed, sample_id)

    def __call__(self, first_id: int, n: int) -> tuple[list[str], list[int]]:
        ids = range(first_id, first_id + n)
        return [self.prompt(i) for i in ids], [self.seed_of(i) for i in ids]
