"""CoMat's fidelity preservation: an adversarial loss that keeps the fine-tuned model's outputs looking like the
pretrained model's, so that chasing the caption and attention objectives does not wreck image quality.

The discriminator is the pretrained UNet itself (a separate copy, trained through LoRA) run on final latents at the
last timestep with the empty prompt, followed by a per-pixel Linear(4 -> 1) head: one real/fake logit per latent
pixel. "Real" latents are what the frozen original model generates for the same prompts and noise, "fake" the
fine-tuned model's. The generator's term is the reward here: score = mean over pixels of log σ(D(x)), i.e. minus
the BCE of calling its latents real; `adversarial_update` takes one discriminator step (BCE, real = 1, fake = 0).

The discriminator keeps its own AdamW (CoMat: lr 2e-5, β1 = 0, grad-clip 1) instead of joining the policy's
DeepSpeed engine: it is a second player with its own optimiser and schedule. Across learner workers its gradients
are averaged with one all-reduce per step, so every worker keeps the same discriminator. Its weights and optimiser
moments are saved as safetensors with the learner's checkpoints (`save_state` / `load_state`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ralign.training.distributed import active_dist
from ralign.models.pipeline import load_pipeline
from ralign.rewards.base import Reward, RewardOutput

STATE_FILE = "discriminator.safetensors"


class LatentDiscriminator(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module, empty_text: torch.Tensor, timestep: int, lora_rank: int):
        super().__init__()
        self.unet = copy.deepcopy(unet).requires_grad_(False)
        self.unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                         target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name="discriminator")
        self.head = torch.nn.Linear(self.unet.config.out_channels, 1)
        self.register_buffer("empty_text", empty_text.detach().clone(), persistent=False)
        self.timestep = timestep

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, h, w) logits."""
        text = self.empty_text.expand(len(latents), -1, -1)
        features = self.unet(latents, self.timestep, encoder_hidden_states=text).sample
        return self.head(features.permute(0, 2, 3, 1)).squeeze(-1)

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}


class FidelityDiscriminator(Reward):
    name = "fidelity"
    differentiable = True
    uses_latents = True
    trains = True

    def __init__(self, pipeline: str = "base", lora_rank: int = 8, lr: float = 2e-5, beta1: float = 0.0,
                 grad_clip: float = 1.0, timestep: int = 0, seed: int = 0, device: str = "cpu"):
        pipe = load_pipeline(pipeline)
        with torch.no_grad():
            ids = pipe.tokenizer([""], padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
            empty = pipe.text_encoder(ids).last_hidden_state
        torch.manual_seed(seed)  # same LoRA / head init on every learner worker
        self.model = LatentDiscriminator(pipe.unet, empty, timestep, lora_rank).to(device)
        self.model.eval()
        self.optimizer = torch.optim.AdamW(list(self.model.trainable().values()), lr=lr, betas=(beta1, 0.999), weight_decay=0.0)
        self.grad_clip = grad_clip
        self.updates = 0

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], latents: torch.Tensor | None = None, **_) -> RewardOutput:
        if latents is None:
            raise ValueError("fidelity scores latents; only a gradient algorithm's chain passes them")
        log_real = F.logsigmoid(self.model(latents)).flatten(1).mean(1)  # generator: look real
        return RewardOutput(log_real, {"adv_g_loss": -log_real.detach()})

    def adversarial_update(self, real_latents: torch.Tensor, fake_latents: torch.Tensor) -> dict[str, float]:
        """One discriminator step on detached latents; returns its loss and accuracy."""
        self.model.train()
        real_logits = self.model(real_latents.detach())
        fake_logits = self.model(fake_latents.detach())
        loss = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits)) + \
            F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = list(self.model.trainable().values())
        dist = active_dist()
        if dist is not None and dist.get_world_size() > 1:
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= dist.get_world_size()
        torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        self.optimizer.step()
        self.model.eval()
        self.updates += 1
        accuracy = 0.5 * ((real_logits > 0).float().mean() + (fake_logits < 0).float().mean())
        return {"discriminator_loss": loss.item(), "discriminator_accuracy": accuracy.item()}

    # ---- reward actors score with the learner's discriminator -------------------------------------------------
    def shared_weights(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.model.trainable().items()}

    def load_shared_weights(self, state: dict[str, torch.Tensor]) -> None:
        params = self.model.trainable()
        if set(state) != set(params):
            raise ValueError(f"discriminator weights do not match: {sorted(set(state) ^ set(params))[:4]}")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state[n])

    # ---- checkpoints --------------------------------------------------------------------------------------------
    def save_state(self, directory: str | Path) -> None:
        tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in self.model.trainable().items()}
        for i, p in enumerate(self.optimizer.param_groups[0]["params"]):
            for k, v in self.optimizer.state.get(p, {}).items():
                tensors[f"adam.{i}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
        save_file(tensors, str(Path(directory) / STATE_FILE), metadata={"updates": str(self.updates)})

    def load_state(self, directory: str | Path) -> None:
        from ralign.models.weights import CheckpointError, check_fits

        path = Path(directory) / STATE_FILE
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (the checkpoint holds no discriminator state)")
        try:
            with safe_open(str(path), "pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
                updates = (f.metadata() or {}).get("updates", "0")
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path}: cannot read weights: truncated or not a safetensors file ({str(exc).splitlines()[0]})") from None
        params = self.model.trainable()
        weights = {k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")}
        check_fits(weights, {n: p.shape for n, p in params.items()}, str(path), complete=True, what="the discriminator")
        if not updates.isdigit():
            raise CheckpointError(f"{path}: metadata 'updates' is {updates!r}, not a count")
        moments = []
        for i, p in enumerate(self.optimizer.param_groups[0]["params"]):
            state = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"adam.{i}.")}
            for moment in ("exp_avg", "exp_avg_sq"):
                if moment in state and state[moment].shape != p.shape:
                    raise CheckpointError(f"{path}: tensor 'adam.{i}.{moment}' has shape {tuple(state[moment].shape)}, "
                                          f"the discriminator expects {tuple(p.shape)}")
            moments.append((p, state))
        # Everything checked: only now does the loaded state replace the current one.
        self.updates = int(updates)
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(weights[n])
        for p, state in moments:
            if state:
                self.optimizer.state[p] = state
