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
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ralign.algorithms.registry import build_algorithm
from ralign.algorithms.base import UpdateContext
from ralign.diffusion.policy import DiffusionPolicy
from ralign.diffusion.seeding import learner_generator
from ralign.training.config import TrainConfig
from ralign.training.distributed import active_dist

log = logging.getLogger(__name__)

ADAPTER_FILE = "trainable.safetensors"
STATE_FILE = "learner_state.json"


class BadRewardsError(RuntimeError):
    """Too many rewards were NaN/inf: the run stops rather than train on what is left."""


def deepspeed_config(cfg: TrainConfig, world_size: int, gas: int) -> dict:
    """`gas`: the algorithm's backward passes per update."""
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
        # Only the modules that train: ZeRO-3 would otherwise partition a frozen text encoder whose forward reads its
        # children's weight shapes before their hooks gather them (transformers' CLIP embeddings do).
        for name, module in policy.trainable_modules().items():
            setattr(self, name, module)

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
        self.algorithm = build_algorithm(cfg)
        # The config checked the family when it could read it; a hub id's is known only once the model has loaded.
        self.algorithm.check_model(policy.family, cfg.model.pipeline)
        if self.algorithm.reward_in_learner and reward is None:
            raise ValueError(f"{cfg.algorithm.name} needs its differentiable reward in the learner")
        _ensure_process_group()
        dist = active_dist()
        self.rank = dist.get_rank() if dist else 0
        self.world_size = dist.get_world_size() if dist else 1
        self.gas = self.algorithm.backwards_per_update()
        self.ds_config = deepspeed_config(cfg, self.world_size, self.gas)
        self.module = PolicyModule(policy)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=self.module, model_parameters=self._param_groups(), config=self.ds_config)
        self.iteration = 0  # completed iterations
        self.generator = learner_generator(cfg.train.seed, self.rank)
        self.bad_rewards = 0
        self.seen_rewards = 0
        self._stage0_grad_norm = 0.0
        self.quarantined: list[dict] = []  # samples left out of an update for a non-finite reward, not yet logged

    def _param_groups(self) -> list[dict]:
        """One optimiser group, or two when a trainable text encoder has its own rate (TextCraftor + UNet: a whole
        encoder fine-tuned at a LoRA's rate would be destroyed)."""
        modules = self.policy.trainable_modules()
        denoiser = [p for name, m in modules.items() if name != "text_encoder" for p in m.parameters() if p.requires_grad]
        text = [p for p in modules["text_encoder"].parameters() if p.requires_grad] if "text_encoder" in modules else []
        lr_text = self.cfg.train.text_encoder_lr or self.cfg.train.lr
        groups = [{"params": denoiser, "lr": self.cfg.train.lr}] if denoiser else []
        if text:
            groups.append({"params": text, "lr": lr_text})
        return groups

    # ---- DeepSpeed plumbing -------------------------------------------------------------------------------------
    def _backward(self, loss: torch.Tensor) -> None:
        # The algorithms' losses are sums over denoising steps and means over a micro-batch's samples: each
        # micro-batch's share of the update is 1 / (micro-batches per update).
        self.engine.backward(loss / self.algorithm.micro_batches_per_update(), scale_wrt_gas=False)
        if self.cfg.deepspeed.zero_stage == 0 and self.engine.is_gradient_accumulation_boundary():
            # Without ZeRO the engine does not record the global norm; take it before the step clips and clears.
            grads = [p.grad.detach().norm() for p in self.module.parameters() if p.grad is not None]
            self._stage0_grad_norm = float(torch.stack(grads).norm()) if grads else 0.0
        self.engine.step()
        self._backwards += 1
        self.engine()  # the next micro-step begins (see PolicyModule.forward)

    def _end_update(self) -> None:
        # Every rank must make the same number of backward passes per update (the engine counts them to find the
        # accumulation boundary and all-reduce), even when quarantined samples left a micro-batch with no loss.
        if self._backwards > self.gas:
            raise RuntimeError(f"{self.cfg.algorithm.name} made {self._backwards} backward passes in one update; it declares {self.gas}")
        while self._backwards < self.gas:
            zero = sum((p * 0).sum() for p in self.module.parameters() if p.requires_grad)
            self._backward(zero)
        self._backwards = 0

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
    def update(self, batch) -> dict[str, float]:
        """One iteration of the configured algorithm on this worker's batch (`Chains` for algorithms that learn from
        scored rollouts, `Prefixes` for gradient algorithms); stats averaged over ranks."""
        self.engine.train()
        self.engine()  # the first micro-step begins (see PolicyModule.forward)
        self._backwards = 0
        ctx = UpdateContext(policy=self.policy, reward=self.reward, micro_batch=self.cfg.train.micro_batch,
                            generator=self.generator, backward=self._backward, end_update=self._end_update,
                            gather=self._gather, rank=self.rank, world_size=self.world_size)
        stats = self.algorithm.update(batch, ctx)
        if self._backwards:
            raise RuntimeError(f"{self.cfg.algorithm.name} left {self._backwards} backward passes without ending the update")
        for record in ctx.quarantined:
            record["iteration"] = self.iteration + 1
        self.quarantined += ctx.quarantined
        if "quarantined" in stats:
            self._check_bad_rewards(int(stats["quarantined"]), len(batch))
        stats = self._global_mean(stats)
        self.iteration += 1
        self.policy.version += 1
        norm = self.engine.get_global_grad_norm() if self.cfg.deepspeed.zero_stage > 0 else self._stage0_grad_norm
        stats["grad_norm"] = float(norm or 0.0)
        stats["lr"] = float(self.optimizer.param_groups[0]["lr"])
        stats["staleness"] = float(np.mean([self.policy.version - 1 - v for v in batch.versions])) if len(batch) else 0.0
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
        if self.reward is not None and self.reward.trains:
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
                "algorithm": self.algorithm.state_dict(),
                "bad_rewards": self.bad_rewards, "seen_rewards": self.seen_rewards,
                "generator": self.generator.get_state().tolist(),
                "policy_spec": self.cfg.policy_spec(),
                "trained_with": {"algorithm": self.cfg.algorithm.name, "reward": self.cfg.reward.name},
            }
            record.update(extra or {})
            if self.reward is not None:  # a reward that trains alongside (CoMat's discriminator) saves its state
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
        missing = [k for k in ("iteration", "version", "algorithm", "bad_rewards", "seen_rewards", "generator") if k not in record]
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
        self.algorithm.load_state_dict(record["algorithm"])
        self.bad_rewards, self.seen_rewards = record["bad_rewards"], record["seen_rewards"]
        self.generator.set_state(torch.tensor(record["generator"], dtype=torch.uint8))
        if self.reward is not None:
            self.reward.load_state(directory)
        return record
