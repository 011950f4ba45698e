"""Rewards as autoscaling Ray Serve applications: a thin shell around the same reward objects the training job
builds in-process or in reward actors, so a served score equals an in-process one.

- `RewardServer` is the deployment. `score(images, prompts)` is its handle API (images as a uint8 (B, H, W, 3)
  array); concurrent calls are merged by `@serve.batch` into one reward call per image size. `__call__` is the HTTP
  ingress: `POST /<name>` with JSON `{"prompts": [...], "images": [base64 PNG, ...]}` or `{"prompts": [...],
  "arrays": [[[[r, g, b], ...]]]}`; it answers `{"reward", "scores", "components"}`, and refuses malformed or
  oversized requests with a 4xx and a one-line message (limits from the config's `http` section).
- `build_reward_app(args)` is the import path a declarative Serve config names (ralign/ops/serve_config.py); `deploy`
  starts every application of a `ServeConfig` on the connected Ray cluster.
- `ServedReward` is the client side: a reward object that forwards to a running application through its
  `DeploymentHandle`; reward actors use it when a training config names `reward.deployment`.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import re
import time
import uuid
from collections.abc import Sequence

import numpy as np
import torch
from ray import serve

from ralign.rewards.base import Reward, RewardOutput
from ralign.ops.serve_config import HttpSection, RewardDeployment, ServeConfig

log = logging.getLogger(__name__)


class BadRequest(ValueError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# Strings (with their escapes) carry no nesting; removing them leaves the brackets whose depth matters.
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


def json_depth(body: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text, found without parsing it (a parser that recursed
    into 100,000 brackets is what the limit is for)."""
    skeleton = np.frombuffer(_JSON_STRING.sub(b'""', body), dtype=np.uint8)
    step = np.isin(skeleton, (ord("["), ord("{"))).astype(np.int64) - np.isin(skeleton, (ord("]"), ord("}")))
    return int(np.cumsum(step).max(initial=0))


def _decode_png(text: str, index: int, limits: HttpSection) -> np.ndarray:
    """One image of the API's one format: a PNG of 8-bit RGB, between min_image_side and max_image_side a side."""
    from PIL import Image, UnidentifiedImageError

    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise BadRequest(400, f"images[{index}] is not base64") from None
    try:
        with Image.open(io.BytesIO(raw)) as img:
            if img.format != "PNG":
                raise BadRequest(415, f"images[{index}] is {img.format or 'an unknown format'}; the API takes PNG only")
            if img.mode != "RGB":
                raise BadRequest(415, f"images[{index}] is a PNG of mode {img.mode}; the API takes 8-bit RGB PNGs only")
            if max(img.size) > limits.max_image_side:  # checked before decoding the pixels (decompression bombs)
                raise BadRequest(413, f"images[{index}] is {img.size[0]}x{img.size[1]}; the limit is {limits.max_image_side} per side")
            if min(img.size) < limits.min_image_side:
                raise BadRequest(400, f"images[{index}] is {img.size[0]}x{img.size[1]}; images need at least {limits.min_image_side} pixels a side")
            return np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise BadRequest(400, f"images[{index}] is not a readable image (PNG expected)") from None


def parse_request(body: bytes, limits: HttpSection) -> tuple[list[np.ndarray], list[str]]:
    """A request body -> (images as uint8 (H, W, 3) arrays, prompts), or `BadRequest` naming what is wrong. Everything
    is checked here, before the request joins a batch: a request that passes cannot fail another caller's."""
    from ralign.ops.prompt_input import prompt_problem

    depth = json_depth(body)
    if depth > limits.max_json_depth:
        raise BadRequest(400, f"the body nests {depth} levels deep; the API needs at most {limits.max_json_depth}")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise BadRequest(400, "the body is not JSON; send {\"prompts\": [...], \"images\": [base64 PNG, ...]}") from None
    if not isinstance(data, dict):
        raise BadRequest(400, "the body must be a JSON object with 'prompts' and 'images' (or 'arrays')")
    unknown = set(data) - {"prompts", "images", "arrays"}
    if unknown:
        raise BadRequest(400, f"unknown field(s) {sorted(unknown)}; expected 'prompts' and 'images' or 'arrays'")
    prompts = data.get("prompts")
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise BadRequest(400, "'prompts' must be a non-empty list of strings")
    if len(prompts) > limits.max_images_per_request:
        raise BadRequest(413, f"{len(prompts)} prompts; the limit is {limits.max_images_per_request} per request")
    for i, p in enumerate(prompts):
        if len(p) > limits.max_prompt_chars:
            raise BadRequest(413, f"prompts[{i}] has {len(p)} characters; the limit is {limits.max_prompt_chars}")
        problem = prompt_problem(p, limits.max_prompt_chars)  # the rule `ralign generate` applies too
        if problem:
            raise BadRequest(400, f"prompts[{i}]: {problem}")
    if ("images" in data) == ("arrays" in data):
        raise BadRequest(400, "send exactly one of 'images' (base64 PNG strings) or 'arrays' (H x W x 3 uint8 lists)")
    if "images" in data:
        items = data["images"]
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise BadRequest(400, "'images' must be a list of base64 PNG strings")
        images = [_decode_png(x, i, limits) for i, x in enumerate(items)]
    else:
        items = data["arrays"]
        if not isinstance(items, list):
            raise BadRequest(400, "'arrays' must be a list of H x W x 3 nested lists of 0..255")
        images = []
        for i, x in enumerate(items):
            try:
                arr = np.asarray(x, dtype=np.float64)
            except (ValueError, TypeError, RecursionError):
                raise BadRequest(400, f"arrays[{i}] is not a rectangular numeric array") from None
            if arr.ndim != 3 or arr.shape[2] != 3 or min(arr.shape[:2]) < 1:
                raise BadRequest(400, f"arrays[{i}] has shape {list(arr.shape)}; expected [H, W, 3]")
            if max(arr.shape[:2]) > limits.max_image_side:
                raise BadRequest(413, f"arrays[{i}] is {arr.shape[1]}x{arr.shape[0]}; the limit is {limits.max_image_side} per side")
            if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 255:
                raise BadRequest(400, f"arrays[{i}] has values outside 0..255")
            if min(arr.shape[:2]) < limits.min_image_side:
                raise BadRequest(400, f"arrays[{i}] is {arr.shape[1]}x{arr.shape[0]}; images need at least {limits.min_image_side} pixels a side")
            images.append(arr.round().astype(np.uint8))
    if len(images) != len(prompts):
        raise BadRequest(400, f"{len(images)} images for {len(prompts)} prompts; send one image per prompt")
    return images, prompts


class ScoringFailed(RuntimeError):
    """The reward raised on this request's images (and on them alone: the batch was scored again without it)."""


@serve.deployment(name="RewardServer")
class RewardServer:
    def __init__(self, deployment: dict, limits: dict):
        from actors.common import actor_device
        from ralign.rewards.registry import build_reward

        self.settings = RewardDeployment.model_validate(deployment)
        self.limits = HttpSection.model_validate(limits)
        torch.set_num_threads(self.settings.threads)  # a replica's share of the node, no oversubscription
        self.device = actor_device(self.settings.ray_actor_options.num_gpus > 0)
        self.reward = build_reward({**self.settings.reward, "device": self.device})
        self.score_batch.set_max_batch_size(self.settings.max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)
        self.batches = 0

    def describe(self) -> dict:
        return {"reward": self.settings.reward, "max_batch_size": self.settings.max_batch_size}

    def _score_now(self, images: np.ndarray, prompts: list[str]) -> dict:
        with torch.no_grad():
            x = torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2).float() / 255.0
            out = self.reward(x, prompts)
        return {"scores": out.score.float().cpu().numpy(), "components": {k: v.float().cpu().numpy() for k, v in out.components.items()}}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def score_batch(self, requests: list[tuple[np.ndarray, list[str]]]) -> list:
        """Several callers' (images, prompts) scored together, one reward call per image size. If a merged call
        raises, each of its requests is scored alone, so a failure reaches the caller that caused it (as a
        `ScoringFailed` in its slot) and every other caller still gets its scores."""
        self.batches += 1
        outputs: list = [None] * len(requests)
        by_shape: dict[tuple, list[int]] = {}
        for i, (images, _) in enumerate(requests):
            by_shape.setdefault(tuple(images.shape[1:]), []).append(i)
        for members in by_shape.values():
            try:
                out = self._score_now(np.concatenate([requests[i][0] for i in members]), [p for i in members for p in requests[i][1]])
            except Exception:  # noqa: BLE001 - isolate: score each request alone
                if len(members) == 1:
                    out = None
                else:
                    for i in members:
                        outputs[i] = self._score_alone(*requests[i])
                    continue
            if out is None:
                outputs[members[0]] = self._score_alone(*requests[members[0]])
                continue
            start = 0
            for i in members:
                n = len(requests[i][1])
                outputs[i] = {"scores": out["scores"][start:start + n], "components": {k: v[start:start + n] for k, v in out["components"].items()}}
                start += n
        return outputs

    def _score_alone(self, images: np.ndarray, prompts: list[str]):
        try:
            return self._score_now(images, prompts)
        except Exception as exc:  # noqa: BLE001 - handed to this request's caller alone
            return ScoringFailed(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")

    async def score(self, images: np.ndarray, prompts: Sequence[str]) -> dict:
        """Handle API: uint8 (B, H, W, 3) images and their prompts -> {"scores": (B,), "components": {name: (B,)}}.
        Raises ValueError for malformed input and ScoringFailed when the reward raised on these images."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) != len(prompts):
            raise ValueError(f"expected uint8 images (B, H, W, 3) with one prompt each, got {images.dtype} {images.shape} "
                             f"and {len(prompts)} prompts")
        result = await self.score_batch((images, list(prompts)))
        if isinstance(result, Exception):
            raise result
        return result

    async def _read_body(self, request) -> bytes:
        body = bytearray()
        async for chunk in request.stream():  # bounded even without a Content-Length
            body += chunk
            if len(body) > self.limits.max_request_bytes:
                raise BadRequest(413, f"the body exceeds the limit of {self.limits.max_request_bytes} bytes")
        return bytes(body)

    async def __call__(self, request):
        import asyncio

        from starlette.responses import JSONResponse

        request_id = uuid.uuid4().hex[:12]
        try:
            declared = request.headers.get("content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > self.limits.max_request_bytes):
                raise BadRequest(413, f"the body is {declared} bytes; the limit is {self.limits.max_request_bytes}")
            if request.method != "POST":
                raise BadRequest(405, "POST a JSON body with 'prompts' and 'images'")
            try:
                # A client that declares more than it sends (or sends slowly) gives up its slot at the deadline.
                body = await asyncio.wait_for(self._read_body(request), timeout=self.limits.body_timeout_s)
            except asyncio.TimeoutError:
                raise BadRequest(408, f"the body did not arrive within {self.limits.body_timeout_s:g} s") from None
            images, prompts = parse_request(body, self.limits)
        except BadRequest as exc:
            return JSONResponse({"error": str(exc), "request_id": request_id}, status_code=exc.status)
        try:
            results = []
            # Images of one request may differ in size; each size is its own batch item.
            for shape in dict.fromkeys(im.shape for im in images):
                idx = [i for i, im in enumerate(images) if im.shape == shape]
                out = await self.score(np.stack([images[i] for i in idx]), [prompts[i] for i in idx])
                results.append((idx, out))
        except Exception as exc:  # noqa: BLE001 - a server fault, said in one line with an id that is in the log too
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log.error("request %s: scoring failed: %s", request_id, reason)
            return JSONResponse({"error": f"scoring failed: {reason}", "request_id": request_id}, status_code=500)
        scores = [0.0] * len(prompts)
        components: dict[str, list[float]] = {}
        for idx, out in results:
            for j, i in enumerate(idx):
                scores[i] = float(out["scores"][j])
                for k, v in out["components"].items():
                    components.setdefault(k, [0.0] * len(prompts))[i] = float(v[j])
        return JSONResponse({"reward": self.settings.reward.get("name"), "scores": scores, "components": components,
                             "request_id": request_id})


def build_reward_app(args: dict):
    """The application a declarative Serve config (or `deploy`) builds: one `RewardServer` with its settings."""
    settings = RewardDeployment.model_validate(args["deployment"])
    return RewardServer.options(
        max_ongoing_requests=settings.max_ongoing_requests,
        autoscaling_config=settings.autoscaling.ray_dict(),
        ray_actor_options=settings.ray_actor_options.ray_dict(),
    ).bind(args["deployment"], args["limits"])


def deploy(cfg: ServeConfig, only: Sequence[str] | None = None) -> dict[str, str]:
    """Start (or update) every application of `cfg` on the connected Ray cluster; returns name -> route."""
    serve.start(http_options=cfg.http.ray_http_options())
    routes = {}
    for d in cfg.deployments:
        if only and d.name not in only:
            continue
        serve.run(build_reward_app(cfg.app_args(d)), name=d.name, route_prefix=f"/{d.name}", blocking=False)
        routes[d.name] = f"http://{cfg.http.host}:{cfg.http.port}/{d.name}"
    return routes


def replica_counts() -> dict[str, int]:
    """Running replicas per application (from `serve.status()`)."""
    out = {}
    for name, app in serve.status().applications.items():
        out[name] = sum(d.replica_states.get("RUNNING", 0) for d in app.deployments.values())
    return out


class ServedReward(Reward):
    """A reward object backed by a running reward application (same scores, same components), for reward actors
    whose training config names `reward.deployment`. Synchronous: reward actors are plain (non-async) actors."""

    differentiable = False  # scores come back as numbers, without a graph

    def __init__(self, app_name: str, expected_reward: str | None = None, timeout_s: float = 120.0, retries: int = 3):
        self.handle = serve.get_app_handle(app_name)
        self.app_name, self.timeout_s, self.retries = app_name, timeout_s, retries
        served = self.handle.describe.remote().result(timeout_s=timeout_s)["reward"]
        self.name = served.get("name", app_name)  # this instance's name: the served reward's
        if expected_reward is not None and self.name != expected_reward:
            raise ValueError(f"reward application {app_name!r} serves {self.name!r}, but the config's reward.name is {expected_reward!r}")

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **_) -> RewardOutput:
        arr = (images.permute(0, 2, 3, 1).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        last = None
        for attempt in range(self.retries):
            try:
                out = self.handle.score.remote(arr, list(prompts)).result(timeout_s=self.timeout_s)
                return RewardOutput(torch.from_numpy(np.asarray(out["scores"])),
                                    {k: torch.from_numpy(np.asarray(v)) for k, v in out["components"].items()})
            except Exception as exc:  # noqa: BLE001 - a replica restarting or a timeout: retry, bounded
                last = exc
                log.warning("reward application %s: attempt %d failed (%s)", self.app_name, attempt + 1, exc.__class__.__name__)
                time.sleep(min(5.0, 0.5 * 2**attempt))
        raise RuntimeError(f"reward application {self.app_name!r} did not answer after {self.retries} attempts: {last}")
