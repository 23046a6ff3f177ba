"""Rollouts through transformers' `generate`: KV cache on, prompts left-padded, stop strings honoured."""

from __future__ import annotations

import contextlib

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from ponder.rollout import (
    Completion, RolloutEngine, SamplingParams, decode_texts, register, shadow_dtype, special_stop_ids, truncate_at_stop,
)


@register("hf")
class HFEngine(RolloutEngine):
    def __init__(self, model, tokenizer, batch_size: int = 256):
        super().__init__(model, tokenizer)
        self.batch_size = batch_size

    @torch.no_grad()
    def generate(self, prompts, params: SamplingParams):
        flat = [p for p in prompts for _ in range(params.n)]
        out: list[Completion] = []
        if params.seed is not None:
            torch.manual_seed(params.seed)  # HF sampling draws from the global generator
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(flat), self.batch_size):
                out += self._batch(flat[start : start + self.batch_size], params)
        finally:
            self.model.train(was_training)
        return [out[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]

    def _batch(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        tok = self.tokenizer
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        pad = tok.pad_token_id
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        eos = self.model.generation_config.eos_token_id  # (with `or`, an EOS id of 0 fell through to the tokenizer's)
        eos = tok.eos_token_id if eos is None else eos
        eos_ids = set(eos if isinstance(eos, list) else [eos]) | special_stop_ids(tok, params.stop)
        greedy = params.temperature == 0
        kwargs = dict(
            max_new_tokens=params.max_tokens, do_sample=not greedy, pad_token_id=pad,
            eos_token_id=list(eos_ids), use_cache=True, return_dict_in_generate=True,
            output_scores=params.logprobs,
        )
        if not greedy:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None,
                          min_p=params.min_p or None)
        if params.stop:  # transformers' own stop_strings search the prompt's end too
            kwargs.update(stopping_criteria=StoppingCriteriaList([CompletionStops(tok, params.stop, width)]))
        narrow = shadow_dtype(self.model)  # bfloat16 matrices beside float32 norms: as autocast over float32 runs
        with torch.autocast(device.type, dtype=narrow) if narrow else contextlib.nullcontext(), plain_config(self.model):
            res = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        new = res.sequences[:, width:].tolist()
        logprobs = None
        if params.logprobs:
            scores = torch.stack(res.scores, dim=1).float().log_softmax(-1)  # processed: the sampling distribution
            logprobs = scores.gather(-1, res.sequences[:, width:, None]).squeeze(-1).tolist()
        out = []
        for i, seq in enumerate(new):
            kept, reason = truncate_at_stop(seq, tok, params.stop, eos_ids)
            if reason is None:  # ran to max_new_tokens: no EOS, so no padding after it either
                reason = "length"
            lp = logprobs[i][: len(kept)] if logprobs is not None else None
            out.append(Completion(kept, reason, lp))
        return out


class CompletionStops(StoppingCriteria):
    """Ends a row once its new tokens' text holds a stop string: only the completion's (transformers' stop_strings
    match the end of the whole sequence, so a prompt ending in `=` and a first token `=` met the stop string `==`).
    Each step decodes each row's last few tokens, enough for any stop string to end in them."""

    def __init__(self, tokenizer, stop: tuple[str, ...], width: int):
        self.tokenizer, self.stop, self.width = tokenizer, stop, width
        self.tail = 4 * max(len(s) for s in stop) + 8  # tokens: some decode to no character (special, part of one)

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, self.width:]
        texts = decode_texts(self.tokenizer, new[:, -self.tail:].tolist())
        return torch.tensor([any(s in t for s in self.stop) for t in texts], device=input_ids.device)


@contextlib.contextmanager
def plain_config(model):
    """The model's generation config set aside for the call: SamplingParams alone decide. transformers fills every
    field a call leaves unset from the checkpoint's generation_config.json, and real ones set sampling fields
    (Qwen2.5-*-Instruct: repetition_penalty 1.05): greedy tokens then differ from the fast engine's, and the
    log-probs returned are not the policy's that the trainer scores."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = inner.generation_config
    inner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        inner.generation_config = saved
