"""The toy world's word-level tokenizer, built offline and saved in the Hugging Face format.

Real runs use the checkpoint's own tokenizer (CLIPTokenizer for SD1.5). The toy world has ~60 words, so a word-level
vocabulary keeps embedding tables tiny. It is a `PreTrainedTokenizerFast`, so `AutoTokenizer.from_pretrained(dir)`
and diffusers' `StableDiffusionPipeline.from_pretrained` load it with no network access.

Id layout: pad=0, start=1, unk=2, words..., end-of-text = the highest id. End-of-text being the highest id keeps
CLIP-style "argmax" pooling (open_clip's default, and transformers' legacy CLIP path) correct.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from ralign.world.prompts import TEXT_MAX_TOKENS, vocabulary

PAD, BOS, UNK, EOS = "<|pad|>", "<|startoftext|>", "<|unk|>", "<|endoftext|>"


def build_word_tokenizer(model_max_length: int = TEXT_MAX_TOKENS, extra_words: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    words = sorted(set(vocabulary()) | set(extra_words))
    vocab = {PAD: 0, BOS: 1, UNK: 2}
    for w in words:
        vocab[w] = len(vocab)
    vocab[EOS] = len(vocab)
    core = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    core.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    # Same split as ralign.world.prompts.prompt_words: words, and punctuation as separate tokens.
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        model_max_length=model_max_length,
    )


def save_word_tokenizer(path: str | Path, model_max_length: int = TEXT_MAX_TOKENS) -> PreTrainedTokenizerFast:
    tok = build_word_tokenizer(model_max_length)
    tok.save_pretrained(str(path))
    return tok
