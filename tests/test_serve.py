"""Reward servers on a real Ray Serve instance (loopback only): the same scores as the in-process reward through the
handle, over HTTP (PNG and arrays) and from a reward actor pointed at the application; 4xx with a message for
malformed or oversized requests; and autoscaling from 1 to 2 replicas under a bounded burst and back down after it."""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from ralign.config import ConfigError, load_config, parse_config
from ralign.ops.serve_config import HttpSection, ServeConfig
from ralign.world.prompts import generate
from ralign.world.scene import render


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _post(url: str, body: bytes, timeout: float = 60.0) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


# ---- config and request validation (no Ray) --------------------------------------------------------------------------

def test_committed_serve_config_parses_and_ray_accepts_it():
    cfg = load_config(ServeConfig, "jobs/configs/serve_rewards.yaml")
    cfg.validate_with_ray()
    assert {a["route_prefix"] for a in cfg.to_serve_deploy_dict()["applications"]} == {f"/{d.name}" for d in cfg.deployments}


@pytest.mark.parametrize("bad, message", [
    ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "exceeds autoscaling.max_replicas"),
    ({"autoscaling": {"max_replica": 2}}, "unknown key"),
    ({"reward": {"name": "nope"}}, "not a known reward"),
    ({"reward": {"name": "grounded_attention"}}, "only receives images"),
    ({"max_batch_size": 0}, "max_batch_size"),
])
def test_bad_serve_configs_are_refused_with_the_key(bad, message):
    deployment = {"name": "r", "reward": {"name": "clip_score"}, **bad}
    with pytest.raises(ConfigError, match=message):
        parse_config(ServeConfig, {"deployments": [deployment]})


def test_malformed_requests_are_refused_with_a_reason():
    from actors.serve import BadRequest, parse_request

    limits = HttpSection(max_images_per_request=2, max_image_side=16, max_prompt_chars=50)
    img = np.zeros((8, 8, 3), np.uint8)
    cases = {
        b"not json": (400, "not JSON"),
        json.dumps([1, 2]).encode(): (400, "JSON object"),
        json.dumps({"prompts": ["a"], "images": [_png(img)], "extra": 1}).encode(): (400, "unknown field"),
        json.dumps({"prompts": [], "images": []}).encode(): (400, "non-empty list"),
        json.dumps({"prompts": ["a", "b"], "images": [_png(img)]}).encode(): (400, "1 images for 2 prompts"),
        json.dumps({"prompts": ["a"] * 3, "images": [_png(img)] * 3}).encode(): (413, "limit is 2"),
        json.dumps({"prompts": ["a"], "images": ["%%%"]}).encode(): (400, "not base64"),
        json.dumps({"prompts": ["a"], "images": [base64.b64encode(b"GIF89a-not").decode()]}).encode(): (400, "not a readable image"),
        json.dumps({"prompts": ["a"], "images": [_png(np.zeros((32, 8, 3), np.uint8))]}).encode(): (413, "limit is 16 per side"),
        json.dumps({"prompts": ["a\x00b"], "images": [_png(img)]}).encode(): (400, "control characters"),
        json.dumps({"prompts": ["a" * 51], "images": [_png(img)]}).encode(): (413, "51 characters"),
        json.dumps({"prompts": ["a"], "arrays": [[[1, 2]]]}).encode(): (400, "expected [H, W, 3]"),
        json.dumps({"prompts": ["a"], "arrays": [[[[300, 0, 0]]]]}).encode(): (400, "outside 0..255"),
        json.dumps({"prompts": ["a"], "arrays": [[[[0, 0, 0]]]], "images": []}).encode(): (400, "exactly one of"),
    }
    for body, (status, message) in cases.items():
        with pytest.raises(BadRequest, match=re.escape(message)) as info:
            parse_request(body, limits)
        assert info.value.status == status, body[:60]
    images, prompts = parse_request(json.dumps({"prompts": ["a"], "images": [_png(img)]}).encode(), limits)
    assert images[0].shape == (8, 8, 3) and prompts == ["a"]


# ---- a real Serve instance -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(ray_local):
    from ray import serve

    from actors.serve import deploy

    port = _free_port()
    cfg = parse_config(ServeConfig, {
        "http": {"host": "127.0.0.1", "port": port, "max_request_bytes": 300_000, "max_image_side": 256},
        "deployments": [{
            "name": "clip-score", "reward": {"name": "clip_score"}, "max_batch_size": 4, "batch_wait_timeout_s": 0.05,
            "max_ongoing_requests": 4, "ray_actor_options": {"num_cpus": 0.25},
            # fast metrics and short delays so the test sees both scaling decisions within seconds
            "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 0.5,
                            "downscale_delay_s": 3, "metrics_interval_s": 0.2, "look_back_period_s": 1},
        }],
    })
    cfg.validate_with_ray()
    routes = deploy(cfg)
    yield cfg, routes["clip-score"]
    serve.shutdown()


def _samples(n: int):
    samples = generate("binding", n, split="test", seed=11)
    return np.stack([render(s.scene) for s in samples]), [s.prompt for s in samples]


def test_served_scores_equal_the_in_process_reward(served, ray_local):
    from ray import serve

    from actors.rollout import RewardActor
    from ralign.rollout.batch import Chains
    from ralign.rewards.registry import build_reward

    _, url = served
    images, prompts = _samples(3)
    with torch.no_grad():
        local = build_reward({"name": "clip_score"})(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0, prompts)
    handle = serve.get_app_handle("clip-score")
    out = handle.score.remote(images, prompts).result(timeout_s=60)
    np.testing.assert_allclose(out["scores"], local.score.numpy(), rtol=1e-4, atol=1e-5)
    assert set(out["components"]) == set(local.components)

    status, body = _post(url, json.dumps({"prompts": prompts, "images": [_png(im) for im in images]}).encode())
    assert status == 200 and body["reward"] == "clip_score"
    np.testing.assert_allclose(body["scores"], local.score.numpy(), rtol=1e-4, atol=1e-5)
    status, body = _post(url, json.dumps({"prompts": prompts[:1], "arrays": [images[0].tolist()]}).encode())
    assert status == 200 and body["scores"][0] == pytest.approx(float(local.score[0]), rel=1e-4, abs=1e-5)

    # a reward actor pointed at the application scores a rollout the same way
    rollout = Chains(ids=[0, 1, 2], prompts=prompts, seeds=[0, 1, 2], versions=[0] * 3, latents=np.zeros((3, 1, 4, 8, 8), np.float32),
                      log_probs=np.zeros((3, 0), np.float32), timesteps=np.zeros(0, np.int64), images=images)
    actor = RewardActor.options(num_cpus=0.25).remote({"name": "clip_score", "deployment": "clip-score"})
    scored = ray_local.get(actor.score.remote(rollout))
    np.testing.assert_allclose(scored.scores, local.score.numpy(), rtol=1e-4, atol=1e-5)
    ray_local.kill(actor)
    wrong = RewardActor.options(num_cpus=0.25).remote({"name": "preference", "deployment": "clip-score"})
    with pytest.raises(Exception, match="serves 'clip_score'"):
        ray_local.get(wrong.score.remote(rollout))


def test_http_refuses_malformed_and_oversized_requests(served):
    _, url = served
    status, body = _post(url, b"{not json")
    assert status == 400 and "not JSON" in body["error"]
    status, body = _post(url, json.dumps({"prompts": ["a"], "arrays": [np.zeros((300, 8, 3), int).tolist()]}).encode())
    assert status == 413 and "limit" in body["error"]  # too large a body (300 KB limit)
    status, body = _post(url, json.dumps({"prompts": ["a"]}).encode())
    assert status == 400 and "exactly one of" in body["error"]


def test_autoscales_up_under_a_burst_and_back_down(served):
    from actors.serve import replica_counts

    _, url = served
    images, prompts = _samples(4)
    body = json.dumps({"prompts": prompts, "images": [_png(im) for im in images]}).encode()
    stop = threading.Event()
    statuses: list[int] = []

    def client():
        while not stop.is_set():
            statuses.append(_post(url, body)[0])

    assert replica_counts()["clip-score"] == 1
    threads = [threading.Thread(target=client, daemon=True) for _ in range(6)]
    for t in threads:
        t.start()
    deadline, peak = time.monotonic() + 120, 1
    try:
        while time.monotonic() < deadline and peak < 2:
            peak = max(peak, replica_counts().get("clip-score", 0))
            time.sleep(0.25)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert peak == 2, "no second replica within 120 s of sustained load"
    assert statuses and set(statuses) == {200}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and replica_counts().get("clip-score") != 1:
        time.sleep(0.5)
    assert replica_counts()["clip-score"] == 1, "did not scale back down within 120 s after the burst"
