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
def apps(ray_local):
    from ray import serve

    from actors.serve import deploy

    port = _free_port()
    cfg = parse_config(ServeConfig, {
        "http": {"host": "127.0.0.1", "port": port, "max_request_bytes": 300_000, "max_image_side": 256,
                 "body_timeout_s": 2.0, "request_timeout_s": 30.0},
        "deployments": [{
            "name": "clip-score", "reward": {"name": "clip_score"}, "max_batch_size": 4, "batch_wait_timeout_s": 0.05,
            "max_ongoing_requests": 4, "ray_actor_options": {"num_cpus": 0.25},
            # fast metrics and short delays so the test sees both scaling decisions within seconds
            "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 0.5,
                            "downscale_delay_s": 3, "metrics_interval_s": 0.2, "look_back_period_s": 1},
        }, {
            # a real reward that raises on cue, one replica whose batches gather every concurrent request
            "name": "flaky", "reward": {"name": "fault_injection", "inner": {"name": "colorfulness"},
                                        "raise_if_prompt_contains": "boom"},
            "max_batch_size": 8, "batch_wait_timeout_s": 1.0, "max_ongoing_requests": 8,
            "ray_actor_options": {"num_cpus": 0.25}, "autoscaling": {"min_replicas": 1, "max_replicas": 1},
        }],
    })
    cfg.validate_with_ray()
    routes = deploy(cfg)
    yield cfg, routes
    serve.shutdown()


@pytest.fixture(scope="module")
def served(apps):
    cfg, routes = apps
    return cfg, routes["clip-score"]


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
    for ref in (wrong.ready.remote(), wrong.score.remote(rollout)):  # refused at once, by a live actor
        with pytest.raises(Exception, match="serves 'clip_score'"):
            ray_local.get(ref, timeout=60)
    ray_local.kill(wrong)


def test_a_flow_model_training_job_scores_its_rollouts_on_the_reward_server(served, ralign_cli_inprocess, tmp_path):
    """`ralign train` on the flow policy (tiny-random-flow, GRPO) with `reward.deployment`: its reward actor is a
    client of the running application, and the job runs to the end on the served scores."""
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    config = Path(__file__).parent / "configs" / "tiny_train.yaml"
    out = tmp_path / "summary.json"
    result = ralign_cli_inprocess(
        "train", "--config", config, "--set", "model.pipeline=tiny-random-flow", "--set", "algorithm.name=grpo",
        "--set", "algorithm.grpo.group_size=2", "--set", "algorithm.grpo.skip_last_steps=1",
        "--set", "reward.name=clip_score", "--set", "reward.deployment=clip-score", "--set", "train.iterations=2",
        "--set", "train.eval.before_after=false", "--set", f"ray.storage_path={tmp_path / 'ray'}",
        "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--json", out)
    assert result.exit_code == 0, (result.output[-3000:], result.exception)
    summary = json.loads(out.read_text())
    assert summary["iterations"] == 2 and summary["ledger"]["balanced"] and summary["ledger"]["consumed"] == 2 * 4
    run = MlflowClient(summary["tracking_uri"]).get_run(summary["run_id"])
    assert run.data.params["reward.deployment"] == "clip-score" and run.data.params["model.pipeline"] == "tiny-random-flow"
    assert np.isfinite(run.data.metrics["reward_mean"]) and run.data.metrics["reward_mean"] != 0  # served scores, trained on


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


# ---- one bad client cannot break the server ------------------------------------------------------------------------

def _concurrently(url: str, bodies: list[bytes]) -> list[tuple[int, dict]]:
    results: list = [None] * len(bodies)

    def send(i):
        results[i] = _post(url, bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def _body(prompts, images) -> bytes:
    return json.dumps({"prompts": prompts, "images": [_png(im) for im in images]}).encode()


def test_one_failing_request_does_not_fail_its_batch(apps):
    """Seven concurrent requests merged into one batch; the reward raises on one of them: that one gets a 500 with
    a request id, the other six their single-request scores."""
    _, routes = apps
    url = routes["flaky"]
    images, prompts = _samples(7)
    singles = [_post(url, _body([prompts[i]], images[i:i + 1]))[1]["scores"][0] for i in range(6)]
    bodies = [_body([prompts[i]], images[i:i + 1]) for i in range(6)] + [_body(["a boom square"], images[6:7])]
    results = _concurrently(url, bodies)
    assert [status for status, _ in results] == [200] * 6 + [500]
    assert [body["scores"][0] for _, body in results[:6]] == pytest.approx(singles, rel=1e-5)
    failed = results[6][1]
    assert "InjectedRewardFailure" in failed["error"] and len(failed["request_id"]) == 12


def test_a_bad_prompt_in_a_concurrent_burst_is_refused_alone(served):
    _, url = served
    images, prompts = _samples(7)
    singles = [_post(url, _body([prompts[i]], images[i:i + 1]))[1]["scores"][0] for i in range(6)]
    bad = json.dumps({"prompts": ["a red \ud800 circle"], "images": [_png(images[6])]}).encode()
    results = _concurrently(url, [_body([prompts[i]], images[i:i + 1]) for i in range(6)] + [bad])
    assert [s for s, _ in results] == [200] * 6 + [400]
    assert [b["scores"][0] for _, b in results[:6]] == pytest.approx(singles, rel=1e-4, abs=1e-5)
    assert "lone surrogate U+D800" in results[6][1]["error"]


def test_images_of_other_sizes_are_brought_to_the_models_input(served):
    """128x128 and 32x32 images are resized the way the reward model's own preprocessing does (scored like the
    in-process reward on the same images); too small or too large ones are refused, naming the limit."""
    from ralign.rewards.registry import build_reward

    _, url = served
    reward = build_reward({"name": "clip_score"})
    images, prompts = _samples(2)
    big = np.kron(images[0], np.ones((2, 2, 1), np.uint8))  # 128 x 128
    small = images[1][::2, ::2]  # 32 x 32
    status, body = _post(url, _body(prompts, [big, small]))  # mixed sizes in one request
    assert status == 200
    with torch.no_grad():
        expected = [float(reward(torch.from_numpy(im).permute(2, 0, 1)[None].float() / 255.0, [p]).score[0])
                    for im, p in ((big, prompts[0]), (small, prompts[1]))]
    assert body["scores"] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    status, body = _post(url, _body(["a"], [np.zeros((1, 1, 3), np.uint8)]))
    assert status == 400 and "at least 8 pixels a side" in body["error"]
    status, body = _post(url, json.dumps({"prompts": ["a"], "arrays": [np.zeros((2, 2, 3), int).tolist()]}).encode())
    assert status == 400 and "at least 8 pixels a side" in body["error"]
    status, body = _post(url, _body(["a"], [np.zeros((300, 300, 3), np.uint8)]))
    assert status == 413 and "limit is 256 per side" in body["error"]


def test_only_rgb_pngs_are_images(served):
    from PIL import Image

    _, url = served
    image = _samples(1)[0][0]
    for mode, fmt, message in (("RGBA", "PNG", "mode RGBA"), ("RGB", "JPEG", "is JPEG"), ("I;16", "PNG", "mode I;16")):
        buf = io.BytesIO()
        pil = Image.fromarray(image).convert("RGBA") if mode == "RGBA" else Image.fromarray(image)
        if mode == "I;16":
            pil = Image.fromarray((image[..., 0].astype(np.uint16) * 256))
        pil.save(buf, format=fmt)
        status, body = _post(url, json.dumps({"prompts": ["a red circle"], "images": [base64.b64encode(buf.getvalue()).decode()]}).encode())
        assert status == 415 and message in body["error"], (mode, fmt, body)


def test_prompts_follow_the_one_prompt_rule(served):
    _, url = served
    image = _samples(1)[0][0]
    for prompt, message in (("a red\\ncircle", "U+000A"), ("a red\u007fcircle", "U+007F"), ("a red\u0085circle", "U+0085"),
                            ("a \u202ered circle", "U+202E")):
        status, body = _post(url, _body([prompt.replace("\\n", "\n")], [image]))
        assert status == 400 and message in body["error"] and "control character" in body["error"], prompt


def test_deeply_nested_json_is_refused_without_recursion(served):
    _, url = served
    status, body = _post(url, b"[" * 100_000)
    assert status == 400 and "nests 100000 levels deep" in body["error"]


def test_stalled_clients_release_their_slots(served, apps):
    """As many clients as the replica's max_ongoing_requests declare a longer body than they send: each is closed
    with 408 at the body deadline, and a valid request meanwhile is answered before its client gives up."""
    cfg, _ = apps
    _, url = served
    host, port = "127.0.0.1", cfg.http.port
    images, prompts = _samples(1)
    valid = _body(prompts, images)
    stalled = []
    for _ in range(4):
        s = socket.create_connection((host, port), timeout=30)
        s.sendall(f"POST /clip-score HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(valid) + 100}\r\n\r\n".encode() + valid)
        stalled.append(s)
    # The client's own timeout bounds a hang (slots never released); it is not a speed claim.
    status, _ = _post(url, valid, timeout=cfg.http.body_timeout_s + 15)
    assert status == 200
    for s in stalled:
        reply = s.recv(4096).decode(errors="replace")
        assert reply.startswith("HTTP/1.1 408"), reply[:200]
        s.close()


def test_bounded_fuzz_never_gets_a_server_error(served):
    """300 malformed bodies (types, nesting, encodings, sizes, truncated and lying headers), loopback only: no 5xx,
    and a valid request afterwards scores as before."""
    _, url = served
    cfg_port = int(url.split(":")[2].split("/")[0])
    rng = np.random.default_rng(0)
    images, prompts = _samples(1)
    valid = _body(prompts, images)
    before = _post(url, valid)[1]["scores"]
    pieces = [b"{", b"}", b"[", b"]", b'"prompts"', b'"images"', b'"arrays"', b":", b",", b"null", b"1e309", b"-1",
              b'"\\ud800"', b'"\\u0000"', b"\xff\xfe", b'"iVBORw0KGgo="', b"true", b"[[[[1,2,3]]]]", b'"' + b"a" * 5000 + b'"']
    statuses = []
    for i in range(300):
        kind = i % 3
        if kind == 0:  # random token soup
            body = b"".join(pieces[j] for j in rng.integers(0, len(pieces), rng.integers(1, 40)))
        elif kind == 1:  # a valid body, cut or with bytes flipped
            body = bytearray(valid[: rng.integers(1, len(valid))])
            for j in rng.integers(0, len(body), 3):
                body[j] = int(rng.integers(0, 256))
            body = bytes(body)
        else:  # well-formed JSON of the wrong types
            body = json.dumps({"prompts": [int(rng.integers(0, 9))] if rng.random() < 0.5 else ["a"] * int(rng.integers(0, 3)),
                               "images": [str(rng.random())] if rng.random() < 0.5 else [[1, 2]]}).encode()
        if i % 25 == 24:  # a lying short Content-Length over a raw socket
            with socket.create_connection(("127.0.0.1", cfg_port), timeout=30) as s:
                s.sendall(f"POST /clip-score HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n".encode() + body)
                reply = s.recv(4096).decode(errors="replace")
            statuses.append(int(reply.split(" ")[1]) if reply.startswith("HTTP/1.1") else 0)
            continue
        statuses.append(_post(url, body, timeout=60)[0])
    assert statuses and all(s < 500 for s in statuses), sorted(set(statuses))
    assert _post(url, valid)[1]["scores"] == pytest.approx(before, rel=1e-6)


def test_generate_refuses_bytes_that_are_not_utf8_in_one_line(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "generate", "--prompt", b"a red \xff circle", "--out",
                           str(tmp_path / "out")], capture_output=True, timeout=300)
    err = proc.stderr.decode(errors="replace").strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and "lone surrogate" in err[0], err[-5:]
    assert not (tmp_path / "out").exists()
