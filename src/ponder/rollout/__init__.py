"""Rollout engines: turn prompt token ids into sampled completions, behind one interface.

Engines generate with the policy's weights, in process. The hf engine runs the model itself; the fast
engine runs it too, or (float32 master weights on CUDA: its `dtype` option) one copy in bfloat16 that it
refreshes in place after each optimizer step; a model already in that layout (bfloat16 matrices, float32
embeddings and norms: the sharded trainer's rollout copy) both run as it is, under autocast (shadow_dtype).
Either way the call after an optimizer step already samples from the new weights.
"""

from __future__ import annotations

import contextlib
import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import torch

from ponder.errors import UserError


@dataclass
class SamplingParams:
    n: int = 1  # completions per prompt
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    # 0: off. Else tokens below min_p x the most likely token's probability are dropped (after top-k and top-p, as
    # transformers orders them): a cut that follows the model's confidence, where top-p's follows the tail's mass
    min_p: float = 0.0
    max_tokens: int = 256
    # stop strings, searched in the completion's text (never the prompt's); the completion keeps the stop string. One
    # that is a special token's text (`<|im_end|>`), which decoded texts leave out, ends a completion as EOS does.
    stop: tuple[str, ...] = ()
    logprobs: bool = False  # return each sampled token's log-probability under the sampling distribution (greedy: temperature 1)
    # return the entropy of each token's distribution at the temperature (1 when greedy), over the whole vocabulary
    # (engines that compute it: the fast one; others leave Completion.entropies None)
    entropies: bool = False
    seed: int | None = None  # fixes the sampling RNG for this call


@dataclass
class Completion:
    token_ids: list[int]  # generated tokens, including the EOS or the tokens that completed a stop string
    finish_reason: Literal["stop", "length"]
    logprobs: list[float] | None = None
    entropies: list[float] | None = None


class RolloutEngine(ABC):
    """Implementations take the model and tokenizer at construction and keep references, not copies."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    @abstractmethod
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        """For each prompt, `params.n` completions (outer list: prompts, inner: samples)."""

    def idle_memory(self):
        """Device memory the engine keeps but does not use until its next `generate` call, as a flat byte
        tensor that a caller may overwrite until then (the trainer's policy pass does); None if none."""
        return None

    def cache_bytes(self) -> int:
        """Device memory the engine's cache holds now (it may grow between calls; the trainer plans again then)."""
        return 0

    def rollout_matrices(self) -> dict | None:
        """The engine's own copies of the model's linear layers in its rollout dtype, current with the master weights,
        by id of the master parameter (the update may compute with them); None if it keeps none."""
        return None


ENGINES: dict[str, type[RolloutEngine]] = {}


def register(name: str):
    def deco(cls):
        ENGINES[name] = cls
        return cls

    return deco


def make_engine(name: str, model, tokenizer, **options) -> RolloutEngine:
    from ponder.rollout import hf  # noqa: F401  (registers "hf")

    try:
        from ponder.rollout import fast  # noqa: F401  (registers "fast" where available)
    except ImportError:
        pass
    if name not in ENGINES:
        raise UserError(f"unknown rollout engine '{name}'; choose one of: {', '.join(sorted(ENGINES))}")
    params = inspect.signature(ENGINES[name].__init__).parameters.values()
    known = [p.name for p in params
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in ("self", "model", "tokenizer")]
    unknown = sorted(set(options) - set(known))
    if unknown and not any(p.kind == p.VAR_KEYWORD for p in params):
        raise UserError(f"rollout.engine_options: the {name} engine has no option {', '.join(map(repr, unknown))}; "
                        f"its options are {', '.join(known)}")
    annotations = {p.name: p.annotation for p in params}
    return ENGINES[name](model, tokenizer, **{k: typed_option(k, v, annotations.get(k)) for k, v in options.items()})


@contextlib.contextmanager
def engine_keys(max_tokens: str, samples: str):
    """An engine's lines name its own parameters ("shorten max_tokens", "fewer samples (k, group_size, n)"); within
    this block, the settings of the command that asked (rollout.max_new_tokens; rollout.group_size ...)."""
    try:
        yield
    except UserError as e:
        raise UserError(str(e).replace("shorten max_tokens", f"shorten {max_tokens}")
                        .replace("(k, group_size, n)", f"({samples})")) from None


_OPTION_TYPES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "text", "None": "null"}


def _is(value, name: str) -> bool:
    if name == "bool" or isinstance(value, bool):  # (a bool is an int to Python, not to a user)
        return name == "bool" and isinstance(value, bool)
    return {"int": isinstance(value, int), "float": isinstance(value, (int, float)), "str": isinstance(value, str),
            "None": value is None}[name]


def typed_option(key: str, value, annotation):
    """An engine option of the type its engine declares (int, float, bool, str, or None where allowed): a number YAML
    read as text (1e-3, which YAML 1.1 reads as a string) as the number; else one line. A float where an integer
    is meant failed deep in the engine (torch.zeros got 2.5 blocks)."""
    names = [t.strip() for t in annotation.split("|")] if isinstance(annotation, str) else []
    if not names or any(t not in _OPTION_TYPES for t in names):  # no annotation read here: as given
        return value
    if "float" in names:
        from ponder.config import number_text

        value = number_text(value)
    if not any(_is(value, t) for t in names):
        raise UserError(f"rollout.engine_options.{key} must be {' or '.join(_OPTION_TYPES[t] for t in names)}; "
                        f"got {value!r}")
    return value


def shadow_dtype(model) -> torch.dtype | None:
    """The dtype of a model's matrices where they are narrower than its input embeddings: a rollout copy's layout
    (bfloat16 linear layers beside float32 embeddings and norms: ponder.rollout.fast.RolloutCopy's shadow,
    ponder.sharding.RolloutWeights). Engines run such a model under autocast to that dtype, which computes what
    autocast over the float32 model does. None for a model of one precision."""
    embedding = model.get_input_embeddings()
    if embedding is None or not embedding.weight.is_floating_point():
        return None
    # the head, or (LoRA's narrowed base under a tied head: ponder.models.narrow_frozen_matrices) any linear layer
    narrowest = min((m.weight.dtype for m in model.modules() if isinstance(m, torch.nn.Linear)
                     and m.weight.is_floating_point()), key=lambda d: d.itemsize, default=embedding.weight.dtype)
    return narrowest if narrowest.itemsize < embedding.weight.dtype.itemsize else None


TAGS = ("<think>", "</think>", "<answer>", "</answer>")  # what the format and accuracy rewards read


def _special_ids_but_tags(tokenizer) -> set[int] | None:
    """The special ids a decoded text leaves out, where the tokenizer made one of TAGS a special token (the usual way to
    add them: additional_special_tokens); None where it did not (skip_special_tokens then does it all). Kept on the
    tokenizer: read once."""
    cached = getattr(tokenizer, "_ponder_special_but_tags", False)
    if cached is not False:
        return cached
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special = {i for i, t in added.items() if getattr(t, "special", False)} | set(getattr(tokenizer, "all_special_ids", []))
    tags = {i for i in special if tokenizer.convert_ids_to_tokens(i) in TAGS}
    result = special - tags if tags else None
    try:
        tokenizer._ponder_special_but_tags = result
    except AttributeError:
        pass
    return result


def decode_texts(tokenizer, token_lists: list[list[int]]) -> list[str]:
    """`tokenizer.decode(ids, skip_special_tokens=True)` of each list, but for think and answer tags that the tokenizer
    made special tokens: those stay (skipped, a well-formed answer lost its tags and scored 0 on format and accuracy).
    A fast tokenizer whose decoding is the Rust tokenizer's alone (no space clean-up, no override) decodes them all in
    one call, in parallel: one call a list took about 20 ms of the 0.5B GRPO step's host time (256 completions of 512
    tokens) while the GPU waited."""
    from transformers import PreTrainedTokenizerFast

    drop, skip = _special_ids_but_tags(tokenizer), True
    if drop is not None:
        token_lists, skip = [_without(ids, drop) for ids in token_lists], False
    backend = getattr(tokenizer, "_tokenizer", None)
    if (isinstance(tokenizer, PreTrainedTokenizerFast) and hasattr(backend, "decode_batch")
            and not tokenizer.clean_up_tokenization_spaces
            and type(tokenizer).decode is PreTrainedTokenizerFast.decode
            and type(tokenizer)._decode is PreTrainedTokenizerFast._decode):
        return backend.decode_batch(token_lists, skip_special_tokens=skip)
    return [tokenizer.decode(t, skip_special_tokens=skip) for t in token_lists]


def _without(ids: list[int], drop: set[int]) -> list[int]:
    """ids less those in `drop`: the trailing ones (EOS, padding) cut off, the rest looked at one by one only where
    some remain (a set's isdisjoint runs in C: 256 completions of 512 tokens took a third longer to decode when
    every token was looked at)."""
    end = len(ids)
    while end and ids[end - 1] in drop:
        end -= 1
    kept = ids[:end]
    return kept if drop.isdisjoint(kept) else [t for t in kept if t not in drop]


def decode_text(tokenizer, ids: list[int]) -> str:
    """decode_texts of one list."""
    return decode_texts(tokenizer, [ids])[0]


def completion_texts(tokenizer, outs: list[list[Completion]]) -> list[list[str]]:
    """Each prompt's completions as texts (decode_texts over all of them at once)."""
    flat = iter(decode_texts(tokenizer, [c.token_ids for out in outs for c in out]))
    return [[next(flat) for _ in out] for out in outs]


def special_stop_ids(tokenizer, stop: tuple[str, ...]) -> set[int]:
    """The ids of the stop strings that are one special token's text: decoded texts (skip_special_tokens) never hold
    them, so engines end a completion at such a token as at EOS."""
    ids = set()
    for s in stop:
        one = tokenizer.encode(s, add_special_tokens=False)
        if len(one) == 1 and tokenizer.decode(one) == s and not tokenizer.decode(one, skip_special_tokens=True):
            ids.add(one[0])
    return ids


def truncate_at_stop(token_ids: list[int], tokenizer, stop: tuple[str, ...], eos_ids: set[int], text: str | None = None):
    """Cut a generated sequence after whichever comes first, its first EOS or the end of its first stop string;
    return (ids, finish_reason or None). `text`: the decoded text of the sequence before its first EOS, where the
    caller has it (decode_texts of many sequences at once)."""
    end = next((i for i, t in enumerate(token_ids) if t in eos_ids), None) if eos_ids else None
    before = token_ids if end is None else token_ids[:end]  # what follows an EOS (padding) holds no stop string
    if stop:
        text = decode_text(tokenizer, before) if text is None else text
        if any(s in text for s in stop):
            # the shortest prefix whose text holds a stop string
            lo, hi = 1, len(before)
            while lo < hi:
                mid = (lo + hi) // 2
                if any(s in decode_text(tokenizer, before[:mid]) for s in stop):
                    hi = mid
                else:
                    lo = mid + 1
            return before[:lo], "stop"
    if end is not None:
        return token_ids[: end + 1], "stop"
    return token_ids, None
