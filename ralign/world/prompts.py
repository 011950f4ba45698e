"""Prompt families of the toy world, generated together with a scene that satisfies them.

Every prompt comes with one scene that makes it true, so the same generator yields pretraining pairs (prompt, render)
and RL / evaluation prompts. Splits hold out colour-shape combinations: `train` prompts never use a combination of
`VAL_COMBOS` or `TEST_COMBOS`; about half of the `val` / `test` prompts contain one (their `unseen` flag is set), the
rest re-use training combinations. `all` (for pretraining the base model, as a web-scale model would have seen
everything) draws from every combination.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ralign.config import UserError

from ralign.world.scene import COLORS, GRID, SHAPES, SIZES, Scene, SceneObject, random_jitter

FAMILIES: tuple[str, ...] = ("single", "binding", "counting", "spatial", "size", "long")
SPLITS: tuple[str, ...] = ("train", "val", "test", "all")

VAL_COMBOS: frozenset[tuple[str, str]] = frozenset({("orange", "triangle"), ("blue", "circle")})
TEST_COMBOS: frozenset[tuple[str, str]] = frozenset({("purple", "square"), ("green", "triangle"), ("yellow", "circle")})
ALL_COMBOS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)
TRAIN_COMBOS: frozenset[tuple[str, str]] = frozenset(ALL_COMBOS) - VAL_COMBOS - TEST_COMBOS

NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
PLURALS = {s: s + "s" for s in SHAPES}
RELATIONS = ("to the left of", "to the right of", "above", "below")

# The toy text encoder's token limit (start and end tokens included). Long prompts are always longer than this.
TEXT_MAX_TOKENS = 24

LONG_OBJECT_SENTENCES = (
    "there is a {size} {color} {shape}.",
    "a {size} {color} {shape} is also in the picture.",
    "the picture also shows a {size} {color} {shape}.",
    "you can see a {size} {color} {shape} as well.",
)
LONG_FILLER_SENTENCES = (
    "the background is plain and light grey.",
    "every shape is drawn in a flat colour.",
    "the shapes do not touch each other.",
    "the image is clean and sharp.",
)


@dataclass(frozen=True)
class PromptSample:
    prompt: str
    family: str
    split: str
    scene: Scene
    unseen: bool  # contains a colour-shape combination that `train` never uses


def prompt_words(prompt: str) -> list[str]:
    """Word-level tokens of a prompt: lower-cased words, with . , ; ! ? as tokens of their own."""
    out: list[str] = []
    for raw in prompt.lower().split():
        word = raw
        trailing: list[str] = []
        while word and word[-1] in ".,;!?":
            trailing.insert(0, word[-1])
            word = word[:-1]
        if word:
            out.append(word)
        out.extend(trailing)
    return out


def token_count(prompt: str) -> int:
    """Tokens the toy text encoder sees, start and end tokens included."""
    return len(prompt_words(prompt)) + 2


def _allowed_combos(split: str) -> list[tuple[str, str]]:
    if split == "train":
        return sorted(TRAIN_COMBOS)
    if split == "val":
        return sorted(TRAIN_COMBOS | VAL_COMBOS)
    if split == "test":
        return sorted(TRAIN_COMBOS | TEST_COMBOS)
    return list(ALL_COMBOS)


def _held_out(split: str) -> list[tuple[str, str]]:
    return sorted(VAL_COMBOS if split == "val" else TEST_COMBOS if split == "test" else frozenset())


class _Draw:
    """Random choices for one prompt, constrained to the split's combinations."""

    def __init__(self, rng: np.random.Generator, split: str):
        self.rng = rng
        self.split = split
        self.allowed = _allowed_combos(split)
        self.held_out = _held_out(split)
        # Half of val/test prompts are forced to contain a held-out combination; the rest use training ones only.
        self.force_unseen = bool(self.held_out) and bool(rng.random() < 0.5)

    def combos(self, n: int, distinct_colors: bool = True, distinct_shapes: bool = False) -> list[tuple[str, str]]:
        pool = self.allowed if self.force_unseen or not self.held_out else sorted(TRAIN_COMBOS)
        for _ in range(1000):
            picked: list[tuple[str, str]] = []
            if self.force_unseen:
                picked.append(self.held_out[self.rng.integers(len(self.held_out))])
            while len(picked) < n:
                picked.append(pool[self.rng.integers(len(pool))])
            order = self.rng.permutation(n)
            picked = [picked[i] for i in order]
            colors = [c for c, _ in picked]
            shapes = [s for _, s in picked]
            if distinct_colors and len(set(colors)) < n:
                continue
            if distinct_shapes and len(set(shapes)) < n:
                continue
            return picked
        raise RuntimeError("could not draw combinations; the split's constraints are unsatisfiable")

    def cells(self, n: int) -> list[tuple[int, int]]:
        flat = self.rng.choice(GRID * GRID, size=n, replace=False)
        return [(int(i) // GRID, int(i) % GRID) for i in flat]

    def size(self) -> str:
        return list(SIZES)[self.rng.integers(len(SIZES))]

    def pick(self, options):
        return options[self.rng.integers(len(options))]


def _a(word: str) -> str:
    """Indefinite article for the word that follows it."""
    return "an" if word[0] in "aeiou" else "a"


def _scene(draw: _Draw, objects: list[SceneObject]) -> Scene:
    return Scene(objects=tuple(objects), jitter=random_jitter(draw.rng, len(objects)))


def _single(d: _Draw) -> tuple[str, list[SceneObject]]:
    ((color, shape),) = d.combos(1)
    (row, col), = d.cells(1)
    template = d.pick(("{a} {c} {s}", "a picture of {a} {c} {s}"))
    return template.format(a=_a(color), c=color, s=shape), [SceneObject(color, shape, d.size(), row, col)]


def _binding(d: _Draw) -> tuple[str, list[SceneObject]]:
    (c1, s1), (c2, s2) = d.combos(2, distinct_colors=True, distinct_shapes=True)
    cells = d.cells(2)
    objs = [SceneObject(c1, s1, d.size(), *cells[0]), SceneObject(c2, s2, d.size(), *cells[1])]
    return f"{_a(c1)} {c1} {s1} and {_a(c2)} {c2} {s2}", objs


def _counting(d: _Draw) -> tuple[str, list[SceneObject]]:
    ((color, shape),) = d.combos(1)
    n = int(d.rng.integers(2, 5))
    objs = [SceneObject(color, shape, d.size(), r, c) for r, c in d.cells(n)]
    return f"{NUMBER_WORDS[n]} {color} {PLURALS[shape]}", objs


def relation_holds(relation: str, first: tuple[int, int], second: tuple[int, int]) -> bool:
    """Whether the object in cell `first` (row, col) stands in `relation` to the one in cell `second`."""
    axis = 1 if relation in ("to the left of", "to the right of") else 0
    a, b = first[axis], second[axis]
    return a != b and (a < b) == (relation in ("to the left of", "above"))


def _spatial(d: _Draw) -> tuple[str, list[SceneObject]]:
    (c1, s1), (c2, s2) = d.combos(2, distinct_colors=True)
    relation = d.pick(RELATIONS)
    while True:
        (r1, k1), (r2, k2) = d.cells(2)
        if relation_holds(relation, (r1, k1), (r2, k2)):
            break
    objs = [SceneObject(c1, s1, d.size(), r1, k1), SceneObject(c2, s2, d.size(), r2, k2)]
    return f"{_a(c1)} {c1} {s1} {relation} {_a(c2)} {c2} {s2}", objs


def _size(d: _Draw) -> tuple[str, list[SceneObject]]:
    (c1, s1), (c2, s2) = d.combos(2, distinct_colors=True)
    z1 = d.size()
    z2 = "small" if z1 == "large" else "large"
    cells = d.cells(2)
    objs = [SceneObject(c1, s1, z1, *cells[0]), SceneObject(c2, s2, z2, *cells[1])]
    return f"{_a(z1)} {z1} {c1} {s1} and {_a(z2)} {z2} {c2} {s2}", objs


def _long(d: _Draw) -> tuple[str, list[SceneObject]]:
    n_objects = int(d.rng.integers(3, 5))
    n_filler = int(d.rng.integers(0, 3))
    combos = d.combos(n_objects, distinct_colors=True)
    objs = [SceneObject(c, s, d.size(), r, k) for (c, s), (r, k) in zip(combos, d.cells(n_objects))]
    sentences = [d.pick(LONG_OBJECT_SENTENCES).format(size=o.size, color=o.color, shape=o.shape) for o in objs]
    fillers = [LONG_FILLER_SENTENCES[i] for i in d.rng.choice(len(LONG_FILLER_SENTENCES), n_filler, replace=False)]
    # Fillers go anywhere except first, so the prompt opens on an object as real long captions usually do.
    for filler in fillers:
        sentences.insert(int(d.rng.integers(1, len(sentences) + 1)), filler)
    prompt = " ".join(sentences)
    while token_count(prompt) <= TEXT_MAX_TOKENS:  # never happens with these templates, but the contract is explicit
        prompt += " " + LONG_FILLER_SENTENCES[0]
    return prompt, objs


_BUILDERS = {
    "single": _single,
    "binding": _binding,
    "counting": _counting,
    "spatial": _spatial,
    "size": _size,
    "long": _long,
}


def _stream_seed(seed: int, family: str, split: str) -> list[int]:
    # crc32, not hash(): Python salts str hashes per process, and prompts must be identical across processes.
    return [seed, zlib.crc32(family.encode()), zlib.crc32(split.encode())]


def generate(family: str, n: int, split: str = "train", seed: int = 0) -> list[PromptSample]:
    """`n` prompts of one family, deterministic in (family, n, split, seed); the first k of n are those of k."""
    if family not in _BUILDERS:
        raise UserError(f"unknown prompt family {family!r}; expected one of {list(FAMILIES)}")
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    if n < 0:
        raise ValueError("n must be >= 0")
    return list(itertools.islice(stream(family, split, seed), n))


def stream(family: str, split: str = "train", seed: int = 0) -> Iterator[PromptSample]:
    """The prompts `generate(family, n, split, seed)` returns, one at a time and without end (drawn only when asked
    for: a consumer that stops early pays for what it took)."""
    if family not in _BUILDERS:
        raise UserError(f"unknown prompt family {family!r}; expected one of {list(FAMILIES)}")
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    return _stream(family, split, seed)


def _stream(family: str, split: str, seed: int) -> Iterator[PromptSample]:
    rng = np.random.default_rng(_stream_seed(seed, family, split))
    while True:
        draw = _Draw(rng, split)
        prompt, objects = _BUILDERS[family](draw)
        unseen = any(o.combo not in TRAIN_COMBOS for o in objects)
        yield PromptSample(prompt, family, split, _scene(draw, objects), unseen)


def generate_mixed(n: int, split: str = "train", seed: int = 0, families: tuple[str, ...] = FAMILIES) -> list[PromptSample]:
    """`n` prompts spread evenly over `families` (round-robin), deterministic in the arguments."""
    per = -(-n // len(families))
    by_family = {f: generate(f, per, split, seed) for f in families}
    return [by_family[families[i % len(families)]][i // len(families)] for i in range(n)]


def vocabulary() -> list[str]:
    """Every word any generator template can produce, sorted; the toy tokenizers are built from this list."""
    words: set[str] = set()
    words.update(COLORS, SHAPES, SIZES, PLURALS.values(), NUMBER_WORDS.values())
    templates = ["a an picture of and", *RELATIONS, *LONG_OBJECT_SENTENCES, *LONG_FILLER_SENTENCES]
    for t in templates:
        for w in prompt_words(t):
            if not w.startswith("{"):
                words.add(w.strip("{}"))
    words.update(".,;!?")
    return sorted(w for w in words if "{" not in w and "}" not in w)
