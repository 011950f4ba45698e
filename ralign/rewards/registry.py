"""Build rewards from config: `{"name": ..., **options}` -> a Reward object (in-process, or inside a Ray actor)."""

from __future__ import annotations

from collections.abc import Callable

from ralign.rewards.clip_score import ClipScoreReward, PreferenceReward
from ralign.rewards.colorfulness import ColorfulnessReward
from ralign.rewards.decomposed import DecomposedPreferenceReward

_BUILDERS: dict[str, Callable[..., object]] = {
    "colorfulness": ColorfulnessReward,
    "clip_score": ClipScoreReward,
    "preference": PreferenceReward,
    "decomposed_preference": DecomposedPreferenceReward,
}


def register(name: str, builder: Callable[..., object]) -> None:
    _BUILDERS[name] = builder


def reward_names() -> list[str]:
    return sorted(_BUILDERS)


def is_differentiable(name: str) -> bool:
    return bool(getattr(_BUILDERS[name], "differentiable", False))


def build_reward(spec: dict):
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in _BUILDERS:
        raise ValueError(f"unknown reward {name!r}; expected one of {reward_names()}")
    return _BUILDERS[name](**spec)
