"""LongAlign segment-level encoding on a tiny random text encoder."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from ralign.models.tokenizer import build_word_tokenizer
from ralign.diffusion.text_encoding import PlainEncoder, SegmentEncoder, split_segments


@pytest.fixture(scope="module")
def parts():
    tok = build_word_tokenizer()
    torch.manual_seed(0)
    te = CLIPTextModel(
        CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       max_position_embeddings=tok.model_max_length, pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    ).eval()
    return te, tok


def test_split_segments():
    assert split_segments("a red circle. a blue square; two circles!  ") == ["a red circle.", "a blue square;", "two circles!"]
    assert split_segments("a red circle") == ["a red circle"]
    assert split_segments("") == [""]
    assert split_segments(" . ; ") == [""]


def test_short_prompt_is_plain_encoding_then_pad(parts):
    te, tok = parts
    enc = SegmentEncoder(te, tok, budget=48)
    with torch.no_grad():
        seg = enc(["a red circle"])[0]
        plain = PlainEncoder(te, tok)(["a red circle"])[0]
        pad = enc.pad_embedding()
    assert seg.shape == (48, 32)
    assert torch.allclose(seg[:4], plain[:4], atol=1e-6)  # start token + 3 words; end-of-text dropped
    assert torch.allclose(seg[4:], pad.expand(44, -1))


def test_each_sentence_restarts_positions(parts):
    te, tok = parts
    enc = SegmentEncoder(te, tok, budget=96)
    first, second = "there is a small red circle.", "a large blue square is also in the picture."
    with torch.no_grad():
        both = enc([f"{first} {second}"])[0]
        a = PlainEncoder(te, tok)([first])[0]
        b = PlainEncoder(te, tok)([second])[0]
    n_a, n_b = len(tok(first).input_ids) - 1, len(tok(second).input_ids) - 1  # minus end-of-text
    assert torch.allclose(both[:n_a], a[:n_a], atol=1e-6)
    assert torch.allclose(both[n_a : n_a + n_b], b[:n_b], atol=1e-6)
    assert enc.token_count(f"{first} {second}") == n_a + n_b
    # the second segment keeps its own start-of-text token
    assert torch.allclose(both[n_a], a[0], atol=1e-6)


def test_keep_eos_keeps_each_segments_own_end_token(parts):
    te, tok = parts
    first, second = "there is a small red circle.", "a large blue square is also in the picture."
    enc = SegmentEncoder(te, tok, budget=96, keep_eos=True)
    with torch.no_grad():
        both = enc([f"{first} {second}"])[0]
        a = PlainEncoder(te, tok)([first])[0]
        b = PlainEncoder(te, tok)([second])[0]
        pad = enc.pad_embedding()
    n_a, n_b = len(tok(first).input_ids), len(tok(second).input_ids)  # end-of-text included
    assert torch.allclose(both[:n_a], a[:n_a], atol=1e-6)  # ends with the first sentence's end-of-text state
    assert torch.allclose(both[n_a : n_a + n_b], b[:n_b], atol=1e-6)
    assert torch.allclose(both[n_a + n_b :], pad.expand(96 - n_a - n_b, -1))  # the segments' padding still dropped
    assert enc.token_count(f"{first} {second}") == n_a + n_b == SegmentEncoder(te, tok, budget=96).token_count(f"{first} {second}") + 2


def test_keep_eos_when_padding_reuses_the_end_token(parts):
    """CLIP's tokenizer pads with the end-of-text id: only the first one of a segment is its own."""
    te, tok = parts
    enc = SegmentEncoder(te, tok, budget=48, keep_eos=True)
    ids = torch.tensor([[tok.bos_token_id, 7, 8, tok.eos_token_id, tok.eos_token_id, tok.eos_token_id]])
    assert enc._kept(ids).tolist() == [[True, True, True, True, False, False]]


def test_budget_truncates_and_gradients_flow(parts):
    te, tok = parts
    enc = SegmentEncoder(te, tok, budget=24)
    long = " ".join(["there is a small red circle."] * 8)
    assert enc.token_count(long) > 24
    out = enc([long, "a red circle"])
    assert out.shape == (2, 24, 32)
    out.sum().backward()
    assert te.embeddings.token_embedding.weight.grad.abs().sum() > 0
    te.zero_grad()


def test_budget_below_limit_is_refused(parts):
    te, tok = parts
    with pytest.raises(ValueError, match="below the encoder's own limit"):
        SegmentEncoder(te, tok, budget=8)


def test_plain_short_reads_short_prompts_plainly_and_long_ones_by_segments(parts):
    te, tok = parts
    short = "a red circle"
    long = "there is a small red circle. a large blue square is also in the picture. two green triangles are on the left."
    assert PlainEncoder(te, tok).overflow(long) is not None
    enc = SegmentEncoder(te, tok, budget=96, keep_eos=True, plain_short=True)
    with torch.no_grad():
        mixed = enc([short, long, ""])
        plain = PlainEncoder(te, tok)([short, ""])
        segmented = SegmentEncoder(te, tok, budget=96, keep_eos=True)([long])[0]
    assert mixed.shape == (3, 96, 32)
    assert torch.allclose(mixed[0], plain[0].repeat(4, 1))
    assert torch.allclose(mixed[2], plain[1].repeat(4, 1))
    assert torch.allclose(mixed[1], segmented)


def test_repeated_encoding_leaves_cross_attention_unchanged(parts):
    """Why `plain_short` is exact: the UNet reading the plain encoding repeated k times predicts what it predicts
    from the plain encoding itself."""
    from diffusers import UNet2DConditionModel

    te, tok = parts
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32), norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8,
    ).eval()
    with torch.no_grad():
        plain = PlainEncoder(te, tok)(["a red circle", "two blue squares"])
        repeated = SegmentEncoder(te, tok, budget=96, plain_short=True)(["a red circle", "two blue squares"])
        x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
        assert torch.allclose(unet(x, t, encoder_hidden_states=plain).sample, unet(x, t, encoder_hidden_states=repeated).sample, atol=1e-5)
        assert not torch.allclose(plain, SegmentEncoder(te, tok, budget=96)(["a red circle", "two blue squares"])[:, :24])


def test_plain_short_needs_a_budget_that_repeats_the_plain_encoding(parts):
    te, tok = parts
    with pytest.raises(ValueError, match="must be a multiple of 24"):
        SegmentEncoder(te, tok, budget=50, plain_short=True)
