"""The estimators behind `ponder eval`: pass@k, majority vote, bootstrap interval, reflection words."""

from itertools import combinations
from fractions import Fraction
from math import comb

import numpy as np
import pytest

from ponder.evaluation.stats import MAX_TEXT_HEADS, bootstrap_ci, exact_key, majority, pass_at_k, pass_ks, vote_groups
from ponder.metrics import reflection_pattern
from ponder.tasks import Task


def brute_pass_at_k(n, c, k):
    """Share of all k-subsets of n samples (the first c correct) that hold a correct sample."""
    subsets = list(combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_pass_at_k_matches_enumeration_of_subsets(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_known_values():
    assert pass_at_k(5, 1, 1) == pytest.approx(0.2)
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)  # only the one subset {wrong, wrong} fails
    assert pass_at_k(10, 0, 10) == 0.0
    assert pass_at_k(10, 3, 8) == 1.0  # n - c < k: exactly 1
    # large n, where C(n, k) overflows floats, against exact integer binomials
    assert pass_at_k(200, 20, 100) == pytest.approx(1 - comb(180, 100) / comb(200, 100), rel=1e-12)
    assert pass_at_k(1000, 1, 1) == pytest.approx(0.001)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(4, 5, 1)


def test_pass_ks_are_powers_of_two_and_k():
    assert pass_ks(16) == [1, 2, 4, 8, 16]
    assert pass_ks(12) == [1, 2, 4, 8, 12]
    assert pass_ks(1) == [1]


def test_vote_groups_equivalent_fractions_into_one_vote():
    # needs mathematical equivalence (ponder.rewards.match.equivalent): \frac{1}{2} has no plain numeric form
    groups = vote_groups(["1/2", "3", "0.5", "\\frac{1}{2}", "3"])
    assert groups == [0, 1, 0, 0, 1]
    assert majority(groups) == 0


def test_vote_groups_with_given_equivalence_and_missing_answers():
    same = lambda a, b: a.lower() == b.lower()  # noqa: E731
    assert vote_groups(["A", None, "a", "", "b", " B "], same) == [0, None, 0, None, 1, 1]


def test_numbers_and_arithmetic_group_by_exact_value_without_math_verify():
    calls = []

    def never(a, b):
        calls.append((a, b))
        return False

    # Countdown answers: any expression of the right value is the same vote
    assert vote_groups(["(3+5)*2", "16", "2 * 8", "15", "16.0", "4 \\times 4"], never) == [0, 0, 0, 1, 0, 0]
    assert calls == []  # distinct exact values are never sent to the (slow) equivalence check
    assert exact_key("1/0") == ("text", "1/0") and exact_key("2**10") == ("text", "2**10")
    assert exact_key(" 3 / 4 ") == exact_key("0.75") == ("value", Fraction(3, 4))


def test_many_distinct_text_answers_stay_apart():
    always = lambda a, b: True  # noqa: E731
    few = [f"x_{i}" for i in range(MAX_TEXT_HEADS)]
    assert vote_groups(few, always) == [0] * MAX_TEXT_HEADS
    many = [f"x_{i}" for i in range(MAX_TEXT_HEADS + 1)]
    assert vote_groups(many + ["x_0"], always) == list(range(MAX_TEXT_HEADS + 1)) + [0]
    code = ["def f():\n    return 1", "def f():\n  return 1", "def f():\n    return 2"]
    assert vote_groups(code, always) == [0, 0, 1]  # programs vote by their text (up to spacing), never by math


def test_majority_breaks_ties_by_earliest_first_occurrence():
    assert majority([1, 0, 0, 1]) == 0  # group 0 appeared first, whatever order the votes come in
    assert majority([0, 1, 1, 0, 2]) == 0
    assert majority([0, 1, 1]) == 1  # more votes beat earlier appearance
    assert majority([None, 2, None]) == 2
    assert majority([None, None]) is None
    same = lambda a, b: a == b  # noqa: E731
    assert majority(vote_groups(["7", "9", "9", "7"], same)) == 0


def test_bootstrap_interval_covers_true_mean_at_about_95_percent():
    rng = np.random.default_rng(123)
    true_mean, covered = 0.3, 0
    for d in range(200):
        per_problem = rng.binomial(8, true_mean, size=60) / 8  # pass@1 of 60 problems with 8 samples each
        lo, hi = bootstrap_ci(per_problem, n_boot=1000, seed=d)
        covered += lo <= true_mean <= hi
    assert 0.90 <= covered / 200 <= 0.98, covered


def test_bootstrap_is_seeded_and_brackets_the_mean():
    x = np.random.default_rng(0).random(30)
    assert bootstrap_ci(x, seed=5) == bootstrap_ci(x, seed=5)
    lo, hi = bootstrap_ci(x, seed=5)
    assert lo < x.mean() < hi
    assert bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0)


def test_reflection_words_match_whole_words_any_case():
    pat = reflection_pattern(("wait", "verify", "check", "mistake", "however", "recheck"))
    assert pat.search("Wait, that is wrong")
    assert pat.search("let me RECHECK this")
    assert pat.search("I made a mistake.")
    assert not pat.search("awaiting the checkout")  # inside other words: not a reflection
    assert reflection_pattern(["hmm"]).search("Hmm...") and not reflection_pattern(["hmm"]).search("wait")


def test_digits_apart_are_no_number_and_do_not_vote_with_one():
    """`1 2 3` lost its spaces before its arithmetic was read, became 123, and voted with `123`."""
    assert exact_key("1 2 3") != exact_key("123") == ("value", Fraction(123))
    assert exact_key(" 2 * 8 ") == exact_key("16") and exact_key("(3 + 5) * 2") == ("value", Fraction(16))


def test_the_voted_answer_is_the_groups_most_frequent_text():
    """Countdown's answers of one value can differ in what the task checks (`2*8` does not use the numbers 3, 5 and
    2; `(3+5)*2` does): the group's first answer decided cons@k, so the order of the samples did."""
    from ponder.evaluation.stats import voted_answer

    for answers in (["2*8", "(3+5)*2", "(3 + 5)*2"], ["(3+5)*2", "2*8", "2*8"]):
        groups = vote_groups(answers)
        assert groups == [0, 0, 0]
        assert "".join(voted_answer(answers, groups, 0).split()) == ("(3+5)*2" if answers[0] == "2*8" else "2*8")
    assert voted_answer(["1/2", "0.5", None], [0, 0, None], 0) == "1/2"  # a tie: the first


def test_bootstrap_interval_is_95_percent_with_a_tail_of_2_5_percent_on_each_side():
    """100 problems scoring 0 and 1 alternately: the mean's standard error is 0.5 / 10 = 0.05, so the 95% interval
    is 0.5 -+ 1.96 * 0.05 = (0.402, 0.598); taking 5% from each tail (a 90% interval) gives 0.5 -+ 0.082."""
    lo, hi = bootstrap_ci([0.0, 1.0] * 50, n_boot=20000, seed=0)
    assert lo == pytest.approx(0.40, abs=0.005) and hi == pytest.approx(0.60, abs=0.005)
    lo90, hi90 = bootstrap_ci([0.0, 1.0] * 50, level=0.9, n_boot=20000, seed=0)
    assert lo90 == pytest.approx(0.42, abs=0.005) and hi90 == pytest.approx(0.58, abs=0.005)


class HalfCredit(Task):
    """Partial credit: "half" scores 0.5, the gold 1, anything else 0."""

    name = "half_credit"

    def verify(self, answer, example):
        return 1.0 if answer == example["answer"] else 0.5 if answer == "half" else 0.0


def test_partial_scores_count_in_mean_score_but_not_as_correct(monkeypatch):
    """runner.py: a sample is correct when its score is 1. Samples half, half, gold, wrong (k = 4): one correct, so
    pass@1 = 1/4 and pass@2 = 1 - C(3, 2) / C(4, 2) = 1/2; the half scores show only in mean_score = (.5+.5+1+0)/4."""
    import torch

    from ponder.evaluate import evaluate
    from ponder.models.tiny import char_tokenizer
    from ponder.rollout import Completion, RolloutEngine
    from ponder.tasks import TASKS, get_task

    texts = ["<answer>half</answer>", "<answer>half</answer>", "<answer>42</answer>", "<answer>41</answer>"]

    class Scripted(RolloutEngine):
        def generate(self, prompts, params):
            return [[Completion(self.tokenizer(t).input_ids, "stop") for t in texts[: params.n]] for _ in prompts]

    get_task("first_digit")  # load the built-in tasks before adding a test-only one
    monkeypatch.setitem(TASKS, "half_credit", HalfCredit())
    tok = char_tokenizer()
    res = evaluate(torch.nn.Linear(1, 1), tok, [{"prompt": "q", "answer": "42", "task": "half_credit"}],
                   template="plain", k=4, engine=Scripted(None, tok), progress=False, n_boot=100)
    f = res["tasks"]["half_credit"]
    assert [s["score"] for s in res["samples"]] == [0.5, 0.5, 1.0, 0.0]
    assert [s["correct"] for s in res["samples"]] == [False, False, True, False]
    assert f["pass@1"] == pytest.approx(0.25) and f["pass@2"] == pytest.approx(0.5) and f["pass@4"] == 1.0
    assert f["mean_score"] == pytest.approx(0.5)
    assert f["cons@4"] == 0.0  # "half" wins the vote 2 to 1 to 1, and a half score is not correct
