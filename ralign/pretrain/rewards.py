"""Pretraining of the toy reward models: reward CLIP, preference model, captioner, segmenter.

Like real reward models, they learn from data about the world (renders and their prompts, clean vs corrupted renders),
never from the oracle. Each trainer writes its model, a MODEL_CARD.md with measured quality, and returns metrics.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from ralign.models import captioner as cap
from ralign.models import reward_clip as rc
from ralign.models import segmenter as seg
from ralign.pretrain.common import Progress, cosine_lr, descend, machine_description, parameter_count
from ralign.world.data import images_to_tensor, sample_stream
from ralign.world.prompts import FAMILIES, RELATIONS, PromptSample, generate, relation_holds
from ralign.world.scene import COLORS, GRID, SHAPES, Scene, SceneObject, object_mask, random_jitter, render

log = logging.getLogger(__name__)


def _steps(default: int, scale: float) -> int:
    return max(1, int(default * scale))


def _images01(samples) -> torch.Tensor:
    return (images_to_tensor([render(s.scene) for s in samples]) + 1.0) / 2.0


def _write_card(path: Path, title: str, body: str) -> None:
    (path / "MODEL_CARD.md").write_text(f"# {title}\n\n{body.strip()}\n\n- Machine: {machine_description()}.\n", encoding="utf-8")


def _unique(batch: list[PromptSample]) -> list[PromptSample]:
    seen, out = set(), []
    for s in batch:
        if s.prompt not in seen:
            seen.add(s.prompt)
            out.append(s)
    return out


def _earlier_card(out: Path) -> str:
    """The description in the card of the model being continued (its title line dropped)."""
    card = (out / "MODEL_CARD.md").read_text(encoding="utf-8") if (out / "MODEL_CARD.md").is_file() else ""
    return card.split("\n", 2)[-1].strip() if card else "(no card was found)"


def _start_model(out: Path, load, build, continue_steps: int, steps: int, scale: float):
    """(model, tokenizer, steps, earlier card or None): the model in `out` continued for `continue_steps`, or a fresh
    one for `steps` x `scale`."""
    if continue_steps > 0:
        return (*load(out), continue_steps, _earlier_card(out))
    return (*build(), _steps(steps, scale), None)


def _continued_note(earlier: str | None, flag: str) -> str:
    """A card line quoting the earlier card of a model that these steps continued (empty for a fresh model)."""
    if earlier is None:
        return ""
    quoted = "\n".join(f"  > {line}" if line else "  >" for line in earlier.splitlines())
    return f"\n  These steps continued the model that was here (`{flag}`); its card said:\n{quoted}"


# ---------------------------------------------------------------------------------------------------------------
# reward CLIP
# ---------------------------------------------------------------------------------------------------------------

def _clip_loss(model, images01, ids, near_misses01: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric contrastive loss; `near_misses01` are extra images that no text of the batch describes, so each
    text must rank its own image above them too (text -> image direction only)."""
    img = F.normalize(model.encode_image(images01 * 2 - 1), dim=-1)
    txt = F.normalize(model.encode_text(ids), dim=-1)
    scale = model.logit_scale.exp().clamp(max=100)
    labels = torch.arange(len(img))
    candidates = img
    if near_misses01 is not None and len(near_misses01):
        candidates = torch.cat([img, F.normalize(model.encode_image(near_misses01 * 2 - 1), dim=-1)])
    return (F.cross_entropy(scale * img @ txt.T, labels) + F.cross_entropy(scale * txt @ candidates.T, labels)) / 2


# Near misses: scenes that contradict their prompt in one compositional detail, built from the prompt's own scene
# graph (never judged by the oracle). Each family gets the mistakes its prompts can express: a text-to-image model's
# typical errors (attribute leakage, a count off by one, a mirrored relation, swapped sizes, a missing object).
NEAR_MISSES: dict[str, tuple[str, ...]] = {
    "single": ("recolour", "reshape", "remove"),
    "binding": ("swap_colours", "recolour", "reshape", "remove"),
    "counting": ("remove", "add_one", "recolour", "reshape"),
    "spatial": ("swap_places", "misplace", "recolour", "reshape", "remove"),
    "size": ("swap_sizes", "resize", "recolour", "reshape", "remove"),
    "long": ("recolour", "reshape", "remove"),
}


def near_miss_scene(sample: PromptSample, kind: str, rng: np.random.Generator) -> Scene:
    """`sample`'s scene changed by one mistake of `kind` (see NEAR_MISSES) so that it no longer matches the prompt."""
    scene = sample.scene
    objs = list(scene.objects)
    jitter = list(scene.jitter or random_jitter(rng, len(objs)))
    i = int(rng.integers(len(objs)))
    o = objs[i]
    if kind == "recolour":
        used = {x.color for x in objs}
        free = [c for c in COLORS if c not in used]
        objs[i] = SceneObject(free[int(rng.integers(len(free)))], o.shape, o.size, o.row, o.col)
    elif kind == "reshape":
        shapes = [s for s in SHAPES if s != o.shape]
        objs[i] = SceneObject(o.color, shapes[int(rng.integers(len(shapes)))], o.size, o.row, o.col)
    elif kind == "remove":
        del objs[i], jitter[i]
    elif kind == "add_one":
        cell = _free_cell(scene, rng)
        if cell is None:  # a full grid cannot take one more; one fewer is as wrong
            return near_miss_scene(sample, "remove", rng)
        objs.append(SceneObject(o.color, o.shape, o.size, *cell))
        jitter.extend(random_jitter(rng, 1))
    elif kind == "resize":  # both objects the same size
        objs[i] = SceneObject(o.color, o.shape, "small" if o.size == "large" else "large", o.row, o.col)
    elif kind == "misplace":  # both objects moved to cells where the prompt's relation does not hold
        relation = next(r for r in RELATIONS if f" {r} " in sample.prompt)
        while True:
            cells = rng.choice(GRID * GRID, size=2, replace=False)
            (r1, k1), (r2, k2) = [(int(c) // GRID, int(c) % GRID) for c in cells]
            if not relation_holds(relation, (r1, k1), (r2, k2)):
                break
        objs[0] = SceneObject(objs[0].color, objs[0].shape, objs[0].size, r1, k1)
        objs[1] = SceneObject(objs[1].color, objs[1].shape, objs[1].size, r2, k2)
    elif kind in ("swap_colours", "swap_places", "swap_sizes"):
        a, b = objs[0], objs[1]
        if kind == "swap_colours":
            objs[0], objs[1] = (SceneObject(b.color, a.shape, a.size, a.row, a.col), SceneObject(a.color, b.shape, b.size, b.row, b.col))
        elif kind == "swap_places":
            objs[0], objs[1] = (SceneObject(a.color, a.shape, a.size, b.row, b.col), SceneObject(b.color, b.shape, b.size, a.row, a.col))
        else:
            objs[0], objs[1] = (SceneObject(a.color, a.shape, b.size, a.row, a.col), SceneObject(b.color, b.shape, a.size, b.row, b.col))
    else:
        raise ValueError(f"unknown near-miss kind {kind!r}; expected one of {sorted({k for v in NEAR_MISSES.values() for k in v})}")
    return Scene(tuple(objs), tuple(jitter))


def near_miss_images01(samples: list[PromptSample], per_sample: int, rng: np.random.Generator) -> torch.Tensor:
    scenes = []
    for s in samples:
        kinds = NEAR_MISSES[s.family]
        scenes.extend(near_miss_scene(s, kinds[int(rng.integers(len(kinds)))], rng) for _ in range(per_sample))
    return (images_to_tensor([render(sc) for sc in scenes]) + 1.0) / 2.0


class GeneratedLook:
    """Makes renders look like the base model's samples, so a reward learns on the images it will score: a round
    trip through the base pipeline's VAE (a posterior sample, as the diffusion model's latents are), then a random
    Gaussian blur and a small colour shift. Applied to every image of a batch alike, near misses included, so the
    look itself says nothing about which image is right."""

    def __init__(self, vae_dir: Path | None, vae_fraction: float = 0.25, blur_sigma_max: float = 1.2, colour_shift: float = 0.04):
        self.vae, self.vae_fraction = None, vae_fraction
        if vae_dir is not None and (Path(vae_dir) / "config.json").is_file():
            from diffusers import AutoencoderKL

            self.vae = AutoencoderKL.from_pretrained(str(vae_dir), local_files_only=True, use_safetensors=True).eval().requires_grad_(False)
        self.blur_sigma_max, self.colour_shift = blur_sigma_max, colour_shift

    def describe(self) -> str:
        vae = f"for a random {self.vae_fraction:.0%} of images a round trip through the base VAE, then " if self.vae is not None else ""
        return f"{vae}Gaussian blur sigma U(0, {self.blur_sigma_max}) and a colour shift of up to {self.colour_shift} per channel"

    @torch.no_grad()
    def __call__(self, images01: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = images01.clone()
        # A fraction only: the round trip costs ~30 ms an image on one core, 4x the rest of a training step.
        through = torch.rand(len(x), generator=generator) < self.vae_fraction
        if self.vae is not None and through.any():
            posterior = self.vae.encode(x[through] * 2 - 1).latent_dist
            x[through] = ((self.vae.decode(posterior.sample(generator)).sample + 1) / 2).clamp(0, 1)
        sigmas = torch.rand(len(x), generator=generator) * self.blur_sigma_max
        x = torch.stack([TF.gaussian_blur(img, kernel_size=7, sigma=float(s)) if s > 0.2 else img for img, s in zip(x, sigmas)])
        shift = (torch.rand(len(x), 3, 1, 1, generator=generator) * 2 - 1) * self.colour_shift
        return (x + shift).clamp(0, 1)


@torch.no_grad()
def _retrieval(model, tokenizer, n: int = 64, seed: int = 321) -> dict:
    out = {}
    for fam in FAMILIES:
        samples = generate(fam, n, "test", seed=seed)
        prompts = [s.prompt for s in samples]
        sims = rc.encode_images(model, _images01(samples)) @ rc.encode_texts(model, tokenizer, prompts).T
        out[fam] = round(float(np.mean([prompts[int(sims[i].argmax())] == prompts[i] for i in range(n)])), 3)
    return out


@torch.no_grad()
def near_miss_accuracy(score, look: GeneratedLook, n: int = 64, seed: int = 321) -> dict:
    """Per family, how often `score(images01, prompts)` (higher = better match) rates a held-out prompt's own image
    above a near miss of it, both with the generated look (chance 0.5). The oracle is not involved: the near miss is
    wrong by construction."""
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    out = {}
    for fam in FAMILIES:
        samples = generate(fam, n, "test", seed=seed)
        prompts = [s.prompt for s in samples]
        good = score(look(_images01(samples), gen), prompts)
        bad = score(look(near_miss_images01(samples, 1, rng), gen), prompts)
        out[fam] = round(float((good > bad).float().mean()), 3)
    return out


def clip_similarity(model, tokenizer):
    """The reward CLIP's cosine similarity as a `near_miss_accuracy` score."""
    return lambda images01, prompts: (rc.encode_images(model, images01) * rc.encode_texts(model, tokenizer, prompts)).sum(-1)


def train_reward_clip(out_dir, seed: int = 0, scale: float = 1.0, steps: int = 2000, batch: int = 64, lr: float = 5e-4,
                      near_misses_per_image: int = 2, continue_steps: int = 0, eval_prompts: int = 64) -> dict:
    """Contrastive training on renders with the generated look, each text also ranked against near misses of its
    scene (`near_misses_per_image` per image). The VAE is the base pipeline's when one is beside `out_dir`.
    `continue_steps > 0` instead trains the reward CLIP already in `out_dir` for that many more steps (warm-up 10 %,
    `lr` as given), and its card keeps the earlier training's description."""
    out = Path(out_dir)
    model, tokenizer, steps, earlier = _start_model(out, rc.load_reward_clip, rc.build_reward_clip, continue_steps, steps, scale)
    torch.manual_seed(seed)
    rng, gen = np.random.default_rng(seed + 12), torch.Generator().manual_seed(seed + 13)
    look = GeneratedLook(out.parent / "base" / "vae")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    sched = cosine_lr(opt, steps, warmup=min(100, max(1, steps // 10)))
    stream = sample_stream(batch, seed=seed + 11)
    progress = Progress("reward-clip", steps, max(1, min(100, steps)))
    model.train()
    for i in range(steps):
        samples = _unique(next(stream))
        images = _images01(samples)
        near = near_miss_images01(samples, near_misses_per_image, rng)
        looked = look(torch.cat([images, near]), gen)
        loss = _clip_loss(model, looked[: len(images)], rc.tokenize(tokenizer, [s.prompt for s in samples]), looked[len(images):])
        progress.step(i, descend(loss, model.parameters(), opt, sched))
    model.eval()
    rc.save_reward_clip(model, tokenizer, out)
    retrieval = _retrieval(model, tokenizer, n=eval_prompts)
    near_acc = near_miss_accuracy(clip_similarity(model, tokenizer), look, n=eval_prompts)
    metrics = {"steps": steps, "batch": batch, "near_misses_per_image": near_misses_per_image, "wall_s": round(progress.wall_s, 1),
               "params": parameter_count(model), "retrieval_top1": retrieval, "near_miss_accuracy": near_acc,
               "continued": earlier is not None}
    table = "\n".join(f"| {f} | {retrieval[f]:.3f} | {near_acc[f]:.3f} |" for f in FAMILIES)
    kinds = "; ".join(f"{f}: {', '.join(k)}" for f, k in NEAR_MISSES.items())
    continued = _continued_note(earlier, "--continue-reward-clip")
    _write_card(out, "Toy reward CLIP (open_clip `CLIP`, custom config)", f"""
Scores text-image agreement (CLIP score) as a reward; LongAlign decomposes its text embedding.
- Data: renders of generated prompts of every family and colour-shape combination (split `all`), fresh each step,
  given the generated look: {look.describe()}.
- Near misses (hard negatives, from the scene graph): {near_misses_per_image} per image, each its scene with one
  mistake its family's prompts can express ({kinds}). Each text ranks its own image above the batch's other images
  and all near misses.
- Training: contrastive, {steps} steps, batch {batch} (duplicate prompts removed), AdamW lr {lr}, cosine;
  wall time {metrics['wall_s']} s. Parameters: {metrics['params']:,}. Context: {rc.REWARD_CONTEXT} tokens.{continued}
- Quality on {eval_prompts} held-out `test` prompts per family: image->text top-1 retrieval among them on clean renders
  (chance {1 / eval_prompts:.3f}), and near-miss accuracy (own image scored above a near miss, both with the generated look; chance 0.5):

| family | top-1 | near-miss accuracy |
| --- | --- | --- |
{table}
""")
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# preference model
# ---------------------------------------------------------------------------------------------------------------

CORRUPTIONS = ("noise", "blur", "wrong_attribute", "missing_object", "extra_object")


def _free_cell(scene: Scene, rng) -> tuple[int, int] | None:
    used = {(o.row, o.col) for o in scene.objects}
    free = [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in used]
    return free[rng.integers(len(free))] if free else None


def corrupt(sample: PromptSample, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A rejected image for `sample`'s prompt: degraded, or a render of a scene that contradicts the prompt."""
    scene = sample.scene
    objs = list(scene.objects)
    if kind == "noise":
        img = render(scene).astype(np.float32) + rng.normal(0, 40, (64, 64, 3))
        return np.clip(img, 0, 255).astype(np.uint8)
    if kind == "blur":
        t = torch.from_numpy(render(scene)).permute(2, 0, 1).float()
        return TF.gaussian_blur(t, kernel_size=7, sigma=1.6).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    if kind == "wrong_attribute":
        i = int(rng.integers(len(objs)))
        o = objs[i]
        if rng.random() < 0.5:
            used = {x.color for x in objs}
            colour = [c for c in COLORS if c not in used][int(rng.integers(len(COLORS) - len(used)))]
            objs[i] = SceneObject(colour, o.shape, o.size, o.row, o.col)
        else:
            shape = [s for s in SHAPES if s != o.shape][int(rng.integers(len(SHAPES) - 1))]
            objs[i] = SceneObject(o.color, shape, o.size, o.row, o.col)
        return render(Scene(tuple(objs), scene.jitter))
    if kind == "missing_object":
        i = int(rng.integers(len(objs)))
        jitter = tuple(j for k, j in enumerate(scene.jitter) if k != i)
        return render(Scene(tuple(o for k, o in enumerate(objs) if k != i), jitter))
    cell = _free_cell(scene, rng)
    extra = SceneObject(list(COLORS)[int(rng.integers(len(COLORS)))], SHAPES[int(rng.integers(len(SHAPES)))], "small", *cell)
    return render(Scene((*objs, extra), scene.jitter + random_jitter(rng, 1)))


def _pair_batch(samples, rng, near_miss_fraction: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(chosen, rejected, kinds): each prompt's clean render against a corruption of it or, for `near_miss_fraction`
    of them, a near miss of its scene (one compositional mistake its family's prompts can express)."""
    kinds = [NEAR_MISSES[s.family][int(rng.integers(len(NEAR_MISSES[s.family])))] if rng.random() < near_miss_fraction
             else CORRUPTIONS[int(rng.integers(len(CORRUPTIONS)))] for s in samples]
    good = [render(s.scene) for s in samples]
    bad = [corrupt(s, k, rng) if k in CORRUPTIONS else render(near_miss_scene(s, k, rng)) for s, k in zip(samples, kinds)]
    return (images_to_tensor(good) + 1) / 2, (images_to_tensor(bad) + 1) / 2, kinds


def preference_logits(model, tokenizer, images01, prompts) -> torch.Tensor:
    return model.logit_scale.exp().clamp(max=100) * (rc.encode_images(model, images01) * rc.encode_texts(model, tokenizer, prompts)).sum(-1)


def _initial_preference_model(out: Path):
    """(model, tokenizer, what it started from): like PickScore (fine-tuned from CLIP-H), the preference model starts
    from a model that already aligns text and image, the reward CLIP beside `out` when there is one."""
    base = out.parent / "reward_clip"
    if (base / "open_clip_config.json").is_file():
        return (*rc.load_reward_clip(base), "reward CLIP")
    return (*rc.build_reward_clip(), "random")


def train_preference(out_dir, seed: int = 0, scale: float = 1.0, steps: int = 300, batch: int = 32, lr: float = 2e-4,
                     near_miss_fraction: float = 0.0, continue_steps: int = 0, eval_prompts: int = 64) -> dict:
    """Bradley-Terry on (clean, rejected) pairs, initialised from the reward CLIP when one is beside `out_dir`.
    With `near_miss_fraction > 0`, that fraction of the rejected images are near misses of the prompt's scene and
    every image (chosen and rejected alike) gets the base model's generated look: corruptions alone never show the
    model two clean-looking images of which only one matches the prompt, and that is what it must tell apart on
    generated images. `continue_steps > 0` trains the preference model already in `out_dir` for that many more
    steps; its card keeps the earlier training's description."""
    out = Path(out_dir)
    if continue_steps > 0:
        model, tokenizer, init = *rc.load_reward_clip(out), "the preference model that was here"
        steps, earlier = continue_steps, _earlier_card(out)
    else:
        (model, tokenizer, init), steps, earlier = _initial_preference_model(out), _steps(steps, scale), None
    torch.manual_seed(seed)
    rng, gen = np.random.default_rng(seed + 21), torch.Generator().manual_seed(seed + 23)
    look = GeneratedLook(out.parent / "base" / "vae") if near_miss_fraction > 0 else None
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    sched = cosine_lr(opt, steps, warmup=min(50, steps) if earlier is None else max(1, steps // 10))
    stream = sample_stream(batch, seed=seed + 22)
    progress = Progress("preference", steps, max(1, min(100, steps)))
    model.train()
    for i in range(steps):
        samples = _unique(next(stream))
        good, bad, _ = _pair_batch(samples, rng, near_miss_fraction)
        if look is not None:
            good, bad = look(torch.cat([good, bad]), gen).split(len(samples))
        prompts = [s.prompt for s in samples]
        ids = rc.tokenize(tokenizer, prompts)
        margin = preference_logits(model, tokenizer, good, prompts) - preference_logits(model, tokenizer, bad, prompts)
        # Keep the contrastive objective too, so preference learning does not erase text-image alignment.
        loss = F.softplus(-margin).mean() + 0.5 * _clip_loss(model, good, ids)
        progress.step(i, descend(loss, model.parameters(), opt, sched))
    model.eval()
    rc.save_reward_clip(model, tokenizer, out)
    accuracy = _pair_accuracy(model, tokenizer, seed)
    eval_look = look or GeneratedLook(out.parent / "base" / "vae")
    near_acc = near_miss_accuracy(lambda images01, prompts: preference_logits(model, tokenizer, images01, prompts), eval_look, n=eval_prompts)
    metrics = {"steps": steps, "batch": batch, "lr": lr, "near_miss_fraction": near_miss_fraction, "wall_s": round(progress.wall_s, 1),
               "params": parameter_count(model), "init": init, "pair_accuracy": accuracy, "near_miss_accuracy": near_acc,
               "continued": earlier is not None}
    table = "\n".join(f"| {k} | {v:.3f} |" for k, v in accuracy.items())
    near_table = "\n".join(f"| {f} | {a:.3f} |" for f, a in near_acc.items())
    rejected = (f"{', '.join(CORRUPTIONS)} (noise sigma 40/255, Gaussian blur sigma 1.6, one object's colour or shape\n"
                "  changed, one object removed, one small object added)")
    if near_miss_fraction > 0:
        kinds = "; ".join(f"{f}: {', '.join(k)}" for f, k in NEAR_MISSES.items())
        rejected = (f"for {near_miss_fraction:.0%} of pairs a near miss of the prompt's scene, one mistake its family's\n"
                    f"  prompts can express ({kinds}); for the rest {rejected}. Chosen and rejected images alike get\n"
                    f"  the generated look: {look.describe()}")
    _write_card(out, "Toy preference model (open_clip `CLIP`, PickScore-style)", f"""
Scores how much a person would prefer an image for a prompt: scaled cosine similarity, trained with a Bradley-Terry
loss on (clean render, rejected render) pairs. Initialised from: {init}.
- Rejected: {rejected}.
- Training: {steps} steps, batch {batch} pairs, AdamW lr {lr}, BT loss + 0.5 x contrastive loss; wall time
  {metrics['wall_s']} s. Parameters: {metrics['params']:,}.{_continued_note(earlier, "--continue-preference")}
- Quality: pairwise accuracy (clean preferred) on 60 held-out `test` prompts per rejection kind (chance 0.5):

| rejection kind | accuracy |
| --- | --- |
{table}

- Near-miss accuracy on {eval_prompts} held-out `test` prompts per family (own image preferred over a near miss of
  it, both with the generated look: {eval_look.describe()}; chance 0.5):

| family | near-miss accuracy |
| --- | --- |
{near_table}

How well it ranks the base model's own samples of a prompt: `ralign diagnose reward --reward preference`
(benchmarks/results/diagnose.md).
""")
    return metrics


@torch.no_grad()
def _pair_accuracy(model, tokenizer, seed: int, n: int = 60) -> dict:
    rng = np.random.default_rng(seed + 99)
    samples = [s for f in FAMILIES for s in generate(f, n // len(FAMILIES) + 1, "test", seed=seed + 7)][:n]
    prompts = [s.prompt for s in samples]
    good = _images01(samples)
    g = preference_logits(model, tokenizer, good, prompts)
    out = {}
    for kind in CORRUPTIONS:
        bad = (images_to_tensor([corrupt(s, kind, rng) for s in samples]) + 1) / 2
        out[kind] = round(float((g > preference_logits(model, tokenizer, bad, prompts)).float().mean()), 3)
    return out


# ---------------------------------------------------------------------------------------------------------------
# captioner
# ---------------------------------------------------------------------------------------------------------------

def train_captioner(out_dir, seed: int = 0, scale: float = 1.0, steps: int = 500, batch: int = 32, lr: float = 5e-4,
                    near_misses_per_image: int = 0, rank_weight: float = 1.0, continue_steps: int = 0,
                    eval_prompts: int = 64) -> dict:
    """Teacher forcing on renders. With `near_misses_per_image > 0` each image also gets near misses of its scene
    (the generated look applied to all of them) and a Bradley-Terry loss on the caption reward itself: the prompt's
    NLL given its own image must be below its NLL given each near miss. Likelihood training alone never shows the
    captioner an image that almost matches a prompt, which is what a reward has to tell apart on generated images.
    `continue_steps > 0` trains the captioner already in `out_dir` for that many more steps; its card keeps the
    earlier training's description."""
    out = Path(out_dir)
    model, tokenizer, steps, earlier = _start_model(out, cap.load_captioner, cap.build_captioner, continue_steps, steps, scale)
    torch.manual_seed(seed)
    rng, gen = np.random.default_rng(seed + 32), torch.Generator().manual_seed(seed + 33)
    look = GeneratedLook(out.parent / "base" / "vae") if near_misses_per_image > 0 else None
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = cosine_lr(opt, steps, warmup=min(100, max(1, steps // 10)) if earlier is not None else 100)
    stream = sample_stream(batch, seed=seed + 31)
    progress = Progress("captioner", steps, max(1, min(100, steps)))
    model.train()
    for i in range(steps):
        samples = next(stream)
        prompts = [s.prompt for s in samples]
        images = _images01(samples)
        _, _, mask = cap.caption_batch(tokenizer, prompts)
        if look is None:
            loss = cap.caption_nll(model, tokenizer, images, prompts).sum() / mask[:, 1:].sum()  # mean per token
        else:
            k = near_misses_per_image
            looked = look(torch.cat([images, near_miss_images01(samples, k, rng)]), gen)
            nll = cap.caption_nll(model, tokenizer, looked, prompts + [p for p in prompts for _ in range(k)])
            own, near = nll[: len(prompts)], nll[len(prompts):].view(len(prompts), k)
            loss = own.sum() / mask[:, 1:].sum() + rank_weight * F.softplus(own[:, None] - near).mean()
        progress.step(i, descend(loss, model.parameters(), opt, sched))
    model.eval()
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    quality = _caption_quality(model, tokenizer, seed)
    eval_look = look or GeneratedLook(out.parent / "base" / "vae")
    near_acc = near_miss_accuracy(lambda images01, prompts: -cap.caption_nll(model, tokenizer, images01, prompts),
                                  eval_look, n=eval_prompts)
    metrics = {"steps": steps, "batch": batch, "near_misses_per_image": near_misses_per_image, "rank_weight": rank_weight,
               "wall_s": round(progress.wall_s, 1), "params": parameter_count(model), **quality,
               "near_miss_accuracy": near_acc, "continued": earlier is not None}
    table = "\n".join(f"| {f} | {q['nll_per_token']:.3f} | {q['nll_right_lt_wrong']:.3f} | {q['greedy_exact']:.3f} | {near_acc[f]:.3f} |"
                      for f, q in quality["families"].items())
    if near_misses_per_image > 0:
        kinds = "; ".join(f"{f}: {', '.join(k)}" for f, k in NEAR_MISSES.items())
        data = (f"renders of generated prompts of every family (split `all`), caption = \"{cap.CAPTION_PREFIX} \" + prompt,\n"
                f"  with the generated look ({eval_look.describe()}); {near_misses_per_image} near misses per image, each its\n"
                f"  scene with one mistake its family's prompts can express ({kinds})")
        objective = f"teacher forcing (token cross-entropy) + {rank_weight} x Bradley-Terry on the NLL (own image below each near miss)"
    else:
        data = f"renders of generated prompts of every family (split `all`), caption = \"{cap.CAPTION_PREFIX} \" + prompt"
        objective = "teacher forcing, token cross-entropy"
    continued = _continued_note(earlier, "--continue-captioner")
    _write_card(out, "Toy captioner (transformers `BlipForConditionalGeneration`)", f"""
CoMat's concept-matching model: the reward is minus the per-sample NLL of the prompt given the image
(`caption_nll`, prefix "{cap.CAPTION_PREFIX}" masked out).
- Data: {data}.
- Training: {objective}, {steps} steps, batch {batch}, AdamW lr {lr}, cosine;
  wall time {metrics['wall_s']} s. Parameters: {metrics['params']:,}.{continued}
- Quality on 32 held-out `test` prompts per family: NLL per prompt token; how often the right prompt has lower NLL
  than the prompt of another image of the same family; greedy caption exactly equal to the prompt; and on
  {eval_prompts} per family, near-miss accuracy (the prompt's NLL lower given its own image than given a near miss,
  both with the generated look; chance 0.5):

| family | NLL / token | right < wrong | greedy exact | near-miss accuracy |
| --- | --- | --- | --- | --- |
{table}
""")
    return metrics


@torch.no_grad()
def _caption_quality(model, tokenizer, seed: int, n: int = 32) -> dict:
    out = {}
    for fam in FAMILIES:
        samples = generate(fam, n, "test", seed=seed + 5)
        prompts = [s.prompt for s in samples]
        images = _images01(samples)
        right = cap.caption_nll(model, tokenizer, images, prompts)
        wrong = cap.caption_nll(model, tokenizer, images, prompts[1:] + prompts[:1])
        _, _, mask = cap.caption_batch(tokenizer, prompts)
        differs = torch.tensor([a != b for a, b in zip(prompts, prompts[1:] + prompts[:1])])
        greedy = cap.greedy_captions(model, tokenizer, images[:16], max_new_tokens=cap.CAPTION_MAX_TOKENS - 8)
        out[fam] = {
            "nll_per_token": round(float(right.sum() / mask[:, 1:].sum()), 4),
            "nll_right_lt_wrong": round(float((right < wrong)[differs].float().mean()), 3),
            "greedy_exact": round(float(np.mean([g == p for g, p in zip(greedy, prompts[:16])])), 3),
        }
    return {"families": out}


# ---------------------------------------------------------------------------------------------------------------
# segmenter
# ---------------------------------------------------------------------------------------------------------------

def absent_combo(objs, rng, shared: bool) -> tuple[str, str]:
    """A colour-shape combination not in the scene; with `shared`, one that shares its colour with an object that is
    there (a red square's "red circle"), else its shape, when the scene allows one. The committed segmenter found
    such colour-sharing phrases 97 % of the time (it had learnt the colour, not the pair) against 0.3 % for
    shape-sharing ones."""
    present = {x.combo for x in objs}
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    if shared:
        colours, shapes = {c for c, _ in present}, {s for _, s in present}
        absent = ([(c, s) for c, s in absent if c in colours] or [(c, s) for c, s in absent if s in shapes] or absent)
    return absent[int(rng.integers(len(absent)))]


def _segmentation_example(sample: PromptSample, rng, shared_absent: float = 0.0) -> tuple[str, np.ndarray]:
    """A phrase and its target mask: a present "colour shape" (55 %), a bare shape noun (15 %), or an absent object
    (30 %: CoMat's pixel loss pushes attention out of the whole image for a missing object, so an empty mask must
    come out empty). A fraction `shared_absent` of the absent phrases share a colour with an object that is there
    (`absent_combo`): those are the ones a segmenter trained on random absent phrases fires on (it learns "red", not
    "red circle"), and on a swapped-colour image they are exactly the phrases CoMat's concentration loss asks about."""
    objs, jitter = sample.scene.objects, sample.scene.jitter
    r = rng.random()
    if r < 0.55:
        o = objs[int(rng.integers(len(objs)))]
        members = [k for k, x in enumerate(objs) if x.combo == o.combo]
        phrase = f"{o.color} {o.shape}"
    elif r < 0.7:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        members = [k for k, x in enumerate(objs) if x.shape == shape]
        phrase = shape if len(members) <= 1 else shape + "s"
    else:
        c, s = absent_combo(objs, rng, shared=rng.random() < shared_absent)
        members, phrase = [], f"{c} {s}"
    mask = np.zeros((64, 64), dtype=np.float32)
    for k in members:
        mask = np.maximum(mask, object_mask(objs[k], jitter[k]))
    return phrase, mask


def train_segmenter(out_dir, seed: int = 0, scale: float = 1.0, steps: int = 1500, batch: int = 32, lr: float = 1e-3,
                    shared_absent: float = 0.0, generated_look: bool = False, continue_steps: int = 0) -> dict:
    """BCE + soft Dice on renders against the renderer's coverage masks. `shared_absent`: the fraction of absent
    phrases that share a colour with a present object (`_segmentation_example`); `generated_look`: the
    images get the base model's look (`GeneratedLook`; masks unchanged), since CoMat segments generated images.
    `continue_steps > 0` trains the segmenter already in `out_dir` for that many more steps; its card keeps the
    earlier training's description."""
    out = Path(out_dir)
    model, tokenizer, steps, earlier = _start_model(out, seg.load_segmenter, seg.build_segmenter, continue_steps, steps, scale)
    torch.manual_seed(seed)
    rng, gen = np.random.default_rng(seed + 41), torch.Generator().manual_seed(seed + 43)
    look = GeneratedLook(out.parent / "base" / "vae") if generated_look else None
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = cosine_lr(opt, steps, warmup=min(100, max(1, steps // 10)) if earlier is not None else 100)
    stream = sample_stream(batch, seed=seed + 42 + (1000 if earlier is not None else 0))
    progress = Progress("segmenter", steps, max(1, min(100, steps)))
    model.train()
    for i in range(steps):
        samples = next(stream)
        phrases, masks = zip(*[_segmentation_example(s, rng, shared_absent) for s in samples])
        target = torch.from_numpy(np.stack(masks))
        images = _images01(samples) if look is None else look(_images01(samples), gen)
        logits = seg.segment_logits(model, tokenizer, images, phrases)
        prob = torch.sigmoid(logits)
        # BCE for every pixel + a soft Dice term, since objects cover only a few percent of the image.
        dice = 1 - (2 * (prob * target).sum((1, 2)) + 1) / (prob.sum((1, 2)) + target.sum((1, 2)) + 1)
        loss = F.binary_cross_entropy_with_logits(logits, target) + 0.5 * dice.mean()
        progress.step(i, descend(loss, model.parameters(), opt, sched))
    model.eval()
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    quality = _segmentation_quality(model, tokenizer, seed)
    metrics = {"steps": steps, "batch": batch, "shared_absent": shared_absent, "generated_look": generated_look,
               "wall_s": round(progress.wall_s, 1), "params": parameter_count(model), **quality, "continued": earlier is not None}
    absent_note = (f"; {shared_absent:.0%} of those share the colour of an object that is there" if shared_absent else "")
    look_note = f"\n  Every image given the generated look: {look.describe()}." if look is not None else ""
    continued = _continued_note(earlier, "--continue-segmenter")
    _write_card(out, "Toy text-prompted segmenter (transformers `CLIPSegForImageSegmentation`)", f"""
Stands in for Grounded-SAM in CoMat's attribute concentration: a noun phrase ("red circle", "circle", "circles")
in, a per-pixel probability map out at image resolution.
- Data: renders of generated prompts (split `all`); targets from the renderer's own coverage masks (union of the
  matching objects; an empty mask for 30 % absent-object phrases{absent_note}).{look_note}
- Training: BCE + 0.5 x soft Dice, {steps} steps, batch {batch}, AdamW lr {lr}, cosine; wall time {metrics['wall_s']} s.
  Parameters: {metrics['params']:,}.{continued}
- Quality on {quality['n_images']} held-out `test` images (clean renders): mean IoU (threshold 0.5) for present "colour shape"
  phrases {quality['iou_present']:.3f}; present phrases missed {quality['missed_detection_rate']:.3f}. Absent-object
  phrases, a random one per image / one sharing the colour of an object that is there: any pixel above 0.5
  {quality['false_positive_rate']:.3f} / {quality['false_positive_rate_shared']:.3f}; found, i.e. at least
  {seg.MIN_DETECTION_AREA} pixels above 0.5 (what `ralign.models.grounded_segmenter.ToySegmenter` counts)
  {quality['false_detection_rate']:.3f} / {quality['false_detection_rate_shared']:.3f}.
""")
    return metrics


def segmentation_probes(samples, rng: np.random.Generator) -> tuple[list[str], list[np.ndarray], list[str], list[str]]:
    """What a grounded segmenter is asked about each sample: a present "colour shape" phrase (one of its objects,
    drawn by `rng`) with its true mask (every object of that colour and shape), a random absent phrase, and an absent
    phrase sharing the colour of a present object. Used by the segmenter's card and benchmarks/sanity/segmenter_quality.py."""
    present, truth, absent, shared = [], [], [], []
    for s in samples:
        o = s.scene.objects[int(rng.integers(len(s.scene.objects)))]
        mask = np.zeros((64, 64), dtype=bool)
        for k, x in enumerate(s.scene.objects):
            if x.combo == o.combo:
                mask |= object_mask(x, s.scene.jitter[k]) > 0.5
        present.append(f"{o.color} {o.shape}")
        truth.append(mask)
        absent.append(" ".join(absent_combo(s.scene.objects, rng, shared=False)))
        shared.append(" ".join(absent_combo(s.scene.objects, rng, shared=True)))
    return present, truth, absent, shared


@torch.no_grad()
def _segmentation_quality(model, tokenizer, seed: int, n: int = 120) -> dict:
    rng = np.random.default_rng(seed + 77)
    samples = [s for f in ("single", "binding", "spatial", "long") for s in generate(f, n // 4, "test", seed=seed + 8)]
    images = _images01(samples)
    ious = []
    present_phrases, present_masks, absent_phrases, shared_phrases = segmentation_probes(samples, rng)
    pred = seg.segment(model, tokenizer, images, present_phrases).numpy() > 0.5
    missed = [p.sum() < seg.MIN_DETECTION_AREA for p in pred]
    for p, m in zip(pred, present_masks):
        union = (p | m).sum()
        ious.append((p & m).sum() / union if union else 1.0)
    out = {"n_images": len(samples), "iou_present": round(float(np.mean(ious)), 4),
           "missed_detection_rate": round(float(np.mean(missed)), 4)}
    for suffix, phrases in (("", absent_phrases), ("_shared", shared_phrases)):
        pred_absent = seg.segment(model, tokenizer, images, phrases).numpy() > 0.5
        out[f"false_positive_rate{suffix}"] = round(float(np.mean([p.any() for p in pred_absent])), 4)
        out[f"false_detection_rate{suffix}"] = round(float(np.mean([p.sum() >= seg.MIN_DETECTION_AREA for p in pred_absent])), 4)
    return out


__all__ = ["train_reward_clip", "train_preference", "train_captioner", "train_segmenter", "segmentation_probes", "corrupt", "CORRUPTIONS"]
