"""Prompt encoding for the UNet's cross-attention: the pipeline's plain (truncated) encoding, and LongAlign's
segment-level encoding of prompts longer than the text encoder's token limit.

Segment-level encoding (LongAlign, DESIGN.md section 1): split the prompt into sentences (a sentence longer than one
encoder pass is split further, at word boundaries), encode each segment on its own with the frozen text encoder
(each restarts its position embeddings), drop every end-of-text and padding token (`keep_eos` keeps each
segment's first end-of-text token instead, a departure from the paper), keep each segment's start-of-text token, concatenate along the sequence axis, truncate to a token budget, and pad with one shared pad
embedding: the mean of the tail (the positions after end-of-text) of the empty prompt's encoding. Cross-attention
accepts any sequence length, so the UNet is unchanged. `overflow` says what a prompt would lose to the budget.

`plain_short` (a departure from the paper, off by default) reads every prompt the plain encoding reads whole through
that plain encoding, repeated to fill the budget: cross-attention is a softmax over the keys, so repeating the whole
key/value sequence k times leaves each query's output exactly as it was (each weight is divided by k and summed k
times). Short prompts then mean to the UNet exactly what they meant before, and only long ones are read by segments.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+")


def split_segments(prompt: str) -> list[str]:
    """Sentences of a prompt, split after '.', '!', '?' or ';'; empty pieces dropped; never an empty list."""
    pieces = [p.strip() for p in _SENTENCE_END.split(prompt.strip())]
    pieces = [p for p in pieces if p and not re.fullmatch(r"[.!?;\s]*", p)]
    return pieces or [""]


@dataclass
class PlainEncoder:
    """The pipeline's own encoding: one pass, truncated at the tokenizer's limit (what SD1.5 does at 77 tokens)."""

    text_encoder: torch.nn.Module
    tokenizer: object

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        ids = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.text_encoder.device)
        return self.text_encoder(ids).last_hidden_state

    def overflow(self, prompt: str) -> str | None:
        """What of `prompt` this encoding would cut off, as a phrase for an error message; None if it reads it all."""
        n = len(self.tokenizer(prompt, verbose=False).input_ids)  # untruncated, and no warning about that
        limit = self.tokenizer.model_max_length
        if n > limit:
            return f"{n} tokens, but the plain text encoding reads {limit} (start and end tokens included) and cuts off the rest"
        return None


def fit_sentence(sentence: str, word_tokens: Sequence[int], limit: int) -> list[str]:
    """`sentence` cut at word boundaries into pieces of at most `limit` tokens, given the token count of each of its
    whitespace-separated words (tokenizers that split on whitespace first, as CLIP's BPE and the toy word-level one
    do, tokenise a text to the concatenation of its words' tokens). A single word over the limit stays a piece of
    its own (the encoder then truncates it; `SegmentEncoder.overflow` reports that)."""
    words = sentence.split()
    pieces: list[list[str]] = []
    used = limit + 1  # forces a new piece for the first word
    for word, n in zip(words, word_tokens):
        if used + n > limit:
            pieces.append([])
            used = 0
        pieces[-1].append(word)
        used += n
    return [" ".join(p) for p in pieces] or [sentence]


@dataclass
class SegmentEncoder:
    """LongAlign's segment-level encoding to a fixed `budget` of tokens (gradients flow if the encoder is trainable)."""

    text_encoder: torch.nn.Module
    tokenizer: object
    budget: int
    keep_eos: bool = False  # LongAlign drops every end-of-text token; True keeps each segment's first one
    plain_short: bool = False  # prompts that fit one pass: the plain encoding, repeated (module docstring)

    def __post_init__(self) -> None:
        limit = self.tokenizer.model_max_length
        if self.budget < limit:
            raise ValueError(f"segment budget {self.budget} is below the encoder's own limit {limit}")
        if self.plain_short and self.budget % limit:
            raise ValueError(f"reading short prompts plainly repeats their {limit}-token encoding, so the segment budget "
                             f"must be a multiple of {limit}, got {self.budget}")

    def _kept(self, ids: torch.Tensor) -> torch.Tensor:
        """Which token positions of each segment (rows of `ids`) go into the concatenation."""
        specials = {i for i in (self.tokenizer.eos_token_id, self.tokenizer.pad_token_id) if i is not None}
        keep = torch.ones_like(ids, dtype=torch.bool)
        for special in specials:
            keep &= ids != special
        if self.keep_eos:
            # The first end-of-text of a row is the segment's own (CLIP pads with the same id after it).
            is_eos = ids == self.tokenizer.eos_token_id
            has_eos = is_eos.any(dim=1)
            first = is_eos.int().argmax(dim=1)
            keep[has_eos.nonzero().squeeze(1), first[has_eos]] = True
        return keep

    def pad_embedding(self) -> torch.Tensor:
        """Mean of the empty prompt's encoding after its end-of-text token: a neutral filler the UNet already knows."""
        ids = self.tokenizer([""], padding="max_length", max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids
        hidden = self.text_encoder(ids.to(self.text_encoder.device)).last_hidden_state[0]
        eos_pos = int((ids[0] == self.tokenizer.eos_token_id).nonzero()[0])
        return hidden[eos_pos + 1 :].mean(dim=0)

    def segments(self, prompt: str) -> list[str]:
        """The pieces encoded one pass each: the prompt's sentences, a sentence longer than one pass split at word
        boundaries (else the tokenizer would silently cut its end off before the budget is even reached)."""
        sentences = split_segments(prompt)
        limit = self.tokenizer.model_max_length - 2  # start and end tokens
        lengths = [len(ids) for ids in self.tokenizer(sentences, add_special_tokens=False, verbose=False).input_ids]
        out: list[str] = []
        for sentence, n in zip(sentences, lengths):
            if n <= limit:
                out.append(sentence)
                continue
            words = sentence.split()
            word_tokens = [len(ids) for ids in self.tokenizer(words, add_special_tokens=False, verbose=False).input_ids]
            out.extend(fit_sentence(sentence, word_tokens, limit))
        return out

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        if not self.plain_short:
            return self._segment_encode(prompts)
        plain = PlainEncoder(self.text_encoder, self.tokenizer)
        short = [plain.overflow(p) is None for p in prompts]
        out: list[torch.Tensor | None] = [None] * len(prompts)
        for is_short, encode in ((True, plain), (False, self._segment_encode)):
            rows = [i for i, s in enumerate(short) if s == is_short]
            if not rows:
                continue
            encoded = encode([prompts[i] for i in rows])
            if is_short:
                encoded = encoded.repeat(1, self.budget // encoded.shape[1], 1)
            for i, e in zip(rows, encoded):
                out[i] = e
        return torch.stack(out)

    def _segment_encode(self, prompts: Sequence[str]) -> torch.Tensor:
        segments_per_prompt = [self.segments(p) for p in prompts]
        flat = [s for segs in segments_per_prompt for s in segs]
        ids = self.tokenizer(
            flat, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.text_encoder.device)
        hidden = self.text_encoder(ids).last_hidden_state  # one batched pass over every segment of every prompt
        keep = self._kept(ids)
        pad = self.pad_embedding()
        out, row = [], 0
        for segs in segments_per_prompt:
            pieces = [hidden[row + j][keep[row + j]] for j in range(len(segs))]
            row += len(segs)
            seq = torch.cat(pieces, dim=0)[: self.budget]
            if seq.shape[0] < self.budget:
                seq = torch.cat([seq, pad.expand(self.budget - seq.shape[0], -1)], dim=0)
            out.append(seq)
        return torch.stack(out)

    def token_count(self, prompt: str) -> int:
        """Tokens of the concatenation before it is cut to the budget (what the budget is compared with)."""
        ids = self.tokenizer(
            self.segments(prompt), padding="max_length", truncation=True, max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids
        return int(self._kept(ids).sum())

    def overflow(self, prompt: str) -> str | None:
        """What of `prompt` this encoding would cut off, as a phrase for an error message; None if it reads it all."""
        limit = self.tokenizer.model_max_length
        for piece in self.segments(prompt):
            n = len(self.tokenizer(piece, verbose=False).input_ids)
            if n > limit:
                return (f"the word run {piece[:40]!r} is {n} tokens with no space to split it at, but one encoder pass reads "
                        f"{limit} (start and end tokens included)")
        n = self.token_count(prompt)
        if n > self.budget:
            return f"{n} tokens after segment encoding, but the budget is {self.budget} (model.policy.segment_budget) and the rest is cut off"
        return None


def interpolate_embeddings(original: torch.Tensor, tuned: Sequence[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """TextCraftor's interpolation, for one or several tuned encoders: e = Σ_i w_i·e_i + (1 − Σ_i w_i)·e_original.
    With one encoder, w = 0 gives the original embedding and w = 1 the tuned one; weights may go beyond [0, 1]."""
    total = sum(w for w, _ in tuned)
    out = (1.0 - total) * original
    for w, e in tuned:
        if e.shape != original.shape:
            raise ValueError(f"embeddings to interpolate differ in shape: {tuple(e.shape)} vs {tuple(original.shape)}")
        out = out + w * e
    return out


def token_offsets(tokenizer, prompt: str) -> list[tuple[int, int]]:
    """Character span of each position of the text encoder's (truncated) token sequence; (0, 0) for special tokens.
    Computed where the tokenizer lives (a sampler) and shipped with the attention maps, so a reward actor needs no
    tokenizer of its own."""
    enc = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length, return_offsets_mapping=True)
    return [(int(a), int(b)) for a, b in enc["offset_mapping"]]
