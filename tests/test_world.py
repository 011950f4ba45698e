"""The toy world: renderer, prompt generator and splits, prompt parser, and the oracle's trustworthiness.

The oracle is the project's measuring stick, so besides being right on clean renders it must stay right on images
that look like a small diffusion model's (blurred, tinted, noisy), never crash on garbage, and never call a wrong or
broken image correct.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from ralign.world import oracle
from ralign.world.oracle import Relation, RequiredObject, Requirements
from ralign.world.prompts import (
    FAMILIES, LONG_FILLER_SENTENCES, LONG_OBJECT_SENTENCES, NUMBER_WORDS, PLURALS, RELATIONS, TEST_COMBOS,
    TEXT_MAX_TOKENS, TRAIN_COMBOS, VAL_COMBOS, generate, token_count, vocabulary,
)
from ralign.world.scene import (
    BACKGROUND, COLORS, IMAGE_SIZE, SHAPES, SIZES, Scene, SceneObject, cell_center, object_mask, render,
)

REPO = Path(__file__).resolve().parents[1]


# -- renderer ---------------------------------------------------------------------------------------------------

def test_render_is_deterministic_and_draws_where_asked():
    obj = SceneObject("red", "square", "large", 0, 2)
    img = render(Scene((obj,)))
    assert img.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and img.dtype == np.uint8
    assert np.array_equal(img, render(Scene((obj,))))
    x, y = cell_center(0, 2)
    assert tuple(img[int(y), int(x)]) == COLORS["red"]
    assert tuple(img[60, 3]) == BACKGROUND
    # The other eight cells are empty.
    assert np.all(img[int(cell_center(2, 0)[1]), int(cell_center(2, 0)[0])] == BACKGROUND)
    # Anti-aliasing: some pixels lie strictly between the fill colour and the background.
    px = img.reshape(-1, 3)
    mixed = ~np.all(px == COLORS["red"], axis=1) & ~np.all(px == BACKGROUND, axis=1)
    assert mixed.sum() > 0


@pytest.mark.parametrize("shape, area_ratio", [("square", 1.0), ("circle", np.pi / 4), ("triangle", 0.5)])
@pytest.mark.parametrize("size", list(SIZES))
def test_render_shapes_have_their_geometry(shape, area_ratio, size):
    # PIL fills a shape's outline too, which at the renderer's 4x supersampling extends it by 1/4 px to the right and
    # to the bottom: sides are 1/4 px longer, centres 1/8 px further right and down.
    side, shift = SIZES[size] + 0.25, 0.125
    mask = object_mask(SceneObject("blue", shape, size, 1, 1))
    assert mask.sum() == pytest.approx(area_ratio * side**2, rel=0.01)
    rows = np.nonzero(mask.sum(axis=1) > 0.5)[0]
    assert rows.max() - rows.min() + 1 == pytest.approx(side, abs=1)
    # Centre of mass (pixel centres at i + 0.5): an upright triangle's sits a sixth of its height below the centre
    # of its box, a circle's and a square's at the centre.
    x, y = cell_center(1, 1)
    mass_y = float((mask.sum(axis=1) * (np.arange(mask.shape[0]) + 0.5)).sum() / mask.sum())
    mass_x = float((mask.sum(axis=0) * (np.arange(mask.shape[1]) + 0.5)).sum() / mask.sum())
    assert mass_x == pytest.approx(x + shift, abs=0.05)
    assert mass_y - (y + shift) == pytest.approx(side / 6 if shape == "triangle" else 0.0, abs=0.05)


@pytest.mark.parametrize("kwargs", [dict(color="pink"), dict(shape="hexagon"), dict(size="huge"), dict(row=3),
                                    dict(col=-1)])
def test_bad_scene_objects_are_refused(kwargs):
    base = dict(color="red", shape="circle", size="small", row=0, col=0)
    with pytest.raises(ValueError):
        SceneObject(**{**base, **kwargs})


def test_bad_scenes_are_refused():
    with pytest.raises(ValueError, match="share a grid cell"):
        Scene((SceneObject("red", "circle", "small", 0, 0), SceneObject("blue", "square", "small", 0, 0)))
    with pytest.raises(ValueError, match="jitter"):
        Scene((SceneObject("red", "circle", "small", 0, 0),), jitter=((0.0, 0.0), (1.0, 1.0)))


# -- prompts and splits -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_generation_is_deterministic_and_respects_splits(family):
    a = generate(family, 60, "train", seed=3)
    assert [s.prompt for s in a] == [s.prompt for s in generate(family, 60, "train", seed=3)]
    assert [s.scene for s in a] == [s.scene for s in generate(family, 60, "train", seed=3)]
    assert [s.prompt for s in a[:10]] == [s.prompt for s in generate(family, 10, "train", seed=3)]
    assert [s.prompt for s in a] != [s.prompt for s in generate(family, 60, "train", seed=4)]
    for s in a:
        assert all(o.combo in TRAIN_COMBOS for o in s.scene.objects) and not s.unseen
    test = generate(family, 60, "test", seed=3)
    assert any(s.unseen for s in test) and any(not s.unseen for s in test)
    assert all(o.combo not in VAL_COMBOS for s in test for o in s.scene.objects)
    assert all(s.unseen == any(o.combo in TEST_COMBOS for o in s.scene.objects) for s in test)
    val = generate(family, 60, "val", seed=3)
    assert all(o.combo not in TEST_COMBOS for s in val for o in s.scene.objects)
    assert any(o.combo in VAL_COMBOS for s in val for o in s.scene.objects)


def test_generation_is_identical_across_processes():
    """Seeds go through crc32, not the per-process salted hash(): a fresh interpreter makes the same prompts."""
    code = ("from ralign.world.prompts import generate\n"
            "print('|'.join(s.prompt for s in generate('long', 5, 'test', 9)))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, check=True)
    assert out.stdout.strip() == "|".join(s.prompt for s in generate("long", 5, "test", 9))


def test_long_prompts_exceed_the_text_encoder_limit():
    for s in generate("long", 100, "train", seed=0):
        assert token_count(s.prompt) > TEXT_MAX_TOKENS
        assert 3 <= s.prompt.count(".") <= 6
    for family in ("single", "binding", "counting", "spatial", "size"):
        assert all(token_count(s.prompt) <= TEXT_MAX_TOKENS for s in generate(family, 50, "all"))


def test_bad_generator_arguments():
    with pytest.raises(ValueError, match="unknown prompt family"):
        generate("poems", 1)
    with pytest.raises(ValueError, match="unknown split"):
        generate("single", 1, split="holdout")


# -- parser -------------------------------------------------------------------------------------------------------

def _expected(sample) -> Requirements:
    """Requirements implied by the generator's own scene (what the parser must recover from the text alone)."""
    objs = sample.scene.objects
    family = sample.family
    if family == "counting":
        return Requirements(family, (RequiredObject(objs[0].color, objs[0].shape, count=len(objs)),))
    sized = family in ("size", "long")
    required = tuple(RequiredObject(o.color, o.shape, o.size if sized else None) for o in objs)
    relations = ()
    if family == "spatial":
        (a, b), relation = objs, next(r for r in RELATIONS if f" {r} " in sample.prompt)
        relations = (Relation(0, relation, 1),)
        # The stated relation holds between the cells of the generator's scene.
        holds = {"to the left of": a.col < b.col, "to the right of": a.col > b.col,
                 "above": a.row < b.row, "below": a.row > b.row}
        assert holds[relation]
    return Requirements(family, required, relations)


@pytest.mark.parametrize("family", FAMILIES)
def test_parser_round_trips_every_family(family):
    for s in generate(family, 200, "all", seed=11):
        assert oracle.parse_prompt(s.prompt) == _expected(s), s.prompt


def test_parser_is_lenient_about_case_whitespace_and_a_final_full_stop():
    req = oracle.parse_prompt("  A   Picture of an ORANGE triangle. ")
    assert req == Requirements("single", (RequiredObject("orange", "triangle"),))
    assert not req.extra_objects_allowed and req.total_objects == 1
    assert oracle.parse_prompt("four yellow circles").total_objects == 4


@pytest.mark.parametrize("bad, problem", [
    ("", "empty"),
    ("   ", "empty"),
    ("a red", "no one-sentence template"),
    ("a pink circle", "no one-sentence template"),
    ("three red circle", "no one-sentence template"),
    ("one red circle", "no one-sentence template"),
    ("a red circle and", "no one-sentence template"),
    ("a red circle next to a blue square", "no one-sentence template"),
    ("a red circle next to a blue square.", "more than one object"),
    ("there is a small red circle and a large blue square.", "more than one object"),
    ("there is a small red circle. the red is nice.", "red"),
    ("the sky is blue.", "blue"),
    ("hello world.", "no object"),
])
def test_parser_rejects_text_outside_the_world(bad, problem):
    with pytest.raises(ValueError, match=re.escape(problem)):
        oracle.parse_prompt(bad)
    with pytest.raises(ValueError, match="must be a string"):
        oracle.parse_prompt(None)  # type: ignore[arg-type]


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


_colors, _shapes, _sizes = st.sampled_from(sorted(COLORS)), st.sampled_from(SHAPES), st.sampled_from(sorted(SIZES))


@st.composite
def _requirements_and_text(draw):
    """A random requirement set of a random family, and a prompt stating it in the generator's wording."""
    family = draw(st.sampled_from(FAMILIES))
    if family == "single":
        c, s = draw(_colors), draw(_shapes)
        prefix = draw(st.sampled_from(["", "a picture of "]))
        return Requirements(family, (RequiredObject(c, s),)), f"{prefix}{_a(c)} {c} {s}"
    if family == "binding":
        (c1, s1), (c2, s2) = draw(st.tuples(_colors, _shapes)), draw(st.tuples(_colors, _shapes))
        return (Requirements(family, (RequiredObject(c1, s1), RequiredObject(c2, s2))),
                f"{_a(c1)} {c1} {s1} and {_a(c2)} {c2} {s2}")
    if family == "counting":
        n, c, s = draw(st.sampled_from(sorted(NUMBER_WORDS))), draw(_colors), draw(_shapes)
        return Requirements(family, (RequiredObject(c, s, count=n),)), f"{NUMBER_WORDS[n]} {c} {PLURALS[s]}"
    if family == "spatial":
        (c1, s1), (c2, s2), rel = draw(st.tuples(_colors, _shapes)), draw(st.tuples(_colors, _shapes)), draw(
            st.sampled_from(RELATIONS))
        return (Requirements(family, (RequiredObject(c1, s1), RequiredObject(c2, s2)), (Relation(0, rel, 1),)),
                f"{_a(c1)} {c1} {s1} {rel} {_a(c2)} {c2} {s2}")
    if family == "size":
        (z1, c1, s1), (z2, c2, s2) = (draw(st.tuples(_sizes, _colors, _shapes)) for _ in range(2))
        return (Requirements(family, (RequiredObject(c1, s1, z1), RequiredObject(c2, s2, z2))),
                f"{_a(z1)} {z1} {c1} {s1} and {_a(z2)} {z2} {c2} {s2}")
    objects = draw(st.lists(st.tuples(_sizes, _colors, _shapes), min_size=1, max_size=6))
    sentences = [draw(st.sampled_from(LONG_OBJECT_SENTENCES)).format(size=z, color=c, shape=s) for z, c, s in objects]
    for filler in draw(st.lists(st.sampled_from(LONG_FILLER_SENTENCES), max_size=3)):
        sentences.insert(draw(st.integers(0, len(sentences))), filler)
    return Requirements("long", tuple(RequiredObject(c, s, z) for z, c, s in objects)), " ".join(sentences)


@settings(max_examples=300, deadline=None)
@given(_requirements_and_text())
def test_parser_property_requirements_survive_text(case):
    requirements, text = case
    assert oracle.parse_prompt(text) == requirements


def _check_parse_or_value_error(text: str) -> None:
    try:
        req = oracle.parse_prompt(text)
    except ValueError:
        return
    assert req.family in FAMILIES and req.objects and not req.extra_objects_allowed
    assert all(o.color in COLORS and o.shape in SHAPES and o.size in (None, *SIZES) and o.count >= 1
               for o in req.objects)
    assert all(0 <= r.subject < len(req.objects) and 0 <= r.reference < len(req.objects) for r in req.relations)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=120))
def test_parser_property_junk_text_is_parsed_or_refused(text):
    _check_parse_or_value_error(text)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(vocabulary() + ["and", "of", "the"]), min_size=1, max_size=14))
def test_parser_property_word_salad_is_parsed_or_refused(words):
    """Near misses built from the world's own vocabulary are the hard case for a parser."""
    _check_parse_or_value_error(" ".join(words))


# -- oracle on clean, degraded and broken images -------------------------------------------------------------------

def test_oracle_is_right_on_clean_renders():
    report = oracle.oracle_check(100, seed=1, split="test")
    assert list(report["families"]) == list(FAMILIES)
    for family, metrics in report["families"].items():
        assert metrics["n"] == 100
        assert metrics["all_correct"] >= 0.99, family
        assert metrics["object_recall"] == 1.0 and metrics["artifact_rate"] == 0.0, family
    assert report["families"]["single"]["spatial_acc"] is None and report["families"]["single"]["size_acc"] is None
    assert report["families"]["spatial"]["spatial_acc"] == 1.0
    assert report["families"]["long"]["size_acc"] == 1.0


def _like_a_diffusion_model(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blurred edges, a global colour cast and pixel noise, at levels a small VAE-based model shows."""
    f = ndimage.gaussian_filter(image.astype(np.float32), sigma=(0.8, 0.8, 0))
    f += rng.uniform(-15, 15, size=3) + rng.normal(0, 6, f.shape)
    return np.clip(np.round(f), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("family", FAMILIES)
def test_oracle_is_robust_to_blur_tint_and_noise(family):
    rng = np.random.default_rng(5)
    samples = generate(family, 40, "test", seed=5)
    verdicts = [oracle.judge(s.prompt, _like_a_diffusion_model(render(s.scene), rng)) for s in samples]
    assert np.mean([v.all_correct for v in verdicts]) >= 0.95


def _bad_images():
    rng = np.random.default_rng(0)
    return {
        "noise": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        "blank": np.full((64, 64, 3), BACKGROUND, dtype=np.uint8),
        "black": np.zeros((64, 64, 3), np.uint8),
        "saturated": np.full((64, 64, 3), 255, np.uint8),
        "one_colour": np.full((64, 64, 3), COLORS["red"], dtype=np.uint8),
        "grey_noise": np.clip(rng.normal(128, 60, (64, 64, 3)), 0, 255).astype(np.uint8),
    }


@pytest.mark.parametrize("name", list(_bad_images()))
def test_oracle_degrades_sensibly_on_bad_images(name):
    img = _bad_images()[name]
    for family in FAMILIES:
        prompt = generate(family, 1, "test", seed=0)[0].prompt
        verdict = oracle.judge(prompt, img)
        assert not verdict.all_correct
        assert 0.0 <= verdict.object_recall <= 1.0
    if name in ("blank", "saturated"):  # nothing drawn: no objects, nothing broken
        assert oracle.detect(img) == [] and not oracle.has_artifact(img)
    else:  # garbage or a canvas-filling smear is an artefact
        assert oracle.has_artifact(img)
    fid = oracle.evaluate_fidelity([img, img], [render(s.scene) for s in generate("single", 4, "test")])
    assert np.isfinite(fid["kid"]) and set(fid) == {"kid", "artifact_rate", "off_palette_fraction"}


@pytest.mark.parametrize("family", FAMILIES)
def test_oracle_rejects_the_render_of_another_prompt(family):
    a, b = generate(family, 30, "test", seed=4), generate(family, 30, "test", seed=5)

    def content(sample):
        return sorted(o.combo for o in sample.scene.objects)

    pairs = [(x, y) for x, y in zip(a, b) if content(x) != content(y)]
    assert len(pairs) >= 20
    assert not any(oracle.judge(x.prompt, render(y.scene)).all_correct for x, y in pairs)


def test_oracle_checks_relations_sizes_counts_and_binding():
    left = SceneObject("red", "circle", "small", 1, 0)
    right = SceneObject("blue", "square", "large", 0, 2)
    img = render(Scene((left, right)))
    assert oracle.judge("a red circle to the left of a blue square", img).all_correct
    assert oracle.judge("a blue square above a red circle", img).all_correct
    for wrong in ("a red circle to the right of a blue square", "a red circle above a blue square"):
        verdict = oracle.judge(wrong, img)
        assert verdict.spatial_ok is False and verdict.object_recall == 1.0 and not verdict.all_correct
    assert oracle.judge("a small red circle and a large blue square", img).all_correct
    verdict = oracle.judge("a large red circle and a small blue square", img)
    assert verdict.size_ok is False and verdict.binding_ok and not verdict.all_correct
    verdict = oracle.judge("two red circles", img)
    assert verdict.count_ok is False and verdict.object_recall == 0.5
    # Colours swapped between the shapes: nothing is found, and binding fails.
    verdict = oracle.judge("a blue circle and a red square", img)
    assert verdict.object_recall == 0.0 and verdict.binding_ok is False
    # One object too many: everything asked for is there, but the scene is not the one described.
    verdict = oracle.judge("a red circle", img)
    assert verdict.object_recall == 1.0 and verdict.binding_ok and verdict.count_ok is False
    assert not verdict.all_correct


def test_verdict_fields_apply_per_family():
    for family in FAMILIES:
        s = generate(family, 1, "test", seed=2)[0]
        v = oracle.judge(s.prompt, render(s.scene))
        assert v.family == family and v.all_correct
        assert (v.spatial_ok is None) == (family != "spatial")
        assert (v.size_ok is None) == (family not in ("size", "long"))
        assert isinstance(v.count_ok, bool) and isinstance(v.binding_ok, bool)


def test_detector_reports_geometry():
    obj = SceneObject("green", "triangle", "large", 2, 1)
    (d,) = oracle.detect(render(Scene((obj,))))
    x, y = cell_center(2, 1)
    assert (d.color, d.shape, d.size) == ("green", "triangle", "large")
    assert d.x == pytest.approx(x, abs=0.5)
    assert d.y == pytest.approx(y + SIZES["large"] / 6, abs=0.7)  # a triangle's centroid sits 1/3 above its base
    assert d.area == pytest.approx(SIZES["large"] ** 2 / 2, rel=0.05)


@pytest.mark.parametrize("image_size", [48, 128])
def test_oracle_thresholds_scale_with_the_image(image_size):
    for family in ("counting", "size", "long"):
        for s in generate(family, 10, "test", seed=8):
            assert oracle.judge(s.prompt, render(s.scene, image_size=image_size)).all_correct, s.prompt


def test_evaluate_shape_and_bad_input():
    samples = generate("spatial", 5, "test") + generate("single", 5, "test")
    report = oracle.evaluate([s.prompt for s in samples], [render(s.scene) for s in samples])
    assert set(report) == {"families", "overall"}
    assert list(report["families"]) == ["single", "spatial"]
    keys = {"n", "object_recall", "binding_acc", "count_acc", "spatial_acc", "size_acc", "all_correct", "artifact_rate"}
    assert set(report["overall"]) == keys and report["overall"]["n"] == 10
    assert report["families"]["spatial"]["spatial_acc"] == 1.0
    assert report["families"]["single"]["spatial_acc"] is None and report["overall"]["size_acc"] is None
    relabelled = oracle.evaluate([s.prompt for s in samples], [render(s.scene) for s in samples], ["x"] * 10)
    assert list(relabelled["families"]) == ["x"]
    with pytest.raises(ValueError, match="prompts but"):
        oracle.evaluate(["a red circle"], [])
    with pytest.raises(ValueError, match="HxWx3"):
        oracle.judge("a red circle", np.zeros((64, 64), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        oracle.judge("a red circle", np.zeros((64, 64, 3), np.float32))


def test_kid_is_zero_on_one_distribution_and_large_between_two():
    clean = [render(s.scene) for s in generate("binding", 40, "test", seed=2)]
    other = [render(s.scene) for s in generate("binding", 40, "test", seed=3)]
    rng = np.random.default_rng(1)
    noisy = [np.clip(im + rng.normal(0, 40, im.shape), 0, 255).astype(np.uint8) for im in clean]
    noise = [rng.integers(0, 256, im.shape, dtype=np.uint8) for im in clean[:10]]
    same = oracle.kid(clean, other)
    assert abs(oracle.kid(clean, clean)) < 0.1 and abs(same) < 0.1
    assert oracle.kid(noisy, other) > 100 * max(abs(same), 1e-3)
    assert oracle.kid(noise, other) > oracle.kid(noisy, other) > 0
    with pytest.raises(ValueError, match="at least two"):
        oracle.kid(clean[:1], other)


def test_no_reward_or_training_code_imports_the_oracle():
    """The oracle is evaluation only: training against it would optimise the measuring stick itself."""
    pattern = re.compile(r"world\.oracle|world import .*\boracle\b")
    for part in ("rewards", "algorithms", "models", "pretrain"):
        for path in (REPO / "ralign" / part).rglob("*.py"):
            assert not pattern.search(path.read_text(encoding="utf-8")), path
