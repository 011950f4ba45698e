"""The reward servers' config (`jobs/configs/serve_rewards.yaml`): which rewards to serve on Ray Serve, how each
batches and autoscales, and the HTTP limits of their ingress.

One file is the single source: `ralign serve` deploys it on a local or remote Ray cluster, and `ralign k8s render`
turns it into the RayService's `serveConfigV2` (`to_serve_deploy_dict`), so the two can never drift apart. Every
reward becomes its own Serve application (route `/<name>`), built by `actors.serve:build_reward_app` from the args
here; training configs point their reward actors at one by name (`reward.serve.deployment`).

Autoscaling settings are checked twice: by our own model (keys, types, min <= initial <= max) and by Ray's
`AutoscalingConfig`, which is what Serve will apply (Ray's deploy schema alone accepts min > max).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from ralign.config import StrictModel

SERVE_IMPORT_PATH = "actors.serve:build_reward_app"


class AutoscalingSection(StrictModel):
    min_replicas: int = Field(1, ge=0)
    initial_replicas: int | None = Field(None, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)
    # Ray 2.60 deprecates the per-deployment metrics interval in favour of environment variables
    # (RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S); left unset, Ray's default applies.
    metrics_interval_s: float | None = Field(None, gt=0)
    look_back_period_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> "AutoscalingSection":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"autoscaling.min_replicas={self.min_replicas} exceeds autoscaling.max_replicas={self.max_replicas}")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(f"autoscaling.initial_replicas={self.initial_replicas} must lie in [min_replicas, max_replicas]")
        from ray.serve.config import AutoscalingConfig  # what Serve itself will accept

        AutoscalingConfig(**self.ray_dict())
        return self

    def ray_dict(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class ActorOptionsSection(StrictModel):
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    memory_mb: int | None = Field(None, ge=1)  # Ray's `memory`, in MiB here to keep the YAML readable

    def ray_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            out["num_gpus"] = self.num_gpus
        if self.memory_mb:
            out["memory"] = self.memory_mb * 1024 * 1024
        return out


class RewardDeployment(StrictModel):
    name: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,40}$")  # the application name and its route /<name>
    reward: dict = Field(default_factory=lambda: {"name": "clip_score"})  # a reward spec, as in a training config
    max_batch_size: int = Field(8, ge=1, le=256)  # @serve.batch: requests merged into one reward call
    batch_wait_timeout_s: float = Field(0.05, ge=0, le=10)
    max_ongoing_requests: int = Field(8, ge=1)
    threads: int = Field(1, ge=1)  # torch threads per replica (no oversubscription of the node's cores)
    ray_actor_options: ActorOptionsSection = ActorOptionsSection()
    autoscaling: AutoscalingSection = AutoscalingSection()

    @field_validator("reward")
    @classmethod
    def _known_reward(cls, spec: dict) -> dict:
        from ralign.rewards.registry import needs_chain_inputs, reward_names

        name = spec.get("name")
        if name not in reward_names():
            raise ValueError(f"reward.name={name!r} is not a known reward; expected one of {reward_names()}")
        options = {k: v for k, v in spec.items() if k != "name"}
        if needs_chain_inputs(name, options):
            raise ValueError(f"reward {name!r} has terms {needs_chain_inputs(name, options)} that score a chain's attention maps "
                             "or latents; a reward server only receives images and prompts")
        return spec


class HttpSection(StrictModel):
    host: str = "127.0.0.1"  # loopback unless asked: a reward server is an internal service
    port: int = Field(8000, ge=1, le=65535)
    max_request_bytes: int = Field(16 * 1024 * 1024, ge=1024)  # larger bodies are refused with 413
    max_images_per_request: int = Field(64, ge=1)
    max_image_side: int = Field(1024, ge=8)
    min_image_side: int = Field(8, ge=1)  # smaller images carry nothing a reward could judge: 400
    max_prompt_chars: int = Field(4000, ge=1)
    max_json_depth: int = Field(8, ge=5, le=64)  # the API's own nesting is 5 ('arrays' of rows of pixels); deeper: 400
    # A request body must have arrived within body_timeout_s of the request (408 otherwise, and its slot is free
    # again); a request must be answered within request_timeout_s (Ray Serve's own HTTP deadline, 408). Defaults
    # suit 16 MB of PNGs on a slow link and a loaded replica.
    body_timeout_s: float = Field(10.0, gt=0, le=600)
    request_timeout_s: float = Field(60.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _deadlines(self) -> "HttpSection":
        if self.body_timeout_s >= self.request_timeout_s:
            raise ValueError(f"http.body_timeout_s={self.body_timeout_s:g} must be below http.request_timeout_s="
                             f"{self.request_timeout_s:g}: the body is part of the request")
        if self.min_image_side > self.max_image_side:
            raise ValueError(f"http.min_image_side={self.min_image_side} exceeds http.max_image_side={self.max_image_side}")
        return self

    def ray_http_options(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "request_timeout_s": self.request_timeout_s}


class ServeConfig(StrictModel):
    http: HttpSection = HttpSection()
    deployments: list[RewardDeployment] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> "ServeConfig":
        names = [d.name for d in self.deployments]
        if len(names) != len(set(names)):
            raise ValueError(f"deployments: duplicate names {sorted({n for n in names if names.count(n) > 1})}")
        return self

    def deployment(self, name: str) -> RewardDeployment:
        for d in self.deployments:
            if d.name == name:
                return d
        raise KeyError(f"no reward deployment {name!r}; this config serves {[d.name for d in self.deployments]}")

    def app_args(self, d: RewardDeployment) -> dict[str, Any]:
        """The args `build_reward_app` receives: the deployment's settings and the HTTP limits."""
        return {"deployment": d.model_dump(mode="json"), "limits": self.http.model_dump(mode="json")}

    def to_serve_deploy_dict(self) -> dict[str, Any]:
        """Ray Serve's declarative config (what `serve deploy` and a RayService's serveConfigV2 take)."""
        apps = []
        for d in self.deployments:
            apps.append({
                "name": d.name,
                "route_prefix": f"/{d.name}",
                "import_path": SERVE_IMPORT_PATH,
                "args": self.app_args(d),
                "deployments": [{
                    "name": "RewardServer",
                    "max_ongoing_requests": d.max_ongoing_requests,
                    "autoscaling_config": d.autoscaling.ray_dict(),
                    "ray_actor_options": d.ray_actor_options.ray_dict(),
                }],
            })
        return {"http_options": self.http.ray_http_options(), "applications": apps}

    def validate_with_ray(self) -> None:
        """Check the generated declarative config against Ray Serve's own schema."""
        from ray.serve.schema import ServeDeploySchema

        ServeDeploySchema.model_validate(self.to_serve_deploy_dict())
