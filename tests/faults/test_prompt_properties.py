"""Property-based tests (hypothesis) of the code that reads prompt text: LongAlign's segmentation and segment
encoding, CoMat's noun-phrase parser, the toy world's word counter, and the oracle's prompt parser.

The oracle parser already has properties in tests/test_world.py (requirements survive their wording, junk text is
parsed or refused); the ones here are different invariants: case and spacing never change what is required, and a
long prompt's objects follow its sentences in order.
"""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import CLIPTextConfig, CLIPTextModel

from ralign.models.tokenizer import build_word_tokenizer
from ralign.diffusion.text_encoding import SegmentEncoder, fit_sentence, split_segments
from ralign.rewards.text_parsing import MODIFIERS, NON_OBJECT_NOUNS, NOUNS, parse_entities
from ralign.world import oracle
from ralign.world.prompts import LONG_FILLER_SENTENCES, LONG_OBJECT_SENTENCES, generate, prompt_words, token_count, vocabulary
from ralign.world.scene import COLORS, SHAPES, SIZES

BOUNDED = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SENTENCE_ENDS = ".!?;"
WORDS = [w for w in vocabulary() if w.isalpha()]


def _content(text: str) -> str:
    """The characters a segmentation must keep, in order: all but whitespace and sentence-ending punctuation (a piece
    made of those alone is dropped by design)."""
    return re.sub(rf"[\s{re.escape(SENTENCE_ENDS)}]", "", text)


# ------------------------------------------------------------------------------------------ sentence segmentation


@BOUNDED
@given(st.text(alphabet=st.sampled_from(list("ab ,.!?;\t\n") + ["\u2028", "\u00a0"]), max_size=80))
def test_split_segments_covers_the_text_in_order_one_sentence_each(prompt):
    pieces = split_segments(prompt)
    assert pieces and all(p == p.strip() for p in pieces)
    assert _content("".join(pieces)) == _content(prompt)
    for piece in pieces:
        assert not re.search(rf"[{re.escape(SENTENCE_ENDS)}]\s", piece), piece  # a sentence end inside a piece
    if _content(prompt):
        assert all(_content(p) for p in pieces)  # no piece is punctuation or whitespace only


@BOUNDED
@given(st.lists(st.tuples(st.text(alphabet="abcdefgh", min_size=1, max_size=6), st.integers(1, 9)), min_size=1, max_size=30),
       st.integers(1, 12))
def test_fit_sentence_keeps_words_in_order_within_the_limit(words_and_tokens, limit):
    words = [w for w, _ in words_and_tokens]
    tokens = dict(zip(words, (n for _, n in words_and_tokens)))
    counts = [tokens[w] for w in words]  # a word always has the same token count
    pieces = fit_sentence(" ".join(words), counts, limit)
    assert " ".join(pieces).split() == words
    for piece in pieces:
        size = sum(tokens[w] for w in piece.split())
        assert size <= limit or len(piece.split()) == 1  # only a single over-long word may exceed it
    # greedy: no piece could have taken the next piece's first word
    for a, b in zip(pieces, pieces[1:]):
        assert sum(tokens[w] for w in a.split()) + tokens[b.split()[0]] > limit


@pytest.fixture(scope="module")
def encoder_parts():
    tok = build_word_tokenizer()
    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=tok.model_max_length,
                                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id)).eval()
    return te, tok


_sentence = st.lists(st.sampled_from(WORDS), min_size=1, max_size=40).map(" ".join)
_prompt = st.lists(st.tuples(_sentence, st.sampled_from(list(SENTENCE_ENDS) + [""])), min_size=1, max_size=5).map(
    lambda parts: " ".join(s + end for s, end in parts))


@BOUNDED
@given(prompt=_prompt, budget=st.sampled_from([24, 40, 96]))
def test_segment_encoding_keeps_every_token_in_order_up_to_the_budget(encoder_parts, prompt, budget):
    te, tok = encoder_parts
    enc = SegmentEncoder(te, tok, budget)
    segments = enc.segments(prompt)
    limit = tok.model_max_length
    assert _content("".join(segments)) == _content(prompt)
    assert all(len(tok(s).input_ids) <= limit for s in segments)  # every piece fits one encoder pass
    with torch.no_grad():
        got = enc([prompt])[0]
        # The reference: each segment encoded alone, its start token and words kept, concatenated in order.
        parts = []
        for s in segments:
            ids = tok([s], return_tensors="pt").input_ids
            parts.append(te(ids).last_hidden_state[0][:-1])  # drop the end-of-text token
        expected = torch.cat(parts)
        n = expected.shape[0]
        assert n == enc.token_count(prompt)
        kept = min(n, budget)
        torch.testing.assert_close(got[:kept], expected[:kept], rtol=1e-4, atol=1e-5)
        if kept < budget:
            torch.testing.assert_close(got[kept:], enc.pad_embedding().expand(budget - kept, -1), rtol=1e-4, atol=1e-5)
    assert (enc.overflow(prompt) is None) == (n <= budget)


# -------------------------------------------------------------------------------------- CoMat's noun-phrase parser

_token = st.one_of(st.sampled_from(sorted(NOUNS) + sorted(MODIFIERS) + ["picture", "shape", "and", "of", "the", "Red", "CIRCLE"]),
                   st.text(alphabet="xyz", min_size=1, max_size=3))
_separator = st.sampled_from([" ", "  ", ", ", "-", ". ", " and "])


@BOUNDED
@given(st.lists(st.tuples(_token, _separator), min_size=1, max_size=14))
def test_lexicon_entities_are_the_object_nouns_with_their_modifiers(parts):
    prompt = "".join(t + s for t, s in parts)
    entities = parse_entities(prompt, parser="lexicon")
    words = [(m.group().lower(), m.span()) for m in re.finditer(r"[A-Za-z]+", prompt)]
    object_nouns = [(w, span) for w, span in words if w in NOUNS and w not in NON_OBJECT_NOUNS]
    assert [(e.noun, e.spans[-1]) for e in entities] == object_nouns  # one entity per object noun, in prompt order
    for e in entities:
        texts = [prompt[a:b].lower() for a, b in e.spans]
        assert texts == [*e.modifiers, e.noun]  # the spans are where the words are
        assert all(m in MODIFIERS for m in e.modifiers)
        assert all(a1 <= a2 for (a1, _), (a2, _) in zip(e.spans, e.spans[1:]))
        starts = [a for a, _ in e.spans]
        assert len(set(starts)) == len(starts)


# ------------------------------------------------------------------------------------ the toy world's word counter

_vocab_word = st.sampled_from(WORDS)
_trailing = st.sampled_from(["", "", ".", ",", ";", "!", "?"])
_space = st.sampled_from([" ", "  ", "\t", "\n"])


@pytest.fixture(scope="module")
def word_tokenizer():
    return build_word_tokenizer(model_max_length=10_000)  # no truncation: every token is counted


@BOUNDED
@given(parts=st.lists(st.tuples(_vocab_word, _trailing, _space, st.booleans()), min_size=1, max_size=30))
def test_token_count_is_what_the_toy_tokenizer_produces(word_tokenizer, parts):
    """`token_count` is how the generator guarantees long prompts exceed the encoder's limit: it must agree with the
    tokenizer on any text written with the world's words, whatever the case and spacing."""
    prompt = "".join((w.upper() if up else w) + p + s for w, p, s, up in parts)
    assert token_count(prompt) == len(word_tokenizer(prompt).input_ids)
    assert "".join(prompt_words(prompt)) == re.sub(r"\s", "", prompt.lower())


# ----------------------------------------------------------------------------------------- the oracle's parser

GENERATED = [sample.prompt for family in ("single", "binding", "counting", "spatial", "size", "long")
             for sample in generate(family, 30, "all", seed=5)]


@BOUNDED
@given(st.sampled_from(GENERATED), st.data())
def test_oracle_requirements_ignore_case_and_spacing(prompt, data):
    words = prompt.split(" ")
    cases = data.draw(st.lists(st.sampled_from([str.lower, str.upper, str.title]), min_size=len(words), max_size=len(words)))
    gaps = data.draw(st.lists(st.sampled_from([" ", "  ", "\t", "\n", " \n "]), min_size=len(words) - 1, max_size=len(words) - 1))
    edges = data.draw(st.tuples(st.sampled_from(["", " ", "\n"]), st.sampled_from(["", " ", "\t"])))
    varied = edges[0] + "".join(c(w) + g for c, w, g in zip(cases, words, gaps + [""])) + edges[1]
    assert oracle.parse_prompt(varied) == oracle.parse_prompt(prompt)


_object_sentence = st.tuples(st.sampled_from(LONG_OBJECT_SENTENCES), st.sampled_from(sorted(SIZES)),
                             st.sampled_from(sorted(COLORS)), st.sampled_from(SHAPES))


@BOUNDED
@given(st.lists(_object_sentence, min_size=1, max_size=6), st.lists(st.sampled_from(LONG_FILLER_SENTENCES), max_size=3), st.data())
def test_oracle_long_prompt_objects_follow_the_sentence_order(objects, fillers, data):
    sentences = [t.format(size=z, color=c, shape=s) for t, z, c, s in objects]
    order = data.draw(st.permutations(range(len(sentences))))
    forward = oracle.parse_prompt(" ".join(sentences + fillers))
    shuffled = oracle.parse_prompt(" ".join(fillers[:1] + [sentences[i] for i in order] + fillers[1:]))
    assert forward.family == shuffled.family == "long"
    assert [(o.color, o.shape, o.size) for o in forward.objects] == [(c, s, z) for _, z, c, s in objects]
    assert list(shuffled.objects) == [forward.objects[i] for i in order]
