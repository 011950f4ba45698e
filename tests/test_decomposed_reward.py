"""LongAlign's decomposed preference reward on the toy preference model."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ralign.rewards.clip_score import PreferenceReward
from ralign.rewards.decomposed import DecomposedPreferenceReward
from ralign.rewards.registry import build_reward
from ralign.world.data import render_samples
from ralign.world.prompts import generate

SHORT = generate("binding", 6, split="test", seed=3)
LONG = generate("long", 4, split="test", seed=3)


def test_w_one_is_the_plain_preference_score_and_parts_add_up():
    images01 = render_samples(SHORT) / 2 + 0.5  # renders come in [-1, 1]; rewards take [0, 1]
    prompts = [s.prompt for s in SHORT]
    plain = PreferenceReward()(images01, prompts).score
    full = DecomposedPreferenceReward(w=1.0)(images01, prompts)
    assert torch.allclose(full.score, plain, atol=1e-5)
    c = full.components
    assert torch.allclose(c["text_relevant"] + c["text_irrelevant"], plain, atol=1e-5)
    reweighted = DecomposedPreferenceReward(w=0.3)(images01, prompts)
    assert torch.allclose(reweighted.score, c["text_relevant"] + 0.3 * c["text_irrelevant"], atol=1e-5)


def test_reweighting_removes_the_batch_mean_text_direction():
    reward = DecomposedPreferenceReward(w=0.0)
    prompts = [s.prompt for s in SHORT]
    t = reward.text_embeddings(prompts)
    v = F.normalize(t.mean(0), dim=-1)
    t_prime = t - (t @ v)[:, None] * v
    assert torch.allclose(t_prime @ v, torch.zeros(len(prompts)), atol=1e-6)  # w = 0: nothing left along v


def test_long_prompts_are_scored_by_their_sentences_and_gradients_reach_the_images():
    reward = build_reward({"name": "decomposed_preference", "w": 0.3})
    prompts = [s.prompt for s in LONG]
    t = reward.text_embeddings(prompts)
    # LongAlign's mean of normalised sentence embeddings, not renormalised: shorter than 1 when sentences differ
    assert t.shape[0] == len(prompts) and (t.norm(dim=-1) < 1 - 1e-3).all()
    renormalised = build_reward({"name": "decomposed_preference", "renormalise_segments": True}).text_embeddings(prompts)
    assert torch.allclose(renormalised, t / t.norm(dim=-1, keepdim=True), atol=1e-5)
    # Not the single truncated pass the plain score makes (the preference model's context is 32 tokens).
    from ralign.models.reward_clip import encode_texts

    one_pass = encode_texts(reward.model, reward.tokenizer, prompts)
    assert not torch.allclose(t, one_pass, atol=1e-3)
    images = torch.rand(len(prompts), 3, 64, 64, requires_grad=True)
    out = reward(images, prompts)
    out.score.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert set(out.components) == {"text_relevant", "text_irrelevant", "preference"}


def _gather_worker(rank: int, world: int, port: int, queue) -> None:
    import os

    import torch.distributed as dist

    from ralign.rewards.decomposed import global_mean

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = torch.full((rank + 1, 3), float(rank))  # rank 0: one row of 0s; rank 1: two rows of 1s
    queue.put((rank, (global_mean(rows, "rows").tolist(), global_mean(rows, "process_means").tolist())))
    dist.destroy_process_group()


def test_text_direction_is_averaged_over_every_learner_worker():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_gather_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert results[0] == results[1]  # the same on both ranks
    by_rows, by_process = results[0]
    assert all(abs(a - 2 / 3) < 1e-6 for a in by_rows)  # (0 + 1 + 1) / 3 rows
    assert all(abs(a - 0.5) < 1e-6 for a in by_process)  # (0 + 1) / 2 process means, as LongAlign gathers
