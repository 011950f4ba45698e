"""The oracle: checks an image against its prompt by plain image processing. EVALUATION ONLY — no reward may import
this module, or training would optimise the measuring stick itself.

Three parts:
- `parse_prompt`: text -> `Requirements` (objects with colour, shape, optional size and count; relations; family),
  from the words alone, for every template the prompt generator uses.
- `detect`: image -> `Detection`s: palette quantisation (nearest of background + the six colours, within a
  distance), connected components per colour, shape from simple descriptors, size class from the bounding box.
- `judge` / `evaluate`: per-image verdicts and per-family metrics; `kid` / `evaluate_fidelity`: a distribution
  distance between generated and rendered images on deterministic image statistics (no network to be fooled).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ralign.world.prompts import FAMILIES, NUMBER_WORDS, PLURALS, generate
from ralign.world.scene import BACKGROUND, COLORS, SHAPES, SIZES, render

# ---------------------------------------------------------------------------------------------------------------
# Prompt parsing
# ---------------------------------------------------------------------------------------------------------------

_COLOR = "(" + "|".join(COLORS) + ")"
_SHAPE = "(" + "|".join(SHAPES) + ")"
_PLURAL = "(" + "|".join(PLURALS.values()) + ")"
_SIZE = "(" + "|".join(SIZES) + ")"
_NUMBER = "(" + "|".join(NUMBER_WORDS.values()) + ")"
_ART = "(?:a|an)"
_REL = "(to the left of|to the right of|above|below)"
_WORD_TO_NUMBER = {w: n for n, w in NUMBER_WORDS.items()}
_PLURAL_TO_SHAPE = {p: s for s, p in PLURALS.items()}

_PATTERNS = {
    "single": re.compile(rf"^(?:a picture of )?{_ART} {_COLOR} {_SHAPE}$"),
    "binding": re.compile(rf"^{_ART} {_COLOR} {_SHAPE} and {_ART} {_COLOR} {_SHAPE}$"),
    "counting": re.compile(rf"^{_NUMBER} {_COLOR} {_PLURAL}$"),
    "spatial": re.compile(rf"^{_ART} {_COLOR} {_SHAPE} {_REL} {_ART} {_COLOR} {_SHAPE}$"),
    "size": re.compile(rf"^{_ART} {_SIZE} {_COLOR} {_SHAPE} and {_ART} {_SIZE} {_COLOR} {_SHAPE}$"),
}
# One object per sentence in long prompts; sentences without a colour word are scene filler.
_LONG_OBJECT = re.compile(rf"\b{_SIZE} {_COLOR} {_SHAPE}\b")
_ANY_COLOR = re.compile(rf"\b{_COLOR}\b")


@dataclass(frozen=True)
class RequiredObject:
    color: str
    shape: str
    size: str | None = None
    count: int = 1


@dataclass(frozen=True)
class Requirements:
    family: str
    objects: tuple[RequiredObject, ...]
    relations: tuple[tuple[int, str, int], ...] = ()  # (object index, relation, object index)

    @property
    def total_objects(self) -> int:
        return sum(o.count for o in self.objects)


def _normalise(prompt: str) -> str:
    return " ".join(prompt.lower().split())


def parse_prompt(prompt: str) -> Requirements:
    """Requirements of a prompt of any family the generator makes; ValueError for anything else."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    text = _normalise(prompt)
    if not text:
        raise ValueError("empty prompt")
    sentences = [s.strip() for s in re.split(r"[.;!?]", text) if s.strip()]
    if len(sentences) == 1 and not text.endswith("."):
        single = sentences[0]
        for family, pattern in _PATTERNS.items():
            m = pattern.match(single)
            if m:
                return _from_match(family, m.groups())
        raise ValueError(f"cannot parse prompt {prompt[:80]!r}: no known template matches")
    objects = []
    for sentence in sentences:
        found = _LONG_OBJECT.findall(sentence)
        if len(found) > 1:
            raise ValueError(f"cannot parse prompt: sentence {sentence[:60]!r} describes more than one object")
        if found:
            size, color, shape = found[0]
            objects.append(RequiredObject(color, shape, size))
        elif _ANY_COLOR.search(sentence):
            raise ValueError(f"cannot parse prompt: sentence {sentence[:60]!r} names a colour but no sized object")
    if not objects:
        raise ValueError(f"cannot parse prompt {prompt[:80]!r}: no object described")
    return Requirements("long", tuple(objects))


def _from_match(family: str, g: tuple[str, ...]) -> Requirements:
    if family == "single":
        return Requirements(family, (RequiredObject(g[0], g[1]),))
    if family == "binding":
        return Requirements(family, (RequiredObject(g[0], g[1]), RequiredObject(g[2], g[3])))
    if family == "counting":
        return Requirements(family, (RequiredObject(g[1], _PLURAL_TO_SHAPE[g[2]], count=_WORD_TO_NUMBER[g[0]]),))
    if family == "spatial":
        return Requirements(family, (RequiredObject(g[0], g[1]), RequiredObject(g[3], g[4])), ((0, g[2], 1),))
    return Requirements(family, (RequiredObject(g[1], g[2], g[0]), RequiredObject(g[4], g[5], g[3])))


# ---------------------------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------------------------

PALETTE_NAMES = ("background", *COLORS)
PALETTE = np.asarray([BACKGROUND, *COLORS.values()], dtype=np.float32)
# A pixel belongs to a palette colour within this RGB distance; the closest two colours are ~95 apart, so 55 leaves
# room for a generator's tint without ever admitting a pixel to two colours.
PALETTE_RADIUS = 55.0
# A pixel within this distance of the straight line between the background and a colour is an anti-aliased edge.
BLEND_RADIUS = 30.0
MIN_AREA = 12  # px; a small triangle covers ~40 px, anti-aliasing specks a handful
MAX_AREA = 2 * SIZES["large"] ** 2  # beyond this no single object of the world fits: a blob, not a shape
LARGE_THRESHOLD = (SIZES["small"] + SIZES["large"]) / 2  # bounding-box side separating small from large
ARTIFACT_PIXEL_FRACTION = 0.03  # off-palette pixels (not anti-aliasing) above this mark the image as an artefact


@dataclass(frozen=True)
class Detection:
    color: str
    shape: str  # circle | square | triangle | unknown
    size: str
    x: float  # centroid, pixels
    y: float
    area: int
    fill: float


def _quantise(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel palette index (-1 = off-palette) and a mask of anti-aliasing blend pixels."""
    px = image.reshape(-1, 3).astype(np.float32)
    dist = np.linalg.norm(px[:, None, :] - PALETTE[None, :, :], axis=-1)
    idx = dist.argmin(axis=1)
    idx = np.where(dist[np.arange(len(px)), idx] <= PALETTE_RADIUS, idx, -1)
    bg = PALETTE[0]
    blend = np.zeros(len(px), dtype=bool)
    for colour in PALETTE[1:]:
        d = colour - bg
        t = np.clip(((px - bg) @ d) / float(d @ d), 0.0, 1.0)
        blend |= np.linalg.norm(px - (bg + t[:, None] * d), axis=1) <= BLEND_RADIUS
    h, w = image.shape[:2]
    return idx.reshape(h, w), blend.reshape(h, w)


def _classify(mask: np.ndarray) -> tuple[str, float]:
    """Shape of one component from its fill ratio, where its mass lies, and whether its box corners are filled."""
    rows, cols = np.nonzero(mask)
    top, left = rows.min(), cols.min()
    h = rows.max() - top + 1
    w = cols.max() - left + 1
    area = len(rows)
    fill = area / float(h * w)
    aspect = max(h, w) / min(h, w)
    if aspect > 1.6 or fill < 0.3 or area > MAX_AREA:
        return "unknown", fill
    box = mask[top : top + h, left : left + w]
    # An upright triangle puts most of its mass in the lower half of its box; circles and squares are symmetric.
    mid = (h - 1) / 2.0
    lower, upper = np.sum(rows - top > mid), np.sum(rows - top < mid)
    if lower > 1.6 * max(upper, 1) and fill < 0.72:
        return "triangle", fill
    # Squares fill the corners of their bounding box, circles leave them empty (a small circle's fill ratio alone
    # can look square after quantisation at some sub-pixel offsets).
    k = max(1, min(h, w) // 5)
    corners = np.concatenate([box[:k, :k].ravel(), box[:k, -k:].ravel(), box[-k:, :k].ravel(), box[-k:, -k:].ravel()])
    corner_fill = float(corners.mean())
    if corner_fill >= 0.5 and fill >= 0.8:
        return "square", fill
    if fill >= 0.6 and corner_fill < 0.5:
        return "circle", fill
    return "unknown", fill


def detect(image: np.ndarray) -> list[Detection]:
    image = _check_image(image)
    idx, _ = _quantise(image)
    detections = []
    for ci, name in enumerate(PALETTE_NAMES[1:], start=1):
        labels, n = ndimage.label(idx == ci, structure=np.ones((3, 3)))
        for comp in range(1, n + 1):
            mask = labels == comp
            area = int(mask.sum())
            if area < MIN_AREA:
                continue
            shape, fill = _classify(mask)
            rows, cols = np.nonzero(mask)
            side = max(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1)
            size = "large" if side >= LARGE_THRESHOLD else "small"
            detections.append(Detection(name, shape, size, float(cols.mean()), float(rows.mean()), area, round(fill, 3)))
    return detections


def off_palette_fraction(image: np.ndarray) -> float:
    """Fraction of pixels that are neither a palette colour nor an anti-aliased blend with the background."""
    idx, blend = _quantise(_check_image(image))
    return float(np.mean((idx < 0) & ~blend))


def has_artifact(image: np.ndarray, detections: list[Detection] | None = None) -> bool:
    """Off-palette pixels beyond anti-aliasing, or a blob that is no shape of the world."""
    dets = detect(image) if detections is None else detections
    return any(d.shape == "unknown" for d in dets) or off_palette_fraction(image) > ARTIFACT_PIXEL_FRACTION


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    return image


# ---------------------------------------------------------------------------------------------------------------
# Verdicts and metrics
# ---------------------------------------------------------------------------------------------------------------

SPATIAL_MARGIN = 2.0  # px between centroids for a relation to count as holding


@dataclass
class Verdict:
    family: str
    object_recall: float
    binding_ok: bool
    count_ok: bool
    spatial_ok: bool | None
    size_ok: bool | None
    artifact: bool
    all_correct: bool
    detections: list[Detection] = field(default_factory=list)


def _relation_holds(a: Detection, rel: str, b: Detection) -> bool:
    if rel == "to the left of":
        return a.x < b.x - SPATIAL_MARGIN
    if rel == "to the right of":
        return a.x > b.x + SPATIAL_MARGIN
    if rel == "above":
        return a.y < b.y - SPATIAL_MARGIN
    return a.y > b.y + SPATIAL_MARGIN  # below


def judge(prompt: str, image: np.ndarray) -> Verdict:
    """Check one image against its prompt.

    - object_recall: required objects found (colour and shape), one-to-one; for counts, min(found, n) / n.
    - binding_ok: every required colour-shape pair is present, and no detected object carries a required colour on
      a shape the prompt does not give that colour (a red square for "a red circle and a blue square" fails).
    - count_ok: each required pair appears exactly as often as required, and there are no other objects
      (applies to every family: the prompt describes the whole scene).
    - spatial_ok: the relation holds between the centroids (spatial family only, else None).
    - size_ok: every sized object is present with its size (size and long families, else None).
    - artifact: off-palette pixels beyond anti-aliasing, or blobs that are no shape of the world.
    """
    req = parse_prompt(prompt)
    image = _check_image(image)
    dets = detect(image)
    shapes = [d for d in dets if d.shape != "unknown"]
    artifact = has_artifact(image, dets)
    matches = [[d for d in shapes if d.color == o.color and d.shape == o.shape] for o in req.objects]
    recall = sum(min(len(m), o.count) for m, o in zip(matches, req.objects)) / req.total_objects
    required_pairs = {(o.color, o.shape) for o in req.objects}
    required_colors = {o.color for o in req.objects}
    binding_ok = all(matches) and all((d.color, d.shape) in required_pairs for d in shapes if d.color in required_colors)
    count_ok = all(len(m) == o.count for m, o in zip(matches, req.objects)) and len(dets) == req.total_objects
    spatial_ok = None
    if req.relations:
        spatial_ok = all(matches[i] and matches[j] and _relation_holds(matches[i][0], rel, matches[j][0])
                         for i, rel, j in req.relations)
    size_ok = None
    if any(o.size for o in req.objects):
        size_ok = all(any(d.size == o.size for d in m) for m, o in zip(matches, req.objects) if o.size)
    all_correct = (recall == 1.0 and binding_ok and count_ok and spatial_ok is not False and size_ok is not False
                   and not artifact)
    return Verdict(req.family, recall, binding_ok, count_ok, spatial_ok, size_ok, artifact, all_correct, dets)


METRICS = ("object_recall", "binding_acc", "count_acc", "spatial_acc", "all_correct", "artifact_rate")


def _aggregate(verdicts: Sequence[Verdict]) -> dict:
    def mean(values):
        values = [float(v) for v in values if v is not None]
        return round(float(np.mean(values)), 4) if values else None

    return {
        "n": len(verdicts),
        "object_recall": mean(v.object_recall for v in verdicts),
        "binding_acc": mean(v.binding_ok for v in verdicts),
        "count_acc": mean(v.count_ok for v in verdicts),
        "spatial_acc": mean(v.spatial_ok for v in verdicts),
        "size_acc": mean(v.size_ok for v in verdicts),
        "all_correct": mean(v.all_correct for v in verdicts),
        "artifact_rate": mean(v.artifact for v in verdicts),
    }


def evaluate(prompts: Sequence[str], images: Sequence[np.ndarray], families: Sequence[str] | None = None) -> dict:
    """Per-family and overall metrics; families default to the family parsed from each prompt."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
    verdicts = [judge(p, im) for p, im in zip(prompts, images)]
    fams = list(families) if families is not None else [v.family for v in verdicts]
    by_family: dict[str, list[Verdict]] = {}
    for fam, v in zip(fams, verdicts):
        by_family.setdefault(fam, []).append(v)
    ordered = [f for f in FAMILIES if f in by_family] + [f for f in by_family if f not in FAMILIES]
    return {"families": {f: _aggregate(by_family[f]) for f in ordered}, "overall": _aggregate(verdicts)}


def oracle_check(n: int, seed: int = 0, split: str = "test") -> dict:
    """The oracle on clean renders of every family: should be ~1.0 all-correct (it is how the oracle is trusted)."""
    prompts, images, families = [], [], []
    for fam in FAMILIES:
        for s in generate(fam, n, split=split, seed=seed):
            prompts.append(s.prompt)
            images.append(render(s.scene))
            families.append(fam)
    report = evaluate(prompts, images, families)
    report.update({"split": split, "n_per_family": n, "seed": seed})
    return report


# ---------------------------------------------------------------------------------------------------------------
# Fidelity: KID on image statistics
# ---------------------------------------------------------------------------------------------------------------

def image_features(image: np.ndarray) -> np.ndarray:
    """A fixed description of an image: palette histogram, off-palette share, edge statistics, colour moments."""
    image = _check_image(image)
    idx, blend = _quantise(image)
    hist = np.bincount(idx.ravel() + 1, minlength=len(PALETTE) + 1) / idx.size  # bin 0 = off-palette
    f = image.astype(np.float32) / 255.0
    gray = f.mean(axis=2)
    gx, gy = np.gradient(gray)
    grad = np.hypot(gx, gy)
    grad_hist = np.histogram(grad, bins=6, range=(0.0, 0.6))[0] / grad.size
    lap = ndimage.laplace(gray)
    sat = f.max(axis=2) - f.min(axis=2)
    moments = [gray.mean(), gray.std(), sat.mean(), sat.std(), float(np.abs(lap).mean()) * 4, float(np.mean((idx < 0) & ~blend))]
    return np.concatenate([hist, grad_hist, np.asarray(moments, dtype=np.float64)])


def kid(images_a: Sequence[np.ndarray], images_b: Sequence[np.ndarray]) -> float:
    """Unbiased squared MMD with the cubic polynomial kernel of KID, on `image_features` (x100 for readability)."""
    fa = np.stack([image_features(im) for im in images_a])
    fb = np.stack([image_features(im) for im in images_b])
    if len(fa) < 2 or len(fb) < 2:
        raise ValueError("KID needs at least two images per set")
    d = fa.shape[1]

    def kernel(x, y):
        return (x @ y.T / d + 1.0) ** 3

    kxx, kyy, kxy = kernel(fa, fa), kernel(fb, fb), kernel(fa, fb)
    m, n = len(fa), len(fb)
    mmd = (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean()
    return float(mmd * 100.0)


def evaluate_fidelity(generated: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> dict:
    artifacts = [has_artifact(im) for im in generated]
    return {"kid": round(kid(generated, reference), 5), "artifact_rate": round(float(np.mean(artifacts)), 4),
            "off_palette_fraction": round(float(np.mean([off_palette_fraction(im) for im in generated])), 5)}
