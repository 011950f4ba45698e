"""The oracle: checks an image against its prompt by plain image processing. EVALUATION ONLY — no reward may import
this module, or training would optimise the measuring stick itself.

Four parts:
- `parse_prompt`: text -> `Requirements` (objects with colour, shape, optional size and count; relations; family),
  from the words alone, for every template the prompt generator uses.
- `detect`: image -> `Detection`s. Each pixel is explained as a blend of the background and one palette colour
  (its *coverage* of that colour); pixels covered at least half are foreground, connected components per colour are
  objects, and shape and size come from descriptors of the coverage map that survive blur, tint and noise.
- `judge` / `evaluate`: per-image `Verdict`s and per-family metrics.
- `kid` / `evaluate_fidelity`: Kernel Inception Distance between image sets, on deterministic image statistics
  instead of a network's features (a network could be fooled by, or co-adapt with, the models being measured).

Why coverage rather than nearest-palette-colour masks: a small diffusion model's images have blurred edges, a tinted
background and slightly shifted colours. Thresholding "close to the palette colour" then erodes shapes unevenly (a
9 px triangle loses its tip, a square its corners) and the shape calls flip. The coverage of a pixel, its position on
the line from the background to the fill colour, is what the renderer's anti-aliasing and any blur actually preserve:
the 0.5 iso-line is the shape's outline, and the summed coverage is the shape's area whatever the blur.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from ralign.world.prompts import FAMILIES, NUMBER_WORDS, PLURALS, RELATIONS, generate
from ralign.world.scene import BACKGROUND, COLORS, IMAGE_SIZE, SHAPES, SIZES, render

# ---------------------------------------------------------------------------------------------------------------
# Prompt parsing
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequiredObject:
    """One object (or `count` identical objects) the prompt asks for; `size` is None where the prompt states none."""

    color: str
    shape: str
    size: str | None = None
    count: int = 1


class Relation(NamedTuple):
    """`objects[subject]` must stand in `relation` (one of prompts.RELATIONS) to `objects[reference]`."""

    subject: int
    relation: str
    reference: int


@dataclass(frozen=True)
class Requirements:
    """Everything an image must show for a prompt.

    The prompt describes the whole scene, so no extra objects are allowed in any family (`extra_objects_allowed` is
    always False for the generator's prompts; it is a field so that a verdict can say which rule it applied).
    """

    family: str
    objects: tuple[RequiredObject, ...]
    relations: tuple[Relation, ...] = ()
    extra_objects_allowed: bool = False

    @property
    def total_objects(self) -> int:
        return sum(o.count for o in self.objects)


def _alternatives(words) -> str:
    # Longest first, so that a regex alternation never stops at a prefix of a longer word.
    return "(" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + ")"


_COLOR = _alternatives(COLORS)
_SHAPE = _alternatives(SHAPES)
_PLURAL = _alternatives(PLURALS.values())
_SIZE = _alternatives(SIZES)
_NUMBER = _alternatives(NUMBER_WORDS.values())
_RELATION = _alternatives(RELATIONS)
_ART = "(?:a|an)"  # article agreement is not checked: "an red circle" still means a red circle
_OBJECT = rf"{_ART} {_COLOR} {_SHAPE}"
_SIZED_OBJECT = rf"{_ART} {_SIZE} {_COLOR} {_SHAPE}"
_WORD_TO_NUMBER = {w: n for n, w in NUMBER_WORDS.items()}
_PLURAL_TO_SHAPE = {p: s for s, p in PLURALS.items()}

# One-sentence families, matched against the whole normalised prompt.
_SHORT_TEMPLATES = {
    "single": re.compile(rf"(?:a picture of )?{_OBJECT}"),
    "binding": re.compile(rf"{_OBJECT} and {_OBJECT}"),
    "counting": re.compile(rf"{_NUMBER} {_COLOR} {_PLURAL}"),
    "spatial": re.compile(rf"{_OBJECT} {_RELATION} {_OBJECT}"),
    "size": re.compile(rf"{_SIZED_OBJECT} and {_SIZED_OBJECT}"),
}
# Long prompts: one object per sentence, wrapped in any wording ("there is a small red circle.", "you can see ...").
_SENTENCE_OBJECT = re.compile(rf"\b{_ART} (?:{_SIZE} )?{_COLOR} {_SHAPE}\b")
# Words that say something about the scene; a sentence holding one outside an object phrase is not understood, and
# is refused rather than silently ignored (it might be asking for something the oracle would then not check).
_WORLD_WORDS = frozenset([*COLORS, *SHAPES, *PLURALS.values(), *SIZES, *NUMBER_WORDS.values(),
                          "left", "right", "above", "below"])


def _normalise(prompt: str) -> str:
    return " ".join(prompt.lower().split())


def parse_prompt(prompt: str) -> Requirements:
    """Requirements of a prompt, and its family, from the text alone.

    Accepts every prompt the generator makes (case and whitespace are free, a short prompt may end in "."); anything
    else raises ValueError naming the problem. Text that matches none of the one-sentence templates must be a series
    of sentences ending in ".", "!" or "?", read as a long prompt one sentence at a time: a sentence holding one
    "a [size] colour shape" phrase is an object, a sentence without any colour, shape, size, number or direction word
    is filler; a sentence mixing those up is an error.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    text = _normalise(prompt)
    if not text:
        raise ValueError("cannot parse an empty prompt")
    short = text[:-1].rstrip() if text.endswith(".") else text
    for family, template in _SHORT_TEMPLATES.items():
        match = template.fullmatch(short)
        if match:
            return _short_requirements(family, match.groups())
    return _long_requirements(prompt, text)


def _short_requirements(family: str, g: tuple[str, ...]) -> Requirements:
    if family == "single":
        return Requirements(family, (RequiredObject(g[0], g[1]),))
    if family == "binding":
        return Requirements(family, (RequiredObject(g[0], g[1]), RequiredObject(g[2], g[3])))
    if family == "counting":
        return Requirements(family, (RequiredObject(g[1], _PLURAL_TO_SHAPE[g[2]], count=_WORD_TO_NUMBER[g[0]]),))
    if family == "spatial":
        return Requirements(family, (RequiredObject(g[0], g[1]), RequiredObject(g[3], g[4])), (Relation(0, g[2], 1),))
    if family == "size":
        return Requirements(family, (RequiredObject(g[1], g[2], g[0]), RequiredObject(g[4], g[5], g[3])))
    raise AssertionError(f"no requirements builder for family {family!r}")


def _long_requirements(prompt: str, text: str) -> Requirements:
    if text[-1] not in ".!?":
        raise ValueError(f"cannot parse prompt {prompt[:80]!r}: it matches no one-sentence template, and is not a "
                         f"series of sentences each ending in '.' (a long prompt)")
    objects = []
    for sentence in (s.strip() for s in re.split(r"[.!?;]", text)):
        if not sentence:
            continue
        found = list(_SENTENCE_OBJECT.finditer(sentence))
        if len(found) > 1:
            raise ValueError(f"cannot parse prompt: sentence {sentence[:60]!r} describes more than one object")
        rest = sentence if not found else sentence[: found[0].start()] + " " + sentence[found[0].end():]
        stray = sorted(set(re.findall(r"[a-z]+", rest)) & _WORLD_WORDS)
        if stray:
            raise ValueError(f"cannot parse prompt: sentence {sentence[:60]!r} uses {stray} outside an 'a [size] "
                             f"colour shape' phrase; no prompt template reads like that")
        if found:
            size, color, shape = found[0].groups()
            objects.append(RequiredObject(color, shape, size))
    if not objects:
        raise ValueError(f"cannot parse prompt {prompt[:80]!r}: it matches no template and describes no object")
    return Requirements("long", tuple(objects))


# ---------------------------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------------------------

COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
_PALETTE = np.asarray([COLORS[c] for c in COLOR_NAMES], dtype=np.float32)
_BACKGROUND = np.asarray(BACKGROUND, dtype=np.float32)

# Pixels within this RGB distance of the nominal background are background candidates; their median is the image's
# actual background, so a global tint does not read as faint coverage everywhere. Every palette colour is >= 210
# away from the background, so a pixel this close is under 30 % covered by any of them.
BACKGROUND_RADIUS = 60.0
# Below this share of background-like pixels the image has no usable background; the nominal one is used.
MIN_BACKGROUND_SHARE = 0.25
# A pixel is a blend of the background and a palette colour if it lies within this RGB distance of the line between
# them. Lines of the closest pair (orange, yellow) are 75 apart at full coverage, generated colours drift by 20-40.
LINE_RADIUS = 60.0
# Coverage above this is darker / more saturated than any palette colour, not a blend: off-palette.
MAX_COVERAGE = 1.4
# Foreground means covered at least half: the 0.5 iso-line of coverage is the shape's outline.
FOREGROUND_COVERAGE = 0.5
# Pixels covered this much give the object's actual (possibly tinted) colour.
CORE_COVERAGE = 0.8
MIN_AREA = 12  # px at 64x64; the smallest object (small triangle) covers ~40 px, anti-aliasing specks a few
# Object pixels are measured within this many px of the 0.5 outline, where a blur of sigma <= 1 px leaves coverage.
FRINGE = 2
# Bounding-box side separating small from large: midway between the two sizes of the world.
LARGE_THRESHOLD = (SIZES["small"] + SIZES["large"]) / 2
# A component wider than this is no single object of the world (largest 15 px) but a merge or a smear.
MAX_SIDE = 1.5 * SIZES["large"]
# Width / height outside [1 / MAX_ASPECT, MAX_ASPECT] is no shape of the world (all three fill a square box).
MAX_ASPECT = 1.5
# Vertical skewness of the coverage: an upright triangle's mass is bunched at its base, skew -0.566 in the continuum
# (-0.55..-0.60 measured on renders, down to -0.32 after a VAE round trip); circles and squares are symmetric (0,
# |skew| <= 0.15 measured after a VAE round trip). An inverted triangle (+) is not a shape of the world.
TRIANGLE_SKEW = -0.25
# Fill ratio (area / width x height) bounds for the shapes; outside them a blob is unclassifiable. Ideal values:
# triangle 0.5 (measured 0.53-0.77 as blur rounds its tip), circle pi/4 = 0.785, square 1.
TRIANGLE_FILL = (0.4, 0.85)
ROUND_FILL = (0.65, 1.1)
# Circle vs square: "squareness" is the mean of two descriptors, each normalised to 0 at the ideal circle and 1 at
# the ideal square. Fill ratio: pi/4 -> 1. Diagonal ratio (longest chord along a diagonal over the longest along an
# axis): 1 -> sqrt(2). On small shapes after a VAE round trip the mean misclassifies ~11 %, either alone 14-16 %.
_CIRCLE_FILL, _SQUARE_FILL = np.pi / 4, 1.0
_CIRCLE_DIAG, _SQUARE_DIAG = 1.0, float(np.sqrt(2.0))
# Below the midpoint 0.5 because blur and VAE decoding round a square's corners (small squares measured down to 0.3
# after a round trip through the toy VAE) more than they square a circle (up to 0.48); clean renders give circles
# ~0 and squares ~0.95, blurred ones (sigma 1 px) squares >= 0.65, so 0.45 keeps a wide margin there.
SQUARENESS_THRESHOLD = 0.45
# Share of off-palette pixels (neither background, nor a blend with a palette colour) that marks an artefact; a clean
# render has none, a VAE round trip < 0.5 %.
ARTIFACT_PIXEL_FRACTION = 0.02

UNKNOWN = "unknown"  # shape of an unclassifiable blob; also the colour of an off-palette blob


@dataclass(frozen=True)
class Detection:
    """One object found in an image. Geometry is in pixels of the image given; area is summed coverage."""

    color: str  # a palette colour, or "unknown" for an off-palette blob
    shape: str  # circle | square | triangle | unknown
    size: str  # small | large
    x: float  # centroid
    y: float
    area: float
    side: float  # longest chord along an axis: the bounding-box side for every shape of the world
    fill: float  # area / (width x height)
    diag: float  # longest diagonal chord / longest axis chord
    skew: float  # vertical skewness of the coverage (negative: mass at the bottom)


@dataclass(frozen=True)
class _Pixels:
    """Per-pixel explanation of an image as background / blend with one palette colour / off-palette."""

    background: np.ndarray  # (3,) estimated background colour
    line: np.ndarray  # HxW palette index of the best-fitting background->colour line
    coverage: np.ndarray  # HxW coverage of that colour
    label: np.ndarray  # HxW palette index of foreground pixels after a 3x3 majority vote, -1 elsewhere
    foreground: np.ndarray  # HxW bool, covered >= FOREGROUND_COVERAGE by a palette colour
    off_palette: np.ndarray  # HxW bool


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    if min(image.shape[:2]) < 8:
        raise ValueError(f"image of {image.shape[:2]} px is too small to hold a shape")
    return image


def _estimate_background(px: np.ndarray) -> np.ndarray:
    near = np.linalg.norm(px - _BACKGROUND, axis=1) <= BACKGROUND_RADIUS
    if near.mean() < MIN_BACKGROUND_SHARE:
        return _BACKGROUND
    return np.median(px[near], axis=0)


def _explain_pixels(image: np.ndarray) -> _Pixels:
    h, w = image.shape[:2]
    px = image.reshape(-1, 3).astype(np.float32)
    bg = _estimate_background(px)
    diff = px - bg
    lines = _PALETTE - bg  # (6, 3) direction from the background to each colour
    t = diff @ lines.T / np.sum(lines * lines, axis=1)  # (N, 6) coverage of each colour
    # Distance to each background->colour segment (coverage clipped at 0: a pixel "lighter" than the background is
    # measured against the background itself).
    residual = np.linalg.norm(diff[:, None, :] - np.clip(t, 0.0, None)[:, :, None] * lines[None], axis=2)
    label = residual.argmin(axis=1)
    rows = np.arange(len(px))
    coverage, best = t[rows, label], residual[rows, label]
    blend = (best <= LINE_RADIUS) & (coverage <= MAX_COVERAGE)
    near_background = np.linalg.norm(diff, axis=1) <= BACKGROUND_RADIUS
    foreground = blend & (coverage >= FOREGROUND_COVERAGE)
    off_palette = ~near_background & ~blend
    line, foreground = label.reshape(h, w), foreground.reshape(h, w)
    # Majority vote of the colour labels in each foreground pixel's 3x3 neighbourhood: where two colour lines are
    # close (orange / yellow) noise can flip single edge pixels, which would otherwise nibble holes into the shape.
    onehot = np.stack([(line == k) & foreground for k in range(len(COLOR_NAMES))], axis=-1).astype(np.float32)
    votes = ndimage.uniform_filter(onehot, size=(3, 3, 1), mode="constant")
    label = np.where(foreground, votes.argmax(axis=-1), -1)
    return _Pixels(bg, line, coverage.reshape(h, w), label, foreground, off_palette.reshape(h, w))


def _chords(cov: np.ndarray) -> tuple[float, float, float]:
    """Longest horizontal, vertical and (mean of the two) diagonal chords of a coverage map, in pixels.

    A chord's length is the summed coverage along its line, which blur and anti-aliasing leave unchanged. Pixels on
    one diagonal line are sqrt(2) apart and a diagonal line through pixel centres only samples alternate half-pixels,
    so neighbouring diagonals are averaged before taking the longest.
    """
    width, height = float(cov.sum(axis=1).max()), float(cov.sum(axis=0).max())
    diagonals = []
    for m in (cov, cov[:, ::-1]):
        sums = np.asarray([np.trace(m, offset=k) for k in range(-m.shape[0] + 1, m.shape[1])])
        pairs = (sums[:-1] + sums[1:]) / 2 if len(sums) > 1 else sums
        diagonals.append(float(pairs.max()) * np.sqrt(2.0))
    return width, height, float(np.mean(diagonals))


def _classify(fill: float, diag_ratio: float, skew: float, width: float, height: float, side: float,
              scale: float) -> str:
    """Shape from blur-tolerant descriptors; "unknown" for a blob no shape of the world explains."""
    if side > MAX_SIDE * scale or not (1 / MAX_ASPECT <= width / max(height, 1e-6) <= MAX_ASPECT):
        return UNKNOWN
    if skew <= TRIANGLE_SKEW:
        return "triangle" if TRIANGLE_FILL[0] <= fill <= TRIANGLE_FILL[1] else UNKNOWN
    if skew >= -TRIANGLE_SKEW or not (ROUND_FILL[0] <= fill <= ROUND_FILL[1]):
        return UNKNOWN
    squareness = ((fill - _CIRCLE_FILL) / (_SQUARE_FILL - _CIRCLE_FILL)
                  + (diag_ratio - _CIRCLE_DIAG) / (_SQUARE_DIAG - _CIRCLE_DIAG)) / 2
    return "square" if squareness >= SQUARENESS_THRESHOLD else "circle"


def _measure(image: np.ndarray, pixels: _Pixels, mask: np.ndarray, territory: np.ndarray, color: str,
             scale: float) -> Detection:
    """Describe one component: its colour's actual value, its coverage map, and the descriptors of that map."""
    img = image.astype(np.float32)
    core = mask & (pixels.coverage >= CORE_COVERAGE)
    fill_color = np.median(img[core if core.sum() >= 4 else mask], axis=0)
    direction = fill_color - pixels.background
    cov = np.clip((img - pixels.background) @ direction / max(float(direction @ direction), 1e-6), 0.0, 1.0)
    cov = np.where(territory, cov, 0.0)
    rows, cols = np.nonzero(territory)
    cov = cov[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1]
    area = float(cov.sum())
    ys, xs = np.mgrid[: cov.shape[0], : cov.shape[1]]
    cy, cx = float((cov * ys).sum() / area), float((cov * xs).sum() / area)
    var_y = float((cov * (ys - cy) ** 2).sum() / area)
    skew = float((cov * (ys - cy) ** 3).sum() / area / max(var_y, 1e-6) ** 1.5)
    width, height, diagonal = _chords(cov)
    side = max(width, height)
    fill = area / max(width * height, 1e-6)
    diag_ratio = diagonal / max(side, 1e-6)
    shape = _classify(fill, diag_ratio, skew, width, height, side, scale)
    size = "large" if side >= LARGE_THRESHOLD * scale else "small"
    return Detection(color, shape, size, float(cx + cols.min()), float(cy + rows.min()), round(area, 2), round(side, 2),
                     round(fill, 3), round(diag_ratio, 3), round(skew, 3))


def _blob(mask: np.ndarray, scale: float) -> Detection:
    """An off-palette component: an object the world has no colour for, described by its pixel mask."""
    rows, cols = np.nonzero(mask)
    height, width = int(np.ptp(rows)) + 1, int(np.ptp(cols)) + 1
    side = float(max(height, width))
    size = "large" if side >= LARGE_THRESHOLD * scale else "small"
    fill = len(rows) / float(height * width)
    return Detection(UNKNOWN, UNKNOWN, size, float(cols.mean()), float(rows.mean()), float(len(rows)), side,
                     round(fill, 3), 0.0, 0.0)


def _detect(image: np.ndarray) -> tuple[list[Detection], _Pixels]:
    scale = min(image.shape[:2]) / IMAGE_SIZE  # thresholds are in pixels of a 64x64 image
    min_area = MIN_AREA * scale**2
    pixels = _explain_pixels(image)
    eight = np.ones((3, 3), dtype=bool)  # 8-connectivity: a diagonal step inside a thin triangle tip stays connected
    components: list[tuple[str, np.ndarray]] = []
    for k, name in enumerate(COLOR_NAMES):
        labels, n = ndimage.label(pixels.label == k, structure=eight)
        for i in range(1, n + 1):
            mask = labels == i
            if mask.sum() >= min_area:
                components.append((name, mask))
    fringe = max(1, round(FRINGE * scale))
    grown = [ndimage.binary_dilation(mask, structure=eight, iterations=fringe) for _, mask in components]
    claims = np.sum(grown, axis=0) if grown else np.zeros(image.shape[:2])
    detections = [
        # Fringe pixels claimed by two objects belong to neither: objects this close are mis-drawn anyway.
        _measure(image, pixels, mask, region & ((claims == 1) | mask), name, scale)
        for (name, mask), region in zip(components, grown)
    ]
    labels, n = ndimage.label(pixels.off_palette, structure=eight)
    for i in range(1, n + 1):
        mask = labels == i
        if mask.sum() >= min_area:
            detections.append(_blob(mask, scale))
    detections.sort(key=lambda d: (round(d.y), d.x))
    return detections, pixels


def detect(image: np.ndarray) -> list[Detection]:
    """Objects in an HxWx3 uint8 image (thresholds scale with the image side, calibrated at 64x64).

    Components smaller than MIN_AREA are ignored (anti-aliasing specks, noise). Off-palette components of at least
    that size are returned as blobs with colour and shape "unknown": they are extra objects and artefacts.
    """
    return _detect(_check_image(image))[0]


def off_palette_fraction(image: np.ndarray) -> float:
    """Share of pixels that are neither background nor a blend of the background with one palette colour."""
    return float(_explain_pixels(_check_image(image)).off_palette.mean())


def _is_artifact(detections: Sequence[Detection], pixels: _Pixels) -> bool:
    return any(d.shape == UNKNOWN for d in detections) or float(pixels.off_palette.mean()) > ARTIFACT_PIXEL_FRACTION


def has_artifact(image: np.ndarray) -> bool:
    """Off-palette pixels beyond anti-aliasing (> ARTIFACT_PIXEL_FRACTION), or a blob that is no shape of the world."""
    detections, pixels = _detect(_check_image(image))
    return _is_artifact(detections, pixels)


# ---------------------------------------------------------------------------------------------------------------
# Verdicts
# ---------------------------------------------------------------------------------------------------------------

# Centroids must differ by more than this (px at 64x64) along the relation's axis; grid cells are 21 px apart, so a
# correct layout clears it easily while two objects side by side in one column do not pass as "left of".
SPATIAL_MARGIN = 2.0
_NO_MATCH = 1e6  # assignment cost of a detection of the wrong colour or shape


@dataclass(frozen=True)
class Verdict:
    """How one image fares against its prompt. Metrics that do not apply to the prompt are None.

    - object_recall: share of required objects found with the right colour and shape, each detection used for at
      most one required object (for "three red circles", min(found, 3) / 3). Size is not needed here.
    - binding_ok: every required (colour, shape) pair appears, and every detected object whose colour the prompt
      names has a shape the prompt gives that colour ("a red circle and a blue square": a red square, or a red blob
      that is no shape at all, fails). Colours the prompt does not name are left to count_ok.
    - count_ok: each required (colour, shape) pair appears exactly as often as required, and the image holds no
      other object. This is the counting family's count check and, elsewhere, the exact-object-count check: the
      prompt describes the whole scene (`Requirements.extra_objects_allowed` is False).
    - spatial_ok: each relation holds between the centroids of the matched objects, by more than SPATIAL_MARGIN
      (prompts with relations only: the spatial family).
    - size_ok: every object whose size the prompt states is matched by an object of that size (size and long
      families, where sizes are stated).
    - artifact: off-palette pixels beyond ARTIFACT_PIXEL_FRACTION, or a blob that is no shape of the world.
    - all_correct: recall 1, binding, count (hence no extra objects), spatial and size hold where they apply, and
      no artefact.
    """

    family: str
    object_recall: float
    binding_ok: bool
    count_ok: bool
    spatial_ok: bool | None
    size_ok: bool | None
    artifact: bool
    all_correct: bool
    detections: tuple[Detection, ...] = field(default=())


def _assign(req: Requirements, detections: Sequence[Detection]) -> list[Detection | None]:
    """One detection (or None) per required object instance, in order of `req.objects` expanded by count.

    A one-to-one assignment minimising mismatches: colour and shape must agree; a wrong size costs 1, so the right
    size wins whenever one is available, and a present object of the wrong size still counts for recall.
    """
    slots = [o for o in req.objects for _ in range(o.count)]
    if not detections:
        return [None] * len(slots)
    cost = np.full((len(slots), len(detections)), _NO_MATCH)
    for i, o in enumerate(slots):
        for j, d in enumerate(detections):
            if (d.color, d.shape) == (o.color, o.shape):
                cost[i, j] = 0.0 if o.size in (None, d.size) else 1.0
    assigned: list[Detection | None] = [None] * len(slots)
    for i, j in zip(*linear_sum_assignment(cost)):
        if cost[i, j] < _NO_MATCH:
            assigned[i] = detections[j]
    return assigned


def _relation_holds(a: Detection, relation: str, b: Detection, margin: float) -> bool:
    if relation == "to the left of":
        return a.x < b.x - margin
    if relation == "to the right of":
        return a.x > b.x + margin
    if relation == "above":
        return a.y < b.y - margin
    if relation == "below":
        return a.y > b.y + margin
    raise ValueError(f"unknown relation {relation!r}")


def judge_requirements(req: Requirements, image: np.ndarray) -> Verdict:
    """`judge` for already parsed requirements (see `Verdict` for what each field means)."""
    image = _check_image(image)
    detections, pixels = _detect(image)
    scale = min(image.shape[:2]) / IMAGE_SIZE
    assigned = _assign(req, detections)
    recall = sum(d is not None for d in assigned) / req.total_objects

    wanted_shapes: dict[str, set[str]] = {}
    wanted_counts: dict[tuple[str, str], int] = {}
    for o in req.objects:
        wanted_shapes.setdefault(o.color, set()).add(o.shape)
        wanted_counts[(o.color, o.shape)] = wanted_counts.get((o.color, o.shape), 0) + o.count
    found_counts = {pair: sum((d.color, d.shape) == pair for d in detections) for pair in wanted_counts}
    binding_ok = (all(n > 0 for n in found_counts.values())
                  and all(d.shape in wanted_shapes[d.color] for d in detections if d.color in wanted_shapes))
    count_ok = found_counts == wanted_counts and (req.extra_objects_allowed or len(detections) == req.total_objects)

    first_slot = np.cumsum([0] + [o.count for o in req.objects])
    spatial_ok = None
    if req.relations:
        spatial_ok = True
        for rel in req.relations:
            subjects = assigned[first_slot[rel.subject]: first_slot[rel.subject + 1]]
            references = assigned[first_slot[rel.reference]: first_slot[rel.reference + 1]]
            spatial_ok &= all(a is not None and b is not None
                              and _relation_holds(a, rel.relation, b, SPATIAL_MARGIN * scale)
                              for a in subjects for b in references)
    size_ok = None
    if any(o.size is not None for o in req.objects):
        slots = [o for o in req.objects for _ in range(o.count)]
        size_ok = all(d is not None and d.size == o.size for o, d in zip(slots, assigned) if o.size is not None)

    artifact = _is_artifact(detections, pixels)
    all_correct = (recall == 1.0 and binding_ok and count_ok and spatial_ok is not False and size_ok is not False
                   and not artifact)
    return Verdict(req.family, recall, binding_ok, count_ok, spatial_ok, size_ok, artifact, all_correct,
                   tuple(detections))


def judge(prompt: str, image: np.ndarray) -> Verdict:
    """Check one image against its prompt (ValueError if the prompt cannot be parsed or the image is malformed)."""
    return judge_requirements(parse_prompt(prompt), image)


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------

METRICS = ("object_recall", "binding_acc", "count_acc", "spatial_acc", "size_acc", "all_correct", "artifact_rate")


def _aggregate(verdicts: Sequence[Verdict]) -> dict:
    """Means over the verdicts a metric applies to; None where it applies to none of them."""

    def mean(values) -> float | None:
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
    """Per-family and overall metrics of images against their prompts.

    Returns {"families": {family: {"n", *METRICS}}, "overall": {"n", *METRICS}}. Families default to the family
    parsed from each prompt; given ones only regroup the verdicts. spatial_acc is None except where prompts state
    relations, size_acc None except where they state sizes; the other metrics apply to every family.
    """
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
    if families is not None and len(families) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(families)} family labels")
    return aggregate([judge(p, im) for p, im in zip(prompts, images)], families)


def aggregate(verdicts: Sequence[Verdict], families: Sequence[str] | None = None) -> dict:
    """`evaluate`'s report from verdicts already judged (families default to each verdict's own)."""
    labels = list(families) if families is not None else [v.family for v in verdicts]
    by_family: dict[str, list[Verdict]] = {}
    for label, verdict in zip(labels, verdicts):
        by_family.setdefault(label, []).append(verdict)
    ordered = [f for f in FAMILIES if f in by_family] + sorted(f for f in by_family if f not in FAMILIES)
    return {"families": {f: _aggregate(by_family[f]) for f in ordered}, "overall": _aggregate(verdicts)}


def oracle_check(n: int, seed: int = 0, split: str = "test") -> dict:
    """The oracle on clean renders of `n` prompts of every family: how the oracle earns trust (all_correct ~1.0).

    Returns `evaluate`'s JSON shape plus the arguments ("split", "n_per_family", "seed").
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    prompts, images, families = [], [], []
    for family in FAMILIES:
        for sample in generate(family, n, split=split, seed=seed):
            prompts.append(sample.prompt)
            images.append(render(sample.scene))
            families.append(family)
    report = evaluate(prompts, images, families)
    report.update({"split": split, "n_per_family": n, "seed": seed})
    return report


# ---------------------------------------------------------------------------------------------------------------
# Fidelity: KID on image statistics
# ---------------------------------------------------------------------------------------------------------------

GRADIENT_BINS = np.asarray([0.0, 0.02, 0.05, 0.1, 0.2, 0.35, np.inf])  # |grad| of [0, 1] grey levels per px
COVERAGE_BINS = np.asarray([0.1, 0.5, 0.9])  # background-ish / soft edge / solid, for the edge-softness profile


def image_features(image: np.ndarray) -> np.ndarray:
    """A fixed numeric description of an image's look, each entry roughly in [0, 1].

    Palette histogram (background, six colours, off-palette), edge softness (share of foreground-ish pixels only
    partly covered), gradient-magnitude histogram, high-frequency energy, brightness and saturation moments. These
    are what separates a clean render from a blurred, noisy, tinted or smeared one, without a network.
    """
    image = _check_image(image)
    pixels = _explain_pixels(image)
    n = pixels.label.size
    colored = (~pixels.off_palette) & (pixels.coverage >= COVERAGE_BINS[0])
    palette_hist = [float(np.sum(colored & (pixels.line == k))) / n for k in range(len(COLOR_NAMES))]
    background_share = float(np.mean(~colored & ~pixels.off_palette))
    off_share = float(pixels.off_palette.mean())
    soft = colored & (pixels.coverage < COVERAGE_BINS[2])
    edge_softness = float(soft.sum() / max(colored.sum(), 1))
    f = image.astype(np.float32) / 255.0
    gray = f.mean(axis=2)
    gy, gx = np.gradient(gray)
    grad = np.hypot(gx, gy)
    grad_hist = np.histogram(grad, bins=GRADIENT_BINS)[0] / grad.size
    # High-frequency energy: mean |Laplacian|; x4 brings a sharp edge's value near 1 (the 5-point kernel weighs 4).
    high_freq = float(np.abs(ndimage.laplace(gray)).mean()) * 4
    saturation = f.max(axis=2) - f.min(axis=2)
    moments = [gray.mean(), gray.std(), saturation.mean(), saturation.std(), high_freq, edge_softness]
    return np.concatenate([[background_share, *palette_hist, off_share], grad_hist, moments]).astype(np.float64)


def kid(images_a: Sequence[np.ndarray], images_b: Sequence[np.ndarray]) -> float:
    """Kernel Inception Distance between two image sets, on `image_features` instead of Inception features.

    The unbiased estimator of the squared MMD with KID's polynomial kernel k(x, y) = (x.y / d + 1)^3 (Binkowski et
    al. 2018), over all pairs. ~0 (it can be slightly negative) for two samples of one distribution. Reported x1000,
    as KID usually is, since the features are small numbers.
    """
    if len(images_a) < 2 or len(images_b) < 2:
        raise ValueError("KID needs at least two images per set")
    fa = np.stack([image_features(im) for im in images_a])
    fb = np.stack([image_features(im) for im in images_b])
    dim = fa.shape[1]

    def kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return (x @ y.T / dim + 1.0) ** 3

    m, n = len(fa), len(fb)
    kaa, kbb, kab = kernel(fa, fa), kernel(fb, fb), kernel(fa, fb)
    mmd2 = ((kaa.sum() - np.trace(kaa)) / (m * (m - 1)) + (kbb.sum() - np.trace(kbb)) / (n * (n - 1))
            - 2.0 * kab.mean())
    return float(mmd2 * 1000.0)


def evaluate_fidelity(generated_images: Sequence[np.ndarray], reference_images: Sequence[np.ndarray]) -> dict:
    """{"kid": KID x1000 of generated vs reference images, "artifact_rate": share of generated images with an
    artefact, "off_palette_fraction": mean share of off-palette pixels in the generated images}."""
    generated = [_check_image(im) for im in generated_images]
    artifacts, off = [], []
    for image in generated:
        detections, pixels = _detect(image)
        artifacts.append(_is_artifact(detections, pixels))
        off.append(float(pixels.off_palette.mean()))
    return {"kid": round(kid(generated, reference_images), 6), "artifact_rate": round(float(np.mean(artifacts)), 4),
            "off_palette_fraction": round(float(np.mean(off)), 6)}
