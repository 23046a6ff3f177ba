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
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise UserError("template 'chat' needs a tokenizer with a chat template; use data.template=r1_zero or plain")
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if template not in TEMPLATES:
        raise UserError(f"unknown template '{template}'; choose one of: {', '.join([*TEMPLATES, 'chat'])}")
    if isinstance(prompt, list):  # chat messages under a text template: use the last user turn
        prompt = next(m["content"] for m in reversed(prompt) if m.get("role") == "user")
    return TEMPLATES[template].format(prompt=prompt)


def opens_think(prompt_text: str) -> bool:
    """Whether the prompt's text leaves a think block open for the answer to continue: DeepSeek-R1-Distill's chat
    template ends its generation prompt with "<think>\n" (R1-Zero's names both tags in its instructions)."""
    return prompt_text.rfind("<think>") > prompt_text.rfind("</think>")


def encoded_prompt(template: str, prompt, tokenizer) -> tuple[list[int], bool]:
    """(token ids, opens_think) of the prompt under a template: the one encoding of the trainer, SFT, evaluation
    and sampling. A chat template writes its special tokens itself (Llama 3's and R1-Distill's begin with BOS), so
    its text is encoded without the tokenizer's own, as apply_chat_template(tokenize=True) does; a text
    template's gets them."""
    text = render(template, prompt, tokenizer)
    return tokenizer(text, add_special_tokens=template != "chat").input_ids, opens_think(text)


def prompt_ids(template: str, prompt, tokenizer) -> list[int]:
    return encoded_prompt(template, prompt, tokenizer)[0]
