"""The policy's settings: the single definition of `model.policy` in a training config, of the policy spec every
checkpoint carries, and of what `DiffusionPolicy` is built with. Kept apart from policy.py so that validating a
config does not import diffusers."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ralign.config import StrictModel

UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class PolicyConfig(StrictModel):
    unet_lora_rank: int = Field(8, ge=0)  # 0 = UNet frozen
    unet_lora_alpha: float | None = None  # None = rank (scale 1)
    text_encoder: Literal["frozen", "full", "lora"] = "frozen"
    text_lora_rank: int = Field(8, ge=1)
    text_encoding: Literal["plain", "segment"] = "plain"  # segment: LongAlign's sentence-level encoding
    segment_budget: int = Field(96, ge=8)
    # Keep each segment's end-of-text token. LongAlign drops them (the default); an encoder that writes the sentence's
    # summary into that token (the toy one, and CLIP's pooled output) then loses it for every prompt, short ones
    # included (benchmarks/results/seed_methods.md measures what that costs the toy base model).
    segment_keep_eos: bool = False
    # Read prompts that fit one encoder pass through the plain encoding (repeated to the budget, which leaves
    # cross-attention's output unchanged), so only long prompts are read by segments. Not in LongAlign, which encodes
    # every prompt by sentences; ralign/diffusion/text_encoding.py says why it is exact.
    segment_plain_short: bool = False
    # TextCraftor's interpolation at inference: e = w·e_tuned + (1 − w)·e_original (1 = the tuned encoder alone);
    # needs a tuned text encoder
    text_encoder_weight: float = 1.0
    steps: int = Field(20, ge=1, le=1000)  # denoising steps of the training chains
    # Steps of evaluation and generation (deterministic: DDIM eta 0 / the flow ODE); None = `steps`. Flow-GRPO trains on
    # 10 and evaluates on 40.
    eval_steps: int | None = Field(None, ge=1, le=1000)
    eta: float = Field(1.0, ge=0.0, le=1.0)  # DDIM: eta (1 = DDPM variance); flow models: the SDE noise level a (Flow-GRPO 0.7)
    guidance: float = Field(3.0, ge=1.0)  # 3 suits the toy base model best (its model card)
    lora_targets: tuple[str, ...] = UNET_LORA_TARGETS


def check_flow_settings(cfg: PolicyConfig) -> None:
    """What a flow-matching policy (ralign.diffusion.flow_policy) refuses: its text encoders stay frozen, and it reads
    prompts through diffusers' own SD3 encoding."""
    from ralign.config import UserError

    for key, value, allowed in (("text_encoder", cfg.text_encoder, "frozen"), ("text_encoding", cfg.text_encoding, "plain")):
        if value != allowed:
            raise UserError(f"model.policy.{key}={value} is not available for flow-matching models (only {allowed})")
    if cfg.text_encoder_weight != 1.0:
        raise UserError("model.policy.text_encoder_weight interpolates a tuned text encoder; flow models keep theirs frozen")
