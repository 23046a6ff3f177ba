"""Rejection-sampling filters: which sampled answers are good enough to become training data.

R1 kept only traces that reach the right answer, in the expected format, in one language, without code
blocks in the reasoning of a non-code problem, without overlong paragraphs or endless repetition, of a
sensible length, and not too many per prompt (its paper: "mixed-language / long-paragraph / code-block
outputs filtered"). Each per-sample filter has a name, and a rejected sample is counted under the first
filter it fails, in the order of `ORDER`.
Per-prompt filters (exact and near duplicates, the cap of m per prompt) run on what is left.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Optional

from ponder.errors import UserError
from ponder.rewards.format import strict_format
from ponder.rewards.language import chain_of_thought, word_counts

ORDER = ("truncated", "length", "format", "correct", "language", "code_block", "long_paragraph", "repetition", "duplicate",
         "near_duplicate", "per_prompt")


@dataclass
class FilterConfig:
    correct: bool = True  # the task's verifier gives full marks to the extracted answer
    format: bool = True  # strict think-then-answer format (the R1-Zero format reward)
    # the thinking's words are in this language: en | zh, or target (each example's `target` column, as
    # bilingual_arithmetic gives it; examples without one: en); None: off
    language: Optional[str] = "en"
    # least share of the thinking's words in `language` (no words at all passes): 1.0, any word of another script
    # rejects, the mixing that `ponder eval` counts in its mixing rate
    language_min: float = 1.0
    code_blocks: bool = True  # reject fenced code (```) in the thinking, for problems that are not code (no `tests`)
    max_paragraph_words: Optional[int] = 500  # reject a paragraph (text between blank lines) of more words; None: off
    ngram: int = 8  # repeated-phrase check: word n-grams of this size ...
    ngram_max_count: int = 1  # ... may occur at most this often (0: off)
    min_tokens: int = 1  # completion length bounds, in the sampling model's tokens
    max_tokens: Optional[int] = None
    keep_truncated: bool = False  # keep answers cut by the token budget (never right to learn to stop there)
    dedup: bool = True  # drop exact duplicates within a prompt (whitespace and case ignored)
    near_dup: float = 0.8  # drop answers this similar to one already kept for the prompt (Jaccard of 5-char shingles); 0: off
    per_prompt: int = 4  # m: most answers kept per prompt; 0: no cap


def check_config(cfg: FilterConfig) -> None:
    if cfg.language not in (None, "en", "zh", "target"):
        raise UserError(f"config filters.language: '{cfg.language}' is not supported; choose en, zh, target (each example's) or null (off)")
    if not 0 <= cfg.near_dup <= 1:
        raise UserError("config filters.near_dup must be between 0 (off) and 1")
    from ponder.config import need

    # (one line for the three named them all, whichever was wrong: --per-prompt -1 said "filters.ngram must be >= 1")
    need(cfg.ngram >= 1, "filters.ngram", cfg.ngram, "at least 1 (words a repeated phrase)")
    need(cfg.ngram_max_count >= 0, "filters.ngram_max_count", cfg.ngram_max_count, "0 (off) or more")
    need(cfg.per_prompt >= 0, "filters.per_prompt", cfg.per_prompt, "0 (no cap) or more (--per-prompt)")
    if not 0 <= cfg.language_min <= 1:
        raise UserError("config filters.language_min must be between 0 and 1 (the least share of the thinking's words in "
                        "the language)")
    if cfg.max_paragraph_words is not None and cfg.max_paragraph_words < 1:
        raise UserError("config filters.max_paragraph_words must be >= 1, or null (off)")
    if cfg.max_tokens is not None and cfg.max_tokens < cfg.min_tokens:
        raise UserError("config filters.max_tokens is below filters.min_tokens; no answer could pass")


@dataclass
class Candidate:
    """One sampled answer with what the filters look at."""

    text: str
    tokens: int
    truncated: bool
    score: float | None = None  # the task verifier's score of the extracted answer (None: not scorable)
    reason: str | None = None  # first filter that rejected it; None: kept
    target: str = "en"  # the example's language (its `target` column), used when filters.language is `target`
    think_opened: bool = False  # the prompt left a think block open (R1-Distill's chat template): the text continues it
    code_task: bool = False  # the problem asks for code (its example has `tests`): code in the thinking is expected


def language_share(text: str, target: str) -> float | None:
    """Share of the thinking's words in `target`; None when it has no words (math only: nothing to mix)."""
    counts = word_counts(chain_of_thought(text))
    total = sum(counts.values())
    return counts["latin" if target == "en" else "han"] / total if total else None


def longest_paragraph(text: str) -> int:
    """Words in the longest paragraph (text between blank lines)."""
    return max((len(p.split()) for p in re.split(r"\n\s*\n", text)), default=0)


def max_ngram_count(text: str, n: int) -> int:
    words = text.lower().split()
    grams = Counter(zip(*(words[i:] for i in range(n))))
    return max(grams.values(), default=0)


def first_failure(c: Candidate, cfg: FilterConfig) -> str | None:
    """The first per-sample filter `c` fails, or None."""
    if c.truncated and not cfg.keep_truncated:
        return "truncated"
    if c.tokens < cfg.min_tokens or (cfg.max_tokens is not None and c.tokens > cfg.max_tokens):
        return "length"
    if cfg.format and not strict_format(c.text, c.think_opened):
        return "format"
    if cfg.correct and not (c.score is not None and c.score >= 1.0):
        return "correct"
    if cfg.language:
        share = language_share(c.text, c.target if cfg.language == "target" else cfg.language)
        if share is not None and share < cfg.language_min:
            return "language"
    if cfg.code_blocks and not c.code_task and "```" in chain_of_thought(c.text):
        return "code_block"
    if cfg.max_paragraph_words and longest_paragraph(c.text) > cfg.max_paragraph_words:
        return "long_paragraph"
    if cfg.ngram_max_count and max_ngram_count(c.text, cfg.ngram) > cfg.ngram_max_count:
        return "repetition"
    return None


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def shingles(text: str, k: int = 5) -> set[str]:
    t = normalise(text)
    return {t[i : i + k] for i in range(max(1, len(t) - k + 1))}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if (a or b) else 1.0


def select(group: list[Candidate], cfg: FilterConfig) -> list[Candidate]:
    """Mark each candidate of one prompt with its rejection reason (or None) and return the kept ones, in order."""
    kept: list[Candidate] = []
    seen: set[str] = set()
    kept_shingles: list[set] = []
    for c in group:
        c.reason = first_failure(c, cfg)
        if c.reason:
            continue
        key = normalise(c.text)
        if cfg.dedup and key in seen:
            c.reason = "duplicate"
            continue
        sh = shingles(c.text)
        if cfg.near_dup and any(jaccard(sh, other) >= cfg.near_dup for other in kept_shingles):
            c.reason = "near_duplicate"
            continue
        if cfg.per_prompt and len(kept) >= cfg.per_prompt:
            c.reason = "per_prompt"
            continue
        seen.add(key)
        kept_shingles.append(sh)
        kept.append(c)
    return kept
