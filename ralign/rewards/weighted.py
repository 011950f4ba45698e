"""A weighted sum of rewards: CoMat's objective (caption + attribute concentration + adversarial fidelity) and
TextCraftor's multi-reward loss (CLIP score + preference + ...) are both `Σ_i w_i · r_i`.

Config: `{"name": "weighted", "terms": [{"name": "caption", "weight": 1.0, ...options}, ...]}`. Each term's own
components are reported as `TERM/COMPONENT`, its score as `TERM`. Terms that need the chain's internals
(`uses_attention`, `uses_latents`) are scored only where those are passed: the gradient algorithms' chain in the
learner, or a reward actor given what the sampler shipped with the rollout. Where they are missing the other terms
are scored and the number left out is reported as `skipped_terms`, so a partial total is never mistaken for a full one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ralign.rewards.base import Reward, RewardOutput


class WeightedReward(Reward):
    name = "weighted"

    def __init__(self, terms: Sequence[dict], device: str = "cpu"):
        from ralign.rewards.registry import build_reward

        if not terms:
            raise ValueError("reward 'weighted' needs at least one term")
        self.terms: list[tuple[float, Reward]] = []
        seen = set()
        for spec in terms:
            spec = dict(spec)
            if "weight" not in spec or "name" not in spec:
                raise ValueError(f"every weighted term needs a name and a weight, got {spec}")
            weight = float(spec.pop("weight"))
            if spec["name"] in seen:
                raise ValueError(f"reward term {spec['name']!r} appears twice")
            seen.add(spec["name"])
            self.terms.append((weight, build_reward({**spec, "device": device})))
        # What the sum can do is what its terms can: every term differentiable, any term using attention, ...
        self.differentiable = all(r.differentiable for _, r in self.terms)
        self.uses_attention = any(r.uses_attention for _, r in self.terms)
        self.uses_latents = any(r.uses_latents for _, r in self.terms)
        self.trains = any(r.trains for _, r in self.terms)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], *, attention=None, latents=None) -> RewardOutput:
        total = images.new_zeros(len(prompts))
        components: dict[str, torch.Tensor] = {}
        skipped = 0
        for weight, reward in self.terms:
            if (reward.uses_attention and attention is None) or (reward.uses_latents and latents is None):
                skipped += 1
                continue
            out = reward(images, prompts, attention=attention, latents=latents)
            total = total + weight * out.score
            components[reward.name] = out.score.detach()
            components.update({f"{reward.name}/{k}": v for k, v in out.components.items() if k != reward.name})
        if skipped:
            components["skipped_terms"] = torch.full((len(prompts),), float(skipped))
        return RewardOutput(total, components)

    def adversarial_update(self, real_latents: torch.Tensor, fake_latents: torch.Tensor) -> dict[str, float]:
        stats = {}
        for _, reward in self.terms:
            stats.update(reward.adversarial_update(real_latents, fake_latents))
        return stats

    def shared_weights(self) -> dict[str, torch.Tensor]:
        return {f"{i}.{k}": v for i, (_, r) in enumerate(self.terms) for k, v in r.shared_weights().items()}

    def load_shared_weights(self, state: dict[str, torch.Tensor]) -> None:
        for i, (_, reward) in enumerate(self.terms):
            if reward.trains:  # each term that trains checks that its part of `state` is exactly its weights
                prefix = f"{i}."
                reward.load_shared_weights({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})

    def save_state(self, directory) -> None:
        for _, reward in self.terms:
            reward.save_state(directory)

    def load_state(self, directory) -> None:
        for _, reward in self.terms:
            reward.load_state(directory)

    @classmethod
    def differentiable_for(cls, options: dict) -> bool:
        from ralign.rewards.registry import is_differentiable

        return all(is_differentiable(t.get("name"), t) for t in options.get("terms", []))

    @classmethod
    def chain_inputs_for(cls, options: dict) -> list[str]:
        from ralign.rewards.registry import needs_chain_inputs

        return [n for t in options.get("terms", []) for n in needs_chain_inputs(t.get("name"), t)]

    @classmethod
    def model_dirs_for(cls, options: dict) -> list:
        from ralign.rewards.registry import model_dirs

        return [d for t in options.get("terms", []) for d in model_dirs(t.get("name"), t)]

    @classmethod
    def attention_for(cls, options: dict) -> bool:
        from ralign.rewards.registry import needs_attention

        return any(needs_attention(t.get("name"), t) for t in options.get("terms", []))
