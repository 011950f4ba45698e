"""The training job's configuration: one YAML file, validated here before anything starts.

Sections: `model` (pipeline and policy: LoRA ranks, text-encoder mode, sampling), `algorithm` (which update and its
hyper-parameters), `reward`, `prompts`, `train` (iterations, batch, optimiser, checkpoints, evaluation),
`ray` (actor counts, CPU shares, rollout pipeline bounds), `deepspeed` and `tracking` (MLflow).
Impossible combinations (a gradient algorithm with a non-differentiable reward, a truncation longer than the chain)
are rejected here with one line naming the keys, not discovered an hour into a run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ralign.config import StrictModel

ALGORITHMS = ("dpok", "refl", "draft", "alignprop", "interval")
GRADIENT_ALGORITHMS = ("refl", "draft", "alignprop", "interval")


class PolicySection(StrictModel):
    unet_lora_rank: int = Field(8, ge=0)
    unet_lora_alpha: float | None = None
    text_encoder: Literal["frozen", "full", "lora"] = "frozen"
    text_lora_rank: int = Field(8, ge=1)
    text_encoding: Literal["plain", "segment"] = "plain"
    segment_budget: int = Field(96, ge=8)
    text_encoder_weight: float = 1.0  # TextCraftor interpolation (evaluation/inference); needs a tuned text encoder
    steps: int = Field(20, ge=1, le=1000)
    eta: float = Field(1.0, ge=0.0, le=1.0)
    guidance: float = Field(3.0, ge=1.0)


class ModelSection(StrictModel):
    pipeline: str = "base"  # 'base' (committed toy model), 'tiny-random' (tests), a diffusers directory or a hub id
    # Start the trainable weights from this checkpoint (e.g. LongAlign's supervised stage, `ralign sft`)
    init_checkpoint: str | None = None
    policy: PolicySection = PolicySection()

    @field_validator("init_checkpoint")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        # Ray workers run in their own directories: a relative path would resolve against theirs.
        return str(Path(value).expanduser().resolve()) if value else value

    def policy_spec(self, seed: int) -> dict:
        """What `ralign.diffusion.policy.build_policy` needs; also written into every checkpoint, so one loads on its own."""
        return {"pipeline": self.pipeline, "seed": seed, "policy": self.policy.model_dump(), "init_checkpoint": self.init_checkpoint}


class DPOKSection(StrictModel):
    alpha: float = 1.0
    beta: float = Field(0.01, ge=0.0)
    clip_range: float = Field(0.2, gt=0.0)
    adv_clip: float = Field(5.0, gt=0.0)
    timestep_fraction: float = Field(0.5, gt=0.0, le=1.0)
    inner_epochs: int = Field(1, ge=1)


class ReFLSection(StrictModel):
    lam: float = 1.0
    scale: float = Field(1.0, gt=0.0)
    late_step_min: int = Field(0, ge=0)
    late_step_max: int = Field(5, ge=1)


class BackpropSection(StrictModel):
    k: int = Field(1, ge=1)
    interval: int = Field(5, ge=1)
    checkpointing: bool = True
    loss_scale: float = Field(1.0, gt=0.0)
    original_text_prefix: bool = True
    attention_steps: int = Field(2, ge=1)  # rewards that use cross-attention (CoMat): gradient steps whose maps are captured


class AlgorithmSection(StrictModel):
    name: Literal["dpok", "refl", "draft", "alignprop", "interval"] = "dpok"
    # Gradient algorithms: run the no-gradient prefix of each chain on the sampler actors and hand the latents to
    # the learners (true), or run the whole chain in the learner (false).
    prefix_on_samplers: bool = True
    dpok: DPOKSection = DPOKSection()
    refl: ReFLSection = ReFLSection()
    backprop: BackpropSection = BackpropSection()


class RewardSection(StrictModel):
    name: str = "preference"
    options: dict = Field(default_factory=dict)
    # Reward actors forward to this running Ray Serve reward application (`ralign serve`) instead of loading the
    # reward themselves; it must serve `name`. Learners of gradient algorithms still build it in-process (gradients).
    deployment: str | None = Field(None, pattern=r"^[a-z][a-z0-9_-]{0,40}$")


class PromptSection(StrictModel):
    families: list[Literal["single", "binding", "counting", "spatial", "size", "long"]] = ["single", "binding", "counting", "spatial", "size"]
    split: Literal["train", "val", "test", "all"] = "train"
    unique_prompts: int = Field(64, ge=1)  # size of the prompt pool the sampler draws from (repeats give per-prompt stats)
    seed: int = 0


class EvalSection(StrictModel):
    every: int = Field(0, ge=0)  # iterations between oracle evaluations (0 = only before and after)
    n_per_family: int = Field(32, ge=1)
    families: list[Literal["single", "binding", "counting", "spatial", "size", "long"]] = ["single", "binding", "counting", "spatial", "size", "long"]
    split: Literal["train", "val", "test"] = "test"
    before_after: bool = True


class TrainSection(StrictModel):
    iterations: int = Field(20, ge=1)
    batch_size: int = Field(8, ge=1)  # samples per learner worker per iteration
    micro_batch: int = Field(4, ge=1)  # samples per forward/backward
    lr: float = Field(3e-4, gt=0.0)
    text_encoder_lr: float | None = Field(None, gt=0.0)  # a trainable text encoder's own rate (default: lr)
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip: float = Field(1.0, gt=0.0)
    seed: int = 0
    checkpoint_every: int = Field(5, ge=1)
    max_bad_reward_fraction: float = Field(0.5, ge=0.0, le=1.0)
    max_failures: int = Field(2, ge=0)  # learner-group restarts from the last checkpoint (Ray Train FailureConfig)
    eval: EvalSection = EvalSection()


class RaySection(StrictModel):
    address: str | None = None  # None: join $RAY_ADDRESS when set (inside a Ray job), else start a local cluster; "auto" or ray://... to join one
    num_cpus: int | None = None  # local cluster only (default: all cores)
    samplers: int = Field(1, ge=1)
    reward_actors: int = Field(1, ge=1)
    learners: int = Field(1, ge=1)
    sampler_cpus: float = Field(0.5, gt=0.0)
    reward_cpus: float = Field(0.5, gt=0.0)
    learner_cpus: float = Field(1.0, gt=0.0)
    threads_per_actor: int = Field(1, ge=1)
    # torch threads of each learner worker (default: threads_per_actor). The learner is the slowest stage of a DPOK
    # iteration; giving it a second thread lets it use a core the sampler leaves idle (ralign bench pipeline).
    learner_threads: int | None = Field(None, ge=1)
    use_gpu: bool = False  # learners get one GPU each; samplers / reward actors get sampler_gpus / reward_gpus
    sampler_gpus: float = Field(0.0, ge=0.0)
    reward_gpus: float = Field(0.0, ge=0.0)
    request_batch: int = Field(4, ge=1)  # prompts per sampler request
    max_inflight_per_sampler: int = Field(2, ge=1)
    # Request batches in flight or produced but not yet trained on (back-pressure). Default: max(1, max_staleness)
    # iterations' worth. Samplers then work on the next batch while the learners train on this one (one version
    # behind, within the bound); a deeper queue would only hold rollouts that go stale before they are used.
    max_unconsumed: int | None = Field(None, ge=1)
    max_staleness: int = Field(1, ge=0)  # policy versions; older rollouts are dropped and counted
    metric_rollout_every: int = Field(4, ge=0)  # gradient algorithms: every N-th request is a full rollout scored by reward actors
    # The last iteration waits up to this long for the metrics rollouts already issued to be scored, so its logged
    # rollout reward covers all of them (it does not change what is trained).
    metric_wait_s: float = Field(120.0, ge=0)
    # Faults (actors/rollout.py): a reward call running longer is abandoned (its samples quarantined, its actor
    # restarted); scoring is re-issued when a reward actor dies, up to max_score_attempts; this many failed reward
    # calls in a row (a reward server that stays down) stop the run with the last error.
    reward_timeout_s: float = Field(600.0, gt=0)
    max_score_attempts: int = Field(3, ge=1)
    max_reward_errors: int = Field(3, ge=1)
    storage_path: str = "runs/ray_train"  # Ray Train checkpoints (shared storage on a real cluster)


class DeepSpeedSection(StrictModel):
    zero_stage: int = Field(2, ge=0, le=3)
    extra: dict = Field(default_factory=dict)  # merged into the generated DeepSpeed config (GPU runs: bf16, offload, ...)


class TrackingSection(StrictModel):
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "ralign"
    run_name: str | None = None
    log_images_every: int = Field(5, ge=0)

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials(cls, uri: str) -> str:
        # The config is logged as run params and config.yaml: a password or token in the URI would be stored with
        # every run. One rule for what counts as credentials: the one that redacts them.
        from ralign.ops.credentials import redact_credentials

        if redact_credentials(uri) != uri:
            raise ValueError("holds credentials (user:password@ or token@); set MLFLOW_TRACKING_USERNAME / "
                             "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment instead")
        return uri


class TrainConfig(StrictModel):
    model: ModelSection = ModelSection()
    algorithm: AlgorithmSection = AlgorithmSection()
    reward: RewardSection = RewardSection()
    prompts: PromptSection = PromptSection()
    train: TrainSection = TrainSection()
    ray: RaySection = RaySection()
    deepspeed: DeepSpeedSection = DeepSpeedSection()
    tracking: TrackingSection = TrackingSection()

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        algo, pol = self.algorithm, self.model.policy
        from ralign.rewards.registry import is_differentiable, needs_attention, needs_chain_inputs, reward_names

        if self.reward.name not in reward_names():
            raise ValueError(f"reward.name={self.reward.name!r} is not a known reward; expected one of {reward_names()}")
        if algo.name in GRADIENT_ALGORITHMS and not is_differentiable(self.reward.name, self.reward.options):
            raise ValueError(f"algorithm.name={algo.name} needs a differentiable reward; reward.name={self.reward.name} "
                             f"{'has a non-differentiable term' if self.reward.name == 'weighted' else 'is not'}")
        chain_terms = needs_chain_inputs(self.reward.name, self.reward.options)
        if algo.name == "dpok" and chain_terms:
            # Their attention is captured, and CoMat's discriminator trained, in the gradient algorithms' chains only.
            raise ValueError(f"reward term(s) {chain_terms} score the chain's cross-attention or latents and train with a "
                             "gradient algorithm; algorithm.name=dpok cannot use them")
        if needs_attention(self.reward.name, self.reward.options) and pol.text_encoding != "plain":
            raise ValueError(f"reward term(s) {chain_terms} score cross-attention per prompt token, which needs "
                             f"model.policy.text_encoding=plain, not {pol.text_encoding}")
        if algo.name == "dpok" and pol.eta <= 0:
            raise ValueError("algorithm.name=dpok needs model.policy.eta > 0 (a deterministic chain has no log-probabilities)")
        if pol.text_encoder_weight != 1.0 and pol.text_encoder == "frozen":
            raise ValueError("model.policy.text_encoder_weight interpolates a tuned text encoder; model.policy.text_encoder=frozen has none")
        if pol.unet_lora_rank == 0 and pol.text_encoder == "frozen":
            raise ValueError("nothing to train: model.policy.unet_lora_rank=0 and model.policy.text_encoder=frozen")
        if algo.name == "refl" and not (algo.refl.late_step_min < algo.refl.late_step_max <= pol.steps):
            raise ValueError(
                f"algorithm.refl late-step window [{algo.refl.late_step_min}, {algo.refl.late_step_max}) must lie inside "
                f"model.policy.steps={pol.steps}"
            )
        if algo.name in ("draft", "alignprop") and algo.backprop.k > pol.steps:
            raise ValueError(f"algorithm.backprop.k={algo.backprop.k} is longer than model.policy.steps={pol.steps}")
        if self.train.batch_size % self.train.micro_batch:
            raise ValueError(f"train.batch_size={self.train.batch_size} must be a multiple of train.micro_batch={self.train.micro_batch}")
        if algo.name in GRADIENT_ALGORITHMS and (self.ray.request_batch % self.train.micro_batch or self.train.batch_size % self.ray.request_batch):
            # Each sampler request carries one plan (where its prefix stops, which steps get gradient), so a
            # micro-batch must not straddle two requests.
            raise ValueError(
                f"gradient algorithms need ray.request_batch={self.ray.request_batch} to be a multiple of "
                f"train.micro_batch={self.train.micro_batch} and to divide train.batch_size={self.train.batch_size}"
            )
        return self

    def policy_spec(self) -> dict:
        return self.model.policy_spec(self.train.seed)

    def unconsumed_bound(self) -> int:
        if self.ray.max_unconsumed is not None:
            return self.ray.max_unconsumed
        per_iteration = -(-self.train.batch_size * self.ray.learners // self.ray.request_batch)
        return max(1, self.ray.max_staleness) * per_iteration
