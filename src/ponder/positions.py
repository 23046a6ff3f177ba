"""Prompts + new tokens against a learned position table, checked before the model's weights load.

A model with a learned position table (GPT-2's `wpe`, OPT's `embed_positions`) fails past it with an IndexError deep
in the model, in whichever batch first meets a long prompt: hours into a run or an evaluation. Rotary models have no
table and run on. `ponder train`, `ponder eval` and `ponder sample` check their longest prompts here first.
"""

from __future__ import annotations

import torch

from ponder import models
from ponder.errors import UserError
from ponder.templates import prompt_ids

# (examples, new tokens, the setting that gives them) of one set of prompts
PromptSet = tuple[list[dict], int, str]


def check_before_loading(prompt_sets: list[PromptSet], template: str, source: str, trust_remote_code: bool,
                         tokenizer) -> list[PromptSet] | None:
    """Check the prompt sets against the position table of the model at `source`, read from its config (`tokenizer`:
    a function that gives the tokenizer, called only for a model with a table). Returns the sets left to check once
    the model has loaded (check_loaded), where its config was not at hand; else None."""
    skeleton = weightless(source, trust_remote_code)
    if skeleton is None:
        return prompt_sets
    check(prompt_sets, template, models.position_limit(skeleton), tokenizer, models.computed_limit(skeleton))
    return None


def check_loaded(prompt_sets: list[PromptSet] | None, template: str, model, tokenizer) -> None:
    """The check of check_before_loading, on the loaded model, for the sets it left."""
    if prompt_sets:
        check(prompt_sets, template, models.position_limit(model), lambda: tokenizer, models.computed_limit(model))


def weightless(source: str, trust_remote_code: bool):
    """The model at `source` built from its config on the meta device: its layout without weights or memory (a moment,
    for a 70B model too), for models.position_limit before the weights load. None where the config is not at hand (a
    Hub model not downloaded yet) or cannot build such a model: the loaded model is checked instead, and its loading
    says what is wrong."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ponder.models.tiny import tiny_config

    try:
        where = models.resolve(source)
        if isinstance(where, models.HubModel):
            where = models.hub_snapshot(where)
            if where is None:
                return None
        # tiny-random: the built-in Llama, whose positions (rotary) are the same in every shape
        config = tiny_config() if isinstance(where, str) else AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
        with torch.random.fork_rng(devices=[]), torch.device("meta"):  # the run's random draws stay as they were
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # a config or a model's own code this cannot read: the loading tells it as one line
        return None


def check(prompt_sets: list[PromptSet], template: str, limit: int | None, tokenizer, computed: int | None = None) -> None:
    """The longest prompt of each set plus its new tokens must fit in `limit` (models.position_limit's; None where
    positions are computed). Where they are computed, the longest prompt alone must fit in `computed`
    (models.computed_limit's): past it, before a token is generated, nothing is left that the model was made for, and
    the prefill's attention alone took hours (a notice, then a run that did not stop). `tokenizer`: a function that
    gives it."""
    if limit is None and computed is None:
        return
    for examples, new_tokens, key in prompt_sets:
        if limit is None:
            i, longest = _longest_past(examples, template, computed, tokenizer)
            if longest > computed:
                raise UserError(f"a prompt of {longest:,} tokens (example {i + 1} of task '{examples[i].get('task')}') is "
                                f"past the {computed:,} positions the model was made for (max_position_embeddings, times "
                                f"its rope scaling factor) before a token is generated; shorten prompts to {computed:,} "
                                "tokens or fewer")
            continue
        lengths = [len(prompt_ids(template, ex["prompt"], tokenizer())) for ex in examples]
        i = max(range(len(lengths)), key=lengths.__getitem__)
        longest = lengths[i]
        if longest + new_tokens <= limit:
            continue
        fixes = [f"lower {key} to {limit - longest}"] if longest < limit else []
        fixes += [f"shorten prompts to {limit - new_tokens} tokens or fewer"] if new_tokens < limit else []
        fix = " or ".join(fixes) or f"shorten prompts and lower {key}: together they must fit in {limit} positions"
        raise UserError(f"a prompt of {longest} tokens (example {i + 1} of task '{examples[i].get('task')}') + {key} "
                        f"{new_tokens} = {longest + new_tokens} positions, past the model's {limit} (max_position_embeddings, "
                        f"a learned position table); {fix}")


def _longest_past(examples: list[dict], template: str, bound: int, tokenizer) -> tuple[int, int]:
    """(index, tokens) of a prompt longer than `bound` tokens under the template, if any (else tokens <= bound). Only
    prompts whose text could be that long are encoded: a prompt has at most one token a byte of its text (byte-level
    BPE, SentencePiece's byte fallback) besides the template's own, and a chat template over 100,000 prompts took
    minutes to render them all. Nor is the tokenizer loaded where no prompt's text reaches half the bound (the
    model's own checks name a missing one in their words)."""
    sizes = sorted(((len(str(ex["prompt"]).encode()), i) for i, ex in enumerate(examples)), reverse=True)
    if not sizes or sizes[0][0] <= bound // 2:
        return -1, 0
    around = len(prompt_ids(template, "x", tokenizer()))  # the template's own tokens, and the one of "x"
    for size, i in sizes:
        if size + around <= bound:
            break
        tokens = len(prompt_ids(template, examples[i]["prompt"], tokenizer()))
        if tokens > bound:
            return i, tokens
    return -1, 0
