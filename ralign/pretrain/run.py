"""`ralign world pretrain`: trains every toy model in turn and writes each one's MODEL_CARD.md."""

from __future__ import annotations

import json
import logging
import platform
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ralign.pretrain.t2i import T2IPretrainConfig, pretrain_t2i

log = logging.getLogger(__name__)

PARTS = ("t2i", "reward_clip", "preference", "captioner", "segmenter")


def machine_description() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def dir_size_mb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in Path(path).rglob("*.safetensors")) / 2**20, 2)


def write_t2i_cards(out: Path, metrics: dict) -> None:
    cfg = metrics["config"]
    clip, vae, unet = metrics["text_clip"], metrics["vae"], metrics["unet"]
    retrieval = "\n".join(f"| {k.removeprefix('retrieval_top1_')} | {v:.3f} |" for k, v in clip.items() if k.startswith("retrieval"))
    (out / "text_clip" / "MODEL_CARD.md").write_text(
        f"""# Toy text CLIP (transformers `CLIPModel`)

Its text tower is the diffusion text encoder of `base` (as OpenAI CLIP's is for SD1.5).

- Data: renders of generated prompts, every family and every colour-shape combination (split `all`), fresh each step.
- Training: contrastive (CLIP loss), {clip['steps']} steps, batch {clip['batch']} (duplicate prompts removed per batch),
  AdamW lr {cfg['clip_lr']}, cosine schedule; wall time {clip['wall_s']} s on {machine_description()}.
- Parameters: {clip['params']:,}. Tokenizer: word-level, {TOKEN_LIMIT} tokens including start/end.
- Quality: image->text top-1 retrieval among 64 held-out `test` prompts per family (chance 0.016):

| family | top-1 |
| --- | --- |
{retrieval}
""",
        encoding="utf-8",
    )
    (out / "base" / "MODEL_CARD.md").write_text(
        f"""# Toy base text-to-image model (diffusers `StableDiffusionPipeline`)

Text encoder: the toy text CLIP's `CLIPTextModel` (frozen). VAE: `AutoencoderKL`, 64x64x3 -> 8x8x4.
UNet: `UNet2DConditionModel` with cross-attention. Sampling scheduler: DDIM; training: DDPM, SD1.5 betas.

- Data: renders of generated prompts of every family (split `all`); captions longer than 24 tokens are truncated,
  as SD1.5 truncates at 77. 10 % of captions are dropped for classifier-free guidance.
- VAE: {vae['steps']} steps, batch {vae['batch']}, L1 + MSE + {cfg['vae_kl_weight']}·KL, wall {vae['wall_s']} s,
  {vae['params']:,} parameters; reconstruction PSNR {vae['recon_psnr_db']} dB on held-out renders;
  latent scaling factor {vae['scaling_factor']} (unit variance).
- UNet: {unet['steps']} steps, batch {unet['batch']}, AdamW lr {cfg['unet_lr']}, cosine, EMA {cfg['unet_ema_decay']},
  wall {unet['wall_s']} s, {unet['params']:,} parameters, final noise-prediction MSE {unet['final_loss']}.
- Machine: {machine_description()}.
- Oracle metrics on held-out `test` prompts: see `eval_test.json` beside this card (written by `ralign eval`).
""",
        encoding="utf-8",
    )


TOKEN_LIMIT = 24


def pretrain_all(out: str | Path, parts: list[str], scale: float = 1.0, seed: int = 0, unet_init: str | None = None) -> dict:
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown pretraining part(s) {unknown}; expected some of {list(PARTS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    if "t2i" in parts:
        base = T2IPretrainConfig(seed=seed, unet_init=unet_init)
        cfg = replace(
            base,
            clip_steps=max(1, int(base.clip_steps * scale)),
            vae_steps=max(1, int(base.vae_steps * scale)),
            unet_steps=max(1, int(base.unet_steps * scale)),
        )
        # A staging directory left by a failed run is resumed: stages finished with the same config are reused.
        staging = out / ".t2i_staging"
        metrics = pretrain_t2i(staging, cfg)
        # Replace the committed models only once the whole run succeeded: no half-written model directories.
        for name, src in (("base", staging / "pipeline"), ("text_clip", staging / "text_clip")):
            shutil.rmtree(out / name, ignore_errors=True)
            shutil.move(str(src), str(out / name))
        (out / "base" / "pretrain_metrics.json").write_text(json.dumps(metrics, indent=2))
        shutil.rmtree(staging, ignore_errors=True)
        write_t2i_cards(out, metrics)
        results["t2i"] = {k: v for k, v in metrics.items() if k != "config"}
        results["t2i"]["config"] = asdict(cfg)
    for part in parts:
        if part == "t2i":
            continue
        from ralign.pretrain import rewards

        trainer = getattr(rewards, f"train_{part}")
        results[part] = trainer(out / part, seed=seed, scale=scale)
    for name in ("base", "text_clip", *[p for p in parts if p != "t2i"]):
        if (out / name).exists():
            results.setdefault("sizes_mb", {})[name] = dir_size_mb(out / name)
    return results
