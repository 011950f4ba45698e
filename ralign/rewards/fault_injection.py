"""A real reward that fails on cue, for fault drills: operators run it to check that a cluster's run survives bad
rewards, and `tests/faults/` uses it to prove that the pipeline quarantines NaN/inf scores and stops on a reward
that keeps raising. It wraps any other reward (built from the same registry) and changes only what it is told to:

    reward: {name: fault_injection, options: {inner: {name: colorfulness}, nan_if_prompt_contains: "blue"}}

- `nan_if_prompt_contains`: samples whose prompt contains this text score NaN (every component too);
- `raise_if_prompt_contains`: a call with such a prompt raises, like a reward server that is down.
Everything else is the inner reward's own score."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ralign.rewards.base import Reward, RewardOutput


class InjectedRewardFailure(RuntimeError):
    pass


class FaultInjectionReward(Reward):
    name = "fault_injection"

    def __init__(self, inner: dict, nan_if_prompt_contains: str | None = None, raise_if_prompt_contains: str | None = None,
                 device: str = "cpu"):
        from ralign.rewards.registry import build_reward

        if not isinstance(inner, dict) or "name" not in inner:
            raise ValueError("fault_injection needs options.inner: {name: <reward>, ...}")
        self.inner = build_reward({**inner, "device": device})
        self.nan_marker, self.raise_marker = nan_if_prompt_contains, raise_if_prompt_contains
        # A wrapper: it can do what the reward it wraps can.
        self.differentiable = self.inner.differentiable
        self.uses_attention, self.uses_latents = self.inner.uses_attention, self.inner.uses_latents

    @classmethod
    def differentiable_for(cls, options: dict) -> bool:
        from ralign.rewards.registry import is_differentiable

        inner = dict(options.get("inner") or {})
        name = inner.pop("name", None)
        return bool(name) and is_differentiable(name, inner)

    @classmethod
    def chain_inputs_for(cls, options: dict) -> list[str]:
        from ralign.rewards.registry import needs_chain_inputs

        inner = dict(options.get("inner") or {})
        name = inner.pop("name", None)
        return needs_chain_inputs(name, inner) if name else []

    @classmethod
    def model_dirs_for(cls, options: dict) -> list:
        from ralign.rewards.registry import model_dirs

        inner = dict(options.get("inner") or {})
        name = inner.pop("name", None)
        return model_dirs(name, inner) if name else []

    @classmethod
    def attention_for(cls, options: dict) -> bool:
        from ralign.rewards.registry import needs_attention

        inner = dict(options.get("inner") or {})
        name = inner.pop("name", None)
        return bool(name) and needs_attention(name, inner)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **inputs) -> RewardOutput:
        if self.raise_marker is not None:
            hit = [p for p in prompts if self.raise_marker in p]
            if hit:
                raise InjectedRewardFailure(f"injected reward failure (prompt {hit[0]!r} contains {self.raise_marker!r})")
        out = self.inner(images, prompts, **inputs)
        if self.nan_marker is None:
            return out
        poisoned = torch.tensor([self.nan_marker in p for p in prompts], device=out.score.device)
        nan = torch.tensor(float("nan"), device=out.score.device)
        return RewardOutput(torch.where(poisoned, nan, out.score),
                            {k: torch.where(poisoned, nan, v) for k, v in out.components.items()})
