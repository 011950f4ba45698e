"""The typed batches that travel from sampler actors through reward actors to the learner, unchanged in shape.

- `Chains`: complete denoising chains with their step log-probabilities and final images, scored by a reward actor
  (what DPOK-style algorithms learn from, and the gradient algorithms' metrics rollouts);
- `Prefixes`: the no-gradient start of each chain that a sampler ran for a gradient algorithm, with the plan the
  learner continues it by (where it stopped, which steps carry gradient).

Arrays are numpy in transit (zero-copy through Ray's object store) and may be torch tensors in-process. Every field
is per sample (samples on axis 0, or the axis its metadata names) unless its metadata says `shared` (one value for
the batch) or `summed` (a cost that adds up when batches are merged), so `select` and `concat` follow the fields
instead of copying them by hand.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

B = TypeVar("B", bound="SampleBatch")

_SHARED = {"shared": True}
_SUMMED = {"summed": True}


def _take(value, index: np.ndarray, axis: int):
    if value is None:
        return None
    if isinstance(value, dict):
        return {k: _take(v, index, axis) for k, v in value.items()}
    if isinstance(value, list):
        return [value[i] for i in index]
    if isinstance(value, np.ndarray):
        return np.take(value, index, axis=axis)
    import torch

    return torch.index_select(value, axis, torch.as_tensor(index, dtype=torch.long, device=value.device))


def _join(values: list, axis: int):
    first = values[0]
    if first is None:
        if any(v is not None for v in values):
            raise ValueError("cannot merge batches where only some carry a field")
        return None
    if isinstance(first, dict):
        if any(set(v) != set(first) for v in values):
            raise ValueError("cannot merge batches with different components")
        return {k: _join([v[k] for v in values], axis) for k in first}
    if isinstance(first, list):
        return [x for v in values for x in v]
    if isinstance(first, np.ndarray):
        return np.concatenate(values, axis=axis)
    import torch

    return torch.cat(values, dim=axis)


def _same(values: list):
    first = values[0]
    for v in values[1:]:
        equal = np.array_equal(np.asarray(v), np.asarray(first)) if hasattr(first, "shape") else v == first
        if not equal:
            raise ValueError(f"cannot merge batches that differ in a shared field ({first!r} vs {v!r})")
    return first


@dataclass
class SampleBatch:
    ids: list[int]  # the pipeline's sample ids (the ledger and quarantine records name them)
    prompts: list[str]
    seeds: list[int]  # noise seeds: x_T of sample i is drawn from seeds[i] alone
    versions: list[int]  # policy version each sample was drawn with

    def __len__(self) -> int:
        return len(self.ids)

    def select(self: B, index: Sequence[int] | np.ndarray) -> B:
        """The samples at `index`, in that order (a mask selects where it is True)."""
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.nonzero(index)[0]
        values = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            values[f.name] = value if f.metadata.get("shared") or f.metadata.get("summed") else _take(value, index, f.metadata.get("axis", 0))
        return type(self)(**values)

    @classmethod
    def concat(cls: type[B], parts: Sequence[B]) -> B:
        if not parts:
            raise ValueError("nothing to merge")
        values = {}
        for f in dataclasses.fields(cls):
            column = [getattr(p, f.name) for p in parts]
            if f.metadata.get("shared"):
                values[f.name] = _same(column)
            elif f.metadata.get("summed"):
                values[f.name] = sum(column)
            else:
                values[f.name] = _join(column, f.metadata.get("axis", 0))
        return cls(**values)


@dataclass
class Chains(SampleBatch):
    latents: object  # (B, K + 1, C, H, W), x_T first
    log_probs: object  # (B, K): log-density of each step taken, summed over latent dimensions
    timesteps: object = field(metadata=_SHARED)  # (K,) the chain's timestep grid
    images: object | None = None  # (B, H, W, 3) uint8
    scores: object | None = None  # (B,), once a reward actor scored them
    components: dict = field(default_factory=dict)  # name -> (B,)
    # What rewards that score more than images need (ralign/rewards/base.py): cross-attention maps packed per group
    # as (steps, layers, B, side, side, tokens), and each prompt's token character spans.
    attention: dict | None = field(default=None, metadata={"axis": 2})
    token_offsets: list | None = None
    metrics_only: bool = field(default=False, metadata=_SHARED)  # scored for metrics, never trained on
    sample_s: float = field(default=0.0, metadata=_SUMMED)
    score_s: float = field(default=0.0, metadata=_SUMMED)

    @property
    def final_latents(self):
        return self.latents[:, -1]

    def score_tensor(self):
        """The scores as a float32 torch tensor the learner may write to: an array that came through Ray's object
        store is read-only, so it is copied rather than wrapped."""
        import torch

        scores = self.scores.copy() if isinstance(self.scores, np.ndarray) else self.scores
        return torch.as_tensor(scores, dtype=torch.float32)


@dataclass
class Prefixes(SampleBatch):
    latents: object | None  # (B, C, H, W) at start_steps[i]; None: the learner draws x_T from the seeds itself
    start_steps: list[int]  # where each chain continues
    grad_steps: list[tuple[int, ...]]  # the steps that carry gradient; empty: the learner draws them
    sample_s: float = field(default=0.0, metadata=_SUMMED)

    @classmethod
    def from_prompts(cls, prompts: Sequence[str], seeds: Sequence[int], versions: Sequence[int] | None = None) -> "Prefixes":
        """Whole chains for the learner to run from x_T, with gradient steps it draws itself (in-process use)."""
        n = len(prompts)
        return cls(list(range(n)), list(prompts), list(seeds), list(versions or [0] * n), None, [0] * n, [()] * n)

    def plan_chunks(self) -> Iterator["Prefixes"]:
        """Runs of consecutive samples with the same plan (one per sampler request, in order)."""
        start = 0
        for i in range(1, len(self) + 1):
            if i == len(self) or (self.start_steps[i], self.grad_steps[i]) != (self.start_steps[start], self.grad_steps[start]):
                yield self.select(range(start, i))
                start = i
