"""`ralign diagnose reward`: can this reward drive training on this family? Measured before spending a cluster on RL.

For held-out prompts of each family, N images per prompt are sampled from the policy with the training sampler, then
scored by the reward and judged by the oracle. Per family (each with a 95 % interval, bootstrap over prompts):
- `random`: the all-correct rate of one sampled image (the policy as it is);
- `reward_best_of_n`: the all-correct rate of the image the reward ranks first (what RL can at best distil);
- `oracle_best_of_n`: the rate at which any of the N is correct (the ceiling of best-of-N);
- `pairwise_accuracy`: how often the reward ranks a correct image above an incorrect one of the same prompt (0.5 is
  chance; prompts whose images are all correct or all wrong have no pairs and are left out);
- `verdict_agreement` (rewards with a verdict of their own, an `all_correct` component, as GenEval-style ones have):
  how often that verdict equals the oracle's, per image (interval over prompts).
The oracle only measures here; the reward never sees it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ralign.config import UserError

log = logging.getLogger(__name__)


def family_summary(rewards: np.ndarray, correct: np.ndarray, verdicts: np.ndarray | None = None) -> dict:
    """rewards, correct (and the reward's own verdicts, if it has them): (prompts, N). The rates above with their
    intervals."""
    from ralign.world.stats import pairwise_accuracy, rate_with_interval

    picked = correct[np.arange(len(rewards)), rewards.argmax(axis=1)]
    pairs = [pairwise_accuracy(r, c) for r, c in zip(rewards, correct)]
    defined = [acc for acc, n in pairs if n]
    out = {
        "prompts": int(len(rewards)), "samples_per_prompt": int(rewards.shape[1]),
        "random": rate_with_interval(correct.mean(axis=1)),
        "reward_best_of_n": rate_with_interval(picked.astype(float)),
        "oracle_best_of_n": rate_with_interval(correct.any(axis=1).astype(float)),
        "pairwise_accuracy": rate_with_interval(defined) if defined else {"rate": None, "ci": None, "n": 0},
    }
    out["pairwise_accuracy"]["pairs"] = int(sum(n for _, n in pairs))
    if verdicts is not None:
        out["verdict_agreement"] = rate_with_interval((verdicts.astype(bool) == correct).mean(axis=1))
    return out


def _reward_of(reward_name: str, options: dict, deployment: str | None, device: str):
    from ralign.rewards.registry import build_reward, needs_chain_inputs, reward_names

    if reward_name not in reward_names():
        raise UserError(f"--reward {reward_name!r} is not a known reward; expected one of {reward_names()}")
    chain_terms = needs_chain_inputs(reward_name, options)
    if chain_terms:
        raise UserError(f"reward term(s) {chain_terms} score a training chain's cross-attention or latents, which "
                        "diagnose does not give them; diagnose the other terms, or the reward without them")
    if deployment:
        from actors.serve import ServedReward

        return ServedReward(deployment, expected_reward=reward_name)
    try:
        return build_reward({"name": reward_name, **options, "device": device})
    except TypeError as exc:
        raise UserError(f"--options for {reward_name}: {exc}") from None


def sample_and_judge(policy, reward, prompts: Sequence[str], n_samples: int, seed: int, batch: int = 64
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(rewards, correct, verdicts), each (len(prompts), n_samples): the training sampler's images of every prompt;
    `verdicts` is the reward's own `all_correct` component, None when it has none."""
    from ralign.diffusion.seeding import sample_seed
    from ralign.world import oracle

    flat = [(i, p) for i, p in enumerate(prompts) for _ in range(n_samples)]
    rewards, correct = np.zeros(len(flat)), np.zeros(len(flat), dtype=bool)
    verdicts: np.ndarray | None = None
    for lo in range(0, len(flat), batch):
        chunk = flat[lo: lo + batch]
        chunk_prompts = [p for _, p in chunk]
        seeds = [sample_seed(seed, lo + j) for j in range(len(chunk))]
        with torch.no_grad():
            traj = policy.sample(chunk_prompts, seeds)
            out = reward(traj.images, chunk_prompts)
        images = (traj.images.permute(0, 2, 3, 1).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        rewards[lo: lo + len(chunk)] = out.score.float().cpu().numpy()
        if "all_correct" in out.components:
            verdicts = np.zeros(len(flat)) if verdicts is None else verdicts
            verdicts[lo: lo + len(chunk)] = out.components["all_correct"].float().cpu().numpy()
        correct[lo: lo + len(chunk)] = [oracle.judge(p, im).all_correct for p, im in zip(chunk_prompts, images)]
    bad = ~np.isfinite(rewards)
    if bad.any():
        raise UserError(f"the reward returned {int(bad.sum())} non-finite score(s) of {len(rewards)}; a reward that "
                        "does that cannot rank images")
    shape = (len(prompts), n_samples)
    return rewards.reshape(shape), correct.reshape(shape), None if verdicts is None else verdicts.reshape(shape)


def diagnose_reward(*, reward_name: str, options: dict | None = None, deployment: str | None = None,
                    families: Sequence[str], prompts: int, samples: int, split: str = "test", seed: int = 0,
                    pipeline: str = "base", checkpoint: str | None = None, tracking_uri: str | None = None,
                    policy_settings: dict | None = None) -> dict:
    """The diagnosis of one reward on one policy (the base model, or a trained checkpoint)."""
    from ralign.world.evaluation import eval_prompts
    from ralign.world.prompts import FAMILIES, SPLITS

    if samples < 2:
        raise UserError(f"--samples {samples}: ranking needs at least 2 images per prompt")
    if prompts < 1:
        raise UserError(f"--prompts {prompts}: at least one prompt per family")
    if not families:
        raise UserError("--families is empty; name at least one of " + ", ".join(FAMILIES))
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise UserError(f"unknown famil{'y' if len(unknown) == 1 else 'ies'} {unknown}; expected some of {list(FAMILIES)}")
    if split not in SPLITS:
        raise UserError(f"--split {split!r}: expected one of {list(SPLITS)}")
    settings = {"steps": 10, "eta": 1.0, "guidance": 3.0, **(policy_settings or {})}
    policy = _policy(pipeline, checkpoint, tracking_uri, settings)
    reward = _reward_of(reward_name, dict(options or {}), deployment, "cpu")
    start = time.time()
    by_family = eval_prompts(split, prompts, seed, families)
    result = {"reward": reward_name, "options": options or {}, "deployment": deployment, "split": split, "seed": seed,
              "pipeline": pipeline if checkpoint is None else None, "checkpoint": checkpoint,
              "sampler": {k: getattr(policy.cfg, k) for k in ("steps", "eta", "guidance")}, "families": {}}
    for fam, fam_samples in by_family.items():
        t0 = time.time()
        rewards, correct, verdicts = sample_and_judge(policy, reward, [s.prompt for s in fam_samples], samples, seed)
        result["families"][fam] = family_summary(rewards, correct, verdicts)
        log.info("diagnose %s: %s done in %.0fs", reward_name, fam, time.time() - t0)
    result["wall_s"] = round(time.time() - start, 1)
    return result


def _policy(pipeline: str, checkpoint: str | None, tracking_uri: str | None, settings: dict):
    from ralign.diffusion.policy import build_policy, policy_from_checkpoint

    if checkpoint is None:
        return build_policy({"pipeline": pipeline, "policy": {"unet_lora_rank": 0, **settings}})
    from ralign.models.weights import read_json
    from ralign.ops.model_registry import local_checkpoint

    with local_checkpoint(checkpoint, tracking_uri) as local:
        spec = read_json(Path(local) / "learner_state.json", f"{checkpoint}/learner_state.json").get("policy_spec") or {}
        if pipeline != "base" and spec.get("pipeline") != pipeline:
            raise UserError(f"{checkpoint} was trained on base model {spec.get('pipeline')!r}, not --pipeline {pipeline!r}")
        return policy_from_checkpoint(local, source=checkpoint, **settings)


def markdown_table(result: dict) -> str:
    def cell(m: dict) -> str:
        if m.get("rate") is None:
            return "–"
        return f"{m['rate']:.2f} [{m['ci'][0]:.2f}, {m['ci'][1]:.2f}]"

    verdict = all("verdict_agreement" in m for m in result["families"].values())

    lines = [f"`{result['reward']}` on {result['checkpoint'] or result['pipeline']} (sampler: {result['sampler']}), held-out "
             f"`{result['split']}` prompts",
             "", "| family | prompts × images | random image | reward's best-of-N | oracle's best-of-N | pairwise accuracy |"
             + (" verdict = oracle's |" if verdict else ""), "|---|---|---|---|---|---|" + ("---|" if verdict else "")]
    for fam, m in result["families"].items():
        lines.append(f"| {fam} | {m['prompts']} × {m['samples_per_prompt']} | {cell(m['random'])} | {cell(m['reward_best_of_n'])} | "
                     f"{cell(m['oracle_best_of_n'])} | {cell(m['pairwise_accuracy'])} |"
                     + (f" {cell(m['verdict_agreement'])} |" if verdict else ""))
    return "\n".join(lines)


def log_to_mlflow(result: dict, tracking_uri: str, experiment: str = "ralign-diagnose") -> str:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    run_id = client.create_run(exp_id, run_name=f"diagnose-{result['reward']}").info.run_id
    for key in ("reward", "split", "seed", "pipeline", "checkpoint"):
        client.log_param(run_id, key, str(result[key]))
    metrics = []
    now = int(time.time() * 1000)
    for fam, m in result["families"].items():
        for name in ("random", "reward_best_of_n", "oracle_best_of_n", "pairwise_accuracy", "verdict_agreement"):
            if name in m and m[name]["rate"] is not None:
                metrics.append(Metric(f"{fam}/{name}", m[name]["rate"], now, 0))
    client.log_batch(run_id, metrics=metrics)
    client.log_text(run_id, json.dumps(result, indent=2), "diagnose.json")
    client.set_terminated(run_id)
    return run_id
