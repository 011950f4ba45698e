"""Entities of a prompt for CoMat's attribute concentration: each concrete noun with the modifiers that bind to it
("three green triangles" -> noun "triangles", modifiers "three", "green"), and where its words sit in the text
encoder's token sequence.

Two parsers give the same entities on the toy world's prompts:
- spaCy, when a pipeline is installed (`en_core_web_sm` or the one named in RALIGN_SPACY_MODEL): nouns with their
  amod / compound / nummod children, as CoMat does;
- a lexicon fallback, used when spaCy or its pipeline is missing: a noun is a word of `NOUNS`, its modifiers the
  directly preceding run of `MODIFIERS` words. It knows only the toy vocabulary (shapes, colours, sizes, numbers),
  which is all the toy world's prompts contain; real prompts need spaCy.
Abstract or background nouns ("picture", "background", "shape") are dropped by both: there is nothing to segment.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ralign.world.prompts import NUMBER_WORDS, PLURALS
from ralign.world.scene import COLORS, SHAPES, SIZES

NOUNS: dict[str, str] = {**{s: s for s in SHAPES}, **{p: s for s, p in PLURALS.items()}}  # word -> singular
MODIFIERS: frozenset[str] = frozenset([*COLORS, *SIZES, *NUMBER_WORDS.values()])
NON_OBJECT_NOUNS: frozenset[str] = frozenset(
    {"picture", "image", "photo", "photograph", "background", "foreground", "scene", "shape", "shapes", "colour", "color",
     "style", "view", "side", "left", "right", "top", "bottom", "middle", "center", "front", "back", "way", "each", "other"}
)
_WORD = re.compile(r"[A-Za-z]+")


@dataclass(frozen=True)
class Entity:
    noun: str  # the noun as written ("triangles")
    modifiers: tuple[str, ...]  # in prompt order ("three", "green")
    spans: tuple[tuple[int, int], ...]  # character spans of modifiers + noun in the prompt

    @property
    def text(self) -> str:
        return " ".join((*self.modifiers, self.noun))

    @property
    def segment_phrase(self) -> str:
        """What the grounded segmenter is asked for: colour + noun; counts and sizes are left to the masks (a
        segmenter finds "green triangle" objects, not "three")."""
        singular = NOUNS.get(self.noun, self.noun)
        colours = [m for m in self.modifiers if m in COLORS]
        if colours:
            return f"{colours[-1]} {singular}"
        return self.noun


def _fallback_entities(prompt: str) -> list[Entity]:
    words = [(m.group().lower(), m.span()) for m in _WORD.finditer(prompt)]
    out = []
    for i, (word, span) in enumerate(words):
        if word not in NOUNS or word in NON_OBJECT_NOUNS:
            continue
        j = i
        while j > 0 and words[j - 1][0] in MODIFIERS and words[j - 1][1][1] + 1 >= words[j][1][0]:
            j -= 1
        mods = tuple(w for w, _ in words[j:i])
        out.append(Entity(word, mods, tuple(s for _, s in words[j : i + 1])))
    return out


@functools.lru_cache(maxsize=1)
def _spacy_pipeline():
    try:
        import spacy
    except ImportError:
        return None
    try:
        return spacy.load(os.environ.get("RALIGN_SPACY_MODEL", "en_core_web_sm"))
    except OSError:  # spaCy without a pipeline installed
        return None


def _spacy_entities(nlp, prompt: str) -> list[Entity]:
    doc = nlp(prompt)
    out = []
    for tok in doc:
        if tok.pos_ not in ("NOUN", "PROPN") or tok.lower_ in NON_OBJECT_NOUNS:
            continue
        mods = sorted((c for c in tok.children if c.dep_ in ("amod", "compound", "nummod")), key=lambda c: c.i)
        words = [*mods, tok]
        out.append(Entity(tok.lower_, tuple(m.lower_ for m in mods), tuple((w.idx, w.idx + len(w.text)) for w in words)))
    return out


def parse_entities(prompt: str, parser: str = "auto") -> list[Entity]:
    """Entities in prompt order. `parser`: auto (spaCy if a pipeline is installed, else the lexicon), spacy, lexicon."""
    if parser not in ("auto", "spacy", "lexicon"):
        raise ValueError(f"parser must be auto, spacy or lexicon, got {parser!r}")
    nlp = _spacy_pipeline() if parser in ("auto", "spacy") else None
    if parser == "spacy" and nlp is None:
        raise RuntimeError("parser='spacy' but spaCy or its pipeline (RALIGN_SPACY_MODEL, default en_core_web_sm) is not installed")
    return _spacy_entities(nlp, prompt) if nlp is not None else _fallback_entities(prompt)


def entity_positions(offsets: Sequence[tuple[int, int]], entities: list[Entity]) -> list[list[int]]:
    """For each entity, the token positions whose characters overlap the entity's words. Words cut off by truncation
    have no tokens; an entity can end up with none."""
    return [[k for k, (a, b) in enumerate(offsets) if b > a and any(a < e1 and b > s1 for s1, e1 in e.spans)] for e in entities]


def entity_token_indices(tokenizer, prompt: str, entities: list[Entity]) -> list[list[int]]:
    """`entity_positions` of the prompt's tokenisation by `tokenizer`."""
    from ralign.diffusion.text_encoding import token_offsets

    return entity_positions(token_offsets(tokenizer, prompt), entities)
