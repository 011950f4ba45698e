"""Scenes of coloured shapes and their anti-aliased renderer.

A scene is a handful of flat-coloured shapes on a plain background, each in one cell of a 3x3 grid. Everything the
toy world trains or measures starts here, so the vocabulary (colours, shapes, sizes, cells) is defined once, in this
file, and imported everywhere else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
GRID = 3

# Colours are far apart in RGB (pairwise distance >= 95) so that palette quantisation stays unambiguous even when a
# generated image blurs or tints them.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 150, 10),
    "yellow": (235, 225, 30),
    "green": (30, 165, 50),
    "blue": (30, 70, 230),
    "purple": (150, 40, 200),
}
BACKGROUND: tuple[int, int, int] = (240, 240, 240)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Bounding-box side in pixels at 64x64. Large shapes leave a gap of at least 4 px to a neighbouring cell even with jitter.
SIZES: dict[str, int] = {"small": 9, "large": 15}
ROW_NAMES = ("top", "middle", "bottom")
COL_NAMES = ("left", "center", "right")
MAX_JITTER = 1  # pixels; keeps renders varied without letting neighbours touch


@dataclass(frozen=True)
class SceneObject:
    color: str
    shape: str
    size: str
    row: int  # 0 = top
    col: int  # 0 = left

    def __post_init__(self) -> None:
        if self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}; expected one of {sorted(COLORS)}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {list(SHAPES)}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; expected one of {list(SIZES)}")
        if not (0 <= self.row < GRID and 0 <= self.col < GRID):
            raise ValueError(f"cell ({self.row}, {self.col}) is outside the {GRID}x{GRID} grid")

    @property
    def combo(self) -> tuple[str, str]:
        return (self.color, self.shape)


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    # Sub-pixel offsets per object, in pixels; drawn by the caller's RNG so rendering itself is a pure function.
    jitter: tuple[tuple[float, float], ...] = field(default=())

    def __post_init__(self) -> None:
        cells = [(o.row, o.col) for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"two objects share a grid cell: {cells}")
        if self.jitter and len(self.jitter) != len(self.objects):
            raise ValueError("jitter must give one (dx, dy) per object")


def cell_center(row: int, col: int, image_size: int = IMAGE_SIZE) -> tuple[float, float]:
    """(x, y) centre of a grid cell in pixel coordinates."""
    step = image_size / GRID
    return (col + 0.5) * step, (row + 0.5) * step


def _shape_polygon(shape: str, cx: float, cy: float, side: float) -> list[tuple[float, float]] | None:
    half = side / 2
    if shape == "square":
        return [(cx - half, cy - half), (cx + half, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if shape == "triangle":  # upright isosceles triangle filling its bounding box
        return [(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    return None


def render(scene: Scene, image_size: int = IMAGE_SIZE, supersample: int = 4,
           rounding: Sequence[float | None] | None = None) -> np.ndarray:
    """Render a scene to an HxWx3 uint8 array, anti-aliased by drawing at `supersample`x and downsampling.

    `rounding` (one entry per object, None = the object's own shape) draws a circle or square as a rounded square
    whose corner radius is that fraction of its side: 0 is a square, 0.5 a circle, values between are the
    in-between shapes a generative model draws (used to train the detector on them, not by the world)."""
    big = image_size * supersample
    scale = supersample * image_size / IMAGE_SIZE
    canvas = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    jitter = scene.jitter or tuple((0.0, 0.0) for _ in scene.objects)
    for k, (obj, (dx, dy)) in enumerate(zip(scene.objects, jitter)):
        cx, cy = cell_center(obj.row, obj.col)
        cx, cy, side = (cx + dx) * scale, (cy + dy) * scale, SIZES[obj.size] * scale
        fill = COLORS[obj.color]
        poly = _shape_polygon(obj.shape, cx, cy, side)
        radius = rounding[k] if rounding is not None and obj.shape in ("circle", "square") else None
        if radius is not None:
            if not 0.0 <= radius <= 0.5:
                raise ValueError(f"rounding {radius} of object {k}: a corner radius is 0 to 0.5 of the side")
            draw.rounded_rectangle([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], radius=radius * side, fill=fill)
        elif poly is None:
            draw.ellipse([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], fill=fill)
        else:
            draw.polygon(poly, fill=fill)
    small = canvas.resize((image_size, image_size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.uint8).copy()


def object_mask(obj: SceneObject, jitter: tuple[float, float] = (0.0, 0.0), image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Soft coverage mask in [0, 1] of one object, same geometry as `render` (used to train the segmenter)."""
    single = Scene(objects=(obj,), jitter=(jitter,))
    img = render(single, image_size=image_size).astype(np.float32)
    bg = np.asarray(BACKGROUND, dtype=np.float32)
    fg = np.asarray(COLORS[obj.color], dtype=np.float32)
    # Per-pixel coverage from the linear blend that box downsampling produced between background and fill colour.
    denom = float(np.sum((fg - bg) ** 2))
    cov = np.sum((img - bg) * (fg - bg), axis=-1) / denom
    return np.clip(cov, 0.0, 1.0)


def random_jitter(rng: np.random.Generator, n: int) -> tuple[tuple[float, float], ...]:
    return tuple((float(rng.uniform(-MAX_JITTER, MAX_JITTER)), float(rng.uniform(-MAX_JITTER, MAX_JITTER))) for _ in range(n))
