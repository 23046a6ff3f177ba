"""Prompt templates: how an example's prompt becomes the text the model continues."""

from __future__ import annotations

from ponder.errors import UserError

# DeepSeek-R1 paper, Table 1, verbatim.
R1_ZERO = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> "
    "</answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here "
    "</answer>. User: {prompt}. Assistant:"
)

TEMPLATES = {"r1_zero": R1_ZERO, "plain": "{prompt}"}


def render(template: str, prompt, tokenizer=None) -> str:
    """Text of the prompt under a template. `chat` uses the tokenizer's chat template."""
    if template == "chat":
        require_chat_template(tokenizer)
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return chat_text(tokenizer, messages, add_generation_prompt=True)
    if template not in TEMPLATES:
        raise UserError(f"unknown template '{template}'; choose one of: {', '.join([*TEMPLATES, 'chat'])}")
    if isinstance(prompt, list):  # chat messages under a text template: use the last user turn
        prompt = next(m["content"] for m in reversed(prompt) if m.get("role") == "user")
    return TEMPLATES[template].format(prompt=prompt)


def end_of_turn(tokenizer) -> str | None:
    """The special token the tokenizer's chat template closes an assistant turn with (<|im_end|>, <|eot_id|>,
    <end_of_turn>, </s>), read off the template's rendering of a two-turn conversation; None without a template,
    or where no special token follows the answer."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    mark = "ponderendofturnprobe"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "1"}, {"role": "assistant", "content": mark}],
                                             tokenize=False)
    except Exception:  # noqa: BLE001  (a template that refuses this conversation: no end to read)
        return None
    after = text.split(mark, 1)[1].lstrip() if isinstance(text, str) and mark in text else ""
    special = sorted(getattr(tokenizer, "all_special_tokens", []) + [
        t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False)],
        key=len, reverse=True)
    return next((t for t in special if t and after.startswith(t)), None)


def require_chat_template(tokenizer) -> None:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise UserError("template 'chat' needs a tokenizer with a chat template; use the r1_zero or plain template (data.template; ponder sample: template; ponder eval: --template)")


def with_chat_options(tokenizer, options: dict | None):
    """The tokenizer, its chat template rendered with `options` from now on (model.chat_template_kwargs: Qwen3's
    {enable_thinking: false}); the tokenizer is returned for chaining."""
    if options:
        tokenizer.ponder_chat_kwargs = dict(options)
    return tokenizer


def chat_text(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The chat template's text of `messages`. Its own error (jinja's TemplateError: `raise_exception` in the
    template, as Gemma's refuses a system turn and Llama's turns that do not alternate, or the template's syntax) is
    one line naming the prompt and the fix, whichever command renders it (train, sft, eval, sample)."""
    try:
        from jinja2 import TemplateError, TemplateSyntaxError
    except ImportError:  # transformers renders with jinja: without it no template ran, so none of its errors to name
        TemplateError = TemplateSyntaxError = ()
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             **getattr(tokenizer, "ponder_chat_kwargs", {}))
    except TemplateError as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if isinstance(e, TemplateSyntaxError):  # broken whatever it is given: not the data's doing
            raise UserError(f"the tokenizer's chat template does not parse: {why}; fix the chat_template in the tokenizer's "
                            "files, or use another template (r1_zero or plain)") from None
        roles = [m.get("role") for m in messages]
        # a lone user turn is the simplest prompt there is: the template, or that one text, is at fault
        fix = ("change that prompt or fix the chat_template in the tokenizer's files" if roles == ["user"] else
               "change those chat messages (templates may refuse a system turn, or turns that do not alternate user/assistant)")
        raise UserError(f"the tokenizer's chat template fails on the prompt {_start(messages)} (roles: {', '.join(map(str, roles))}): "
                        f"{why}; {fix}, or use another template (r1_zero or plain)") from None


def _start(messages: list[dict], n: int = 40) -> str:
    """The question of chat messages (their last user turn, else the last turn), its start quoted, to find it by."""
    turn = next((m for m in reversed(messages) if m.get("role") == "user"), messages[-1] if messages else {})
    text = " ".join(str(turn.get("content", "")).split())
    return repr(text if len(text) <= n else text[:n] + "...")


def opens_think(prompt_text: str) -> bool:
    """Whether the prompt's text leaves a think block open for the answer to continue: DeepSeek-R1-Distill's chat
    template ends its generation prompt with "<think>\n" (R1-Zero's names both tags in its instructions). Only its
    end counts: a question that mentions an unclosed <think> tag opened nothing (its answers' format was judged as
    if the prompt had, and a well-formed one scored 0)."""
    return prompt_text.rstrip().endswith("<think>")


def encoded_prompt(template: str, prompt, tokenizer) -> tuple[list[int], bool]:
    """(token ids, opens_think) of the prompt under a template: the one encoding of the trainer, SFT, evaluation
    and sampling. A chat template writes its special tokens itself (Llama 3's and R1-Distill's begin with BOS), so
    its text is encoded without the tokenizer's own, as apply_chat_template(tokenize=True) does; a text
    template's gets them."""
    text = render(template, prompt, tokenizer)
    ids = tokenizer(text, add_special_tokens=template != "chat").input_ids
    eos = tokenizer.eos_token_id
    if template != "chat" and eos is not None and ids[-1:] == [eos]:
        # a tokenizer that appends EOS to what it encodes (add_eos_token, as some fine-tunes set it) asked the model
        # to go on after the end of the document; the text never holds it (special tokens are not in a question)
        if tokenizer(text, add_special_tokens=False).input_ids[-1:] != [eos]:
            ids = ids[:-1]
    return ids, opens_think(text)


def prompt_ids(template: str, prompt, tokenizer) -> list[int]:
    return encoded_prompt(template, prompt, tokenizer)[0]


def left_out_turns(template: str, prompts) -> str | None:
    """A notice where a text template leaves chat turns out: it shows a prompt's last user turn alone, so a system
    turn (or earlier turns) of chat-message prompts never reached the model, and nothing said so."""
    if template == "chat":
        return None
    cut = [p for p in prompts if isinstance(p, list) and len(p) > 1]
    if not cut:
        return None
    shown = [max((i for i, m in enumerate(p) if m.get("role") == "user"), default=-1) for p in cut]
    roles = sorted({str(m.get("role")) for p, at in zip(cut, shown) for i, m in enumerate(p) if i != at})
    return (f"ponder: {len(cut)} of {len(prompts)} prompts are chat messages with turns besides the last user turn "
            f"({', '.join(roles)}); the {template} template shows that turn alone, so the model never sees the others; "
            "data.template=chat renders them all")


def one_of_each_shape(rows, turns=lambda row: row["prompt"]):
    """The first row of each shape of its turns (plain text, or one sequence of chat roles): what a template check
    renders, since a chat template accepts or refuses a conversation by its roles, not by their words."""
    seen = set()
    for row in rows:
        t = turns(row)
        shape = tuple(m["role"] for m in t) if isinstance(t, list) else "text"
        if shape not in seen:
            seen.add(shape)
            yield row
