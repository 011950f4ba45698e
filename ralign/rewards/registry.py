"""Build rewards from config: `{"name": ..., **options}` -> a Reward object (in-process, or inside a Ray actor).

Builders are imported lazily, so a process that scores with the CLIP reward does not import the captioner's or the
segmenter's model code."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from ralign.rewards.base import Reward

_BUILDERS: dict[str, str | Callable[..., object]] = {
    "colorfulness": "ralign.rewards.colorfulness:ColorfulnessReward",
    "clip_score": "ralign.rewards.clip_score:ClipScoreReward",
    "preference": "ralign.rewards.clip_score:PreferenceReward",
    "decomposed_preference": "ralign.rewards.decomposed:DecomposedPreferenceReward",
    "caption": "ralign.rewards.caption:CaptionReward",
    "detector": "ralign.rewards.detector:DetectorReward",
    "soft_detector": "ralign.rewards.soft_detector:SoftDetectorReward",
    "grounded_attention": "ralign.rewards.grounded_attention:GroundedAttentionReward",
    "fidelity": "ralign.rewards.fidelity:FidelityDiscriminator",
    "weighted": "ralign.rewards.weighted:WeightedReward",
    "fault_injection": "ralign.rewards.fault_injection:FaultInjectionReward",
}


def register(name: str, builder: Callable[..., object]) -> None:
    _BUILDERS[name] = builder


def reward_names() -> list[str]:
    return sorted(_BUILDERS)


def reward_class(name: str) -> type[Reward]:
    if name not in _BUILDERS:
        raise ValueError(f"unknown reward {name!r}; expected one of {reward_names()}")
    builder = _BUILDERS[name]
    if isinstance(builder, str):
        module, attr = builder.split(":")
        builder = getattr(importlib.import_module(module), attr)
    return builder


def is_differentiable(name: str, options: dict | None = None) -> bool:
    return reward_class(name).differentiable_for(options or {})


def needs_chain_inputs(name: str, options: dict | None = None) -> list[str]:
    """Names of the (terms of the) reward that need attention maps or latents from a gradient algorithm's chain."""
    return reward_class(name).chain_inputs_for(options or {})


def needs_attention(name: str, options: dict | None = None) -> bool:
    """Whether the reward (or any term of a composite) scores the chain's cross-attention maps, which samplers must
    then record for the rollouts they ship to reward actors."""
    return reward_class(name).attention_for(options or {})


def model_dirs(name: str, options: dict | None = None) -> list:
    """The directories of weights the reward (and every term of a composite) reads with these options."""
    return reward_class(name).model_dirs_for(options or {})


def build_reward(spec: dict) -> Reward:
    """A reward from `{"name": ..., **options}` (e.g. `RewardSection.spec()`)."""
    spec = dict(spec)
    name = spec.pop("name", None)
    return reward_class(name)(**spec)
