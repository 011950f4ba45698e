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
from torch.utils.checkpoint import checkpoint

from ralign.config import UserError
from ralign.diffusion.flow_sampler import (check_flow_scheduler, flow_grid, flow_ode_step, flow_sde_step_with_logprob,
                                           guided_velocity, sample_flow_chain)
from ralign.diffusion.sampler import StepOutput, Trajectory
from ralign.diffusion.seeding import initial_noise, step_generator
from ralign.diffusion.trainable import copy_trainable_state, weights_fingerprint
from ralign.diffusion.settings import UNET_LORA_TARGETS, PolicyConfig, check_flow_settings

# The image stream's and the text stream's projections of every joint attention block (Flow-GRPO's targets).
FLOW_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


class FlowPolicy:
    family = "flow"  # what the algorithms' `model_families` name
    pipeline_class = StableDiffusion3Pipeline
    # SD3's LoRA loader reads peft's key names (as diffusers' own train_dreambooth_lora_sd3.py writes them); converted
    # to the attention-processor names, its to_q / to_k / to_v / to_out.0 factors would be silently dropped on load.
    lora_keys_in_diffusers_format = False

    def __init__(self, pipe: StableDiffusion3Pipeline, cfg: PolicyConfig):
        check_flow_settings(cfg)
        self.cfg = cfg
        self.pipe = pipe  # for diffusers' encode_prompt and the evaluation pipeline
        self.transformer, self.vae = pipe.transformer, pipe.vae
        self.text_encoders = [m for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3) if m is not None]
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        check_flow_scheduler(self.scheduler, cfg.eta, cfg.steps)
        self.version = 0
        self._grids: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # steps -> (timesteps, sigmas): see `_grid`
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
    def sample(self, prompts: Sequence[str], seeds: Sequence[int], *, decode: bool = True, steps: int | None = None,
               attention_steps: Sequence[int] = ()) -> Trajectory:
        if attention_steps:
            raise ValueError("cross-attention maps are recorded from a UNet's attention processors; an MMDiT's joint "
                             "attention has none to record (a reward that scores attention needs a UNet model)")
        latents, log_probs, means, stds, ts = self._run_chain(prompts, seeds, steps or self.cfg.steps)
        images = self.decode(latents[:, -1]) if decode else None
        return Trajectory(list(prompts), latents, log_probs, means, stds, ts, images)

    @torch.no_grad()
    def sample_prefix(self, prompts: Sequence[str], seeds: Sequence[int], stop_step: int, original_text: bool = False) -> torch.Tensor:
        """Latents after the first `stop_step` SDE steps of the chain, without gradient (what a sampler actor runs
        for a direct-backprop algorithm); the same noise as `sample` draws for these seeds. The text encoders are
        frozen, so `original_text` changes nothing."""
        latents, *_ = self._run_chain(prompts, seeds, self.cfg.steps, stop_step=max(0, stop_step))
        return latents[:, -1]

    def _run_chain(self, prompts: Sequence[str], seeds: Sequence[int], steps: int, stop_step: int | None = None):
        """Steps [0, stop_step) of the SDE chain from the seeds' initial noise (`sample_flow_chain`'s outputs)."""
        cond, uncond = self.encode(prompts)
        x_T = initial_noise(self.latent_shape(), seeds, dtype=cond[0].dtype, device=self.device)
        return sample_flow_chain(self.transformer, self.scheduler, cond, uncond, x_T, steps=steps, noise_level=self.cfg.eta,
                                 guidance=self.cfg.guidance, generator=step_generator(seeds), stop_step=stop_step)

    def _grid(self, steps: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The `steps`-step grid (timesteps, sigmas), computed once per length: the training updates ask for it at
        every step of every chain."""
        if steps not in self._grids:
            self._grids[steps] = flow_grid(self.scheduler, steps)
        timesteps, sigmas = self._grids[steps]
        return timesteps, sigmas.to(device)

    def chain_output(self, x: torch.Tensor, k: int, cond, uncond, *, checkpointed: bool = False) -> torch.Tensor:
        """The guided velocity at step k of the `steps`-step training chain (direct reward backpropagation, DRaFT-K);
        `checkpointed` recomputes the transformer's activations in backward."""
        timesteps, _ = self._grid(self.cfg.steps, x.device)
        if checkpointed:
            return checkpoint(guided_velocity, self.transformer, x, timesteps[k], cond, uncond, self.cfg.guidance, use_reentrant=False)
        return guided_velocity(self.transformer, x, timesteps[k], cond, uncond, self.cfg.guidance)

    def chain_transition(self, velocity: torch.Tensor, k: int, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x_{k+1} from x_k and the step's velocity, differentiable in both: the SDE step at noise level eta (its noise
        a constant of the graph), the ODE's Euler step at eta 0."""
        _, sigmas = self._grid(self.cfg.steps, x.device)
        if self.cfg.eta > 0:
            return flow_sde_step_with_logprob(velocity, sigmas, k, x, self.cfg.eta, generator=generator).prev_sample
        return flow_ode_step(velocity, sigmas, k, x)

    @torch.no_grad()
    def generate_images(self, prompts: Sequence[str], seed: int = 0, batch_size: int = 32) -> list:
        """uint8 images through diffusers' StableDiffusion3Pipeline with this policy's parts (adapters on): the ODE at
        `eval_steps`; image i depends only on (seed, i), as in `ralign eval`."""
        from ralign.models.pipeline import generate_images
        from ralign.models.toy_flow import pipeline_embeds

        pipe = StableDiffusion3Pipeline(
            transformer=self.transformer, scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config),
            vae=self.vae, text_encoder=self.pipe.text_encoder, tokenizer=self.pipe.tokenizer,
            text_encoder_2=self.pipe.text_encoder_2, tokenizer_2=self.pipe.tokenizer_2,
            text_encoder_3=self.pipe.text_encoder_3, tokenizer_3=self.pipe.tokenizer_3)
        pipe.set_progress_bar_config(disable=True)

        return generate_images(pipe, prompts, steps=self.cfg.eval_steps or self.cfg.steps, guidance=self.cfg.guidance,
                               seed=seed, batch_size=batch_size,
                               prompt_embeds_fn=lambda chunk: pipeline_embeds(pipe, chunk, guidance=self.cfg.guidance > 1, device=self.device))

    def step_log_prob(self, latents: torch.Tensor, timestep, cond, uncond, *, prev_sample: torch.Tensor,
                      steps: int | None = None) -> StepOutput:
        """The Gaussian of the SDE step taken from `latents` at `timestep` of a `steps`-step grid, and the
        log-probability of `prev_sample` under it."""
        timesteps, sigmas = self._grid(steps or self.cfg.steps, latents.device)
        matches = (timesteps == float(timestep)).nonzero().flatten().tolist()
        if not matches:
            raise ValueError(f"timestep {float(timestep)} is not on the {len(timesteps)}-step grid of this flow scheduler")
        k = matches[0]
        velocity = guided_velocity(self.transformer, latents, timesteps[k], cond, uncond, self.cfg.guidance)
        return flow_sde_step_with_logprob(velocity, sigmas, k, latents, self.cfg.eta, prev_sample=prev_sample)

    # ---- the forward (noising) process, for losses on clean latents (NFT, rejection sampling) -------------------
    def noised_for_training(self, x0: torch.Tensor, noise: torch.Tensor, generator: torch.Generator,
                            t_min: int = 0, draws: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_sigma, t, target) on the straight path x_sigma = (1 - sigma) x_0 + sigma noise, with sigma drawn
        uniformly from [t_min / T, 1) (DiffusionNFT's choice; T = the scheduler's num_train_timesteps, so `t_min` reads
        as the DDPM-style timestep of the UNet policy), t = T sigma as the transformer takes it, and the velocity
        noise - x_0 it predicts. `draws` (one index per sample) makes samples with the same index share sigma."""
        total = self.scheduler.config.num_train_timesteps
        draws = torch.arange(len(x0)) if draws is None else draws
        sigma = (t_min / total + (1 - t_min / total) * torch.rand(int(draws.max()) + 1, generator=generator))[draws].to(x0)
        s = sigma.view(-1, *([1] * (x0.dim() - 1)))
        return (1 - s) * x0 + s * noise, sigma * total, noise - x0

    def predict(self, noisy: torch.Tensor, t: torch.Tensor, cond: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The transformer's conditional velocity (no guidance) at the training times of `noised_for_training`."""
        return self.transformer(hidden_states=noisy, timestep=t, encoder_hidden_states=cond[0], pooled_projections=cond[1]).sample

    # ---- trainable weights --------------------------------------------------------------------------------------
    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        return {"transformer": self.transformer} if any(p.requires_grad for p in self.transformer.parameters()) else {}

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.transformer.parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {f"transformer.{n}": p.detach().to("cpu", copy=True) for n, p in self.transformer.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, torch.Tensor], version: int, source: str | None = None,
                             complete: bool = False) -> None:
        copy_trainable_state({f"transformer.{n}": p for n, p in self.transformer.named_parameters()}, state, source, complete)
        self.version = version

    def lora_modules(self) -> dict[str, torch.nn.Module]:
        """The modules that may carry peft adapters, by the name diffusers' `save_lora_weights` gives their layers."""
        return {"transformer": self.transformer}
