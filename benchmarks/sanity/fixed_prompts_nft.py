"""Sanity check of a DiffusionNFT update (forward process, implicit positive / negative policies), as a hand loop with
plain AdamW on the policy's LoRA (it predates ralign/algorithms/nft.py, which makes the same update through the
learner): 4 fixed `train` prompts x 16 samples per iteration, as fixed_prompts_grpo.py. Results:
benchmarks/results/fixed_prompt_sanity.json.

    python benchmarks/sanity/fixed_prompts_nft.py LR BETA ITERATIONS REWARD FAMILY [KL_WEIGHT]
"""
import sys, time, json
import numpy as np, torch
torch.set_num_threads(2)
from ralign.diffusion.policy import build_policy
from ralign.diffusion.seeding import seed_lora_init
from ralign.rewards.registry import build_reward
from ralign.world import oracle, prompts as P

lr, nft_beta, iters, RW = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
fam = sys.argv[5] if len(sys.argv) > 5 else "spatial"
kl_beta = float(sys.argv[6]) if len(sys.argv) > 6 else 0.0
G, NP, MB, EPOCHS = 16, 4, 16, 1
seed_lora_init()
policy = build_policy({"pipeline": "base", "policy": {"unet_lora_rank": 8, "steps": 10, "eta": 1.0, "guidance": 3.0}})
params = policy.trainable_parameters()
opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
reward = build_reward({"name": "detector"})
ps = [s.prompt for s in P.generate(fam, NP, split="train", seed=7)]
prompts = [p for p in ps for _ in range(G)]
acp = policy.scheduler.alphas_cumprod
gen = torch.Generator().manual_seed(0)
for it in range(iters):
    t0 = time.time()
    seeds = [it * 1000 + j for j in range(len(prompts))]
    with torch.no_grad():
        traj = policy.sample(prompts, seeds)
        out = reward(traj.images, prompts)
    imgs = (traj.images.permute(0, 2, 3, 1).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    ora = np.mean([oracle.judge(p, im).all_correct for p, im in zip(prompts, imgs)])
    if RW == "random":
        scores = torch.randn(len(prompts))
    else:
        scores = out.score.float()
    sg = scores.view(NP, G)
    adv = ((sg - sg.mean(1, keepdim=True)) / (sg - sg.mean(1, keepdim=True)).std().clamp_min(1e-4)).flatten().clamp(-2, 2)
    r = (adv / 2 / 2 + 0.5).clamp(0, 1)
    x0 = traj.latents[:, -1]
    n = len(prompts)
    t = torch.randint(0, 1000, (n,), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    a = acp[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    with torch.no_grad():
        cond_all, _ = policy.encode(prompts)
        old = torch.cat([policy.unet(xt[i:i+MB], t[i:i+MB], encoder_hidden_states=cond_all[i:i+MB]).sample for i in range(0, n, MB)])
        if kl_beta > 0:
            with policy.reference():
                ref = torch.cat([policy.unet(xt[i:i+MB], t[i:i+MB], encoder_hidden_states=cond_all[i:i+MB]).sample for i in range(0, n, MB)])
    stats = []
    for ep in range(EPOCHS):
        order = torch.randperm(n, generator=gen)
        for lo in range(0, n, MB):
            idx = order[lo:lo+MB]
            cur = policy.unet(xt[idx], t[idx], encoder_hidden_states=cond_all[idx]).sample
            pos = nft_beta * cur + (1 - nft_beta) * old[idx]
            neg = (1 + nft_beta) * old[idx] - nft_beta * cur
            pl = (pos - eps[idx]).pow(2).flatten(1).mean(1)
            nl = (neg - eps[idx]).pow(2).flatten(1).mean(1)
            loss = (r[idx] * pl + (1 - r[idx]) * nl).mean() / nft_beta
            if kl_beta > 0:
                loss = loss + kl_beta * (cur - ref[idx]).pow(2).mean()
            opt.zero_grad(); loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step(); stats.append(float(gn))
    print(json.dumps({"it": it, "reward": round(float(out.score.mean()), 3), "det_ok": round(float(out.components['all_correct'].float().mean()), 3),
                      "oracle": round(float(ora), 3), "gn": round(np.mean(stats), 4), "s": round(time.time() - t0, 1)}), flush=True)
