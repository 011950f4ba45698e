"""Small real checkpoints for the fault tests: a tiny random pipeline's policy, saved the way `ralign train` and
`ralign sft` save theirs (trainable.safetensors + learner_state.json with the policy spec)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ralign.diffusion.policy import build_policy

TINY_POLICY = {"unet_lora_rank": 2, "steps": 1}


def policy_spec(**policy) -> dict:
    return {"pipeline": "tiny-random", "seed": 0, "policy": {**TINY_POLICY, **policy}}


def write_checkpoint(directory: Path, spec: dict | None = None, state: dict[str, torch.Tensor] | None = None) -> Path:
    """A loadable checkpoint of `spec` (default: a tiny UNet-LoRA policy); `state` replaces its trainable tensors."""
    spec = spec or policy_spec()
    directory.mkdir(parents=True, exist_ok=True)
    if state is None:
        torch.manual_seed(1)
        state = build_policy(spec).trainable_state()
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "trainable.safetensors"))
    (directory / "learner_state.json").write_text(json.dumps({"iteration": 1, "version": 1, "policy_spec": spec}))
    return directory
