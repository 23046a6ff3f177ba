"""The bilingual miniature world: arithmetic chains asked and worked in English or Chinese (docs/bilingual.md).

Each language has its own words for numbers, operations and checks, so the `language` reward (Latin
words against Han characters) and the mixing-rate metric can tell them apart in a chain of thought:

    en   Compute 42 + 73 - 27        42 plus 73 is 115. 115 minus 27 is 88. So the total is 88.
    zh   计算四十二加七十三减二十七    四十二加七十三得一百一十五。一百一十五减二十七得八十八。所以结果是八十八。

English numbers are digits and its operations words ("plus", "minus"), so a worked English chain
always has Latin words in it; Chinese numbers are Chinese numerals (ponder.tasks.zh_numerals).

The task `bilingual_arithmetic` gives the problems of `arithmetic` (same hash partition, so no test
chain is a corpus or training chain in either language) with the prompt in the `target` language and
a `target` column (en | zh) that the `language` reward and the rejection-sampling filter
(`filters.language: target`) read. Its verifier is exact in both languages: the final number in digits
or as a standard Chinese numeral, nothing else (not the chain itself, not a colloquial numeral).
"""

from __future__ import annotations

import random

from ponder.errors import UserError
from ponder.rewards.match import to_number
from ponder.tasks import Task, register
from ponder.tasks import arithmetic as ar
from ponder.tasks.zh_numerals import from_zh, to_zh

LANGUAGES = ("en", "zh")

# Words of each language, for the task's prompts and the corpus (ponder.tasks.corpus_bilingual). The
# tokenizer's extra characters (ZH_CHARS) are read off these tables: a word added here is covered.
EN = {
    "plus": "plus", "minus": "minus", "is": "is",
    "first": "First, ", "then": "Then ",
    "openers": ["", "", "", "Step by step: ", "Let me compute step by step. ", "Left to right: ", "OK. "],
    "recaps": ["So the result is {a}.", "So the total is {a}.", "That gives {a}."],
    "fixes": ["wait, that is wrong", "wait", "wait, let me check", "hmm, wait. check again"],
    "thoughts": ["This is easy.", "I know this one.", "Let me think.", "Quick one.", "Easy."],
    "bare": ["The answer is {a}.", "{a}", "{a}.", "It is {a}."],
    "worked_end": ["{body} So the answer is {a}.", "{body} The answer is {a}.", "Let me compute. {body} Answer: {a}"],
    "compute": "Compute {e}",
    "drill_heads": ["Practice:", "Addition and subtraction facts", "Mental math drill", "Exercises with answers"],
    "quiz": ["Q: What is {e}?\nA: {a}", "Quiz: {e}\nAnswer: {a}", "What is {e}? {a}"],
    "intros": ["Compute {e}.", "Example: {e}", "How to work out {e} step by step:", "Let us find {e}."],
    "web_ends": ["So {e} is {a}.", "The answer is {a}.", "Result: {a}"],
    "question": "Question: {p}",
    "number_heads": ["Numbers in Chinese:", "How to write numbers:", "Number words"],
}
ZH = {
    "plus": "加", "minus": "减", "is": "得",
    "first": "首先，", "then": "然后",
    "openers": ["", "", "", "一步一步算：", "我们一步一步计算。", "从左到右：", "好。"],
    "recaps": ["所以结果是{a}。", "所以总数是{a}。", "得到{a}。"],
    "fixes": ["等等，不对", "等等", "等等，检查一下", "嗯，等等。再算一遍"],
    "thoughts": ["这很简单。", "我知道这个。", "让我想想。", "心算一下。", "简单。"],
    "bare": ["答案是{a}。", "{a}", "{a}。", "是{a}。"],
    "worked_end": ["{body}所以答案是{a}。", "{body}答案是{a}。", "我来算。{body}答案：{a}"],
    "compute": "计算{e}",
    "drill_heads": ["练习：", "加减法", "口算题", "练习和答案"],
    "quiz": ["问：{e}等于多少？\n答：{a}", "口算：{e}\n答案：{a}", "{e}等于多少？{a}"],
    "intros": ["计算{e}。", "例子：{e}", "怎样一步一步求{e}：", "我们来求{e}。"],
    "web_ends": ["所以{e}等于{a}。", "答案是{a}。", "结果：{a}"],
    "question": "问题：{p}",
    "number_heads": ["数字表：", "数字的写法：", "中文数字"],
    # small talk: {place}，{adj}的{noun}{verb}{noun}。
    "places": ["在早上", "在雨后", "在海边", "在中午", "在桥下"],
    "adjs": ["安静", "绿色", "明亮", "忙碌", "快乐", "奇怪", "小", "旧"],
    "nouns": ["猫", "狗", "老师", "孩子", "农民", "鸟", "河", "花园", "窗户", "船", "山", "书"],
    "verbs": ["看", "找", "喜欢", "画", "打开", "记得"],
}
WORDS = {"en": EN, "zh": ZH}


def _strings(table: dict) -> list[str]:
    out = []
    for v in table.values():
        out += v if isinstance(v, list) else [v]
    return out


ZH_CHARS = "".join(sorted({c for c in "".join(_strings(ZH)) + "零一二三四五六七八九十百千的" if ord(c) > 127}))


def number(n: int, lang: str) -> str:
    return str(n) if lang == "en" else to_zh(n)


def expression(nums: list[int], ops: list[str], lang: str) -> str:
    """The chain in a language: `42 + 73 - 27` (English keeps the symbols) or 四十二加七十三减二十七."""
    if lang == "en":
        return ar.expression(nums, ops)
    op = {"+": ZH["plus"], "-": ZH["minus"]}
    return to_zh(nums[0]) + "".join(op[o] + to_zh(x) for o, x in zip(ops, nums[1:]))


def step(a: int, op: str, b: int, c: int, lang: str) -> str:
    """One running-total step: `42 plus 73 is 115` or 四十二加七十三得一百一十五."""
    w = WORDS[lang]
    verb = w["plus"] if op == "+" else w["minus"]
    if lang == "en":
        return f"{a} {verb} {b} {w['is']} {c}"
    return f"{to_zh(a)}{verb}{to_zh(b)}{w['is']}{to_zh(c)}"


def chain_of(ex: dict) -> tuple[list[int], list[str]]:
    tokens = ex["expression"].split()
    return [int(t) for t in tokens[::2]], tokens[1::2]


def prompt_of(ex: dict, lang: str) -> str:
    return WORDS[lang]["compute"].format(e=expression(*chain_of(ex), lang))


def check_language(lang: str, where: str) -> str:
    if lang not in LANGUAGES:
        raise UserError(f"{where}: language '{lang}' is not supported; choose one of: {', '.join(LANGUAGES)}")
    return lang


@register
class BilingualArithmetic(Task):
    """`arithmetic` chains with the prompt in English or Chinese. Options: language (en | zh | both:
    alternating, so half of each), and those of `arithmetic` (difficulty, operands, low, high).
    Columns: those of `arithmetic` plus `target` (the prompt's language) and `eval_group`
    (bilingual_arithmetic/en or /zh, so evaluation reports each language apart)."""

    name = "bilingual_arithmetic"

    def load(self, split="train", n=None, seed=0, language="both", difficulty="hard", operands=None, low=None, high=None, **_):
        langs = list(LANGUAGES) if language == "both" else [check_language(language, f"task '{self.name}'")]
        rows = ar.Arithmetic().load(split=split, n=n, seed=seed, difficulty=difficulty, operands=operands, low=low, high=high)
        out = []
        for i, ex in enumerate(rows):
            lang = langs[i % len(langs)]
            out.append({**ex, "prompt": prompt_of(ex, lang), "task": self.name, "target": lang,
                        "eval_group": f"{self.name}/{lang}"})
        return out

    def verify(self, answer, example):
        """1 when the answer is the number, in digits ("85", "= 85") or as a standard Chinese numeral
        (八十五, 得八十五); in either language, since the answer carries no chain of thought. An
        expression (42 + 73, 四十二加七十三) or a colloquial numeral (一百五) scores 0."""
        gold = example.get("answer")
        if gold is None:
            return None
        if answer is None:
            return 0.0
        return float(read_number(answer) == int(gold))


def read_number(answer: str) -> int | None:
    """The number an answer commits to: what follows its last `=` (or 得 / 等于 / 是), in digits or Chinese."""
    text = answer
    for sign in ("=", "等于", "得", "是"):
        if sign in text:
            text = text.rsplit(sign, 1)[1]
    text = text.strip().rstrip(".。").strip()
    zh = from_zh(text)
    if zh is not None:
        return zh
    value = to_number(text)
    return int(value) if value is not None and value.denominator == 1 else None


def sample_language(rng: random.Random, zh_share: float) -> str:
    return "zh" if rng.random() < zh_share else "en"
