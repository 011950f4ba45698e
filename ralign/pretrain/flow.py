"""Pretraining of the toy flow-matching model (`ralign world pretrain --only flow`): an MMDiT trained with the
rectified-flow loss in the latent space of the committed toy VAE, conditioned on the committed toy text tower, saved
as a `StableDiffusion3Pipeline` directory.

SD3's recipe, shrunk: x_sigma = (1 - sigma) x_0 + sigma eps with sigma drawn logit-normally (SD3's default weighting),
the transformer regresses the velocity eps - x_0 at timestep 1000 sigma, 10 % of captions dropped for classifier-free
guidance, an EMA of the weights is what is saved. The VAE and text tower are `base`'s (frozen), as SD3's encoders are
pretrained elsewhere; the two CLIP slots of the SD3 pipeline both hold that tower, each with a fixed random projection
for the pooled embedding (the toy tower was trained without one; an orthogonal map keeps all of its information).
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.training_utils import EMAModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from ralign.models import toy_flow
from ralign.pretrain.common import Progress, cosine_lr, descend, machine_description, parameter_count
from ralign.world.data import render_samples, sample_stream

log = logging.getLogger(__name__)


@dataclass
class FlowPretrainConfig:
    seed: int = 0
    steps: int = 6000
    batch: int = 64
    lr: float = 5e-4
    ema_decay: float = 0.999
    cfg_drop: float = 0.1
    width: int = 128
    layers: int = 4
    heads: int = 4
    shift: float = 1.0  # sigma-grid shift at sampling (SD3 uses 3 at 1024 px; 64 latent tokens need none)
    log_every: int = 100
    snapshot_every: int = 500
    init: str | None = None  # a transformer directory to continue from (a snapshot or a finished model's), as `--continue-unet`
    eval_prompts: int = 64  # per family, held-out `test`, for the card
    eval_steps: int = 40  # ODE steps of the card's evaluation (Flow-GRPO evaluates with 40)


def text_tower_with_projection(tower: CLIPTextModel, seed: int) -> CLIPTextModelWithProjection:
    """`tower`'s weights in a CLIPTextModelWithProjection whose projection is a fixed random orthogonal map."""
    config = copy.deepcopy(tower.config)
    config.projection_dim = config.hidden_size
    model = CLIPTextModelWithProjection(config)
    # transformers 5 flattens CLIPTextModel (no `.text_model`), while CLIPTextModelWithProjection keeps its tower there.
    model.text_model.load_state_dict(tower.state_dict(), strict=True)
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(config.hidden_size, config.hidden_size, generator=torch.Generator().manual_seed(seed)))
        model.text_projection.weight.copy_(q)
    return model.eval()


def assemble(base_dir: Path, transformer: SD3Transformer2DModel, shift: float) -> StableDiffusion3Pipeline:
    from ralign.models.pipeline import load_pipeline

    base = load_pipeline(str(base_dir))
    vae = AutoencoderKL.from_config({**base.vae.config, "shift_factor": 0.0})
    vae.load_state_dict(base.vae.state_dict())
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=toy_flow.flow_scheduler(shift), vae=vae.eval(),
        text_encoder=text_tower_with_projection(base.text_encoder, seed=1), tokenizer=base.tokenizer,
        text_encoder_2=text_tower_with_projection(base.text_encoder, seed=2), tokenizer_2=base.tokenizer,
        text_encoder_3=None, tokenizer_3=None)


def new_transformer(cfg: FlowPretrainConfig, text_width: int) -> SD3Transformer2DModel:
    return toy_flow.transformer(width=cfg.width, layers=cfg.layers, heads=cfg.heads, text_width=2 * text_width,
                                pooled_width=2 * text_width)


def train_flow(out_dir, seed: int = 0, scale: float = 1.0, **overrides) -> dict:
    """Train (or continue, `init=`) the toy flow model into `out_dir`; returns the card's metrics."""
    cfg = FlowPretrainConfig(seed=seed, **overrides)
    cfg.steps = max(1, int(cfg.steps * scale))
    out = Path(out_dir)
    base_dir = out.parent / "base"
    torch.manual_seed(cfg.seed)
    text_width = json.loads((base_dir / "text_encoder" / "config.json").read_text())["hidden_size"]
    transformer = (SD3Transformer2DModel.from_pretrained(cfg.init, use_safetensors=True) if cfg.init
                   else new_transformer(cfg, text_width))
    pipe = assemble(base_dir, transformer, cfg.shift)
    metrics = {"config": asdict(cfg), "params": parameter_count(transformer)}
    previous = out / "pretrain_metrics.json"
    runs = json.loads(previous.read_text()).get("runs", []) if cfg.init and previous.is_file() else []
    # Snapshots beside the model directory, not in it: the directory is what gets committed.
    metrics["train"] = _fit(cfg, pipe, out.parent / f".{out.name}_snapshots", run_index=len(runs))
    pipe.set_progress_bar_config(disable=True)
    metrics["eval_test"] = _evaluate(pipe, cfg)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    metrics["runs"] = runs + [{"steps": cfg.steps, "lr": cfg.lr, "wall_s": metrics["train"]["wall_s"], "final_loss": metrics["train"]["final_loss"]}]
    previous.write_text(json.dumps(metrics, indent=2))
    write_card(out, metrics)
    return {k: v for k, v in metrics.items() if k != "config"}


def _fit(cfg: FlowPretrainConfig, pipe: StableDiffusion3Pipeline, snapshot_dir: Path, run_index: int = 0) -> dict:
    transformer, vae = pipe.transformer, pipe.vae
    ema = EMAModel(transformer.parameters(), decay=cfg.ema_decay, model_cls=type(transformer), model_config=transformer.config)
    opt = torch.optim.AdamW(transformer.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = cosine_lr(opt, cfg.steps, warmup=min(200, max(1, cfg.steps // 10)))
    # A continued run draws fresh prompts and noise rather than replaying the previous run's.
    data_seed = cfg.seed + 1000 * run_index
    stream = sample_stream(cfg.batch, seed=data_seed + 31)
    rng = np.random.default_rng(data_seed + 32)
    gen = torch.Generator().manual_seed(data_seed + 33)
    progress = Progress("flow", cfg.steps, max(1, min(cfg.log_every, cfg.steps)))
    for module in (vae, pipe.text_encoder, pipe.text_encoder_2):
        module.requires_grad_(False)
    transformer.train()
    for i in range(cfg.steps):
        samples = next(stream)
        prompts = ["" if rng.random() < cfg.cfg_drop else s.prompt for s in samples]
        with torch.no_grad():
            x0 = vae.encode(render_samples(samples)).latent_dist.sample(gen) * vae.config.scaling_factor
            embeds, _, pooled, _ = toy_flow.encode_prompts(pipe, prompts, guidance=False)
        noise = torch.randn(x0.shape, generator=gen)
        sigma = torch.sigmoid(torch.randn(len(samples), generator=gen)).view(-1, 1, 1, 1)  # logit-normal(0, 1)
        noisy = (1 - sigma) * x0 + sigma * noise
        velocity = transformer(hidden_states=noisy, timestep=sigma.flatten() * 1000, encoder_hidden_states=embeds,
                               pooled_projections=pooled).sample
        loss = F.mse_loss(velocity, noise - x0)
        loss_value = descend(loss, transformer.parameters(), opt, sched)
        ema.step(transformer.parameters())
        progress.step(i, loss_value)
        if (i + 1) % cfg.snapshot_every == 0:
            # EMA weights so far: a run that has to stop early still leaves a usable model.
            ema.store(transformer.parameters())
            ema.copy_to(transformer.parameters())
            transformer.save_pretrained(snapshot_dir / f"transformer_step{i + 1}")
            ema.restore(transformer.parameters())
    ema.copy_to(transformer.parameters())
    transformer.eval()
    return {"steps": cfg.steps, "batch": cfg.batch, "wall_s": round(progress.wall_s, 1),
            "final_loss": round(float(np.mean(progress.losses[-200:])), 4)}


def _evaluate(pipe: StableDiffusion3Pipeline, cfg: FlowPretrainConfig) -> dict:
    """The oracle on held-out `test` prompts (evaluation only): ODE sampling, guidance 3, `eval_steps` steps."""
    from ralign.models.pipeline import generate_images
    from ralign.world.evaluation import eval_prompts, evaluate_images

    samples = eval_prompts("test", cfg.eval_prompts, seed=cfg.seed)
    images = {fam: generate_images(pipe, [s.prompt for s in fam_samples], steps=cfg.eval_steps, guidance=3.0, seed=cfg.seed,
                                   batch_size=32, prompt_embeds_fn=lambda chunk: toy_flow.pipeline_embeds(pipe, chunk))
              for fam, fam_samples in samples.items()}
    report = evaluate_images(samples, images)
    return {"families": {f: {"all_correct": v["all_correct"], "ci": v.get("all_correct_ci"), "n": v["n"]}
                         for f, v in report["families"].items()},
            "overall": {"all_correct": report["overall"]["all_correct"], "ci": report["overall"].get("all_correct_ci")}}


def write_card(out: Path, metrics: dict) -> None:
    cfg, train, ev = metrics["config"], metrics["train"], metrics["eval_test"]
    rows = "\n".join(f"| {f} | {v['n']} | {v['all_correct']:.2f} | {v['ci']} |" for f, v in ev["families"].items())
    runs = metrics.get("runs", [])
    history = "".join(f"\n  - run {i + 1}: {r['steps']} steps, lr {r['lr']}, wall {r['wall_s']} s, final MSE {r['final_loss']}"
                      for i, r in enumerate(runs)) if len(runs) > 1 else ""
    (out / "MODEL_CARD.md").write_text(f"""# Toy flow-matching text-to-image model (diffusers `StableDiffusion3Pipeline`)

Transformer: `SD3Transformer2DModel` (MMDiT), width {cfg['width']}, {cfg['layers']} joint blocks, {cfg['heads']} heads, patch 1 on
the 8x8x4 latent, {metrics['params']:,} parameters. Scheduler: `FlowMatchEulerDiscreteScheduler`, shift {cfg['shift']}.
VAE and text tower: `base`'s (frozen); both CLIP slots hold the toy text tower with a fixed random orthogonal
projection for the pooled embedding; no T5 (diffusers feeds zeros).

- Data: renders of generated prompts of every family (split `all`), {int(cfg['cfg_drop'] * 100)} % of captions dropped.
- Loss: rectified flow, velocity eps - x0 at sigma ~ logit-normal(0, 1); AdamW lr {cfg['lr']}, cosine, EMA {cfg['ema_decay']}.
- Training: {sum(r['steps'] for r in runs) if runs else train['steps']} steps, batch {train['batch']}, wall {sum(r['wall_s'] for r in runs) if runs else train['wall_s']} s, final velocity MSE {train['final_loss']}.{history}
- Machine: {machine_description()}.
- Oracle all-correct on held-out `test` prompts (ODE, {cfg['eval_steps']} steps, guidance 3; 95 % bootstrap intervals):

| family | n | all-correct | 95 % interval |
| --- | --- | --- | --- |
{rows}
| overall | | {ev['overall']['all_correct']:.3f} | {ev['overall']['ci']} |
""", encoding="utf-8")
