"""SFT examples as token ids with a loss mask: the prompt under the run's template, the completion scored.

Prompts are encoded exactly as the GRPO trainer encodes them (`ponder.templates.encoded_prompt`),
and completions are appended as separately tokenized text, so a model fine-tuned here is trained on the
token sequences that RL later samples and scores. Chat rows under the `chat` template are rendered by the
tokenizer's chat template, turn by turn; only assistant turns carry loss.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ponder.errors import UserError
from ponder.tasks import chat_messages_problem
from ponder.templates import chat_text, encoded_prompt, one_of_each_shape, require_chat_template, with_chat_options


@dataclass
class Encoded:
    ids: list[int]
    mask: list[int]  # 1 where ids[t] is a target (predicted from ids[:t]); mask[0] is always 0
    truncated: bool = False

    @property
    def prompt_len(self) -> int:
        """Tokens before the first target: the prompt the model is asked to continue."""
        return self.mask.index(1) if 1 in self.mask else len(self.ids)


def read_rows(files: list[str]) -> list[dict]:
    """Rows of the JSONL files, each checked to be {prompt, completion} or {messages}."""
    from ponder.tasks.jsonl import read_jsonl

    rows = []
    for f in files:  # named by file and line, as the editor shows them (blank lines count)
        for line, row in read_jsonl(f, required=(), key="data.files", with_lines=True):
            rows.append(check_row(row, f"{f}:{line}"))
    return rows


def check_row(row: dict, where: str) -> dict:
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in msgs):
            raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        if not any(m["role"] == "assistant" for m in msgs):
            raise UserError(f"{where}: no assistant turn to learn from; add one or drop the row")
        return row
    for key in ("prompt", "completion"):
        if key not in row:
            raise UserError(f"{where}: no '{key}' field; rows need prompt and completion (or messages)")
    if not isinstance(row["completion"], str) or not isinstance(row["prompt"], (str, list)):
        raise UserError(f"{where}: prompt must be text (or chat messages) and completion text")
    problem = chat_messages_problem(row["prompt"])
    if problem:
        raise UserError(f"{where}: {problem}")
    return row


def encode(row: dict, tokenizer, template: str, add_eos: bool = True) -> Encoded:
    if "messages" in row:
        if template == "chat":
            return _encode_chat(row["messages"], tokenizer)
        msgs = row["messages"]
        if [m["role"] for m in msgs].count("assistant") > 1 or msgs[-1]["role"] != "assistant":
            raise UserError(f"multi-turn chat rows need data.template=chat and a tokenizer with a chat template (template is '{template}')")
        if not any(m["role"] == "user" for m in msgs):  # a text template shows the user's turn alone
            raise UserError(f"a messages row under data.template={template} needs a user turn before the assistant's (roles: "
                            f"{', '.join(m['role'] for m in msgs)}); add one, or use data.template=chat")
        row = {"prompt": msgs[:-1], "completion": msgs[-1]["content"]}
    prompt, opened = encoded_prompt(template, row["prompt"], tokenizer)
    text = row["completion"]
    if opened and text.lstrip().startswith("<think>"):  # the prompt opened the block: a whole trace's tag goes
        text = text.lstrip()[len("<think>"):].lstrip("\n")
    completion = tokenizer(text, add_special_tokens=False).input_ids
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise UserError("the tokenizer has no EOS token to end completions with; set data.add_eos=false")
        completion = completion + [tokenizer.eos_token_id]
    if not prompt:  # the first token has no prefix to be predicted from
        prompt = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
    return Encoded(prompt + completion, [0] * len(prompt) + [1] * len(completion))


def _encode_chat(messages: list[dict], tokenizer) -> Encoded:
    """Render turn by turn: text a turn adds is scored when the turn is the assistant's, and only its own part."""
    # (not by rendering the first message alone: a template may refuse a conversation without a user turn, as
    # Qwen3's does a lone system turn, which would refuse every row that opens with one)
    require_chat_template(tokenizer)
    ids, mask, done = [], [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = chat_text(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = chat_text(tokenizer, messages[: i + 1])
        if not before.startswith(done):
            raise UserError("the tokenizer's chat template rewrites earlier turns; train on {prompt, completion} rows instead")
        if not upto.startswith(before):  # DeepSeek-R1-Distill's: its generation prompt ends "<think>\n", its turns do not
            extra = before[len(os.path.commonprefix([before, upto])):]
            raise UserError(f"the tokenizer's chat template writes an assistant turn without the {extra!r} its generation "
                            "prompt ends with; train on {prompt, completion} rows instead")
        for text, scored in ((before[len(done):], 0), (upto[len(before):], 1)):
            piece = tokenizer(text, add_special_tokens=False).input_ids if text else []  # the template writes them
            ids += piece
            mask += [scored] * len(piece)
        done = upto
    if mask and mask[0]:
        mask[0] = 0
    return Encoded(ids, mask)


@dataclass
class DataReport:
    examples: int
    truncated: int
    dropped: int
    max_len: int
    empty: int = 0  # examples with no scored token to begin with (an empty completion without EOS): left out


    def warning(self) -> str | None:
        if not (self.truncated or self.dropped or self.empty):
            return None
        parts = []
        if self.empty:
            parts.append(f"{self.empty} of {self.examples} examples have nothing to learn (no completion token is scored, "
                         "e.g. an empty completion with data.add_eos=false) and were left out")
            if not (self.truncated or self.dropped):
                return parts[0] + "; give them a completion or remove them"
        if self.truncated:
            parts.append(f"{self.truncated} of {self.examples} examples are longer than {self.max_len} tokens and were cut "
                         "(their ends, EOS included, are not learned)")
        if self.dropped:
            parts.append(f"{self.dropped} were dropped (the prompt alone fills the {self.max_len}-token context)")
        return "; ".join(parts) + "; raise data.max_len or shorten the data"


def fit(examples: list[Encoded], max_len: int) -> tuple[list[int], list[Encoded], DataReport]:
    """Cut examples to `max_len` tokens; drop those left without a scored token. Returns the kept
    examples' indices, the kept examples and the counts."""
    index, kept, truncated, dropped, empty = [], [], 0, 0, 0
    for i, ex in enumerate(examples):
        if len(ex.ids) > max_len:
            ex = Encoded(ex.ids[:max_len], ex.mask[:max_len], truncated=True)
            if not any(ex.mask):
                dropped += 1
                continue
            truncated += 1
        if any(ex.mask):
            index.append(i)
            kept.append(ex)
        else:
            empty += 1
    return index, kept, DataReport(len(examples), truncated, dropped, max_len, empty)


def model_context(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def read_data(cfg, seed: int):
    """The rows of data.files and data.coldstart, at most data.n, checked under the template (check_template), and the
    tokenizer that checked them (the model's loading takes it). Empty data is a UserError. Needs no model: the trainer
    reads them before loading one, so a mistake in them is told at once."""
    from ponder.sft.coldstart import coldstart_rows

    d = cfg.data
    rows = read_rows(d.files)
    for spec in d.coldstart:
        rows += coldstart_rows(spec, seed)
    rows = rows[: d.n] if d.n else rows
    if not rows:
        names = ", ".join(str(Path(f)) for f in d.files) or "data.coldstart"
        raise UserError(f"SFT data is empty: {names} holds no rows; give JSONL with {{prompt, completion}} rows")
    return rows, check_template(rows, cfg)


def check_template(rows: list[dict], cfg):
    """Encode one row of each shape (prompt or messages, and its chat roles) with the model's tokenizer, which loads in
    a moment: a template the rows cannot take (an unknown name, `chat` with no chat template, one refusing a system
    turn) is one line before the model loads (minutes for a large one), not after. Returns that tokenizer."""
    from ponder import models

    d = cfg.data
    tokenizer = with_chat_options(models.load_tokenizer(cfg.model.path, cfg.model.trust_remote_code),
                                  cfg.model.chat_template_kwargs)
    # a conversation's roles end with the assistant's turn, a prompt's with the user's: the two never share a shape
    for row in one_of_each_shape(rows, lambda row: row.get("messages", row.get("prompt"))):
        encode(row, tokenizer, d.template, d.add_eos)
    return tokenizer


def load_data(cfg, tokenizer, model, rows: list[dict]) -> tuple[list[dict], list[Encoded], DataReport]:
    """read_data's rows that fit, their encodings (cut to the context) and the truncation report."""
    d = cfg.data
    context = model_context(model)
    max_len = min(x for x in (d.max_len, context) if x is not None) if (d.max_len or context) else 1 << 30
    encoded = [encode(r, tokenizer, d.template, d.add_eos) for r in rows]
    index, encoded, report = fit(encoded, max_len)
    if not encoded:
        raise UserError(f"SFT data is empty after fitting to {max_len} tokens: every prompt fills the context; raise data.max_len")
    return [rows[i] for i in index], encoded, report
