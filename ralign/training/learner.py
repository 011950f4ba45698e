"""The learner: a DiffusionPolicy whose trainable weights are wrapped by a DeepSpeed engine, and one optimiser update
of the configured algorithm on a batch of rollouts.

No Ray here: a Ray Train worker (actors/learner.py) builds a `Learner`, feeds it batches from the rollout
coordinator and reports its checkpoints; a test can drive the same object in-process.

DeepSpeed does the optimisation: `engine.backward` + `engine.step` for every backward pass, with
`gradient_accumulation_steps` set to the number of backward passes one update makes, so the engine all-reduces the
gradients across learner workers, clips them and steps the optimiser exactly once per update. The algorithms'
losses are already sums over denoising steps and means over samples, so DeepSpeed's division by the accumulation
count is turned off (`scale_wrt_gas=False`) and each micro-batch's loss is divided by the number of micro-batches.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ralign.algorithms.advantages import PerPromptNormalizer
from ralign.algorithms.direct_backprop import DirectBackpropConfig, backprop_update, gradient_steps
from ralign.algorithms.dpok import DPOKConfig, dpok_update
from ralign.algorithms.refl import ReFLConfig, choose_late_step, prefix as refl_prefix, refl_update
from ralign.training.distributed import active_dist
from ralign.diffusion.policy import DiffusionPolicy
from ralign.diffusion.sampler import Trajectory, initial_noise
from ralign.training.config import GRADIENT_ALGORITHMS, TrainConfig

log = logging.getLogger(__name__)

ADAPTER_FILE = "trainable.safetensors"
STATE_FILE = "learner_state.json"


class BadRewardsError(RuntimeError):
    """Too many rewards were NaN/inf: the run stops rather than train on what is left."""


@dataclass
class LearnerBatch:
    """What one learner worker trains on in one iteration."""

    prompts: list[str]
    seeds: list[int]
    versions: list[int]  # policy version each sample was drawn with
    # DPOK: the sampled chains and their rewards (from the reward actors)
    latents: torch.Tensor | None = None  # (B, K+1, C, H, W)
    log_probs: torch.Tensor | None = None  # (B, K)
    timesteps: torch.Tensor | None = None  # (K,)
    scores: torch.Tensor | None = None  # (B,)
    # gradient algorithms: where each chain continues (a sampler actor ran the no-gradient prefix)
    start_latents: torch.Tensor | None = None  # (B, C, H, W)
    # one plan per consecutive chunk of samples: (start_step, gradient steps, chunk size); ReFL's gradient steps
    # are [k], direct backprop's the gradient-carrying steps
    plans: list[tuple[int, list[int], int]] = field(default_factory=list)
    ids: list[int] | None = None  # the pipeline's sample ids (quarantine records name them)


def dpok_config(cfg: TrainConfig) -> DPOKConfig:
    d = cfg.algorithm.dpok
    return DPOKConfig(alpha=d.alpha, beta=d.beta, clip_range=d.clip_range, adv_clip=d.adv_clip, timestep_fraction=d.timestep_fraction)


def refl_config(cfg: TrainConfig) -> ReFLConfig:
    r = cfg.algorithm.refl
    return ReFLConfig(lam=r.lam, scale=r.scale, late_step_min=r.late_step_min, late_step_max=r.late_step_max)


def backprop_config(cfg: TrainConfig) -> DirectBackpropConfig:
    b = cfg.algorithm.backprop
    mode = {"draft": "draft", "alignprop": "alignprop", "interval": "interval"}[cfg.algorithm.name]
    return DirectBackpropConfig(mode=mode, k=b.k, interval=b.interval, checkpointing=b.checkpointing,
                                loss_scale=b.loss_scale, original_text_prefix=b.original_text_prefix,
                                attention_steps=b.attention_steps)


def draw_gradient_steps(cfg: TrainConfig, generator: torch.Generator) -> list[int]:
    """The denoising steps that carry gradient in one chain: ReFL's random late step, or direct backprop's steps."""
    if cfg.algorithm.name == "refl":
        return [choose_late_step(cfg.model.policy.steps, refl_config(cfg), generator)]
    return gradient_steps(cfg.model.policy.steps, backprop_config(cfg), generator)


def micro_batches(cfg: TrainConfig) -> int:
    return cfg.train.batch_size // cfg.train.micro_batch


def backwards_per_update(cfg: TrainConfig) -> int:
    """Backward passes in one optimiser update (DeepSpeed's gradient_accumulation_steps)."""
    if cfg.algorithm.name == "dpok":
        trained_steps = max(1, round(cfg.algorithm.dpok.timestep_fraction * cfg.model.policy.steps))
        return micro_batches(cfg) * trained_steps
    return micro_batches(cfg)


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    gas = backwards_per_update(cfg)
    ds = {
        "train_micro_batch_size_per_gpu": 1,  # nominal: batches are ours, DeepSpeed only counts backward passes
        "gradient_accumulation_steps": gas,
        "train_batch_size": gas * world_size,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        # torch's AdamW: DeepSpeed's fused CPU Adam would be JIT-compiled (~30 min on 2 cores, STACK-NOTES).
        "optimizer": {"type": "AdamW", "params": {"lr": cfg.train.lr, "weight_decay": cfg.train.weight_decay, "torch_adam": True}},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    ds.update(cfg.deepspeed.extra)
    return ds


class PolicyModule(torch.nn.Module):
    """The trainable parts of a policy as one module, which is what `deepspeed.initialize` wraps. The VAE and the
    original text encoder stay outside: they are frozen and DeepSpeed need not shard or checkpoint them."""

    def __init__(self, policy: DiffusionPolicy):
        super().__init__()
        if any(p.requires_grad for p in policy.unet.parameters()):
            self.unet = policy.unet
        if any(p.requires_grad for p in policy.text_encoder.parameters()):
            # Only when it trains: ZeRO-3 would otherwise partition a frozen encoder whose forward reads its
            # children's weight shapes before their hooks gather them (transformers' CLIP embeddings do).
            self.text_encoder = policy.text_encoder

    def forward(self, *args, **kwargs):
        """A no-op: the algorithms call the policy's parts directly. The learner calls `engine()` once per micro-step
        only so that DeepSpeed sees each micro-step begin: ZeRO-3 counts micro-steps in `engine.forward`, and without
        that call it overwrites, instead of accumulating, the gradients of earlier backward passes."""
        if args or kwargs:
            raise RuntimeError("PolicyModule is a container for DeepSpeed; call the policy's methods instead")
        return None


def _ensure_process_group() -> None:
    """A one-process gloo group when no launcher (Ray Train) made one, so a Learner also runs in-process."""
    import deepspeed

    if active_dist() is None:
        # Settings a launcher gave are kept; ones an in-process group of a parent process wrote (a child inherits
        # its environment) are not: the parent still listens on that port (EADDRINUSE in the child).
        inherited = os.environ.get("RALIGN_PROCESS_GROUP_OWNER") not in (None, str(os.getpid()))
        if inherited or "MASTER_PORT" not in os.environ:
            import socket

            with socket.socket() as probe:  # a free port now; the group binds it a moment later
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                              RALIGN_PROCESS_GROUP_OWNER=str(os.getpid()))
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)


class Learner:
    def __init__(self, cfg: TrainConfig, policy: DiffusionPolicy, reward=None):
        from ralign.training.deepspeed_ops import configure_environment

        configure_environment()
        import deepspeed

        self.cfg, self.policy, self.reward = cfg, policy, reward
        if cfg.algorithm.name in GRADIENT_ALGORITHMS and reward is None:
            raise ValueError(f"{cfg.algorithm.name} needs its differentiable reward in the learner")
        _ensure_process_group()
        dist = active_dist()
        self.rank = dist.get_rank() if dist else 0
        self.world_size = dist.get_world_size() if dist else 1
        self.ds_config = deepspeed_config(cfg, self.world_size)
        self.module = PolicyModule(policy)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=self.module, model_parameters=self._param_groups(), config=self.ds_config)
        self.gas = self.ds_config["gradient_accumulation_steps"]
        self.normalizer = PerPromptNormalizer()
        self.iteration = 0  # completed iterations
        self.generator = torch.Generator().manual_seed(cfg.train.seed + 7919 * self.rank)
        self.bad_rewards = 0
        self.seen_rewards = 0
        self._stage0_grad_norm = 0.0
        self.quarantined: list[dict] = []  # samples left out of an update for a non-finite reward, not yet logged

    def _param_groups(self) -> list[dict]:
        """One optimiser group, or two when a trainable text encoder has its own rate (TextCraftor + UNet: a whole
        encoder fine-tuned at a LoRA's rate would be destroyed)."""
        unet = [p for p in self.policy.unet.parameters() if p.requires_grad]
        text = [p for p in self.policy.text_encoder.parameters() if p.requires_grad]
        lr_text = self.cfg.train.text_encoder_lr or self.cfg.train.lr
        groups = [{"params": unet, "lr": self.cfg.train.lr}] if unet else []
        if text:
            groups.append({"params": text, "lr": lr_text})
        return groups

    # ---- DeepSpeed plumbing -------------------------------------------------------------------------------------
    def _backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss / micro_batches(self.cfg), scale_wrt_gas=False)
        if self.cfg.deepspeed.zero_stage == 0 and self.engine.is_gradient_accumulation_boundary():
            # Without ZeRO the engine does not record the global norm; take it before the step clips and clears.
            grads = [p.grad.detach().norm() for p in self.module.parameters() if p.grad is not None]
            self._stage0_grad_norm = float(torch.stack(grads).norm()) if grads else 0.0
        self.engine.step()
        self._backwards += 1
        self.engine()  # the next micro-step begins (see PolicyModule.forward)

    def _pad_backwards(self, target: int) -> None:
        # Every rank must make the same number of backward passes per update (the engine counts them to find the
        # accumulation boundary and all-reduce), even when quarantined samples left a micro-batch with no loss.
        while self._backwards < target:
            zero = sum((p * 0).sum() for p in self.module.parameters() if p.requires_grad)
            self._backward(zero)

    def _global_mean(self, values: dict[str, float]) -> dict[str, float]:
        dist = active_dist()
        if dist is None or self.world_size == 1:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        return {k: float(v) / self.world_size for k, v in zip(keys, t.tolist())}

    def _gather(self, obj):
        dist = active_dist()
        if dist is None or self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    # ---- one iteration ------------------------------------------------------------------------------------------
    def update(self, batch: LearnerBatch) -> dict[str, float]:
        """One optimiser update (several for DPOK's inner epochs) on this worker's batch; stats averaged over ranks."""
        self.engine.train()
        self.engine()  # the first micro-step begins (see PolicyModule.forward)
        if self.cfg.algorithm.name == "dpok":
            stats = self._update_dpok(batch)
        else:
            stats = self._update_gradient(batch)
        self.iteration += 1
        self.policy.version += 1
        norm = self.engine.get_global_grad_norm() if self.cfg.deepspeed.zero_stage > 0 else self._stage0_grad_norm
        stats["grad_norm"] = float(norm or 0.0)
        stats["lr"] = float(self.optimizer.param_groups[0]["lr"])
        stats["staleness"] = float(np.mean([self.policy.version - 1 - v for v in batch.versions])) if batch.versions else 0.0
        return stats

    def take_quarantined(self) -> list[dict]:
        """Every worker's quarantined samples since the last call (a collective: call it on every rank)."""
        mine, self.quarantined = self.quarantined, []
        return [r for records in self._gather(mine) for r in records]

    def _check_bad_rewards(self, bad: int, total: int) -> None:
        self.bad_rewards += bad
        self.seen_rewards += total
        frac = self.bad_rewards / max(1, self.seen_rewards)
        if self.seen_rewards >= self.cfg.train.batch_size and frac > self.cfg.train.max_bad_reward_fraction:
            raise BadRewardsError(
                f"{self.bad_rewards} of {self.seen_rewards} rewards were NaN/inf ({frac:.0%} > "
                f"train.max_bad_reward_fraction={self.cfg.train.max_bad_reward_fraction}); stopping"
            )

    def _update_dpok(self, batch: LearnerBatch) -> dict[str, float]:
        cfg = dpok_config(self.cfg)
        scores = batch.scores.float()
        # Per-prompt normalisation over the global batch (all learner workers), as DDPO/DPOK do.
        gathered = self._gather((list(batch.prompts), scores.tolist()))
        all_prompts = [p for ps, _ in gathered for p in ps]
        all_scores = torch.tensor([s for _, ss in gathered for s in ss])
        all_adv = self.normalizer(all_prompts, all_scores)
        offset = sum(len(ps) for ps, _ in gathered[: self.rank])
        advantages = all_adv[offset : offset + len(batch.prompts)]
        mb = self.cfg.train.micro_batch
        totals: dict[str, float] = {}
        for _ in range(self.cfg.algorithm.dpok.inner_epochs):
            self._backwards = 0
            for start in range(0, len(batch.prompts), mb):
                sl = slice(start, start + mb)
                dev = self.policy.device
                traj = Trajectory(batch.prompts[sl], batch.latents[sl].to(dev), batch.log_probs[sl].to(dev), None, None, batch.timesteps)
                s = dpok_update(self.policy, traj, advantages[sl].to(dev), cfg, backward=self._backward, generator=self.generator)
                for k, v in s.items():
                    totals[k] = totals.get(k, 0.0) + v / (micro_batches(self.cfg) * self.cfg.algorithm.dpok.inner_epochs)
            self._pad_backwards(self.gas)
        totals.pop("trained_steps", None)
        totals["reward_mean"] = float(all_scores.mean())
        totals["reward_std"] = float(all_scores.std()) if len(all_scores) > 1 else 0.0
        return self._global_mean(totals) | {"reward_mean": totals["reward_mean"], "reward_std": totals["reward_std"]}

    def _update_gradient(self, batch: LearnerBatch) -> dict[str, float]:
        name = self.cfg.algorithm.name
        mb = self.cfg.train.micro_batch
        self._backwards = 0
        totals: dict[str, float] = {}
        bad = 0
        # Without a plan from the coordinator (in-process use) the learner draws the gradient steps itself.
        plans = batch.plans or [(0, draw_gradient_steps(self.cfg, self.generator), len(batch.prompts))]
        chunk_start = 0
        for start_step, grad_steps, size in plans:
            for start in range(chunk_start, chunk_start + size, mb):
                sl = slice(start, min(start + mb, chunk_start + size))
                prompts, seeds = batch.prompts[sl], batch.seeds[sl]
                if batch.start_latents is not None:
                    x_start = batch.start_latents[sl].to(self.policy.device)
                else:
                    x_start = initial_noise(self.policy.latent_shape(), seeds, device=self.policy.device)
                before = self._backwards
                found: list[dict] = []
                if name == "refl":
                    k = grad_steps[0]
                    if start_step < k:  # the learner runs the prefix itself (algorithm.prefix_on_samplers=false)
                        x_start = _continue_prefix(self.policy, prompts, seeds, start_step, k)
                    s = refl_update(self.policy, prompts, x_start, k, self.reward, refl_config(self.cfg), backward=self._backward,
                                    quarantine=found)
                else:
                    s = backprop_update(self.policy, prompts, seeds, self.reward, backprop_config(self.cfg), backward=self._backward,
                                        start_latents=x_start, start_step=start_step, grad_steps=grad_steps, generator=self.generator,
                                        quarantine=found)
                for record in found:
                    i = sl.start + record.pop("index")
                    record.update(id=batch.ids[i] if batch.ids else None, seed=batch.seeds[i], version=self.policy.version,
                                  iteration=self.iteration + 1)
                self.quarantined += found
                bad += int(s.pop("quarantined", 0))
                if self._backwards == before:
                    continue  # every sample of this micro-batch was quarantined: nothing to average in
                for key, v in s.items():
                    if math.isfinite(v):
                        totals[key] = totals.get(key, 0.0) + v / micro_batches(self.cfg)
            chunk_start += size
        self._pad_backwards(self.gas)
        self._check_bad_rewards(bad, len(batch.prompts))
        totals["quarantined"] = float(bad)
        if "reward" in totals:
            totals["reward_mean"] = totals.pop("reward")
        for key in ("step_k", "grad_steps"):
            totals.pop(key, None)
        return self._global_mean(totals)

    # ---- weights and checkpoints --------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        if self.cfg.deepspeed.zero_stage == 3:
            import deepspeed

            params = [p for p in self.module.parameters() if p.requires_grad]
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                return self.policy.trainable_state()
        return self.policy.trainable_state()

    def reward_shared_weights(self) -> dict[str, torch.Tensor] | None:
        """Weights of a reward that trains here (CoMat's discriminator), for the reward actors that score with it."""
        if hasattr(self.reward, "adversarial_update") and getattr(self.reward, "trains", True) and hasattr(self.reward, "shared_weights"):
            return self.reward.shared_weights() or None
        return None

    def save(self, directory: str | Path, extra: dict | None = None) -> None:
        """Engine state (optimiser, for resume) + trainable weights as safetensors + learner state as JSON."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.engine.save_checkpoint(str(directory), tag="engine", exclude_frozen_parameters=True)
        state = self.trainable_state()
        if self.rank == 0:
            save_file({k: v.contiguous() for k, v in state.items()}, str(directory / ADAPTER_FILE),
                      metadata={"version": str(self.policy.version), "iteration": str(self.iteration)})
            record = {
                "iteration": self.iteration, "version": self.policy.version,
                "normalizer": {p: list(h) for p, h in self.normalizer.history.items()},
                "bad_rewards": self.bad_rewards, "seen_rewards": self.seen_rewards,
                "generator": self.generator.get_state().tolist(),
                "policy_spec": self.cfg.policy_spec(),
            }
            record.update(extra or {})
            if hasattr(self.reward, "save_state"):  # a reward that trains alongside (CoMat's discriminator)
                self.reward.save_state(directory)
            (directory / STATE_FILE).write_text(json.dumps(record))
        from ralign.training.checkpoint import write_manifest

        # Last, so that a save cut short leaves no manifest and is refused on load (ralign/models/weights.py).
        write_manifest(directory, self.rank)

    def load(self, directory: str | Path) -> dict:
        """Restore a checkpoint written by `save`, after checking every file against its manifest; DeepSpeed's pickled
        engine state is read with weights_only=True (ralign/models/weights.py says why both)."""
        from ralign.models.weights import CheckpointError, read_json, read_safetensors
        from ralign.training.checkpoint import verify_manifest, weights_only_engine_loads

        directory = Path(directory)
        verify_manifest(directory)
        record = read_json(directory / STATE_FILE)
        missing = [k for k in ("iteration", "version", "normalizer", "bad_rewards", "seen_rewards", "generator") if k not in record]
        if missing:
            raise CheckpointError(f"{directory / STATE_FILE}: missing {', '.join(missing)}")
        with weights_only_engine_loads(self.engine):
            load_path, _ = self.engine.load_checkpoint(str(directory), tag="engine", load_module_strict=False)
        if load_path is None:
            raise CheckpointError(f"{directory / 'engine'}: DeepSpeed found no engine state to resume from")
        # The trainable weights come from the safetensors file (the engine's module file holds the same tensors).
        weights = directory / ADAPTER_FILE
        self.policy.load_trainable_state(read_safetensors(weights), record["version"], source=str(weights), complete=True)
        self.iteration = record["iteration"]
        self.normalizer.history.clear()
        for p, h in record["normalizer"].items():
            self.normalizer.history[p].extend(h)
        self.bad_rewards, self.seen_rewards = record["bad_rewards"], record["seen_rewards"]
        self.generator.set_state(torch.tensor(record["generator"], dtype=torch.uint8))
        if hasattr(self.reward, "load_state"):
            self.reward.load_state(directory)
        return record


@torch.no_grad()
def _continue_prefix(policy: DiffusionPolicy, prompts, seeds, start_step: int, stop_step: int) -> torch.Tensor:
    if start_step == 0:
        return refl_prefix(policy, prompts, seeds, stop_step)
    raise ValueError(f"a handed-over ReFL prefix must end at the gradient step {stop_step}, not at {start_step}")
