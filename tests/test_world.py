"""The toy world: renderer, prompt generator and splits, prompt parser, and the oracle's trustworthiness."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ralign.world import oracle
from ralign.world.prompts import (
    FAMILIES, NUMBER_WORDS, PLURALS, TEST_COMBOS, TEXT_MAX_TOKENS, TRAIN_COMBOS, VAL_COMBOS, generate, token_count,
)
from ralign.world.scene import BACKGROUND, COLORS, SHAPES, SIZES, Scene, SceneObject, cell_center, object_mask, render


# -- renderer ---------------------------------------------------------------------------------------------------

def test_render_is_deterministic_and_draws_where_asked():
    obj = SceneObject("red", "square", "large", 0, 2)
    img = render(Scene((obj,)))
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert np.array_equal(img, render(Scene((obj,))))
    x, y = cell_center(0, 2)
    assert tuple(img[int(y), int(x)]) == COLORS["red"]
    assert tuple(img[60, 3]) == BACKGROUND
    # anti-aliasing: some pixels lie strictly between the fill colour and the background
    red = np.asarray(COLORS["red"], float)
    bg = np.asarray(BACKGROUND, float)
    px = img.reshape(-1, 3).astype(float)
    mixed = ~np.all(px == red, axis=1) & ~np.all(px == bg, axis=1)
    assert mixed.sum() > 0
    mask = object_mask(obj)
    assert mask.max() == pytest.approx(1.0) and 0 < mask.mean() < 0.1


@pytest.mark.parametrize("kwargs", [dict(color="pink"), dict(shape="hexagon"), dict(size="huge"), dict(row=3)])
def test_bad_scene_objects_are_refused(kwargs):
    base = dict(color="red", shape="circle", size="small", row=0, col=0)
    with pytest.raises(ValueError):
        SceneObject(**{**base, **kwargs})
    with pytest.raises(ValueError, match="share a grid cell"):
        Scene((SceneObject("red", "circle", "small", 0, 0), SceneObject("blue", "square", "small", 0, 0)))


# -- prompts and splits -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_generation_is_deterministic_and_respects_splits(family):
    a = generate(family, 60, "train", seed=3)
    assert [s.prompt for s in a] == [s.prompt for s in generate(family, 60, "train", seed=3)]
    assert [s.prompt for s in a[:10]] == [s.prompt for s in generate(family, 10, "train", seed=3)]
    for s in a:
        assert all(o.combo in TRAIN_COMBOS for o in s.scene.objects) and not s.unseen
    test = generate(family, 60, "test", seed=3)
    assert any(s.unseen for s in test) and any(not s.unseen for s in test)
    assert all(o.combo not in VAL_COMBOS for s in test for o in s.scene.objects)
    assert any(o.combo in TEST_COMBOS for s in test for o in s.scene.objects)


def test_long_prompts_exceed_the_text_encoder_limit():
    for s in generate("long", 100, "train", seed=0):
        assert token_count(s.prompt) > TEXT_MAX_TOKENS
        assert 3 <= s.prompt.count(".") <= 6


def test_bad_generator_arguments():
    with pytest.raises(ValueError, match="unknown prompt family"):
        generate("poems", 1)
    with pytest.raises(ValueError, match="unknown split"):
        generate("single", 1, split="holdout")


# -- parser -------------------------------------------------------------------------------------------------------

def _expected(sample):
    """Requirements implied by the generator's own scene (what the parser must recover from the text)."""
    objs = sample.scene.objects
    sized = sample.family in ("size", "long")
    if sample.family == "counting":
        return {(objs[0].color, objs[0].shape, None, len(objs))}
    return {(o.color, o.shape, o.size if sized else None, 1) for o in objs}


@pytest.mark.parametrize("family", FAMILIES)
def test_parser_round_trips_every_family(family):
    for s in generate(family, 200, "all", seed=11):
        req = oracle.parse_prompt(s.prompt)
        assert req.family == family
        assert {(o.color, o.shape, o.size, o.count) for o in req.objects} == _expected(s)
        if family == "spatial":
            assert len(req.relations) == 1


@pytest.mark.parametrize("bad", ["", "a red", "a pink circle", "three red circle", "a red circle and", "there is a red circle."])
def test_parser_rejects_text_outside_the_world(bad):
    with pytest.raises(ValueError):
        oracle.parse_prompt(bad)


_objects = st.tuples(st.sampled_from(sorted(COLORS)), st.sampled_from(SHAPES), st.sampled_from(sorted(SIZES)))


@settings(max_examples=150, deadline=None)
@given(st.lists(_objects, min_size=1, max_size=4, unique_by=lambda o: o[0]))
def test_parser_property_long_sentences(objects):
    text = " ".join(f"there is a {z} {c} {s}." for c, s, z in objects)
    req = oracle.parse_prompt(text)
    assert [(o.color, o.shape, o.size) for o in req.objects] == [(c, s, z) for c, s, z in objects]


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(sorted(COLORS)), st.sampled_from(SHAPES), st.sampled_from(sorted(NUMBER_WORDS)))
def test_parser_property_counting(color, shape, n):
    req = oracle.parse_prompt(f"{NUMBER_WORDS[n]} {color} {PLURALS[shape]}")
    assert req.objects[0].count == n and req.family == "counting"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=120))
def test_parser_never_crashes_on_junk(text):
    try:
        oracle.parse_prompt(text)
    except ValueError:
        pass


# -- oracle ---------------------------------------------------------------------------------------------------------

def test_oracle_is_right_on_clean_renders():
    report = oracle.oracle_check(100, seed=1, split="test")
    for family, metrics in report["families"].items():
        assert metrics["all_correct"] >= 0.99, family
        assert metrics["artifact_rate"] == 0.0


def _bad_images():
    rng = np.random.default_rng(0)
    return {
        "noise": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        "blank": np.full((64, 64, 3), BACKGROUND, dtype=np.uint8),
        "black": np.zeros((64, 64, 3), np.uint8),
        "saturated": np.full((64, 64, 3), 255, np.uint8),
        "one_colour": np.full((64, 64, 3), COLORS["red"], dtype=np.uint8),
    }


@pytest.mark.parametrize("name", list(_bad_images()))
def test_oracle_degrades_sensibly_on_bad_images(name):
    img = _bad_images()[name]
    for family in FAMILIES:
        prompt = generate(family, 1, "test", seed=0)[0].prompt
        verdict = oracle.judge(prompt, img)
        assert not verdict.all_correct
        assert 0.0 <= verdict.object_recall <= 1.0
    fid = oracle.evaluate_fidelity([img, img], [render(s.scene) for s in generate("single", 4, "test")])
    assert np.isfinite(fid["kid"])


def test_oracle_rejects_the_wrong_image():
    a, b = generate("binding", 30, "test", seed=4), generate("binding", 30, "test", seed=5)
    wrong = [oracle.judge(x.prompt, render(y.scene)).all_correct for x, y in zip(a, b) if x.prompt != y.prompt]
    assert sum(wrong) / len(wrong) < 0.1


def test_oracle_checks_relations_and_sizes():
    left = SceneObject("red", "circle", "small", 1, 0)
    right = SceneObject("blue", "square", "small", 1, 2)
    img = render(Scene((left, right)))
    assert oracle.judge("a red circle to the left of a blue square", img).all_correct
    verdict = oracle.judge("a red circle to the right of a blue square", img)
    assert verdict.spatial_ok is False and not verdict.all_correct
    assert oracle.judge("a small red circle and a large blue square", img).size_ok is False
    assert oracle.judge("two red circles", img).count_ok is False


def test_evaluate_shape_and_bad_input():
    samples = generate("spatial", 5, "test")
    report = oracle.evaluate([s.prompt for s in samples], [render(s.scene) for s in samples])
    assert set(report) == {"families", "overall"}
    assert report["families"]["spatial"]["spatial_acc"] == 1.0
    with pytest.raises(ValueError, match="prompts but"):
        oracle.evaluate(["a red circle"], [])
    with pytest.raises(ValueError, match="HxWx3"):
        oracle.judge("a red circle", np.zeros((64, 64), np.uint8))


def test_kid_separates_distributions():
    clean = [render(s.scene) for s in generate("binding", 40, "test", seed=2)]
    other = [render(s.scene) for s in generate("binding", 40, "test", seed=3)]
    rng = np.random.default_rng(1)
    noisy = [np.clip(im + rng.normal(0, 40, im.shape), 0, 255).astype(np.uint8) for im in clean]
    same = oracle.kid(clean, other)
    assert abs(same) < 0.05
    assert oracle.kid(noisy, other) > 10 * max(abs(same), 1e-3)
