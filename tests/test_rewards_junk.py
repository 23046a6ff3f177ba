"""Answers math-verify finds no expression in (random text, stray tags) are scored in process, with the score a
worker would give, and never sent to the verification workers (ponder.rewards.math.unparseable)."""

import random

import pytest

from ponder.rewards import match, verify_pool
from ponder.rewards import math as pmath
from ponder.rewards.basic import accuracy

pytestmark = pytest.mark.usefixtures("stop_verify_workers")

# (answer, plain-number gold, math-verify's score, decided in process)
CASES = [
    ("k(n.d/226<answer>r", "226", 0.0, True),  # parentheses never closed
    ("a<think>c9cth /k(n.d/226", "226", 0.0, True),
    ("5</answer>", "5", 0.0, True),  # `</`: no expression has it
    ("<answer>7", "7", 0.0, True),  # an operator at the start
    ("5)", "5", 0.0, True),
    ("(5", "5", 0.0, True),
    ("17 )(", "17", 0.0, True),  # closed before opened
    ("5 +", "5", 0.0, True),  # an operator at the end
    ("+ 7 ,", "7", 0.0, True),
    ("a..5", "5", 0.0, True),
    ("7 <= 8 </", "7", 0.0, True),
    ("3 ft)", "3", 0.0, True),
    ("-.5)", "-0.5", 0.0, True),
    ("17)", "17.0", 0.0, True),
    ("x = 3 = (", "3", 0.0, True),  # the last equation, tried next, fails too
    ("12 + 5 = 17 = (", "17", 0.0, True),
    # math-verify finds a value in these: they must still go to a worker
    ("5 a )", "5", 1.0, False),  # its normaliser drops `a )` as a unit ("a ." with a regex dot): 5
    ("5 q +", "5", 1.0, False),
    ("x=(=5", "5", 1.0, False),  # the whole fails, the last equation is 5
    ("(x = 3) = 3", "3", 1.0, False),
    ("2 = 465", "465", 1.0, False),
    ("a-a", "0", 1.0, False),
    ("a/a", "1", 1.0, False),
    ("465 m", "465", 1.0, False),
    ("4 6 5", "465", 0.0, False),
    ("gv==6.ph", "6", 0.0, False),  # fails to parse, but `==` is not on the list: a worker decides
    (r"\frac{1}{2} (", "0.5", 1.0, False),  # LaTeX markup (here a fraction math-verify finds): never decided here
]


@pytest.fixture
def recorded_pool(monkeypatch):
    """The real pool, with every item it is sent recorded; an empty answer cache."""
    sent = []
    real = verify_pool.pool()

    class Recorder:
        def map(self, func, arglist):
            sent.extend(arglist)
            return real.map(func, arglist)

    monkeypatch.setattr(verify_pool, "pool", lambda: Recorder())
    monkeypatch.setattr(match, "_CACHE", {})
    return sent


@pytest.mark.parametrize("answer,gold,score,in_process", CASES)
def test_scores_are_math_verifys_and_junk_skips_the_workers(recorded_pool, answer, gold, score, in_process):
    assert pmath.compare(answer, gold) == score  # the hand label is math-verify's own verdict
    assert pmath.unparseable(answer) is in_process
    assert match.answers_match(answer, gold) == score
    assert ((answer, gold) in recorded_pool) is not in_process


def test_batched_accuracy_sends_no_junk_to_a_worker(monkeypatch):
    def no_pool():
        raise AssertionError("junk must be scored in process")

    monkeypatch.setattr(verify_pool, "pool", no_pool)
    monkeypatch.setattr(match, "_CACHE", {})
    junk = [case[0] for case in CASES if case[3]]
    golds = [case[1] for case in CASES if case[3]]
    assert accuracy(junk, prompts=["q"] * len(junk), answer=golds, task=["jsonl"] * len(junk), extract="none") == [0.0] * len(junk)


def _random_text(rng: random.Random) -> str:
    """Text like a random policy's: characters, digits, operators, tags; or an expression with a few edits."""
    if rng.random() < 0.5:
        pieces = list("abcdegikmnopqrstuvwxy0123456789 \n+-*/=()..") + ["<answer>", "</answer>", "<think>", "</think>"]
        return "".join(rng.choice(pieces) for _ in range(rng.randint(1, 30)))
    atoms = ["x", "e", "pi", "sin", "ln", "a", "m", "s", "q", "and", "5", "12", "0", ".5", "465", "3.5"]
    ops = list("+-*/=<>,;!%|_:.") + ["<=", "**", "//", "</", " a ", " s .", " q "]
    text = rng.choice(atoms)
    for _ in range(rng.randint(0, 4)):
        text = rng.choice(["({})", "{}", "{})", "({}"]).format(text) + rng.choice(ops) + rng.choice(atoms)
    return rng.choice(["", "(", ")", "*", "<answer>"]) + text + rng.choice(["", ")", "(", " +", " m", " a )", "=", ","])


def test_unparseable_agrees_with_math_verify_on_random_text():
    """Whatever `unparseable` decides, math-verify (in this process) finds no expression in it either."""
    rng = random.Random(0)
    decided = 0
    for _ in range(600):
        text = _random_text(rng)
        if not pmath.unparseable(text):
            continue
        decided += 1
        assert not [p for p in pmath._parse(text) if not isinstance(p, str)], text
        for gold in ("0", "5", "465"):
            assert pmath.compare(text, gold) == 0.0, (text, gold)
    assert decided > 200  # most random text is decided here


SYMBOL_WORDS = ["kbr", "kx", "r", "k br", "no", "half", "nan", "oo", "m", "pm", "zz\nq"]  # b*k*r, k*x, ... or units


def test_words_of_symbols_never_answer_a_number_and_skip_the_workers(recorded_pool):
    """Lower-case words without e or i parse to symbols (or units dropped), never to a number: scored 0 in process
    against a numeric gold, as math-verify scores them. `e`, `i` and words holding them (Euler's number, the
    imaginary unit, pi) still go to a worker; number words are read as their numbers before."""
    for answer in SYMBOL_WORDS:
        for gold in ("3", "0", "0.5", "-7"):
            assert pmath.compare(answer, gold) == 0.0, (answer, gold)
            assert match.answers_match(answer, gold) == 0.0
    assert recorded_pool == []
    for answer in ("e", "i", "pi", "x e"):
        assert match.answers_match(answer, "3") == 0.0
    assert sorted(a for a, _ in recorded_pool) == ["e", "i", "pi", "x e"]
    assert match.answers_match("two", "2") == 1.0


def test_the_words_rule_agrees_with_math_verify_on_random_words():
    rng = random.Random(1)
    decided = 0
    for _ in range(150):
        text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz  ") for _ in range(rng.randint(1, 10))).strip() or "q"
        for gold in ("0", "5", "0.25"):
            verdict = match._fast(text, gold)
            if verdict is not None:
                decided += 1
                assert verdict == pmath.compare(text, gold) == 0.0, (text, gold)
    assert decided > 100
