"""The algorithm interface: everything the rest of the system asks an algorithm, so that nothing compares names.

An algorithm is one file holding one `Algorithm` subclass (its settings, its checks, what it asks of the samplers,
its update) and one line in ralign/algorithms/registry.py. Two families share most of the plumbing:

- `RolloutAlgorithm` learns from complete chains sampled by the sampler actors and scored by the reward actors
  (DPOK; GRPO and rejection sampling fit here too: `samples_per_prompt` asks for groups of samples of one prompt).
- `GradientAlgorithm` backpropagates a differentiable reward through the end of the chain inside the learner
  (ReFL, DRaFT, AlignProp, the interval scheme): the samplers run the no-gradient prefix of each chain and hand its
  latents over; every `ray.metric_rollout_every`-th request is instead a full rollout scored by the reward actors,
  for metrics only.

The learner gives an update its services through an `UpdateContext` (the DeepSpeed micro-step, the accumulation
boundary, collectives over learner workers, quarantine), so an algorithm is plain torch and runs in-process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ralign.config import StrictModel

if TYPE_CHECKING:
    from ralign.diffusion.policy import DiffusionPolicy
    from ralign.rewards.base import Reward
    from ralign.rollout.batch import Chains, Prefixes


class NoSettings(StrictModel):
    """An algorithm without settings of its own."""


@dataclass(frozen=True)
class RequestPlan:
    """What one sampler request asks for, decided by the algorithm from the request's number alone (so a resumed
    run asks for exactly what it would have)."""

    stop_step: int | None = None  # run only steps [0, stop_step) and hand the latents over; None: the whole chain
    grad_steps: tuple[int, ...] = ()  # the steps the learner will run with gradient (prefix requests)
    original_text: bool = False  # the prefix uses the pretrained text encoder (TextCraftor)
    metrics_only: bool = False  # a full rollout scored by the reward actors for metrics, never trained on
    attention_steps: tuple[int, ...] = ()  # record these steps' cross-attention for the reward actors (CoMat)

    @property
    def full_chain(self) -> bool:
        return self.stop_step is None


@dataclass
class UpdateContext:
    """The learner's services to one update."""

    policy: "DiffusionPolicy"
    reward: "Reward | None"  # the differentiable reward (gradient algorithms), None for rollout algorithms
    micro_batch: int  # samples per forward/backward
    generator: torch.Generator  # this worker's random choices
    backward: Callable[[torch.Tensor], None]  # one micro-step's loss (already a mean over its samples)
    end_update: Callable[[], None]  # pads this worker's micro-steps to the accumulation boundary: the optimiser steps
    gather: Callable[[Any], list]  # one object from every learner worker, in rank order
    rank: int = 0
    world_size: int = 1
    quarantined: list[dict] = field(default_factory=list)  # samples an update left out, for the run's artefacts


class Algorithm:
    """Built from a training config (ralign/training/config.py TrainConfig; the config asks the registry for the
    algorithm's settings model, so this module does not import it back)."""

    name: ClassVar[str]  # `algorithm.name`
    section: ClassVar[str]  # its settings live under `algorithm.<section>` (DRaFT, AlignProp, interval share one)
    Settings: ClassVar[type[StrictModel]] = NoSettings
    reward_in_learner: ClassVar[bool] = False  # the learner builds the reward (it backpropagates through it)
    # The policies it can train, by `family` ("unet": DiffusionPolicy; "flow": FlowPolicy). An update that reads
    # only `encode`, `step_log_prob` and `reference` works on both; one that calls the UNet itself does not.
    model_families: ClassVar[tuple[str, ...]] = ("unet",)

    def __init__(self, cfg):
        self.cfg = cfg
        self.settings = cfg.algorithm.settings_of(self.section)

    # ---- what it accepts (config validation; a ValueError with one line naming the keys) ------------------------
    @classmethod
    def check(cls, cfg) -> None:
        pass

    @classmethod
    def check_model(cls, family: str | None, pipeline: str) -> None:
        """Refuse a model family this algorithm cannot train (None: not known before the pipeline loads)."""
        if family is not None and family not in cls.model_families:
            kinds = {"unet": "SD-style UNet", "flow": "flow-matching transformer"}
            raise ValueError(f"algorithm.name={cls.name} trains {' or '.join(kinds[f] for f in cls.model_families)} models only; "
                             f"model.pipeline={pipeline} is a {kinds.get(family, family)} model (algorithms for it: "
                             f"{', '.join(_algorithms_for(family))})")

    # ---- what it asks of the samplers ---------------------------------------------------------------------------
    @property
    def samples_per_prompt(self) -> int:
        """Consecutive samples that share a prompt (a group); a group is never split across requests or learners."""
        return 1

    @property
    def shares_initial_noise(self) -> bool:
        """Whether the samples of a group start from one initial noise (their prompt source gives them one seed)."""
        return False

    def request_plan(self, request_no: int) -> RequestPlan:
        return RequestPlan()

    # ---- the update ---------------------------------------------------------------------------------------------
    def micro_batches_per_update(self) -> int:
        """Micro-batches whose losses one optimiser update averages (each backward is divided by this)."""
        return self.cfg.train.batch_size // self.cfg.train.micro_batch

    def backwards_per_update(self) -> int:
        """Backward passes in one optimiser update (DeepSpeed's gradient_accumulation_steps)."""
        return self.micro_batches_per_update()

    def update(self, batch, ctx: UpdateContext) -> dict[str, float]:
        """One iteration on this worker's batch: micro-steps through `ctx.backward`, `ctx.end_update()` after each
        optimiser update it makes; returns its statistics (the learner averages them over workers)."""
        raise NotImplementedError

    # ---- what it remembers between updates (saved with the learner's checkpoints as JSON) -----------------------
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _algorithms_for(family: str) -> list[str]:
    from ralign.algorithms.registry import algorithm_class, algorithm_names

    return [n for n in algorithm_names() if family in algorithm_class(n).model_families]


def check_skip_last_steps(section: str, skip_last_steps: int, cfg) -> None:
    """An algorithm that leaves the last `skip_last_steps` of the chain untrained must keep at least one to train."""
    if skip_last_steps >= cfg.model.policy.steps:
        raise ValueError(f"algorithm.{section}.skip_last_steps={skip_last_steps} leaves no step of model.policy.steps="
                         f"{cfg.model.policy.steps} to train")


class RolloutAlgorithm(Algorithm):
    """Learns from complete chains scored by the reward actors."""

    needs_log_probs: ClassVar[bool] = True  # its update reads the chain's step log-probabilities (eta > 0)
    # The setting of its section that says how many samples of one prompt a batch holds (None: one each).
    group_size_setting: ClassVar[str | None] = None

    @classmethod
    def check(cls, cfg) -> None:
        from ralign.rewards.registry import needs_chain_inputs

        chain_terms = needs_chain_inputs(cfg.reward.name, cfg.reward.options)
        if chain_terms:
            # Their attention is captured, and CoMat's discriminator trained, in the gradient algorithms' chains only.
            raise ValueError(f"reward term(s) {chain_terms} score the chain's cross-attention or latents and train with a "
                             f"gradient algorithm; algorithm.name={cls.name} cannot use them")
        if cls.needs_log_probs and cfg.model.policy.eta <= 0:
            raise ValueError(f"algorithm.name={cls.name} needs model.policy.eta > 0 (a deterministic chain has no log-probabilities)")
        group = cls.group_size(cfg)
        if cfg.ray.request_batch % group or cfg.train.batch_size % group:
            raise ValueError(f"algorithm.name={cls.name} samples groups of {group} per prompt: ray.request_batch="
                             f"{cfg.ray.request_batch} and train.batch_size={cfg.train.batch_size} must be multiples of it")

    @classmethod
    def group_size(cls, cfg) -> int:
        if cls.group_size_setting is None:
            return 1
        return getattr(cfg.algorithm.settings_of(cls.section), cls.group_size_setting)

    @property
    def samples_per_prompt(self) -> int:
        return self.group_size(self.cfg)

    def update(self, batch: "Chains", ctx: UpdateContext) -> dict[str, float]:
        raise NotImplementedError


class GradientAlgorithm(Algorithm):
    """Backpropagates the differentiable reward through the end of each chain, in the learner."""

    reward_in_learner = True
    uses_original_text_prefix: ClassVar[bool] = False  # TextCraftor: its prefix may use the pretrained encoder

    @classmethod
    def check(cls, cfg) -> None:
        from ralign.rewards.registry import is_differentiable

        if not is_differentiable(cfg.reward.name, cfg.reward.options):
            raise ValueError(f"algorithm.name={cls.name} needs a differentiable reward; reward.name={cfg.reward.name} "
                             f"{'has a non-differentiable term' if cfg.reward.name == 'weighted' else 'is not'}")
        t, r = cfg.train, cfg.ray
        if r.request_batch % t.micro_batch or t.batch_size % r.request_batch:
            # Each sampler request carries one plan (where its prefix stops, which steps get gradient), so a
            # micro-batch must not straddle two requests.
            raise ValueError(
                f"gradient algorithms need ray.request_batch={r.request_batch} to be a multiple of "
                f"train.micro_batch={t.micro_batch} and to divide train.batch_size={t.batch_size}"
            )

    def draw_gradient_steps(self, generator: torch.Generator) -> list[int]:
        """The denoising steps (0 = first) that carry gradient in one chain."""
        raise NotImplementedError

    def attention_steps(self, grad_steps: list[int], generator: torch.Generator) -> list[int]:
        """Of `grad_steps`, those whose cross-attention a reward that scores it gets (none unless it says)."""
        return []

    def original_text_prefix(self) -> bool:
        return False

    def request_plan(self, request_no: int) -> RequestPlan:
        from ralign.diffusion.seeding import request_generator
        from ralign.rewards.registry import needs_attention

        generator = request_generator(self.cfg.train.seed, request_no)
        grad = self.draw_gradient_steps(generator)
        every = self.cfg.ray.metric_rollout_every
        if every and request_no % every == every - 1:
            # A full chain for the reward actors; a reward that scores cross-attention (CoMat) gets the maps of as
            # many steps as the learner captures, drawn the way the learner draws them.
            record = needs_attention(self.cfg.reward.name, self.cfg.reward.options)
            return RequestPlan(metrics_only=True, attention_steps=tuple(self.attention_steps(grad, generator)) if record else ())
        stop = min(grad) if self.cfg.algorithm.prefix_on_samplers else 0
        return RequestPlan(stop_step=stop, grad_steps=tuple(grad), original_text=self.original_text_prefix() and stop > 0)

    def update(self, batch: "Prefixes", ctx: UpdateContext) -> dict[str, float]:
        """Every chunk of consecutive samples that share a plan, in micro-batches; `continue_chains` does the work."""
        import math

        from ralign.diffusion.seeding import initial_noise

        mb, policy = ctx.micro_batch, ctx.policy
        micro_batches = self.backwards_per_update()
        totals: dict[str, float] = {}
        bad = 0
        for chunk in batch.plan_chunks():
            start_step, grad_steps = chunk.start_steps[0], list(chunk.grad_steps[0])
            if not grad_steps:  # in-process use: no plan from a coordinator, the learner draws one
                grad_steps = self.draw_gradient_steps(ctx.generator)
            for lo in range(0, len(chunk), mb):
                part = chunk.select(range(lo, min(lo + mb, len(chunk))))
                if part.latents is not None:
                    x_start = torch.as_tensor(part.latents).to(policy.device)
                else:
                    x_start = initial_noise(policy.latent_shape(), part.seeds, device=policy.device)
                found: list[dict] = []
                stats = self.continue_chains(part, x_start, start_step, grad_steps, ctx, found)
                for record in found:
                    i = record.pop("index")
                    record.update(id=part.ids[i], seed=part.seeds[i], version=policy.version)
                ctx.quarantined += found
                bad += int(stats.pop("quarantined", 0))
                if stats.pop("skipped", False):
                    continue  # every sample of this micro-batch was quarantined: nothing to average in
                for key, value in stats.items():
                    if math.isfinite(value):
                        totals[key] = totals.get(key, 0.0) + value / micro_batches
        ctx.end_update()
        totals["quarantined"] = float(bad)
        if "reward" in totals:
            totals["reward_mean"] = totals.pop("reward")
        return totals

    def continue_chains(self, part: "Prefixes", x_start: torch.Tensor, start_step: int, grad_steps: list[int],
                        ctx: UpdateContext, quarantine: list) -> dict[str, float]:
        """Run one micro-batch's chains from `x_start` at `start_step` to the reward, calling `ctx.backward` once;
        returns its stats, with `quarantined` (samples left out) and `skipped` (no backward: all left out)."""
        raise NotImplementedError
