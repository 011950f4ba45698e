"""Held-out evaluation of a text-to-image pipeline in the toy world, scored by the oracle.

Generates images for `n` prompts of every family of a split, scores them with the oracle (per-family metrics),
measures fidelity against clean renders of the same prompts (KID on image statistics + artefact rate), and writes
one image grid per family with a green (all correct) or red frame around each image.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ralign.config import UserError
from ralign.world import oracle
from ralign.world.prompts import FAMILIES, SPLITS, generate
from ralign.world.scene import render
from ralign.world.stats import rate_with_interval

log = logging.getLogger(__name__)

GRID_COLUMNS = 8


def eval_prompts(split: str, n: int, seed: int = 0, families: Sequence[str] = FAMILIES):
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    # Evaluation prompts come from their own seed stream (seed + 10_000) so they never coincide with the RL prompt
    # stream of the same split by construction of the seeds.
    return {f: generate(f, n, split=split, seed=seed + 10_000) for f in families}


def evaluate_images(samples_by_family, images_by_family) -> dict:
    """The oracle's report of generated images, with a 95 % interval on every all-correct rate (bootstrap over
    prompts, ralign/world/stats.py) and each prompt's verdict (`per_prompt`), so that two evaluations of the same
    prompts can be compared pairwise."""
    prompts, images, families, flags = [], [], [], []
    for fam, samples in samples_by_family.items():
        prompts += [s.prompt for s in samples]
        images += list(images_by_family[fam])
        families += [fam] * len(samples)
        flags += [s.unseen for s in samples]
    verdicts = [oracle.judge(p, im) for p, im in zip(prompts, images)]
    report = oracle.aggregate(verdicts, families)
    per_prompt: dict[str, dict] = {}
    for prompt, fam, v in zip(prompts, families, verdicts):
        entry = per_prompt.setdefault(fam, {"prompts": [], "all_correct": [], "object_recall": []})
        entry["prompts"].append(prompt)
        entry["all_correct"].append(float(v.all_correct))
        entry["object_recall"].append(float(v.object_recall))
    for fam, entry in per_prompt.items():
        report["families"][fam]["all_correct_ci"] = rate_with_interval(entry["all_correct"])["ci"]
    report["overall"]["all_correct_ci"] = rate_with_interval([float(v.all_correct) for v in verdicts], families)["ci"]
    report["per_prompt"] = per_prompt
    references = [render(s.scene) for samples in samples_by_family.values() for s in samples]
    report["fidelity"] = oracle.evaluate_fidelity(images, references)
    unseen = [v for v, u in zip(verdicts, flags) if u]
    if unseen:
        report["unseen_combos"] = oracle.aggregate(unseen)["overall"]
    return report


def write_grid(path: Path, prompts: Sequence[str], images: Sequence[np.ndarray], max_images: int = 32, scale: int = 2,
               judge: bool = True) -> None:
    """A PNG grid; with `judge`, frames are green where the oracle judges the image all-correct, red elsewhere
    (toy-world prompts only); without, grey."""
    images = list(images)[:max_images]
    prompts = list(prompts)[:max_images]
    if not images:
        return
    h, w = images[0].shape[:2]
    pad = 3
    cols = min(GRID_COLUMNS, len(images))
    rows = -(-len(images) // cols)
    cell_w, cell_h = w * scale + 2 * pad, h * scale + 2 * pad
    canvas = Image.new("RGB", (cols * cell_w, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (prompt, img) in enumerate(zip(prompts, images)):
        x, y = (i % cols) * cell_w, (i // cols) * cell_h
        colour = ((40, 170, 60) if oracle.judge(prompt, img).all_correct else (200, 40, 40)) if judge else (160, 160, 160)
        draw.rectangle([x, y, x + cell_w - 1, y + cell_h - 1], fill=colour)
        canvas.paste(Image.fromarray(img).resize((w * scale, h * scale), Image.Resampling.NEAREST), (x + pad, y + pad))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    path.with_suffix(".txt").write_text("\n".join(f"{i:2d} {p}" for i, p in enumerate(prompts)) + "\n", encoding="utf-8")


def evaluate_generator(
    generate_fn: Callable[[list[str]], list[np.ndarray]],
    *,
    split: str = "test",
    n: int = 200,
    seed: int = 0,
    families: Sequence[str] = FAMILIES,
    grid_dir: Path | None = None,
) -> dict:
    """Run `generate_fn` on held-out prompts of every family and score the images with the oracle."""
    samples_by_family = eval_prompts(split, n, seed, families)
    images_by_family = {}
    start = time.time()
    for fam, samples in samples_by_family.items():
        t0 = time.time()
        images_by_family[fam] = generate_fn([s.prompt for s in samples])
        log.info("eval: generated %d %s images in %.1fs", len(samples), fam, time.time() - t0)
    report = evaluate_images(samples_by_family, images_by_family)
    report.update({"split": split, "n_per_family": n, "seed": seed, "generate_s": round(time.time() - start, 1)})
    if grid_dir is not None:
        for fam, samples in samples_by_family.items():
            write_grid(Path(grid_dir) / f"grid_{fam}.png", [s.prompt for s in samples], images_by_family[fam])
    return report
