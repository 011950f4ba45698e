"""`ralign sft`: a supervised fine-tuning stage (ralign/algorithms/sft.py) that writes a checkpoint a training
config can start from (`model.init_checkpoint`). LongAlign uses it to adapt the UNet to segment-level encoding
before preference optimisation.

Runs in one process (no rollouts, no rewards: just (prompt, render) pairs from the toy world's `train` split), logs
the loss to MLflow, and writes the checkpoint atomically (a crash leaves no half-written directory).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from ralign.config import ConfigError
from ralign.training.config import SFTConfig

log = logging.getLogger(__name__)


def run_sft(cfg: SFTConfig) -> dict:
    import mlflow
    from ralign.algorithms.sft import sft_loss
    from ralign.diffusion.policy import build_policy
    from ralign.world.data import render_samples, sample_stream

    if cfg.family_weights is not None and len(cfg.family_weights) != len(cfg.families):
        raise ConfigError(f"family_weights has {len(cfg.family_weights)} entries for {len(cfg.families)} families")
    torch.manual_seed(cfg.seed)
    policy = build_policy(cfg.policy_spec())
    params = policy.trainable_parameters()
    if not params:
        raise ConfigError("nothing to train: model.policy has no LoRA rank and a frozen text encoder")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    stream = sample_stream(cfg.batch_size, seed=cfg.seed + 17, split=cfg.split, families=cfg.families, family_weights=cfg.family_weights)
    generator = torch.Generator().manual_seed(cfg.seed)
    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    mlflow.set_experiment(cfg.tracking.experiment)
    losses: list[float] = []
    start = time.time()
    with mlflow.start_run(run_name=cfg.tracking.run_name or "sft") as run:
        mlflow.log_dict(cfg.model_dump(mode="json"), "sft_config.json")
        policy.unet.train()
        for step in range(1, cfg.steps + 1):
            samples = next(stream)
            loss = sft_loss(policy, render_samples(samples), [s.prompt for s in samples], generator, cfg.caption_dropout, cfg.distill_weight)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if step % cfg.log_every == 0 or step == cfg.steps:
                recent = sum(losses[-cfg.log_every:]) / len(losses[-cfg.log_every:])
                mlflow.log_metric("sft_loss", recent, step=step)
                elapsed = time.time() - start
                log.info("sft step %d/%d loss %.4f  %.1fs left", step, cfg.steps, recent, elapsed / step * (cfg.steps - step))
        policy.unet.eval()
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".sft_", dir=out.parent))
        save_file({k: v.contiguous() for k, v in policy.trainable_state().items()}, str(tmp / "trainable.safetensors"))
        spec = cfg.policy_spec()
        spec.pop("init_checkpoint", None)  # the saved weights already include what it started from
        summary = {"version": 0, "iteration": 0, "policy_spec": spec, "sft": {"steps": cfg.steps, "final_loss": sum(losses[-50:]) / len(losses[-50:]),
                   "wall_s": round(time.time() - start, 1), "run_id": run.info.run_id}}
        (tmp / "learner_state.json").write_text(json.dumps(summary, indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        mlflow.log_artifacts(str(out), "checkpoint")
    log.info("sft: wrote %s (final loss %.4f, %.0fs)", out, summary["sft"]["final_loss"], summary["sft"]["wall_s"])
    return {"checkpoint": str(out), **summary["sft"]}
