"""Built-in tiny models: a character-level tokenizer and small Llama-architecture configs.

Character-level keeps the tiny world honest: digits are single tokens, so arithmetic is learnable by a
model of a few million parameters, and any text (tags, self-corrections) needs no vocabulary work.
"""

from __future__ import annotations

import string

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHARS = [c for c in string.printable if c not in "\x0b\x0c\r"]


def char_tokenizer(extra_chars: str = "") -> PreTrainedTokenizerFast:
    """One token per printable ASCII character, plus pad/bos/eos/unk, built with `tokenizers`.

    `extra_chars` (the bilingual world's Chinese, ponder.tasks.bilingual.ZH_CHARS) get the ids after
    the ASCII ones, so every id of the ASCII tokenizer (and of tiny-base) means the same character."""
    extra = [c for c in dict.fromkeys(extra_chars) if c not in CHARS]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS + extra)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        padding_side="left", clean_up_tokenization_spaces=False,
    )


# name -> LlamaConfig keyword arguments. Sizes are parameters without embeddings.
TINY_SHAPES = {
    "nano": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "micro": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
    "small": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2),
    "base": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4),
}


def tiny_config(shape: str = "nano", tokenizer: PreTrainedTokenizerFast | None = None, max_len: int = 1024) -> LlamaConfig:
    tokenizer = tokenizer or char_tokenizer()
    return LlamaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=max_len, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, rope_theta=10000.0, **TINY_SHAPES[shape],
    )


def tiny_random(shape: str = "nano", seed: int = 0):
    """A randomly initialised tiny model and its tokenizer (deterministic for a seed)."""
    tokenizer = char_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_config(shape, tokenizer))
    return model, tokenizer
