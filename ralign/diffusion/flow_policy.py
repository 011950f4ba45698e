"""The flow-matching policy: a StableDiffusion3Pipeline's parts plus LoRA adapters (peft) on its MMDiT transformer,
sampled with Flow-GRPO's SDE (ralign/diffusion/flow_sampler.py), the pretrained policy available by switching the
adapters off. It answers the same questions as `DiffusionPolicy` (encode, sample, step_log_prob, reference, trainable
state), so the rollout algorithms (GRPO) train it unchanged.

`model.policy.eta` is the SDE's noise level a (Flow-GRPO: 0.7); 0 samples the ODE (evaluation, no log-probabilities).
Text conditioning is diffusers' own `encode_prompt` (both CLIP towers' penultimate states side by side, padded to the
joint width, and zeros in place of an absent T5), so a real SD3.5 checkpoint is conditioned exactly as its pipeline
does. The text encoders stay frozen here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from peft import LoraConfig

from ralign.config import UserError
from ralign.diffusion.flow_sampler import check_flow_scheduler, flow_grid, flow_sde_step_with_logprob, guided_velocity, sample_flow_chain
from ralign.diffusion.sampler import StepOutput, Trajectory
from ralign.diffusion.seeding import initial_noise, step_generator
from ralign.diffusion.settings import UNET_LORA_TARGETS, PolicyConfig

# The image stream's and the text stream's projections of every joint attention block (Flow-GRPO's targets).
FLOW_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


class FlowPolicy:
    def __init__(self, pipe: StableDiffusion3Pipeline, cfg: PolicyConfig):
        for key, value, allowed in (("text_encoder", cfg.text_encoder, "frozen"), ("text_encoding", cfg.text_encoding, "plain")):
            if value != allowed:
                raise UserError(f"model.policy.{key}={value} is not available for flow-matching models (only {allowed})")
        if cfg.text_encoder_weight != 1.0:
            raise UserError("model.policy.text_encoder_weight interpolates a tuned text encoder; flow models keep theirs frozen")
        self.cfg = cfg
        self.pipe = pipe  # for diffusers' encode_prompt and the evaluation pipeline
        self.transformer, self.vae = pipe.transformer, pipe.vae
        self.text_encoders = [m for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3) if m is not None]
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        check_flow_scheduler(self.scheduler, cfg.eta, cfg.steps)
        self.version = 0
        for module in (self.transformer, self.vae, *self.text_encoders):
            module.requires_grad_(False)
            module.eval()
        if cfg.unet_lora_rank > 0:
            targets = FLOW_LORA_TARGETS if tuple(cfg.lora_targets) == UNET_LORA_TARGETS else cfg.lora_targets
            self.transformer.add_adapter(LoraConfig(r=cfg.unet_lora_rank, lora_alpha=cfg.unet_lora_alpha or cfg.unet_lora_rank,
                                                    init_lora_weights="gaussian", target_modules=list(targets)))

    # ---- text ---------------------------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str], original: bool = False) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """((embeds, pooled), (negative embeds, negative pooled)) for classifier-free guidance."""
        from ralign.models.toy_flow import encode_prompts

        with torch.no_grad():
            embeds, negative, pooled, negative_pooled = encode_prompts(self.pipe, list(prompts), device=self.device)
        return (embeds, pooled), (negative, negative_pooled)

    def prompt_overflow(self, prompt: str) -> str | None:
        ids = self.pipe.tokenizer(prompt, truncation=False)["input_ids"]
        limit = self.pipe.tokenizer.model_max_length
        return None if len(ids) <= limit else self.pipe.tokenizer.decode(ids[limit - 1: -1])

    # ---- identity and placement ---------------------------------------------------------------------------------
    def base_fingerprint(self) -> str:
        """sha256 of the pretrained weights (adapters excluded), as DiffusionPolicy's."""
        from ralign.diffusion.policy import weights_fingerprint

        return weights_fingerprint((("transformer", self.transformer), ("vae", self.vae),
                                    *((f"text_encoder{i}", m) for i, m in enumerate(self.text_encoders))))

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    def to(self, device: torch.device | str) -> "FlowPolicy":
        for module in (self.transformer, self.vae, *self.text_encoders):
            module.to(device)
        return self

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Inside this block the policy is the pretrained model: adapters off."""
        toggled = getattr(self.transformer, "_hf_peft_config_loaded", False)
        if toggled:
            self.transformer.disable_adapters()
        try:
            yield
        finally:
            if toggled:
                self.transformer.enable_adapters()

    # ---- sampling -----------------------------------------------------------------------------------------------
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.transformer.config
        return (c.in_channels, c.sample_size, c.sample_size)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode to images in [0, 1] (B, 3, H, W), undoing SD3's latent scaling and shift."""
        config = self.vae.config
        images = self.vae.decode(latents / config.scaling_factor + (config.shift_factor or 0.0)).sample
        return (images / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], seeds: Sequence[int], *, decode: bool = True, steps: int | None = None) -> Trajectory:
        steps = steps or self.cfg.steps
        cond, uncond = self.encode(prompts)
        x_T = initial_noise(self.latent_shape(), seeds, dtype=cond[0].dtype, device=self.device)
        latents, log_probs, means, stds, ts = sample_flow_chain(
            self.transformer, self.scheduler, cond, uncond, x_T, steps=steps, noise_level=self.cfg.eta,
            guidance=self.cfg.guidance, generator=step_generator(seeds))
        images = self.decode(latents[:, -1]) if decode else None
        return Trajectory(list(prompts), latents, log_probs, means, stds, ts, images)

    def step_log_prob(self, latents: torch.Tensor, timestep, cond, uncond, *, prev_sample: torch.Tensor,
                      steps: int | None = None) -> StepOutput:
        """The Gaussian of the SDE step taken from `latents` at `timestep` of a `steps`-step grid, and the
        log-probability of `prev_sample` under it."""
        timesteps, sigmas = flow_grid(self.scheduler, steps or self.cfg.steps)
        matches = (timesteps == float(timestep)).nonzero().flatten().tolist()
        if not matches:
            raise ValueError(f"timestep {float(timestep)} is not on the {len(timesteps)}-step grid of this flow scheduler")
        k = matches[0]
        velocity = guided_velocity(self.transformer, latents, timesteps[k], cond, uncond, self.cfg.guidance)
        return flow_sde_step_with_logprob(velocity, sigmas.to(latents.device), k, latents, self.cfg.eta, prev_sample=prev_sample)

    # ---- trainable weights --------------------------------------------------------------------------------------
    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        return {"transformer": self.transformer} if any(p.requires_grad for p in self.transformer.parameters()) else {}

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.transformer.parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {f"transformer.{n}": p.detach().to("cpu", copy=True) for n, p in self.transformer.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, torch.Tensor], version: int, source: str | None = None,
                             complete: bool = False) -> None:
        from ralign.models.weights import check_fits

        params = {f"transformer.{n}": p for n, p in self.transformer.named_parameters()}
        expected = {k: p.shape for k, p in params.items() if k in state or (complete and p.requires_grad)}
        check_fits(state, expected, source or "weights", complete=complete, finite=source is not None, what="this policy")
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)
        self.version = version
