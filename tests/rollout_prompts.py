"""What the pipeline tests sample: a tiny random policy and a fixed cycle of prompts (seeds = sample ids)."""

from __future__ import annotations

SPEC = {"pipeline": "tiny-random", "policy": {"unet_lora_rank": 2, "steps": 2}}
PROMPTS = ["a red circle", "two blue squares", "a green triangle above a yellow circle"]


class PromptCycle:
    def __call__(self, first_id, n):
        ids = range(first_id, first_id + n)
        return [PROMPTS[i % len(PROMPTS)] for i in ids], list(ids)


def pipeline_config(**ray):
    """A training config holding the pipeline's bounds (`ray.*`), for pipelines built by hand; `max_bad_fraction`
    and `min_samples` set the bad-reward limit (train.max_bad_reward_fraction, after train.batch_size samples);
    `iterations` is train.iterations (the schedule samples nothing for training after the last update)."""
    from ralign.config import parse_config
    from ralign.training.config import TrainConfig

    train = {"max_bad_reward_fraction": ray.pop("max_bad_fraction", 1.0)}
    if "iterations" in ray:
        train["iterations"] = ray.pop("iterations")
    if "min_samples" in ray:
        train.update(batch_size=ray.pop("min_samples"), micro_batch=1)
    return parse_config(TrainConfig, {"reward": {"name": "colorfulness"}, "ray": ray, "train": train})
