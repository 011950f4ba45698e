"""Grounded-SAM (GroundingDINO boxes -> SAM masks) through transformers, on tiny random-weight models built offline.

Random weights cannot find a real object, so the thresholds steer the detector: 1.01 lets no box through, 0.0 lets
every query's box through, and then the masks must be SAM's segmentation of those boxes.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (BertConfig, BertTokenizerFast, GroundingDinoConfig, GroundingDinoForObjectDetection,
                          GroundingDinoImageProcessor, GroundingDinoProcessor, SamConfig, SamImageProcessor, SamModel,
                          SamProcessor, SwinConfig)

from ralign.models.grounded_sam import GroundingDinoSamSegmenter, best_candidates, detector_query
from ralign.models.grounded_segmenter import build_grounded_segmenter

WORDS = ["a", "red", "green", "blue", "car", "dog", "triangle", "circle", "square", "big", "small"]
NUM_QUERIES = 5
SIDE = 64  # both models' input resolution
H, W = 40, 48  # not square and not SIDE, so every resize and crop back to image size is exercised
PHRASES = ["red car", "a big green triangle", "Dog"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Kernels this small gain nothing from threads, and on a busy machine OpenMP threads waiting on each other made
    # every call ~100x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast(str(vocab))
    torch.manual_seed(0)
    detector = GroundingDinoForObjectDetection(GroundingDinoConfig(
        backbone_config=SwinConfig(image_size=SIDE, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                                   window_size=4, out_indices=[2, 3, 4]),
        text_config=BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=32),
        # d_model feeds GroupNorm(32, d_model), and three feature levels (Swin's own) keep the coarsest map above 1x1,
        # where that GroupNorm would see one value per group for a single image. Two decoder layers: the box heads of
        # layers 1.. are tied to layer 0's, and with one layer the tie has nothing to bind and fails.
        num_feature_levels=3, d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_n_points=2, decoder_n_points=2, num_queries=NUM_QUERIES, max_text_len=32,
    ))
    detector_processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(size={"shortest_edge": SIDE, "longest_edge": SIDE}), tokenizer=tokenizer)
    sam = SamModel(SamConfig(
        vision_config=dict(hidden_size=16, output_channels=16, num_hidden_layers=2, num_attention_heads=2, image_size=SIDE,
                           patch_size=16, window_size=2, global_attn_indexes=[1], num_pos_feats=8, mlp_dim=32),
        prompt_encoder_config=dict(hidden_size=16, image_size=SIDE, patch_size=16, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=16, mlp_dim=32, num_attention_heads=2, iou_head_hidden_dim=16),
    ))
    sam_processor = SamProcessor(SamImageProcessor(size={"longest_edge": SIDE}, pad_size={"height": SIDE, "width": SIDE},
                                                   mask_size={"longest_edge": SIDE // 4},
                                                   mask_pad_size={"height": SIDE // 4, "width": SIDE // 4}))
    return detector, detector_processor, sam, sam_processor


@pytest.fixture(scope="module")
def images():
    return torch.rand(len(PHRASES), 3, H, W, generator=torch.Generator().manual_seed(1))


def segmenter(components, box_threshold, text_threshold=0.0):
    return GroundingDinoSamSegmenter.from_components(*components, box_threshold=box_threshold, text_threshold=text_threshold)


def test_detector_query_format():
    assert detector_query("  Red Car ") == "red car."
    assert detector_query("a dog.") == "a dog."


def test_masks_are_detached_binary_float_at_image_size(components, images):
    out = segmenter(components, 0.0).masks(images.clone().requires_grad_(True), PHRASES)
    assert out.shape == (len(PHRASES), H, W) and out.dtype == torch.float32 and out.device == images.device
    assert not out.requires_grad
    assert set(out.unique().tolist()) <= {0.0, 1.0}


def test_no_box_passes_means_empty_masks(components, images):
    for box_threshold, text_threshold in ((1.01, 0.0), (0.0, 1.01)):  # no box score / no phrase word passes
        seg = segmenter(components, box_threshold, text_threshold)
        assert all(len(b) == 0 for b in seg.boxes(images, PHRASES))
        assert seg.masks(images, PHRASES).abs().sum() == 0


def test_every_box_goes_through_sam(components, images):
    seg = segmenter(components, 0.0)
    boxes = seg.boxes(images, PHRASES)
    assert [len(b) for b in boxes] == [NUM_QUERIES] * len(PHRASES)
    assert all((b[:, :2] <= b[:, 2:]).all() for b in boxes)  # xyxy
    out = seg.masks(images, PHRASES)
    assert out.flatten(1).sum(1).gt(0).any()
    # The masks are SAM's, not the boxes filled in: random SAM weights segment well outside the boxes.
    ys, xs = torch.arange(H)[:, None] + 0.5, torch.arange(W)[None, :] + 0.5
    in_boxes = torch.stack([torch.stack([(xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1) for x0, y0, x1, y1 in b.tolist()]).any(0)
                            for b in boxes])
    assert (out.bool() & ~in_boxes).any()


def test_batch_equals_one_image_at_a_time(components, images):
    seg = segmenter(components, 0.0)
    batched = seg.boxes(images, PHRASES)
    for i, phrase in enumerate(PHRASES):  # phrases of different token lengths: the batch pads the queries
        torch.testing.assert_close(seg.boxes(images[i : i + 1], [phrase])[0], batched[i], atol=1e-4, rtol=0)
    # Different numbers of boxes per image (none for one): SAM's batch pads them.
    boxes = [torch.tensor([[2.0, 3.0, 20.0, 30.0], [25.0, 5.0, 47.0, 39.0]]), torch.zeros(0, 4), torch.tensor([[0.0, 0.0, 10.0, 12.0]])]
    out = seg.masks_for_boxes(images, boxes)
    assert out[1].sum() == 0
    for i in (0, 2):
        assert torch.equal(seg.masks_for_boxes(images[i : i + 1], boxes[i : i + 1])[0], out[i])


def test_best_candidate_is_the_highest_predicted_iou():
    masks = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    iou = torch.tensor([[0.1, 0.9, 0.3], [0.8, 0.2, 0.7]])
    assert torch.equal(best_candidates(masks, iou), torch.stack([masks[0, 1], masks[1, 0]]))
    assert best_candidates(masks[None], iou[None]).shape == (1, 2, 2, 2)


def test_one_phrase_per_image(components, images):
    seg = segmenter(components, 0.35)
    with pytest.raises(ValueError):
        seg.masks(images, PHRASES[:2])
    assert seg.masks(images[:0], []).shape == (0, H, W)


def test_factory_loads_saved_safetensors_directories(components, images, tmp_path):
    detector, detector_processor, sam, sam_processor = components
    for name, model, processor in (("dino", detector, detector_processor), ("sam", sam, sam_processor)):
        # transformers 5 always writes safetensors (its `safe_serialization` flag is gone, swallowed by **kwargs).
        model.save_pretrained(tmp_path / name)
        processor.save_pretrained(tmp_path / name)
        assert (tmp_path / name / "model.safetensors").exists() and not list((tmp_path / name).glob("*.bin"))
    loaded = build_grounded_segmenter({"backend": "grounded_sam", "detector": str(tmp_path / "dino"), "sam": str(tmp_path / "sam"),
                                       "box_threshold": 0.0, "text_threshold": 0.0})
    assert isinstance(loaded, GroundingDinoSamSegmenter)
    expected = segmenter(components, 0.0).masks(images, PHRASES)
    assert expected.sum() > 0
    assert torch.equal(loaded.masks(images, PHRASES), expected)
