"""The diffusion policy that every algorithm trains: a pipeline's parts plus LoRA adapters (peft) on the UNet and/or
a trainable text encoder, with the pretrained policy available by switching the adapters off (no second copy).

Weights that move between processes are only the trainable ones (`trainable_state`), tagged with a version, so a
sampler can be brought up to date by sending a few MB of adapter tensors instead of the whole model.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline
from peft import LoraConfig
from torch.utils.checkpoint import checkpoint

from ralign.config import MissingPathError, UserError
from ralign.diffusion.sampler import StepOutput, Trajectory, check_scheduler, ddim_step_with_logprob, decode_latents, guided_noise, sample_chain
from ralign.diffusion.seeding import initial_noise, step_generator
from ralign.diffusion.settings import PolicyConfig
from ralign.diffusion.text_encoding import PlainEncoder, SegmentEncoder, interpolate_embeddings
from ralign.diffusion.trainable import copy_trainable_state, weights_fingerprint

class DiffusionPolicy:
    family = "unet"  # what the algorithms' `model_families` name
    pipeline_class = StableDiffusionPipeline  # the diffusers pipeline its parts, and its exported LoRA, belong to
    # Its exported LoRA keys in diffusers' attention-processor names (`to_q.lora.down`), which StableDiffusionPipeline's
    # loader reads; peft's names otherwise.
    lora_keys_in_diffusers_format = True

    def __init__(self, pipe: StableDiffusionPipeline, cfg: PolicyConfig):
        self.cfg = cfg
        self.unet = pipe.unet
        self.vae = pipe.vae
        self.tokenizer = pipe.tokenizer
        self.text_encoder = pipe.text_encoder
        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        check_scheduler(self.scheduler, cfg.eta, cfg.steps)
        self.training_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the forward process
        self.version = 0
        self.mixed_text_encoders: list[tuple[float, torch.nn.Module]] = []  # other tuned encoders to blend in
        for module in (self.unet, self.vae, self.text_encoder):
            module.requires_grad_(False)
            module.eval()
        if cfg.unet_lora_rank > 0:
            self.unet.add_adapter(
                LoraConfig(
                    r=cfg.unet_lora_rank,
                    lora_alpha=cfg.unet_lora_alpha or cfg.unet_lora_rank,
                    init_lora_weights="gaussian",
                    target_modules=list(cfg.lora_targets),
                )
            )
        if cfg.text_encoder == "full":
            # The original encoder stays available for TextCraftor's no-gradient prefix and for interpolation.
            self.original_text_encoder = copy.deepcopy(self.text_encoder).requires_grad_(False)
            self.text_encoder.requires_grad_(True)
        elif cfg.text_encoder == "lora":
            self.text_encoder.add_adapter(
                LoraConfig(r=cfg.text_lora_rank, lora_alpha=cfg.text_lora_rank, init_lora_weights="gaussian",
                           target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
            )
            self.original_text_encoder = None
        elif cfg.text_encoder == "frozen":
            self.original_text_encoder = None
        else:
            raise ValueError(f"text_encoder must be frozen, full or lora, got {cfg.text_encoder!r}")

    # ---- text ---------------------------------------------------------------------------------------------------
    def _encoder_for(self, text_encoder: torch.nn.Module):
        if self.cfg.text_encoding == "segment":
            return SegmentEncoder(text_encoder, self.tokenizer, self.cfg.segment_budget, keep_eos=self.cfg.segment_keep_eos,
                                  plain_short=self.cfg.segment_plain_short)
        if self.cfg.text_encoding == "plain":
            return PlainEncoder(text_encoder, self.tokenizer)
        raise ValueError(f"text_encoding must be plain or segment, got {self.cfg.text_encoding!r}")

    def _encode_with(self, module: torch.nn.Module, prompts: Sequence[str], original: bool) -> tuple[torch.Tensor, torch.Tensor]:
        encoder = self._encoder_for(module)
        ctx = self.reference() if original and self.cfg.text_encoder == "lora" else contextlib.nullcontext()
        with ctx:
            return encoder(list(prompts)), encoder([""] * len(prompts))

    def prompt_overflow(self, prompt: str) -> str | None:
        """What of `prompt` this policy's text encoding would cut off, as a phrase; None if it reads all of it."""
        return self._encoder_for(self.text_encoder).overflow(prompt)

    def encode(self, prompts: Sequence[str], original: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond) embeddings; `original=True` uses the pretrained text encoder (TextCraftor's prefix).
        With a tuned encoder, `cfg.text_encoder_weight` and `mixed_text_encoders` blend it with the original one
        (TextCraftor's interpolation); the blend applies to the empty prompt too, so guidance stays consistent."""
        original_module = self.original_text_encoder if self.original_text_encoder is not None else self.text_encoder
        if original or self.cfg.text_encoder == "frozen":
            return self._encode_with(original_module, prompts, original=True)
        tuned = self._encode_with(self.text_encoder, prompts, original=False)
        if self.cfg.text_encoder_weight == 1.0 and not self.mixed_text_encoders:
            return tuned
        with torch.no_grad():
            base = self._encode_with(original_module, prompts, original=True)
        blends = [(self.cfg.text_encoder_weight, tuned)]
        for weight, module in self.mixed_text_encoders:
            blends.append((weight, self._encode_with(module, prompts, original=False)))
        return tuple(interpolate_embeddings(base[i], [(w, e[i]) for w, e in blends]) for i in (0, 1))

    def mix_text_encoder(self, state: dict[str, torch.Tensor], weight: float, source: str = "the checkpoint to mix") -> None:
        """Blend in another tuned text encoder (its `text_encoder.*` tensors from a checkpoint) with `weight`;
        `source` names the file in errors."""
        from ralign.models.weights import CheckpointError, check_fits

        if self.cfg.text_encoder != "full":
            raise UserError("mixing tuned text encoders needs model.policy.text_encoder=full (whole-encoder checkpoints)")
        module = copy.deepcopy(self.original_text_encoder)
        prefix = "text_encoder."
        tensors = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not tensors:
            raise CheckpointError(f"{source} holds no text-encoder weights")
        # A whole-encoder checkpoint holds every parameter; a partial one would silently blend in the original's.
        check_fits(tensors, {n: p.shape for n, p in module.named_parameters()}, source, complete=True, what="this text encoder")
        module.load_state_dict(tensors, strict=False)
        self.mixed_text_encoders.append((weight, module.requires_grad_(False).eval()))

    # ---- identity -----------------------------------------------------------------------------------------------
    def base_fingerprint(self) -> str:
        """sha256 of the pretrained weights (adapters excluded). Samplers and learners load the base model
        separately; comparing fingerprints catches a model that changed on disk, or a different checkpoint, before
        a run mixes two policies (the importance ratios would be silently wrong)."""
        return weights_fingerprint((("unet", self.unet), ("vae", self.vae), ("text_encoder", self.original_text_encoder or self.text_encoder)))

    # ---- placement ----------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.unet.device

    def to(self, device: torch.device | str) -> "DiffusionPolicy":
        for module in (self.unet, self.vae, self.text_encoder, self.original_text_encoder):
            if module is not None:
                module.to(device)
        return self

    # ---- pretrained policy --------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Inside this block the policy is the pretrained model: adapters are off (no second copy in memory)."""
        toggled = []
        for module in (self.unet, self.text_encoder):
            if getattr(module, "_hf_peft_config_loaded", False):
                module.disable_adapters()
                toggled.append(module)
        try:
            yield
        finally:
            for module in toggled:
                module.enable_adapters()

    # ---- sampling -----------------------------------------------------------------------------------------------
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.unet.config
        return (c.in_channels, c.sample_size, c.sample_size)

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], seeds: Sequence[int], *, decode: bool = True, steps: int | None = None,
               attention_steps: Sequence[int] = ()) -> Trajectory:
        """`attention_steps`: chain steps whose cross-attention maps are recorded into `Trajectory.attention`
        (for rewards that score attention, e.g. CoMat's, in a reward actor)."""
        steps = steps or self.cfg.steps
        cond, uncond = self.encode(prompts)
        x_T = initial_noise(self.latent_shape(), seeds, dtype=cond.dtype, device=cond.device)
        maps: list = []
        around = None
        if attention_steps:
            from ralign.diffusion.attention_capture import AttentionStore

            if self.cfg.text_encoding != "plain":
                raise ValueError("attention maps are recorded for the plain text encoding only (token positions of segments differ)")
            around = AttentionStore(self.unet).step_recorder(attention_steps, len(prompts), maps)
        latents, log_probs, means, stds, ts = sample_chain(
            self.unet, self.scheduler, cond, uncond, x_T, steps=steps, eta=self.cfg.eta, guidance=self.cfg.guidance,
            generator=step_generator(seeds), unet_context=around,
        )
        images = decode_latents(self.vae, latents[:, -1]) if decode else None
        return Trajectory(list(prompts), latents, log_probs, means, stds, ts, images, maps if attention_steps else None)

    @torch.no_grad()
    def sample_prefix(self, prompts: Sequence[str], seeds: Sequence[int], stop_step: int, original_text: bool = False) -> torch.Tensor:
        """Latents after the first `stop_step` steps of the chain, without gradient (the part of a gradient
        algorithm's chain that a sampler actor can run). `original_text` uses the pretrained text encoder
        (TextCraftor's prefix)."""
        cond, uncond = self.encode(prompts, original=original_text)
        x_T = initial_noise(self.latent_shape(), seeds, dtype=cond.dtype, device=cond.device)
        if stop_step <= 0:
            return x_T
        latents, *_ = sample_chain(self.unet, self.scheduler, cond, uncond, x_T, steps=self.cfg.steps, eta=self.cfg.eta,
                                   guidance=self.cfg.guidance, generator=step_generator(seeds), stop_step=stop_step)
        return latents[:, -1]

    @torch.no_grad()
    def generate_images(self, prompts: Sequence[str], seed: int = 0, batch_size: int = 32) -> list:
        """uint8 images through diffusers' pipeline with this policy's parts and text encoding (segments,
        interpolation); image i depends only on (seed, i), as in `ralign eval`."""
        from diffusers import StableDiffusionPipeline

        from ralign.models.pipeline import generate_images

        pipe = StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=DDIMScheduler.from_config(self.scheduler.config), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return generate_images(pipe, prompts, steps=self.cfg.eval_steps or self.cfg.steps, guidance=self.cfg.guidance, seed=seed,
                               batch_size=batch_size,
                               prompt_embeds_fn=lambda chunk: dict(zip(("prompt_embeds", "negative_prompt_embeds"), self.encode(chunk))))

    def noise_pred(self, latents: torch.Tensor, timestep: int, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        return guided_noise(self.unet, latents, timestep, cond, uncond, self.cfg.guidance)

    # Direct reward backpropagation runs the training chain as output -> transition per step, so that a step whose
    # weights take no gradient (its output computed under no_grad) still passes gradient along the latent path.
    def chain_output(self, x: torch.Tensor, k: int, cond: torch.Tensor, uncond: torch.Tensor, *,
                     checkpointed: bool = False) -> torch.Tensor:
        """The guided noise prediction at step k of the `steps`-step training chain; `checkpointed` recomputes the
        UNet's activations in backward."""
        t = self._chain_timestep(k)
        if checkpointed:
            return checkpoint(guided_noise, self.unet, x, t, cond, uncond, self.cfg.guidance, use_reentrant=False)
        return guided_noise(self.unet, x, t, cond, uncond, self.cfg.guidance)

    def chain_transition(self, eps: torch.Tensor, k: int, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x_{k+1} from x_k and the step's noise prediction, differentiable in both: DDIM at the policy's eta (eta 0:
        diffusers' own deterministic step)."""
        t = self._chain_timestep(k)
        if self.cfg.eta > 0:
            return ddim_step_with_logprob(self.scheduler, eps, t, x, self.cfg.eta, generator=generator).prev_sample
        return self.scheduler.step(eps, t, x, eta=0.0).prev_sample

    def _chain_timestep(self, k: int) -> int:
        if self.scheduler.num_inference_steps != self.cfg.steps:
            self.scheduler.set_timesteps(self.cfg.steps)
        return int(self.scheduler.timesteps[k])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode to images in [0, 1] (B, 3, H, W); differentiable."""
        return decode_latents(self.vae, latents)

    def step_log_prob(self, latents: torch.Tensor, timestep: int, cond: torch.Tensor, uncond: torch.Tensor, *,
                      prev_sample: torch.Tensor, steps: int | None = None) -> StepOutput:
        """The Gaussian of one denoising step x_t -> x_{t-1} of a `steps`-step chain under this policy (its mean,
        sigma and the log-probability of `prev_sample`): what the policy-gradient algorithms differentiate."""
        steps = steps or self.cfg.steps
        if self.scheduler.num_inference_steps != steps:
            self.scheduler.set_timesteps(steps)
        eps = self.noise_pred(latents, timestep, cond, uncond)
        return ddim_step_with_logprob(self.scheduler, eps, timestep, latents, self.cfg.eta, prev_sample=prev_sample)

    # ---- the forward (noising) process, for losses on clean latents (NFT, rejection sampling, SFT) ---------------
    def noised_for_training(self, x0: torch.Tensor, noise: torch.Tensor, generator: torch.Generator,
                            t_min: int = 0, draws: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, t, target) at a DDPM timestep t drawn uniformly from [t_min, T): x_t = sqrt(abar_t) x_0 +
        sqrt(1 - abar_t) noise, and the target of the UNet's prediction, the noise itself. `draws` (one index per
        sample) makes samples with the same index share their timestep; default: one draw each."""
        draws = torch.arange(len(x0)) if draws is None else draws
        t = torch.randint(t_min, self.training_scheduler.config.num_train_timesteps, (int(draws.max()) + 1,), generator=generator)[draws]
        t = t.to(x0.device)
        return self.training_scheduler.add_noise(x0, noise, t), t, noise

    def predict(self, noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The network's conditional prediction (no guidance) at the training times of `noised_for_training`."""
        return self.unet(noisy, t, encoder_hidden_states=cond).sample

    # ---- trainable weights --------------------------------------------------------------------------------------
    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        """The modules with trainable weights, by the name their tensors carry in `trainable_state`."""
        return {name: m for name, m in (("unet", self.unet), ("text_encoder", self.text_encoder))
                if any(p.requires_grad for p in m.parameters())}

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for m in (self.unet, self.text_encoder) for p in m.parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Only the trainable tensors (LoRA factors, or the full text encoder), keyed by module prefix."""
        out = {}
        for prefix, module in (("unet", self.unet), ("text_encoder", self.text_encoder)):
            for name, p in module.named_parameters():
                if p.requires_grad:
                    out[f"{prefix}.{name}"] = p.detach().to("cpu", copy=True)  # travels between processes
        return out

    def load_trainable_state(self, state: dict[str, torch.Tensor], version: int, source: str | None = None,
                             complete: bool = False) -> None:
        """Copy trainable tensors into the policy. `source` names the file they came from (errors name it, and its
        values must be finite); `complete` demands every trainable tensor of this policy (a checkpoint of the same
        policy holds them all: one missing would leave that tensor at its fresh initialisation without a word)."""
        params = {f"unet.{n}": p for n, p in self.unet.named_parameters()}
        params.update({f"text_encoder.{n}": p for n, p in self.text_encoder.named_parameters()})
        copy_trainable_state(params, state, source, complete)
        self.version = version

    def lora_modules(self) -> dict[str, torch.nn.Module]:
        """The modules that may carry peft adapters, by the name diffusers' `save_lora_weights` gives their layers."""
        return {"unet": self.unet, "text_encoder": self.text_encoder}


def base_pipeline(spec: dict):
    """The pretrained pipeline a policy spec names: 'base' or 'flow' (the committed toy models), 'tiny-random' or
    'tiny-random-flow' (tests), a diffusers directory or a hub id; a StableDiffusion3Pipeline for a flow model."""
    from ralign.models import pipeline_family
    from ralign.models.pipeline import load_pipeline

    name = spec.get("pipeline", "base")
    if name == "tiny-random":
        from ralign.models.toy_t2i import tiny_random_pipeline

        return tiny_random_pipeline(int(spec.get("seed", 0)))
    if name == "tiny-random-flow":
        from ralign.models.toy_flow import tiny_random_flow_pipeline

        return tiny_random_flow_pipeline(int(spec.get("seed", 0)))
    family = pipeline_family(name)
    if family is None:  # a hub id not in the local cache: its index says which pipeline it is
        from diffusers import DiffusionPipeline

        from ralign.models import FLOW_PIPELINE_CLASSES

        family = "flow" if DiffusionPipeline.load_config(name).get("_class_name") in FLOW_PIPELINE_CLASSES else "unet"
    if family == "flow":
        from ralign.models.toy_flow import load_flow_pipeline

        return load_flow_pipeline(name)
    return load_pipeline(name)


def build_policy(spec: dict):
    """The policy of a plain-dict spec (`TrainConfig.policy_spec()`, or a checkpoint's learner state):
    {"pipeline": name-or-path, "seed": .., "policy": {...PolicyConfig fields}, "device": ..}: a `DiffusionPolicy` over
    an SD-style UNet, or a `FlowPolicy` over a flow-matching transformer, by the pipeline the spec names."""
    from diffusers import StableDiffusion3Pipeline

    pipe = base_pipeline(spec)
    cfg = PolicyConfig(**spec.get("policy", {}))
    if isinstance(pipe, StableDiffusion3Pipeline):
        from ralign.diffusion.flow_policy import FlowPolicy

        policy = FlowPolicy(pipe, cfg)
    else:
        policy = DiffusionPolicy(pipe, cfg)
    if spec.get("init_checkpoint"):
        from ralign.models.weights import read_safetensors

        weights = Path(spec["init_checkpoint"]).expanduser() / "trainable.safetensors"
        if not weights.is_file():
            raise MissingPathError(f"model.init_checkpoint: {weights} does not exist (run the stage that writes it, e.g. `ralign sft`)")
        # Not `complete`: a later stage may train more than the stage it starts from (those tensors start fresh).
        policy.load_trainable_state(read_safetensors(weights), version=0, source=str(weights))
    return policy.to(spec.get("device", "cpu"))


def pretrained_spec(spec: dict) -> dict:
    """The spec of the pretrained model a staged spec (one with `init_checkpoint`) was built on: the same base model
    and sampler (steps, evaluation steps, eta, guidance), nothing trained, and prompts read as the pipeline reads them
    (plain encoding), i.e. what a user of the base model gets."""
    kept = ("steps", "eval_steps", "eta", "guidance")
    policy = {k: v for k, v in spec.get("policy", {}).items() if k in kept}
    return {**spec, "policy": {**policy, "unet_lora_rank": 0, "text_encoder": "frozen", "text_encoding": "plain"},
            "init_checkpoint": None}


def read_checkpoint(directory: str | Path, source: str | None = None) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """A learner checkpoint's files, checked: its learner state, the policy spec in it and its trainable weights.
    `source` is how errors name the checkpoint (default: the directory)."""
    from ralign.models.weights import CheckpointError, read_json, read_safetensors

    directory = Path(directory)
    label = source or str(directory)
    state_file, weights_file = directory / "learner_state.json", directory / "trainable.safetensors"
    for f in (state_file, weights_file):
        if not f.is_file():
            raise MissingPathError(f"{label} is not a ralign checkpoint: {f.name} is missing")
    record = read_json(state_file, f"{label}/{state_file.name}")
    if "policy_spec" not in record:
        raise CheckpointError(f"{label}/{state_file.name} has no policy_spec (written by an older ralign); cannot tell which model it belongs to")
    spec = record["policy_spec"]
    if not isinstance(spec, dict) or not isinstance(spec.get("policy", {}), dict):
        raise CheckpointError(f"{label}/{state_file.name}: policy_spec must be a mapping with a 'policy' mapping")
    unknown = set(spec.get("policy", {})) - set(PolicyConfig.model_fields)
    if unknown:
        raise CheckpointError(f"{label}/{state_file.name}: policy_spec.policy has unknown setting(s) {sorted(unknown)}")
    return record, spec, read_safetensors(weights_file, f"{label}/{weights_file.name}")


def policy_from_checkpoint(directory: str | Path, device: str = "cpu", source: str | None = None, **policy_overrides):
    """The policy a learner checkpoint holds: its base model and policy settings (learner_state.json) plus its
    trainable weights (trainable.safetensors). `policy_overrides` change inference-only settings (e.g.
    text_encoder_weight, guidance, steps). `source` is how errors name the checkpoint (default: the directory; an
    MLflow URI when `directory` is its temporary download)."""
    label = source or str(directory)
    record, spec, weights = read_checkpoint(directory, source)  # before the model: a bad file fails fast
    # The checkpoint's trainable weights supersede the stage it started from: that stage need not be loaded, nor exist.
    spec = {**spec, "policy": {**spec.get("policy", {}), **policy_overrides}, "device": device, "init_checkpoint": None}
    policy = build_policy(spec)
    policy.load_trainable_state(weights, int(record.get("version", 0)), source=f"{label}/trainable.safetensors", complete=True)
    return policy
