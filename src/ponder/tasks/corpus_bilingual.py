"""Documents of the bilingual corpus: the arithmetic of ponder.tasks.corpus in English and Chinese (docs/bilingual.md).

A real web has worked solutions in several languages, and some that switch language half-way, as text
copied between forums does. These kinds write them, with the rates of `CorpusConfig` (worked share,
tags, corrections, ...) and of its `bilingual` section (how much is Chinese, how often a solution
switches). They are used only when a recipe names them in `corpus.kinds` (recipes/pretrain-bilingual-tiny.yaml);
the default corpus, and so tiny-base, does not contain them.

Problems come from the `corpus` partition, as in the English corpus. English steps are written with
words (`42 plus 73 is 115`) so that a switch to or from Chinese shows in a chain's words.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ponder.tasks import arithmetic as ar
from ponder.tasks import bilingual as bl
from ponder.templates import render

if TYPE_CHECKING:  # ponder.tasks.corpus imports this module; its names are imported where they are used
    from ponder.tasks.corpus import Document


@dataclass
class BilingualCorpus:
    zh_share: float = 0.4  # arithmetic documents asked (and begun) in Chinese; the rest in English
    # Worked solutions that switch to the other language after a step, by the language they begin in:
    # the minority language switches to English more often, as mixed web text does.
    switch: dict[str, float] = field(default_factory=lambda: {"zh": 0.2, "en": 0.05})


def _other(lang: str) -> str:
    return "en" if lang == "zh" else "zh"


def worked(rng: random.Random, cfg, ex: dict, lang: str, switch: bool) -> tuple[str, str]:
    """(running totals written out, the language they end in). With `switch`, the steps after a random
    one are in the other language; with rate `cfg.correction`, one step is miswritten, then fixed."""
    nums, ops = bl.chain_of(ex)
    totals = ar.running_totals(nums, ops)
    switch_at = rng.randrange(1, len(totals)) if switch else len(totals)
    slip_at = rng.randrange(len(totals)) if rng.random() < cfg.correction else -1
    numbered = rng.random() < 0.25  # "First, ... Then ..."
    parts, left = [], nums[0]
    for i, (op, x, total) in enumerate(zip(ops, nums[1:], totals)):
        lang_i = lang if i < switch_at else _other(lang)
        w = bl.WORDS[lang_i]
        text = bl.step(left, op, x, total, lang_i)
        if i == slip_at:
            wrong = total + rng.choice([-10, -2, -1, 1, 2, 10])
            wrong = wrong if wrong >= 0 else total + 1
            sep = "，" if lang_i == "zh" else ", "
            text = f"{bl.step(left, op, x, wrong, lang_i)}{sep}{rng.choice(w['fixes'])}{'：' if lang_i == 'zh' else ': '}{text}"
        if numbered:
            text = (w["first"] if i == 0 else w["then"]) + text
        parts.append((lang_i, text))
        left = total
    out = []
    for j, (lang_j, text) in enumerate(parts):
        last = j == len(parts) - 1
        same_next = not last and parts[j + 1][0] == lang_j
        if lang_j == "zh":
            out.append(text + (rng.choice(["。", "，"]) if same_next else "。"))
        else:
            out.append(text + (rng.choice([".", ","]) if same_next else ".") + ("" if last else " "))
    return "".join(out), parts[-1][0]


def _answer(ex: dict, lang: str) -> str:
    return bl.number(int(ex["answer"]), lang)


def bi_r1_arithmetic(rng: random.Random, cfg) -> Document:
    """The R1-Zero template around a problem asked in English or Chinese, answered the way a base model
    would (bare or worked, in tags or not), in the prompt's language or switching half-way."""
    from ponder.tasks.corpus import Document, bare_guess, corpus_chain

    b = cfg.bilingual
    lang = bl.sample_language(rng, b.zh_share)
    ex = corpus_chain(rng, cfg)
    steps = rng.random() < cfg.steps
    if steps:
        body, end = worked(rng, cfg, ex, lang, rng.random() < b.switch.get(lang, 0.0))
        answer, w = _answer(ex, end), bl.WORDS[end]
        body = rng.choice(bl.WORDS[lang]["openers"]) + body
        if rng.random() < cfg.recap:
            body += ("" if end == "zh" else " ") + rng.choice(w["recaps"]).format(a=answer)
    else:
        end, w = lang, bl.WORDS[lang]
        answer = bl.number(bare_guess(rng, cfg, ex), lang)
        body = "" if rng.random() < cfg.empty_think else rng.choice(w["thoughts"])
    if rng.random() < (cfg.tags_worked if steps else cfg.tags):
        sp = rng.choice([" ", ""])
        think = f"<think> {body} </think>" if body else "<think> </think>"
        completion = f" {think} <answer>{sp}{answer}{sp}</answer>"
    elif steps:
        completion = " " + rng.choice(w["worked_end"]).format(body=body, a=answer)
    else:
        completion = " " + rng.choice(w["bare"]).format(a=answer)
    return Document(render("r1_zero", bl.prompt_of(ex, lang)) + completion, "bi_r1_arithmetic", [ar.problem_key(ex["expression"])])


def bi_web_arithmetic(rng: random.Random, cfg) -> Document:
    """Web pages in either language: drills of two-number facts, quizzes with bare answers, worked
    solutions (switching language at the `bilingual.switch` rates), questions answered in tags."""
    from ponder.tasks.corpus import Document, bare_guess, corpus_chain

    b = cfg.bilingual
    lang = bl.sample_language(rng, b.zh_share)
    w = bl.WORDS[lang]
    form = rng.randrange(4)
    if form == 0:
        lines = []
        for _ in range(rng.randint(4, 10)):
            a, x = rng.randint(0, rng.choice([20, 99, 99, 500])), rng.randint(1, 99)
            op = rng.choice("+-") if a >= x else "+"
            lines.append(bl.step(a, op, x, a + x if op == "+" else a - x, lang))
        return Document(rng.choice(w["drill_heads"]) + "\n" + "\n".join(lines), "bi_web_arithmetic", [])
    ex = corpus_chain(rng, cfg)
    e, key = bl.expression(*bl.chain_of(ex), lang), [ar.problem_key(ex["expression"])]
    if form == 1:
        guess = bl.number(bare_guess(rng, cfg, ex), lang)
        return Document(rng.choice(w["quiz"]).format(e=e, a=guess), "bi_web_arithmetic", key)
    body, end = worked(rng, cfg, ex, lang, rng.random() < b.switch.get(lang, 0.0))
    answer = _answer(ex, end)
    if form == 2:
        intro = rng.choice(w["intros"]).format(e=e)
        ending = rng.choice(bl.WORDS[end]["web_ends"]).format(e=bl.expression(*bl.chain_of(ex), end), a=answer)
        return Document(f"{intro} {body} {ending}", "bi_web_arithmetic", key)
    question = w["question"].format(p=bl.prompt_of(ex, lang))
    return Document(f"{question}\n<think> {body} </think> <answer>{answer}</answer>", "bi_web_arithmetic", key)


def zh_numbers(rng: random.Random, cfg) -> Document:
    """A table of numbers in both writings (四十二 = 42): how the two languages' numbers correspond."""
    from ponder.tasks.corpus import Document

    head = rng.choice(bl.ZH["number_heads"] + bl.EN["number_heads"])
    lines = []
    for _ in range(rng.randint(4, 12)):
        n = rng.randint(0, rng.choice([20, 100, 1000, 1000]))
        lines.append(f"{bl.to_zh(n)} = {n}" if rng.random() < 0.5 else f"{n} = {bl.to_zh(n)}")
    return Document(head + "\n" + "\n".join(lines), "zh_numbers", [])


def zh_filler(rng: random.Random, cfg) -> Document:
    """Chinese text that is not arithmetic: short sentences of everyday words."""
    from ponder.tasks.corpus import Document

    z = bl.ZH

    def sentence() -> str:
        return (f"{rng.choice(z['places'])}，{rng.choice(z['adjs'])}的{rng.choice(z['nouns'])}"
                f"{rng.choice(z['verbs'])}{rng.choice(z['nouns'])}。")

    return Document("".join(sentence() for _ in range(rng.randint(2, 8))), "zh_filler", [])


MAKERS = {"bi_r1_arithmetic": bi_r1_arithmetic, "bi_web_arithmetic": bi_web_arithmetic,
          "zh_numbers": zh_numbers, "zh_filler": zh_filler}
