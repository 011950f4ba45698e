"""`ralign world pretrain`: trains every toy model in turn and writes each one's MODEL_CARD.md."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, replace
from pathlib import Path


from ralign.pretrain.common import machine_description
from ralign.pretrain.t2i import T2IPretrainConfig, continue_unet, pretrain_t2i

log = logging.getLogger(__name__)

PARTS = ("t2i", "reward_clip", "preference", "captioner", "segmenter", "detector", "flow")
# The trainers of the parts after t2i, by part: module and function (imported when the part is trained).
_REWARD_TRAINERS = {part: ("ralign.pretrain.rewards", f"train_{part}") for part in ("reward_clip", "preference", "captioner", "segmenter")}
_REWARD_TRAINERS["detector"] = ("ralign.pretrain.detector", "train_detector")
_REWARD_TRAINERS["flow"] = ("ralign.pretrain.flow", "train_flow")  # needs `base` (its VAE and text tower)


def dir_size_mb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in Path(path).rglob("*.safetensors")) / 2**20, 2)


def _unet_runs(unet: dict) -> str:
    runs = unet.get("runs") or []
    if len(runs) < 2:
        return ""
    lines = "".join(
        f"\n  - run {i + 1}: {r['steps']} steps, lr {r['lr']}, wall {r['wall_s']} s, final MSE {r['final_loss']}" for i, r in enumerate(runs)
    )
    return "\n  Trained in several runs, each continuing from the previous one's EMA weights (`--continue-unet`):" + lines


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
  wall {unet['wall_s']} s, {unet['params']:,} parameters, final noise-prediction MSE {unet['final_loss']}.{_unet_runs(unet)}
- Machine: {machine_description()}.
- Sampling: DDIM, 20 steps, classifier-free guidance 3 (measured best on held-out prompts: single all-correct 0.58
  at guidance 3 vs 0.32 at 7.5 after the first 3000 steps); `ralign eval` and the training configs use it.
- Oracle metrics on held-out `test` prompts: `eval_test.json` beside this card (written by
  `ralign eval --pipeline base --split test --n 200 --json ralign/toy_models/base/eval_test.json`).
""",
        encoding="utf-8",
    )


TOKEN_LIMIT = 24


def _install_pipeline(out: Path, staging: Path, metrics: dict) -> None:
    # Replace the committed models only once the whole run succeeded: no half-written model directories.
    names = [("base", staging / "pipeline")]
    if (staging / "text_clip").exists():
        names.append(("text_clip", staging / "text_clip"))
    for name, src in names:
        shutil.rmtree(out / name, ignore_errors=True)
        shutil.move(str(src), str(out / name))
    (out / "base" / "pretrain_metrics.json").write_text(json.dumps(metrics, indent=2))
    shutil.rmtree(staging, ignore_errors=True)
    write_t2i_cards(out, metrics)


def pretrain_all(out: str | Path, parts: list[str], scale: float = 1.0, seed: int = 0,
                 overrides: dict[str, dict] | None = None) -> dict:
    """Train the requested parts into `out`. `overrides` maps a part to what it changes:
    - `t2i`: fields of `T2IPretrainConfig` (e.g. `unet_init`, `unet_lr`, smaller batches for a smoke run), applied
      after `scale`; `continue_steps: N` instead trains the UNet of the pipeline already in `out/base` for N more
      steps, keeping its text encoder and VAE;
    - every other part: keyword arguments of its trainer (`_REWARD_TRAINERS`), e.g. `continue_steps` and `lr` for
      the reward CLIP, near misses for the captioner, shared-colour absent phrases for the segmenter, `init` for the
      flow transformer."""
    overrides = overrides or {}
    unknown = [p for p in [*parts, *overrides] if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown pretraining part(s) {unknown}; expected some of {list(PARTS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    t2i = dict(overrides.get("t2i", {}))
    continue_unet_steps = t2i.pop("continue_steps", 0)
    if "t2i" in parts and continue_unet_steps > 0:
        cfg = replace(T2IPretrainConfig(seed=seed, unet_steps=continue_unet_steps), **t2i)
        staging = out / ".t2i_staging"
        metrics = continue_unet(out / "base", staging, cfg)
        _install_pipeline(out, staging, metrics)
        results["t2i"] = {k: v for k, v in metrics.items() if k != "config"}
    elif "t2i" in parts:
        base = T2IPretrainConfig(seed=seed)
        cfg = replace(
            base,
            clip_steps=max(1, int(base.clip_steps * scale)),
            vae_steps=max(1, int(base.vae_steps * scale)),
            unet_steps=max(1, int(base.unet_steps * scale)),
            **t2i,
        )
        # A staging directory left by a failed run is resumed: stages finished with the same config are reused.
        staging = out / ".t2i_staging"
        metrics = pretrain_t2i(staging, cfg)
        _install_pipeline(out, staging, metrics)
        results["t2i"] = {k: v for k, v in metrics.items() if k != "config"}
        results["t2i"]["config"] = asdict(cfg)
    for part in parts:
        if part == "t2i":
            continue
        import importlib

        module, function = _REWARD_TRAINERS[part]
        trainer = getattr(importlib.import_module(module), function)
        results[part] = trainer(out / part, seed=seed, scale=scale, **overrides.get(part, {}))
    for name in ("base", "text_clip", *[p for p in parts if p != "t2i"]):
        if (out / name).exists():
            results.setdefault("sizes_mb", {})[name] = dir_size_mb(out / name)
    return results
