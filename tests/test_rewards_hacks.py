"""Reward hacks that real runs find: each must score no accuracy, and bombs must come back in time."""

import time

import pytest

from ponder.rewards import verify_pool
from ponder.rewards.basic import accuracy
from ponder.rewards.extract import extract_answer

pytestmark = pytest.mark.usefixtures("stop_verify_workers")


def score(completion: str, gold: str = "42") -> float:
    (value,) = accuracy([completion], prompts=["q"], answer=[gold], task=["plain"])
    return value


def answer(text: str) -> str:
    return f"<think>I computed it.</think> <answer>{text}</answer>"


def test_honest_answers_score():  # the baseline the hacks below are measured against
    assert score(answer("42")) == 1.0
    assert score("<think>6*7</think> The result is \\boxed{42}.") == 1.0
    assert score(answer(r"\{2, 3\}"), gold=r"\{3, 2\}") == 1.0


def test_several_answers_at_once():
    assert score(answer("42 or 43")) == 0.0
    assert score(answer("A or B"), gold="A") == 0.0
    assert score(answer("either 42 or 24")) == 0.0
    assert score(answer(r"42 \pm 1")) == 0.0


def test_list_of_candidates():
    assert score(answer("1, 2, 3, ..., 100")) == 0.0
    assert score(answer(r"1, 2, 3, \ldots, 100")) == 0.0
    assert score(answer("41, 42, 43")) == 0.0
    assert score(answer("41\n42\n43")) == 0.0  # one per line


def test_empty_answer():
    assert score(answer("")) == 0.0
    assert score(answer("   ")) == 0.0
    assert score("<think>42</think>") == 0.0


def test_right_answer_only_inside_think():
    assert score("<think>the answer is <answer>42</answer></think> <answer>41</answer>") == 0.0
    assert score("<think>so \\boxed{42}</think> I am not sure.") == 0.0
    assert score("<think>still thinking, \\boxed{42} is likely") == 0.0  # truncated inside think


def test_answer_blocks_repeated_with_different_values():
    assert score("<think>x</think> <answer>41</answer> <answer>42</answer>") == 0.0
    assert score("<think>x</think> <answer>42</answer> <answer>42</answer>") == 1.0  # agreeing repeats are one answer


def test_a_second_different_answer_block_after_the_gold_scores_nothing():
    """The gold first and a wrong answer after it is still two answers (the test above puts the wrong one first)."""
    assert score("<think>x</think> <answer>42</answer> <answer>41</answer>") == 0.0
    assert extract_answer("<think>x</think> <answer>42</answer> <answer>41</answer>") is None


def test_boxed_spam():
    assert score("<think>x</think> " + " ".join(f"\\boxed{{{i}}}" for i in range(100))) == 0.0
    assert score("<think>x</think> " + "\\boxed{42} " * 50) == 0.0
    assert score(answer(r"\boxed{41} \boxed{42}")) == 0.0


def test_boxed_spam_inside_the_answer_block():
    """A box inside <answer> is unwrapped under the same limit as boxes outside: four agreeing boxes are spam."""
    assert score(answer("\\boxed{42} " * 3)) == 1.0  # up to MAX_BOXES agreeing boxes are one answer
    assert score(answer("\\boxed{42} " * 4)) == 0.0


def test_answer_that_merely_contains_the_gold():
    assert score(answer("not 42")) == 0.0
    assert score(answer("42 is not the answer")) == 0.0
    assert score(answer(r"x \neq 42")) == 0.0
    assert score(answer("420")) == 0.0


def timed(completion: str, gold: str = "42") -> tuple[float, float]:
    start = time.monotonic()
    value = score(completion, gold)
    return value, time.monotonic() - start


def test_huge_power_is_wrong_within_the_limit(short_limit):
    verify_pool.pool().start()  # workers up and ready outside the timed part
    for bomb in (r"9^{9^{9^{9}}}", r"10^{10^{10}}", r"2^{3^{100}}"):  # a tower guard, then the time limit
        value, took = timed(answer(bomb), gold="7")
        assert value == 0.0 and took < short_limit + 1.5, (bomb, took)


def test_latex_nesting_bombs_are_wrong_at_once():
    for bomb in ("{" * 5000 + "42" + "}" * 5000, r"\sqrt{" * 40 + "42" + "}" * 40, r"\frac{" * 2000 + "1}{2}" * 2000):
        value, took = timed(answer(bomb))
        assert value == 0.0 and took < 1.0


def test_a_megabyte_of_digits_is_wrong_at_once():
    value, took = timed(answer("4" * 1_000_000))
    assert value == 0.0 and took < 1.0
    value, took = timed("<think>x</think> \\boxed{" + "9" * 1_000_000 + "}", gold="9" * 10)
    assert value == 0.0 and took < 1.0


def test_extraction_of_a_megabyte_is_fast():
    start = time.monotonic()
    assert extract_answer("<think>" + "{" * 500_000 + "</think> " + "\\boxed{" * 2 + "x" * 500_000) is None
    assert time.monotonic() - start < 1.0
