"""Pretraining of the toy text-to-image model: text CLIP -> VAE -> UNet, assembled as a StableDiffusionPipeline.

The order mirrors how Stable Diffusion was built: a CLIP trained contrastively provides the (then frozen) text
encoder, an autoencoder provides the latent space, and the UNet learns denoising in that space conditioned on the
text encoder's last hidden states, with 10 % of captions dropped for classifier-free guidance.
Training data are renders of prompts of every family and every colour-shape combination (split `all`): the base
model plays the part of a web-pretrained model that has seen everything; the RL splits hold combinations out later.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import EMAModel

from transformers import CLIPModel

from ralign.models import toy_t2i
from ralign.pretrain.common import Progress, cosine_lr, descend, parameter_count
from ralign.models.tokenizer import build_word_tokenizer
from ralign.world.data import render_samples, sample_stream
from ralign.world.prompts import FAMILIES, generate

log = logging.getLogger(__name__)


@dataclass
class T2IPretrainConfig:
    seed: int = 0
    clip_steps: int = 800
    clip_batch: int = 64
    clip_lr: float = 5e-4
    vae_steps: int = 1500
    vae_batch: int = 16
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 3000
    unet_batch: int = 64
    unet_lr: float = 5e-4
    unet_ema_decay: float = 0.999
    cfg_drop: float = 0.1  # fraction of captions replaced by "" so the model also learns the unconditional score
    log_every: int = 100
    snapshot_every: int = 500
    # Warm start: a UNet directory (diffusers format) to continue from instead of a random init, so pretraining can
    # be spread over several sessions on a small machine (each run's EMA weights are the next run's start).
    unet_init: str | None = None
    threads: int = 2


def tokenize(tokenizer, prompts: list[str]) -> dict[str, torch.Tensor]:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")


def train_text_clip(cfg: T2IPretrainConfig, tokenizer) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(cfg.seed)
    model = toy_t2i.text_clip(len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.clip_lr, weight_decay=0.1)
    sched = cosine_lr(opt, cfg.clip_steps)
    stream = sample_stream(cfg.clip_batch, seed=cfg.seed + 1)
    progress = Progress("text-clip", cfg.clip_steps, cfg.log_every)
    model.train()
    for i in range(cfg.clip_steps):
        batch = next(stream)
        # Duplicate prompts in one batch would be false negatives for the contrastive loss; keep the first of each.
        seen, unique = set(), []
        for s in batch:
            if s.prompt not in seen:
                seen.add(s.prompt)
                unique.append(s)
        enc = tokenize(tokenizer, [s.prompt for s in unique])
        out = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=render_samples(unique), return_loss=True)
        progress.step(i, descend(out.loss, model.parameters(), opt, sched))
    model.eval()
    metrics = {"steps": cfg.clip_steps, "batch": cfg.clip_batch, "wall_s": round(progress.wall_s, 1), "params": parameter_count(model)}
    metrics.update(evaluate_text_clip(model, tokenizer))
    return model, metrics


@torch.no_grad()
def evaluate_text_clip(model, tokenizer, n: int = 64, seed: int = 123) -> dict:
    """Image->text retrieval top-1 among n held-out prompts per family (chance = 1/n)."""
    out = {}
    for fam in FAMILIES:
        samples = generate(fam, n, split="test", seed=seed)
        enc = tokenize(tokenizer, [s.prompt for s in samples])
        img = F.normalize(model.get_image_features(pixel_values=render_samples(samples)).pooler_output, dim=-1)
        txt = F.normalize(model.get_text_features(input_ids=enc.input_ids, attention_mask=enc.attention_mask).pooler_output, dim=-1)
        sims = img @ txt.T
        # Identical prompt strings count as correct: they describe the image equally well.
        prompts = [s.prompt for s in samples]
        hits = [prompts[int(sims[i].argmax())] == prompts[i] for i in range(n)]
        out[f"retrieval_top1_{fam}"] = round(float(np.mean(hits)), 3)
    return out


def train_vae(cfg: T2IPretrainConfig) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(cfg.seed)
    vae = toy_t2i.vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = cosine_lr(opt, cfg.vae_steps)
    stream = sample_stream(cfg.vae_batch, seed=cfg.seed + 2)
    progress = Progress("vae", cfg.vae_steps, cfg.log_every)
    vae.train()
    for i in range(cfg.vae_steps):
        x = render_samples(next(stream))
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        # L1 keeps flat colours exact; MSE punishes the rare large error (a missing corner of a triangle) harder.
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + cfg.vae_kl_weight * posterior.kl().mean()
        progress.step(i, descend(loss, vae.parameters(), opt, sched))
    vae.eval()
    metrics = {"steps": cfg.vae_steps, "batch": cfg.vae_batch, "wall_s": round(progress.wall_s, 1), "params": parameter_count(vae)}
    metrics.update(_calibrate_vae(vae, cfg.seed))
    return vae, metrics


@torch.no_grad()
def _calibrate_vae(vae, seed: int) -> dict:
    """Set `scaling_factor` so that scaled latents have unit variance (SD1.5's 0.18215 was found the same way)."""
    samples = next(sample_stream(256, seed=seed + 99, split="test"))
    x = render_samples(samples)
    latents = vae.encode(x).latent_dist.mean
    recon = vae.decode(latents).sample
    mse = F.mse_loss(recon, x).item()
    psnr = 10 * math.log10(4.0 / mse)  # signal range is [-1, 1], peak-to-peak 2
    scale = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scale)
    return {"recon_psnr_db": round(psnr, 2), "scaling_factor": round(scale, 5)}


def train_unet(cfg: T2IPretrainConfig, tokenizer, text_encoder, vae, snapshot_dir: Path | None = None) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(cfg.seed)
    if cfg.unet_init:
        unet = UNet2DConditionModel.from_pretrained(cfg.unet_init, use_safetensors=True)
        log.info("unet: continuing from %s", cfg.unet_init)
    else:
        unet = toy_t2i.unet()
    noise_scheduler = toy_t2i.train_scheduler()
    ema = EMAModel(unet.parameters(), decay=cfg.unet_ema_decay, model_cls=type(unet), model_config=unet.config)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=0.0)
    sched = cosine_lr(opt, cfg.unet_steps, warmup=200)
    stream = sample_stream(cfg.unet_batch, seed=cfg.seed + 3)
    rng = np.random.default_rng(cfg.seed + 4)
    progress = Progress("unet", cfg.unet_steps, cfg.log_every)
    text_encoder.requires_grad_(False)
    vae.requires_grad_(False)
    unet.train()
    for i in range(cfg.unet_steps):
        samples = next(stream)
        prompts = ["" if rng.random() < cfg.cfg_drop else s.prompt for s in samples]
        with torch.no_grad():
            latents = vae.encode(render_samples(samples)).latent_dist.sample() * vae.config.scaling_factor
            context = text_encoder(tokenize(tokenizer, prompts).input_ids).last_hidden_state
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],))
        noisy = noise_scheduler.add_noise(latents, noise, t)
        loss = F.mse_loss(unet(noisy, t, context).sample, noise)
        loss_value = descend(loss, unet.parameters(), opt, sched)
        ema.step(unet.parameters())
        progress.step(i, loss_value)
        if snapshot_dir is not None and (i + 1) % cfg.snapshot_every == 0:
            # EMA weights so far: a long run that has to stop early still leaves a usable model.
            ema.store(unet.parameters())
            ema.copy_to(unet.parameters())
            unet.save_pretrained(snapshot_dir / f"unet_step{i + 1}")
            ema.restore(unet.parameters())
    ema.copy_to(unet.parameters())
    unet.eval()
    metrics = {"steps": cfg.unet_steps, "batch": cfg.unet_batch, "wall_s": round(progress.wall_s, 1), "params": parameter_count(unet)}
    metrics["final_loss"] = round(float(np.mean(progress.losses[-200:])), 4)
    return unet, metrics


def assemble_pipeline(tokenizer, text_encoder, vae, unet) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=toy_t2i.sample_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


STAGE_FILE = "stage_metrics.json"


def _mark_stage(path: Path, cfg: T2IPretrainConfig, metrics: dict) -> None:
    (path / STAGE_FILE).write_text(json.dumps({"config": asdict(cfg), "metrics": metrics}))


def _finished_stage(path: Path, cfg: T2IPretrainConfig) -> dict | None:
    """Metrics of a stage finished earlier with the same config, else None (then it is trained again)."""
    try:
        record = json.loads((path / STAGE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record["metrics"] if record.get("config") == asdict(cfg) else None


def pretrain_t2i(out_dir: str | Path, cfg: T2IPretrainConfig) -> dict:
    """Train all three parts and save `out_dir/pipeline` (diffusers format) and `out_dir/text_clip` (full CLIP)."""
    torch.set_num_threads(cfg.threads)
    out_dir = Path(out_dir)
    tokenizer = build_word_tokenizer()
    # Each finished stage is saved at once and reused by a re-run into the same directory, so a crash in a later
    # stage does not cost the earlier ones.
    if _finished_stage(out_dir / "text_clip", cfg):
        clip = CLIPModel.from_pretrained(out_dir / "text_clip", use_safetensors=True).eval()
        clip_metrics = _finished_stage(out_dir / "text_clip", cfg)
        log.info("text clip: reusing %s", out_dir / "text_clip")
    else:
        clip, clip_metrics = train_text_clip(cfg, tokenizer)
        log.info("text clip: %s", clip_metrics)
        clip.save_pretrained(out_dir / "text_clip")
        tokenizer.save_pretrained(out_dir / "text_clip")
        _mark_stage(out_dir / "text_clip", cfg, clip_metrics)
    if _finished_stage(out_dir / "vae", cfg):
        vae = AutoencoderKL.from_pretrained(out_dir / "vae", use_safetensors=True).eval()
        vae_metrics = _finished_stage(out_dir / "vae", cfg)
        log.info("vae: reusing %s", out_dir / "vae")
    else:
        vae, vae_metrics = train_vae(cfg)
        log.info("vae: %s", vae_metrics)
        vae.save_pretrained(out_dir / "vae")
        _mark_stage(out_dir / "vae", cfg, vae_metrics)
    text_encoder = _text_tower(clip)
    unet, unet_metrics = train_unet(cfg, tokenizer, text_encoder, vae, snapshot_dir=out_dir / "snapshots")
    log.info("unet: %s", unet_metrics)
    pipe = assemble_pipeline(tokenizer, text_encoder, vae, unet)
    pipe.save_pretrained(out_dir / "pipeline")
    metrics = {"config": asdict(cfg), "text_clip": clip_metrics, "vae": vae_metrics, "unet": unet_metrics}
    (out_dir / "pretrain_metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def continue_unet(pipeline_dir: str | Path, out_dir: str | Path, cfg: T2IPretrainConfig) -> dict:
    """Train the UNet of an existing toy pipeline for `cfg.unet_steps` more steps; text encoder and VAE stay as they are.

    Pretraining on 2 cores is spread over sessions: each continuation starts from the previous run's EMA weights
    with a fresh warm-up and cosine schedule, on a data stream seeded by the number of steps already done (no batch
    is repeated). The pipeline's `pretrain_metrics.json` keeps the cumulative step count and one record per run."""
    torch.set_num_threads(cfg.threads)
    pipeline_dir, out_dir = Path(pipeline_dir), Path(out_dir)
    previous = json.loads((pipeline_dir / "pretrain_metrics.json").read_text())
    done = int(previous["unet"]["steps"])
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir, local_files_only=True, use_safetensors=True)
    run_cfg = replace(cfg, seed=cfg.seed + done, unet_init=str(pipeline_dir / "unet"))
    unet, run_metrics = train_unet(run_cfg, pipe.tokenizer, pipe.text_encoder.eval(), pipe.vae.eval(), snapshot_dir=out_dir / "snapshots")
    pipe = assemble_pipeline(pipe.tokenizer, pipe.text_encoder, pipe.vae, unet)
    pipe.save_pretrained(out_dir / "pipeline")
    runs = previous["unet"].get("runs") or [{k: previous["unet"][k] for k in ("steps", "batch", "wall_s", "final_loss")} | {"lr": previous["config"]["unet_lr"]}]
    runs.append({k: run_metrics[k] for k in ("steps", "batch", "wall_s", "final_loss")} | {"lr": cfg.unet_lr})
    metrics = dict(previous)
    metrics["unet"] = {
        "steps": done + run_metrics["steps"], "batch": run_metrics["batch"], "params": run_metrics["params"],
        "wall_s": round(sum(r["wall_s"] for r in runs), 1), "final_loss": run_metrics["final_loss"], "runs": runs,
    }
    (out_dir / "pretrain_metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _text_tower(clip) -> torch.nn.Module:
    """The CLIP text tower as a standalone `CLIPTextModel` (what SD pipelines load as `text_encoder`)."""
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel(clip.config.text_config)
    # transformers 5 flattens CLIPTextModel (no `.text_model`); its keys are those of CLIPModel.text_model.
    text_encoder.load_state_dict(clip.text_model.state_dict(), strict=True)
    text_encoder.eval()
    return text_encoder
