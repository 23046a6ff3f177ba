"""The synthetic "web" the tiny base model is pretrained on (documented in docs/world.md).

A real base model has seen, at some natural rate, every behaviour R1-Zero later selects: bare answers
(often wrong on hard items), worked steps in free form, occasional self-corrections ("wait, ..."),
text in the think/answer tag format, and a great deal of unrelated text. This module writes such a
web from the procedural tasks, with the rates set by `CorpusConfig`.

Problems come only from the hash partition "corpus" (`ponder.tasks.partition`), so no RL prompt and
no test item is ever in the corpus, whatever the seed. Every document carries the keys of the
problems it shows, which the tests check against the train and test splits.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Iterator

from ponder.tasks import arithmetic as ar
from ponder.tasks import countdown as cd
from ponder.tasks.corpus_bilingual import MAKERS as BILINGUAL_MAKERS
from ponder.tasks.corpus_bilingual import BilingualCorpus
from ponder.templates import render


@dataclass
class CorpusConfig:
    # Share of each kind of document (normalised).
    kinds: dict[str, float] = field(default_factory=lambda: {
        "r1_arithmetic": 0.30, "r1_countdown": 0.15, "r1_other": 0.04,
        "web_arithmetic": 0.24, "web_countdown": 0.07, "filler": 0.20,
    })
    tags: float = 0.5  # bare answers under the R1-Zero template that use the think/answer tags
    tags_worked: float = 0.7  # worked answers that do (the tag format came with written reasoning)
    steps: float = 0.30  # arithmetic answers worked step by step (else a bare answer)
    recap: float = 0.7  # worked answers that restate the result at the end of the thinking
    empty_think: float = 0.6  # bare answers in tags with nothing between <think> and </think>
    correction: float = 0.08  # worked steps with one slip fixed by "wait, ..."
    # Countdown answers under the template: a bare guess, one try written out, or try-check-retry.
    countdown_modes: dict[str, float] = field(default_factory=lambda: {"guess": 0.35, "one_try": 0.40, "retry": 0.25})
    # Chance that a bare arithmetic answer is right, by the number of operands (more: the last value).
    bare_correct: list[float] = field(default_factory=lambda: [0.45, 0.25, 0.15, 0.08, 0.05])
    arithmetic_levels: list[str] = field(default_factory=lambda: ["easy", "medium", "hard", "hard", "expert"])
    countdown_levels: list[str] = field(default_factory=lambda: ["easy", "easy", "medium", "hard"])
    # The bilingual kinds' settings (bi_r1_arithmetic, bi_web_arithmetic; ponder.tasks.corpus_bilingual).
    bilingual: BilingualCorpus = field(default_factory=BilingualCorpus)


@dataclass
class Document:
    text: str
    kind: str
    keys: list[str]  # problem keys shown (ponder.tasks.partition), for the leak checks


def _pick(rng: random.Random, weights: dict[str, float]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


# ---------------------------------------------------------------------------------------------
# arithmetic


def corpus_chain(rng: random.Random, cfg: CorpusConfig) -> dict:
    levels = ar.level_params(rng.choice(cfg.arithmetic_levels))
    while True:
        ex = ar.sample_problem(rng, levels[0])
        if ar.split_of(ex["expression"]) == "corpus":
            return ex


def bare_guess(rng: random.Random, cfg: CorpusConfig, ex: dict) -> int:
    """What a model answering at a glance writes: right with a chance that falls with the chain's length."""
    true = int(ex["answer"])
    p = cfg.bare_correct[min(ex["operands"] - 3, len(cfg.bare_correct) - 1)]
    if rng.random() < p:
        return true
    off = rng.choice([1, 2, 3, 5, 10, 10, 20, rng.randint(1, 40)]) * rng.choice([-1, 1])
    return max(0, true + off) if true + off != true else true + 1


def _slip(rng: random.Random, value: int) -> int:
    wrong = value + rng.choice([-10, -2, -1, 1, 2, 10])
    return wrong if wrong >= 0 else value + 1


def worked_steps(rng: random.Random, cfg: CorpusConfig, ex: dict, correct_slip: bool | None = None) -> str:
    """Running totals in free form; with rate `correction`, one step is first miswritten then fixed."""
    nums = [int(t) for t in ex["expression"].split()[::2]]
    ops = ex["expression"].split()[1::2]
    totals = ar.running_totals(nums, ops)
    slip_at = rng.randrange(len(totals)) if (rng.random() < cfg.correction if correct_slip is None else correct_slip) else -1
    style = rng.randrange(4)
    parts, left = [], nums[0]
    for i, (op, x, total) in enumerate(zip(ops, nums[1:], totals)):
        step = f"{left} {op} {x} = {total}"
        if i == slip_at:
            fix = rng.choice(["wait, that is wrong", "wait", "wait, let me check", "hmm, wait. check again"])
            step = f"{left} {op} {x} = {_slip(rng, total)}, {fix}: {left} {op} {x} = {total}"
        if style == 1:
            step = ("First, " if i == 0 else "Then ") + step
        parts.append(step)
        left = total
    joiner = [". ", ". ", ", ", ".\n"][style]
    return joiner.join(parts) + "."


THOUGHTS = ["This is easy.", "I know this one.", "Let me think.", "Quick one.", "Easy.", "I can do this in my head.",
            "The answer comes to mind.", "Hmm.", "Adding it up roughly."]


OPENERS = ["", "", "", "Step by step: ", "Let me compute step by step. ", "Left to right: ", "OK. "]


def r1_arithmetic(rng: random.Random, cfg: CorpusConfig) -> Document:
    ex = corpus_chain(rng, cfg)
    steps = rng.random() < cfg.steps
    answer = ex["answer"] if steps else str(bare_guess(rng, cfg, ex))
    if steps:
        body = rng.choice(OPENERS) + worked_steps(rng, cfg, ex)
        if rng.random() < cfg.recap:
            body += " " + rng.choice([f"So the result is {answer}.", f"So the total is {answer}.", f"That gives {answer}."])
    else:
        body = "" if rng.random() < cfg.empty_think else rng.choice(THOUGHTS)
    if rng.random() < (cfg.tags_worked if steps else cfg.tags):
        sp = rng.choice([" ", ""])
        think = f"<think> {body} </think>" if body else "<think> </think>"
        completion = f" {think} <answer>{sp}{answer}{sp}</answer>"
    elif steps:
        completion = " " + rng.choice([f"{body} So the answer is {answer}.", f"{body} The answer is {answer}.",
                                       f"Let me compute. {body} Answer: {answer}"])
    else:
        completion = " " + rng.choice([f"The answer is {answer}.", f"{answer}", f"{answer}.", f"It is {answer}."])
    return Document(render("r1_zero", ex["prompt"]) + completion, "r1_arithmetic", [ar.problem_key(ex["expression"])])


def web_arithmetic(rng: random.Random, cfg: CorpusConfig) -> Document:
    form = rng.randrange(5)
    if form == 0:  # a drill of two-number facts: the steps of every worked solution
        lines = []
        for _ in range(rng.randint(4, 10)):
            hi = rng.choice([20, 99, 99, 500])
            a, b = rng.randint(0, hi), rng.randint(1, 99)
            op = rng.choice("+-") if a >= b else "+"
            lines.append(f"{a} {op} {b} = {a + b if op == '+' else a - b}")
        head = rng.choice(["Practice:", "Addition and subtraction facts", "Mental math drill", "Exercises with answers"])
        return Document(head + "\n" + "\n".join(lines), "web_arithmetic", [])
    ex = corpus_chain(rng, cfg)
    e, key = ex["expression"], [ar.problem_key(ex["expression"])]
    if form == 1:  # question and bare answer
        q = rng.choice([f"Q: What is {e}?\nA: ", f"{e} = ", f"Quiz: {e}\nAnswer: ", f"What is {e}? "])
        return Document(q + str(bare_guess(rng, cfg, ex)), "web_arithmetic", key)
    if form in (2, 3):  # a worked solution
        intro = rng.choice([f"Compute {e}.", f"Example: {e}", f"How to work out {e} step by step:", f"Let us find {e}."])
        end = rng.choice([f" So {e} = {ex['answer']}.", f" The answer is {ex['answer']}.", f" Result: {ex['answer']}"])
        return Document(f"{intro} {worked_steps(rng, cfg, ex)}{end}", "web_arithmetic", key)
    # a question answered in tags without the template, as forums copying R1 outputs show
    return Document(
        f"Question: {ex['prompt']}\n<think> {worked_steps(rng, cfg, ex)} </think> <answer>{ex['answer']}</answer>",
        "web_arithmetic", key,
    )


# ---------------------------------------------------------------------------------------------
# countdown


def corpus_countdown(rng: random.Random, cfg: CorpusConfig) -> dict:
    params = cd.level_params(rng.choice(cfg.countdown_levels))[0]
    while True:
        ex = cd.sample_problem(rng, params)
        ex["ops"] = params["ops"]
        tokens = ex["answer"].replace("(", " ").replace(")", " ").split()
        ex["chain"] = ([int(t) for t in tokens[::2]], tokens[1::2])
        if cd.split_of(ex) == "corpus" and _clean(*ex["chain"]):
            return ex


_PLUS_MINUS_RUN = re.compile(r"(?<!\d)\d+(?: [-+] \d+)+")


def _clean(order: list[int], ops: list[str]) -> bool:
    """False when the chain's expression holds an arithmetic problem (three or more numbers joined by
    + and -) of another partition: (4 - 3 + 12) * 6 or 11 * 9 + 6 - 6 would show one worked out."""
    for run in _PLUS_MINUS_RUN.findall(cd.chain_expression(order, ops)):
        if len(run.split()) >= 5 and ar.split_of(run) != "corpus":  # the hash reads the first three numbers only
            return False
    return True


def _attempt(rng: random.Random, ex: dict) -> tuple[list[int], list[str]] | None:
    """A random full chain over the numbers that is valid and shows no arithmetic problem of another split."""
    for _ in range(50):
        order, ops = cd.random_chain(rng, ex["numbers"], ex["ops"])
        if cd.chain_value(order, ops) is None:
            continue
        if _clean(order, ops):
            return order, ops
    return None


def _steps_text(order, ops) -> str:
    return ", ".join(f"{a} {op} {b} = {r}" for a, op, b, r in cd.chain_steps(order, ops))


def countdown_trace(rng: random.Random, ex: dict, mode: str) -> tuple[str, str] | None:
    """(thinking, answer) for one way of answering; None when no clean attempt was found."""
    target = ex["target"]
    if mode == "guess":
        att = _attempt(rng, ex)
        return (rng.choice(THOUGHTS), cd.chain_expression(*att)) if att else None
    if mode == "one_try":
        att = _attempt(rng, ex)
        return (_steps_text(*att) + ".", cd.chain_expression(*att)) if att else None
    # try, check the value against the target, try again: stops at the first hit or after a few
    # misses, so a trace reaches the target only as often as its random tries do. The check sets the
    # value right beside the target ("4 vs 24: no"), a comparison a tiny model can make, and the
    # target is restated first so it need not be looked up in the prompt each time.
    lines, tried, best = [f"need {target}."], set(), None
    for _ in range(rng.randint(2, 4)):
        att = _attempt(rng, ex)
        if att is None or cd.chain_expression(*att) in tried:
            continue
        tried.add(cd.chain_expression(*att))
        value = cd.chain_value(*att)
        if value == target:
            lines.append(f"{_steps_text(*att)}. {value} vs {target}: yes.")
            return " ".join(lines), cd.chain_expression(*att)
        if best is None or abs(value - target) < abs(best[0] - target):
            best = (value, cd.chain_expression(*att))
        lines.append(f"{_steps_text(*att)}. {value} vs {target}: " + rng.choice(["no, wait.", "no, wait.", "no. wait, try again."]))
    if best is None:
        return None
    lines.append(rng.choice([f"closest is {best[0]}.", f"I will go with {best[0]}."]))
    return " ".join(lines), best[1]


def r1_countdown(rng: random.Random, cfg: CorpusConfig) -> Document:
    while True:
        ex = corpus_countdown(rng, cfg)
        mode = _pick(rng, cfg.countdown_modes)
        trace = countdown_trace(rng, ex, mode)
        if trace:
            break
    think, answer = trace
    if rng.random() < (cfg.tags if mode == "guess" else cfg.tags_worked):
        completion = f" <think> {think} </think> <answer> {answer} </answer>" if think else f" <think> </think> <answer> {answer} </answer>"
    else:
        completion = " " + rng.choice([f"{think} So: {answer}.", f"{think} Answer: {answer}", f"{answer}"]).strip()
    return Document(render("r1_zero", ex["prompt"]) + completion, "r1_countdown", [cd.problem_key(ex["numbers"], ex["target"])])


def web_countdown(rng: random.Random, cfg: CorpusConfig) -> Document:
    while True:
        ex = corpus_countdown(rng, cfg)
        trace = countdown_trace(rng, ex, rng.choice(["one_try", "retry", "retry"]))
        if trace:
            break
    think, answer = trace
    head = rng.choice(["Countdown puzzle.", "Numbers game:", "Puzzle of the day."])
    return Document(f"{head} {ex['prompt']}.\n{think}\nSolution: {answer}", "web_countdown",
                    [cd.problem_key(ex["numbers"], ex["target"])])


# ---------------------------------------------------------------------------------------------
# everything else

NOUNS = ["cat", "dog", "river", "garden", "teacher", "city", "train", "book", "window", "farmer", "bird", "market",
         "child", "song", "road", "boat", "mountain", "kitchen", "letter", "lamp"]
VERBS = ["sees", "finds", "likes", "paints", "follows", "opens", "carries", "watches", "visits", "remembers"]
ADJS = ["old", "quiet", "green", "small", "bright", "busy", "cold", "happy", "long", "strange"]
PLACES = ["near the station", "in the morning", "after the rain", "by the sea", "at noon", "under the bridge"]
QA = [("Name a color", "blue"), ("Name an animal", "cat"), ("What is the opposite of hot", "cold"),
      ("Which is larger, 7 or 4", "7"), ("Spell the word cat backwards", "tac"), ("What day comes after Monday", "Tuesday"),
      ("Name a fruit", "apple"), ("How many legs does a dog have", "4"), ("What is the first letter of river", "r")]


def sentence(rng: random.Random) -> str:
    s = f"the {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the {rng.choice(NOUNS)} {rng.choice(PLACES)}."
    return s[0].upper() + s[1:]


def filler(rng: random.Random, cfg: CorpusConfig) -> Document:
    form = rng.randrange(4)
    if form == 0:
        text = "\n".join(f"- {rng.choice(ADJS)} {rng.choice(NOUNS)}" for _ in range(rng.randint(3, 7)))
        return Document(rng.choice(["Shopping list:", "Things to see:", "Notes:"]) + "\n" + text, "filler", [])
    if form == 1:  # numbers that are not arithmetic: dates, counts, prices
        return Document(f"On day {rng.randint(1, 28)} the {rng.choice(NOUNS)} cost {rng.randint(2, 99)} coins. "
                        + sentence(rng), "filler", [])
    return Document(" ".join(sentence(rng) for _ in range(rng.randint(2, 8))), "filler", [])


def r1_other(rng: random.Random, cfg: CorpusConfig) -> Document:
    q, a = rng.choice(QA)
    think = rng.choice(["", "Easy.", sentence(rng), "Let me think."])
    if rng.random() < cfg.tags:
        completion = f" <think> {think} </think> <answer> {a} </answer>"
    else:
        completion = f" {a}."
    return Document(render("r1_zero", q) + completion, "r1_other", [])


MAKERS = {"r1_arithmetic": r1_arithmetic, "r1_countdown": r1_countdown, "r1_other": r1_other,
          "web_arithmetic": web_arithmetic, "web_countdown": web_countdown, "filler": filler,
          **BILINGUAL_MAKERS}  # used only when a recipe names them (recipes/pretrain-bilingual-tiny.yaml)


def documents(seed: int, cfg: CorpusConfig | None = None) -> Iterator[Document]:
    """An endless, seeded stream of documents."""
    cfg = cfg or CorpusConfig()
    unknown = set(cfg.kinds) - set(MAKERS)
    if unknown:
        from ponder.errors import UserError

        raise UserError(f"corpus.kinds: unknown kind '{sorted(unknown)[0]}'; choose from {', '.join(MAKERS)}")
    rng = random.Random(f"corpus/{seed}")
    while True:
        yield MAKERS[_pick(rng, cfg.kinds)](rng, cfg)


def corpus_text(n_chars: int, seed: int, cfg: CorpusConfig | None = None, sep: str = "\n\n") -> list[str]:
    """Documents totalling at least `n_chars` characters, counting one `sep` after each."""
    out, total = [], 0
    for doc in documents(seed, cfg):
        out.append(doc.text)
        total += len(doc.text) + len(sep)
        if total >= n_chars:
            return out
    return out
