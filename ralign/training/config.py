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

from pydantic_core import PydanticCustomError
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from ralign.config import StrictModel
from ralign.diffusion.settings import PolicyConfig

class ModelSection(StrictModel):
    # 'base' / 'flow' (committed toy models), 'tiny-random' / 'tiny-random-flow' (tests), a diffusers directory or a
    # hub id; a StableDiffusion3Pipeline is trained as a flow-matching policy
    pipeline: str = "base"
    # Start the trainable weights from this checkpoint (e.g. LongAlign's supervised stage, `ralign sft`)
    init_checkpoint: str | None = None
    policy: PolicyConfig = PolicyConfig()

    @field_validator("init_checkpoint")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        # Ray workers run in their own directories: a relative path would resolve against theirs.
        return str(Path(value).expanduser().resolve()) if value else value

    def family(self) -> str | None:
        """'unet' or 'flow', read from the pipeline's model_index.json; None when that cannot be read before loading
        (a hub id not in the local cache, a path that does not exist: loading says why)."""
        from ralign.models import ModelLoadError, pipeline_family

        try:
            return pipeline_family(self.pipeline)
        except ModelLoadError:
            return None

    def policy_spec(self, seed: int) -> dict:
        """What `ralign.diffusion.policy.build_policy` needs; also written into every checkpoint, so one loads on its own."""
        return {"pipeline": self.pipeline, "seed": seed, "policy": self.policy.model_dump(), "init_checkpoint": self.init_checkpoint}


class AlgorithmSection(StrictModel):
    """`name` selects the algorithm (ralign/algorithms/registry.py); each algorithm's settings are a section of their
    own, `algorithm.<section>`, defined in its file (`algorithm.dpok`, `algorithm.refl`, `algorithm.backprop`, ...).
    Sections of algorithms other than the selected one may be given (a `--set algorithm.name=...` then finds them)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    name: str = "dpok"
    # Gradient algorithms: run the no-gradient prefix of each chain on the sampler actors and hand the latents to
    # the learners (true), or run the whole chain in the learner (false).
    prefix_on_samplers: bool = True

    @model_validator(mode="wrap")
    @classmethod
    def _sections(cls, data, handler):
        # Each section is validated by its algorithm's own settings model; errors keep their full key path.
        if isinstance(data, dict):
            from ralign.algorithms.registry import algorithm_class, algorithm_names, section_class, section_keys

            data, errors = dict(data), []
            known = section_keys()
            name = data.get("name", cls.model_fields["name"].default)
            try:
                data.setdefault(algorithm_class(name).section, {})
            except (ValueError, TypeError):
                names = algorithm_names()
                errors.append({"type": PydanticCustomError("unknown_algorithm", f"not a known algorithm; expected one of {names}"),
                               "loc": ("name",), "input": name})
            for key in [k for k in data if k not in cls.model_fields]:
                if key not in known:
                    errors.append({"type": "extra_forbidden", "loc": (key,), "input": data[key]})
                    continue
                value = data[key]
                if isinstance(value, StrictModel):
                    value = value.model_dump()
                try:
                    data[key] = section_class(key).model_validate(value)
                except ValidationError as err:
                    errors += [{**e, "loc": (key, *e["loc"])} for e in err.errors()]
            if errors:
                raise ValidationError.from_exception_data(cls.__name__, [{k: v for k, v in e.items() if k in ("type", "loc", "input", "ctx")} for e in errors])
        return handler(data)

    def settings_of(self, section: str) -> StrictModel:
        """The validated settings of `algorithm.<section>` (its defaults when the config gives none)."""
        from ralign.algorithms.registry import section_class

        value = (self.__pydantic_extra__ or {}).get(section)
        return value if value is not None else section_class(section)()


class RewardSection(StrictModel):
    name: str = "preference"
    options: dict = Field(default_factory=dict)
    # Reward actors forward to this running Ray Serve reward application (`ralign serve`) instead of loading the
    # reward themselves; it must serve `name`. Learners of gradient algorithms still build it in-process (gradients).
    deployment: str | None = Field(None, pattern=r"^[a-z][a-z0-9_-]{0,40}$")

    def spec(self, device: str | None = None, served: bool = False) -> dict:
        """What `build_reward` takes: `{"name", **options}` (+ `device`); with `served`, the Serve application
        reward actors forward to instead (when `deployment` is set)."""
        spec = {"name": self.name, **self.options}
        if device is not None:
            spec["device"] = device
        if served and self.deployment:
            spec["deployment"] = self.deployment
        return spec


class PromptSection(StrictModel):
    families: list[Literal["single", "binding", "counting", "spatial", "size", "long"]] = ["single", "binding", "counting", "spatial", "size"]
    split: Literal["train", "val", "test", "all"] = "train"
    unique_prompts: int = Field(64, ge=1)  # size of the prompt pool the sampler draws from (repeats give per-prompt stats)
    seed: int = 0


class EvalSection(StrictModel):
    every: int = Field(0, ge=0)  # iterations between oracle evaluations (0 = only before and after)
    n_per_family: int = Field(32, ge=1)
    # Prompts per family of the evaluations every `every` iterations (the learning curve; default n_per_family):
    # the first ones of the before / after set, so each curve point is paired with the same prompts before training.
    curve_n_per_family: int | None = Field(None, ge=1)
    families: list[Literal["single", "binding", "counting", "spatial", "size", "long"]] = ["single", "binding", "counting", "spatial", "size", "long"]
    split: Literal["train", "val", "test"] = "test"
    before_after: bool = True
    # A run that starts from model.init_checkpoint (an earlier stage, e.g. LongAlign's stage 1) is also judged against
    # the pretrained model that stage was built on, on the same prompts and noise: its "before" is the earlier stage,
    # and a method's claim and its reward-hacking check must cover every stage.
    against_pretrained: bool = True


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
    # Faults (ralign/rollout/schedule.py): a reward call running longer is abandoned (its samples quarantined, its actor
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
        pol = self.model.policy
        from ralign.algorithms.registry import algorithm_class
        from ralign.rewards.registry import needs_attention, needs_chain_inputs, reward_names

        if self.reward.name not in reward_names():
            raise ValueError(f"reward.name={self.reward.name!r} is not a known reward; expected one of {reward_names()}")
        if self.train.batch_size % self.train.micro_batch:
            raise ValueError(f"train.batch_size={self.train.batch_size} must be a multiple of train.micro_batch={self.train.micro_batch}")
        # What the algorithm accepts (rewards, policy settings, batch shapes, models) is the algorithm's to say.
        family = self.model.family()
        algorithm_class(self.algorithm.name).check_model(family, self.model.pipeline)
        algorithm_class(self.algorithm.name).check(self)
        if family == "flow":
            from ralign.diffusion.settings import check_flow_settings

            check_flow_settings(pol)
        if needs_attention(self.reward.name, self.reward.options) and pol.text_encoding != "plain":
            raise ValueError(f"reward term(s) {needs_chain_inputs(self.reward.name, self.reward.options)} score cross-attention "
                             f"per prompt token, which needs model.policy.text_encoding=plain, not {pol.text_encoding}")
        if pol.text_encoder_weight != 1.0 and pol.text_encoder == "frozen":
            raise ValueError("model.policy.text_encoder_weight interpolates a tuned text encoder; model.policy.text_encoder=frozen has none")
        if pol.unet_lora_rank == 0 and pol.text_encoder == "frozen":
            raise ValueError("nothing to train: model.policy.unet_lora_rank=0 and model.policy.text_encoder=frozen")
        return self

    def policy_spec(self) -> dict:
        return self.model.policy_spec(self.train.seed)

    def unconsumed_bound(self) -> int:
        if self.ray.max_unconsumed is not None:
            return self.ray.max_unconsumed
        per_iteration = -(-self.train.batch_size * self.ray.learners // self.ray.request_batch)
        return max(1, self.ray.max_staleness) * per_iteration


# `ralign sft` (jobs/sft.py): a supervised stage on renders of the world's prompts, e.g. LongAlign's stage 1.
class SFTConfig(StrictModel):
    model: ModelSection = ModelSection()
    families: list[Literal["single", "binding", "counting", "spatial", "size", "long"]] = ["long", "single", "binding", "counting", "spatial", "size"]
    family_weights: list[float] | None = None  # default: equal
    split: Literal["train", "all"] = "train"
    steps: int = Field(600, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    grad_clip: float = Field(1.0, gt=0.0)
    caption_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    # Weight of the gap to the pretrained model reading the prompt through the plain encoding (short prompts only;
    # ralign.algorithms.sft.plain_teacher_gap); 0 = LongAlign's stage 1 as published
    distill_weight: float = Field(0.0, ge=0.0)
    seed: int = 0
    out: str = "runs/sft"
    log_every: int = Field(50, ge=1)
    tracking: TrackingSection = TrackingSection()

    def policy_spec(self) -> dict:
        return self.model.policy_spec(self.seed)
