"""A GenEval-style reward: a learned object detector plus rules over its detections, scored against the prompt.

Flow-GRPO's strongest results train on GenEval's check (a detector's objects, their counts, colours and positions
against the prompt). This is that reward for the toy world (and for any detector saved in the same layout):
- the prompt is read by the reward's own parser (`text_parsing`'s entities, and the relation words between two
  entities); it never sees the oracle, which has a parser of its own;
- the detector (`ralign/models/detector.py`) finds the objects;
- rules: each named object is present as often as asked (a count off by k scores 1 - k/count), with the size asked
  (small or large by box side), each relation holds between the two objects' grid cells, and nothing else is there.
The score is the mean of those checks (graded, so groups of samples of one prompt differ); `all_correct` is 1 when
every check passes, the verdict GenEval reports. Non-differentiable: for GRPO, DPOK and rejection sampling.
A prompt the parser finds no object in scores NaN, which the reward guard quarantines (nothing to check is not a 0).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ralign.models import TOY_MODELS_DIR
from ralign.models.detector import DEFAULT_THRESHOLD, Detection, detect, load_detector
from ralign.rewards.base import Reward, RewardOutput
from ralign.rewards.text_parsing import NOUNS, parse_entities
from ralign.world.prompts import NUMBER_WORDS, RELATIONS, relation_holds
from ralign.world.scene import COLORS, GRID, IMAGE_SIZE, SIZES

_COUNTS = {w: n for n, w in NUMBER_WORDS.items()}
# Small and large objects differ by 6 px of side; the detector's box side is called by the midpoint.
_SIZE_SPLIT = sum(SIZES.values()) / len(SIZES)
_RELATION = re.compile("|".join(re.escape(r) for r in sorted(RELATIONS, key=len, reverse=True)))


@dataclass(frozen=True)
class WantedObject:
    color: str | None  # None: any colour
    shape: str
    size: str | None
    count: int

    def matches(self, d: Detection) -> bool:
        return d.shape == self.shape and (self.color is None or d.color == self.color)


def read_prompt(prompt: str, parser: str = "lexicon") -> tuple[list[WantedObject], list[tuple[int, str, int]]]:
    """The objects a prompt names and the relations between consecutive ones ((subject, relation, reference))."""
    entities = parse_entities(prompt, parser)
    wanted = []
    for e in entities:
        colours = [m for m in e.modifiers if m in COLORS]
        sizes = [m for m in e.modifiers if m in SIZES]
        counts = [_COUNTS[m] for m in e.modifiers if m in _COUNTS]
        wanted.append(WantedObject(colours[-1] if colours else None, NOUNS[e.noun], sizes[-1] if sizes else None,
                                   counts[-1] if counts else 1))
    relations = []
    for i in range(len(entities) - 1):
        between = prompt[entities[i].spans[-1][1]: entities[i + 1].spans[0][0]].lower()
        found = _RELATION.search(between)
        if found:
            relations.append((i, found.group(), i + 1))
    return wanted, relations


def detected_cell(d: Detection) -> tuple[int, int]:
    """The grid cell (row, col) of a detection's box centre."""
    step = IMAGE_SIZE / GRID
    return min(GRID - 1, max(0, int(d.cy // step))), min(GRID - 1, max(0, int(d.cx // step)))


def detected_size(d: Detection) -> str:
    return "large" if d.side >= _SIZE_SPLIT else "small"


def check(wanted: list[WantedObject], relations: list[tuple[int, str, int]], found: list[Detection]) -> dict[str, list[float]]:
    """Each rule's checks (1.0 = passes) for one image's detections."""
    checks: dict[str, list[float]] = {"count": [], "size": [], "relation": [], "nothing_else": []}
    best: list[Detection | None] = []
    for w in wanted:
        mine = [d for d in found if w.matches(d)]
        checks["count"].append(max(0.0, 1.0 - abs(len(mine) - w.count) / w.count))
        if w.size is not None:
            right = [d for d in mine if detected_size(d) == w.size]
            checks["size"].append(len(right) / max(len(mine), w.count))
        best.append(max(mine, key=lambda d: d.score) if mine else None)
    for subject, relation, reference in relations:
        a, b = best[subject], best[reference]
        checks["relation"].append(float(a is not None and b is not None and relation_holds(relation, detected_cell(a), detected_cell(b))))
    extra = [d for d in found if not any(w.matches(d) for w in wanted)]
    checks["nothing_else"].append(float(not extra))
    return checks


def score_detections(prompt: str, found: list[Detection], parser: str = "lexicon") -> tuple[float, float]:
    """(score, verdict) of one image's detections against its prompt: the mean of the checks, and 1.0 when every
    check passes; both NaN when the prompt names no object."""
    wanted, relations = read_prompt(prompt, parser)
    if not wanted:
        return float("nan"), float("nan")
    passed = [v for values in check(wanted, relations, found).values() for v in values]
    return sum(passed) / len(passed), float(all(v == 1.0 for v in passed))


class DetectorReward(Reward):
    name = "detector"

    def __init__(self, path: str | Path = TOY_MODELS_DIR / "detector", threshold: float = DEFAULT_THRESHOLD, parser: str = "lexicon",
                 device: str = "cpu"):
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"detector reward: threshold must be in (0, 1), got {threshold}")
        self.model = load_detector(path).requires_grad_(False).to(device)
        self.threshold, self.parser = threshold, parser

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **_) -> RewardOutput:
        detections = detect(self.model, images.float(), self.threshold)
        judged = [score_detections(prompt, found, self.parser) for prompt, found in zip(prompts, detections)]
        score = [sc for sc, _ in judged]
        verdict = [v for _, v in judged]
        n_found = [float(len(found)) for found in detections]
        device = images.device
        score_t = torch.tensor(score, device=device)
        return RewardOutput(score_t, {"detector": score_t, "all_correct": torch.tensor(verdict, device=device),
                                      "objects_found": torch.tensor(n_found, device=device)})
