"""Build rewards from config: `{"name": ..., **options}` -> a Reward object (in-process, or inside a Ray actor).

Builders are imported lazily, so a process that scores with the CLIP reward does not import the captioner's or the
segmenter's model code."""

from __future__ import annotations

import importlib
from collections.abc import Callable

_BUILDERS: dict[str, str | Callable[..., object]] = {
    "colorfulness": "ralign.rewards.colorfulness:ColorfulnessReward",
    "clip_score": "ralign.rewards.clip_score:ClipScoreReward",
    "preference": "ralign.rewards.clip_score:PreferenceReward",
    "decomposed_preference": "ralign.rewards.decomposed:DecomposedPreferenceReward",
    "caption": "ralign.rewards.caption:CaptionReward",
    "grounded_attention": "ralign.rewards.grounded_attention:GroundedAttentionReward",
    "fidelity": "ralign.rewards.fidelity:FidelityDiscriminator",
    "weighted": "ralign.rewards.weighted:WeightedReward",
    "fault_injection": "ralign.rewards.fault_injection:FaultInjectionReward",
}


def register(name: str, builder: Callable[..., object]) -> None:
    _BUILDERS[name] = builder


def reward_names() -> list[str]:
    return sorted(_BUILDERS)


def reward_class(name: str):
    if name not in _BUILDERS:
        raise ValueError(f"unknown reward {name!r}; expected one of {reward_names()}")
    builder = _BUILDERS[name]
    if isinstance(builder, str):
        module, attr = builder.split(":")
        builder = getattr(importlib.import_module(module), attr)
    return builder


def is_differentiable(name: str, options: dict | None = None) -> bool:
    """A reward class answers from its `differentiable` attribute, or, when that depends on its options (a
    composite), from its `differentiable_for(options)` classmethod."""
    cls = reward_class(name)
    if hasattr(cls, "differentiable_for"):
        return cls.differentiable_for(options or {})
    return bool(getattr(cls, "differentiable", False))


def needs_chain_inputs(name: str, options: dict | None = None) -> list[str]:
    """Names of the (terms of the) reward that need attention maps or latents from a gradient algorithm's chain
    (a composite answers with its `chain_inputs_for(options)` classmethod)."""
    cls = reward_class(name)
    if hasattr(cls, "chain_inputs_for"):
        return cls.chain_inputs_for(options or {})
    return [name] if getattr(cls, "uses_attention", False) or getattr(cls, "uses_latents", False) else []


def needs_attention(name: str, options: dict | None = None) -> bool:
    """Whether the reward (or any term of a composite) scores the chain's cross-attention maps, which samplers must
    then record for the rollouts they ship to reward actors."""
    return any(getattr(reward_class(n), "uses_attention", False) for n in needs_chain_inputs(name, options))


def build_reward(spec: dict):
    spec = dict(spec)
    name = spec.pop("name", None)
    return reward_class(name)(**spec)
