"""The procedural tasks of the miniature world: exact verifiers and hash-disjoint splits."""

import random

import pytest

from ponder.errors import UserError
from ponder.tasks import get_task
from ponder.tasks import arithmetic as ar
from ponder.tasks import countdown as cd
from ponder.tasks.partition import partition_of


@pytest.fixture(scope="module")
def arith():
    return get_task("arithmetic")


@pytest.fixture(scope="module")
def count():
    return get_task("countdown")


# ---------------------------------------------------------------------------------------------
# arithmetic


def test_arithmetic_examples_are_left_to_right_chains(arith):
    rows = arith.load("test", n=50, seed=3)
    for ex in rows:
        tokens = ex["expression"].split()
        value = int(tokens[0])
        for op, x in zip(tokens[1::2], tokens[2::2]):
            value = value + int(x) if op == "+" else value - int(x)
            assert value >= 0  # running totals never go below zero
        assert ex["answer"] == str(value)
        assert ex["prompt"] == f"Compute {ex['expression']}"
        assert ex["task"] == "arithmetic" and ex["difficulty"] == "hard"
        assert 3 <= ex["operands"] <= 5 and all(10 <= int(t) <= 99 for t in tokens[::2])


def test_arithmetic_hand_computed_chain():
    assert ar.running_totals([86, 66, 65], ["-", "+"]) == [20, 85]
    assert ar.expression([86, 66, 65], ["-", "+"]) == "86 - 66 + 65"


@pytest.mark.parametrize("answer", ["85", " 85 ", "85.", "85.0", "+85", "= 85", "x = 85", "86 - 66 + 65 = 85", "\\boxed{85}"])
def test_arithmetic_accepts_every_form_of_the_right_number(arith, answer):
    assert arith.verify(answer, {"answer": "85"}) == 1.0


@pytest.mark.parametrize("answer", ["84", "86 - 66 + 65", "85 + 0", "eighty-five", "", "85 = 84", None])
def test_arithmetic_rejects_wrong_numbers_and_unevaluated_expressions(arith, answer):
    assert arith.verify(answer, {"answer": "85"}) == 0.0


def test_arithmetic_levels_and_options(arith):
    easy = arith.load("train", n=20, difficulty="easy")
    assert all(ex["operands"] == 3 and ex["difficulty"] == "easy" for ex in easy)
    long = arith.load("train", n=20, difficulty="expert")
    assert all(6 <= ex["operands"] <= 8 for ex in long)
    mixed = arith.load("train", n=200, difficulty="mixed")
    assert {ex["difficulty"] for ex in mixed} == set(ar.LEVELS)
    custom = arith.load("train", n=10, operands=[7, 7], low=1, high=5)
    assert all(ex["operands"] == 7 and all(1 <= int(t) <= 5 for t in ex["expression"].split()[::2]) for ex in custom)


def test_arithmetic_bad_options_are_user_errors(arith):
    with pytest.raises(UserError, match="unknown difficulty 'impossible'"):
        arith.load("train", n=1, difficulty="impossible")
    with pytest.raises(UserError, match="operands"):
        arith.load("train", n=1, operands=2)
    with pytest.raises(UserError, match="unknown split 'dev'"):
        arith.load("dev", n=1)


@pytest.mark.parametrize("options,line", [
    ({"digit": None}, "task 'first_digit': option digit must be one of 0-9; got None"),  # (every answer was wrong)
    ({"digit": [1]}, "task 'first_digit': option digit must be one of 0-9; got [1]"),
    ({"digit": 10}, "task 'first_digit': option digit must be one of 0-9; got 10"),
    ({"split": "bogus"}, "task 'first_digit': unknown split 'bogus'; choose train or test"),  # (taken, unsaid)
])
def test_first_digit_bad_options_are_user_errors(options, line):
    from ponder.tasks import get_task

    split = options.pop("split", "train")
    with pytest.raises(UserError) as e:
        get_task("first_digit").load(split, n=2, **options)
    assert str(e.value) == line


def test_arithmetic_asks_for_more_distinct_problems_than_exist(arith):
    # 3 numbers from 1..2 and two operators: at most 32 chains, about a tenth of them test items
    with pytest.raises(UserError, match="distinct 'test' problems"):
        arith.load("test", n=40, operands=3, low=1, high=2)


# ---------------------------------------------------------------------------------------------
# countdown

EX = {"numbers": [7, 5, 3], "target": 26, "answer": "7 * 3 + 5", "task": "countdown"}


@pytest.mark.parametrize("answer", [
    "7 * 3 + 5", "5 + 7 * 3", "(7 * 3) + 5", "3*7+5", "7 × 3 + 5", "7 x 3 + 5", "7 \\times 3 + 5",
    "7 * 3 + 5 = 26", "26 = 5 + 3 * 7", " (3 * 7) + 5. ", "[(7 * 3) + 5]",
])
def test_countdown_accepts_any_valid_expression(count, answer):
    assert count.verify(answer, EX) == 1.0


@pytest.mark.parametrize("answer,why", [
    ("7 * 3 + 5 + 0", "0 is not given"),
    ("7 * 4 - 2", "numbers not given"),
    ("7 * 3 + 3 + 2", "3 used twice, 2 not given"),
    ("5 * 5 + 1", "5 used twice"),
    ("7 * 3", "wrong value"),
    ("7 + 5 + 3", "wrong value"),
    ("26", "26 is not given"),
    ("-5 + 7 * 3 + 10", "unary minus and 10 not given"),
    ("(7 * 3 + 5) / 1", "1 not given"),
    ("7 ** 3", "power is not allowed"),
    ("__import__('os').system('true')", "calls are not allowed"),
    ("7 * 3 + 5.0", "not an integer"),
    ("7 * 3 + 5 = 1000", "states a value that is not the target"),  # scored 1: the stated side was dropped unread
    ("27 = 7 * 3 + 5", "states a value that is not the target"),
    ("7 * 3 + 5 = 26 = 27", "states a value that is not the target"),
    ("", "empty"),
    ("(" * 300 + "7" + ")" * 300, "too long"),
])
def test_countdown_rejects_rule_breaking_answers(count, answer, why):
    assert count.verify(answer, EX) == 0.0, why


def test_countdown_division_must_be_exact_at_every_step(count):
    ex = {"numbers": [8, 3, 6], "target": 16}
    assert count.verify("8 / 3 * 6", ex) == 0.0  # 8/3 is not an integer, though the total is 16
    assert count.verify("8 * 6 / 3", ex) == 1.0
    assert count.verify("8 / (6 - 6)", {"numbers": [8, 6, 6], "target": 1}) == 0.0


def test_countdown_repeated_numbers_may_be_used_as_often_as_given(count):
    ex = {"numbers": [4, 6, 6], "target": 8}
    assert count.verify("6 + 6 - 4", ex) == 1.0
    assert count.verify("6 + 6 + 6 - 4 - 6", ex) == 0.0


def test_countdown_evaluate_never_runs_code(monkeypatch):
    import builtins

    monkeypatch.setattr(builtins, "eval", lambda *a, **k: pytest.fail("eval was called"))
    with pytest.raises(cd.InvalidExpression):
        cd.evaluate("open('x').read()", [1, 2])
    assert cd.evaluate("(1 + 2) * 2", [1, 2, 2]) == 6


def test_countdown_examples_have_a_solution_and_levels(count):
    for level, size in [("easy", 3), ("medium", 3), ("hard", 4), ("expert", 5)]:
        rows = count.load("train", n=30, difficulty=level, seed=1)
        for ex in rows:
            assert len(ex["numbers"]) == size and ex["difficulty"] == level
            assert count.verify(ex["answer"], ex) == 1.0  # the stored solution is valid
            assert ex["target"] not in ex["numbers"] and 1 <= ex["target"] <= cd.MAX_TARGET
            assert ex["prompt"] == cd.prompt_of(ex["numbers"], ex["target"])


def test_countdown_chain_expression_brackets_only_where_needed():
    assert cd.chain_expression([7, 5, 3], ["+", "*"]) == "(7 + 5) * 3"
    assert cd.chain_expression([7, 3, 5], ["*", "+"]) == "7 * 3 + 5"
    assert cd.chain_value([7, 5, 3], ["+", "*"]) == 36
    assert cd.chain_value([7, 5, 3], ["/", "+"]) is None  # 7 / 5 is not exact


def test_countdown_first_guesses_rarely_hit():
    """Check-and-retry must pay: one random full chain reaches the target far less often than five do."""
    rng = random.Random(0)
    problems = get_task("countdown").load("train", n=300, seed=2)
    one = five = 0
    for ex in problems:
        values = [cd.chain_value(*cd.random_chain(rng, ex["numbers"], "+-*")) for _ in range(5)]
        one += values[0] == ex["target"]
        five += ex["target"] in values
    assert one / 300 < 0.25 and five >= 2 * one


# ---------------------------------------------------------------------------------------------
# splits


@pytest.mark.parametrize("name,level", [("arithmetic", "hard"), ("arithmetic", "easy"), ("countdown", "medium"), ("countdown", "easy")])
def test_splits_are_disjoint_whatever_the_seeds(name, level):
    task = get_task(name)
    key = (lambda ex: ar.problem_key(ex["expression"])) if name == "arithmetic" else (
        lambda ex: cd.problem_key(ex["numbers"], ex["target"]))
    test = {key(ex) for seed in (0, 1) for ex in task.load("test", n=60, seed=seed, difficulty=level)}
    train = {key(ex) for seed in (0, 7) for ex in task.load("train", n=300, seed=seed, difficulty=level)}
    assert test and train and not test & train
    assert all(partition_of(k) == "test" for k in test) and all(partition_of(k) == "train" for k in train)


def test_splits_are_deterministic_by_seed(arith, count):
    assert arith.load("train", n=20, seed=5) == arith.load("train", n=20, seed=5)
    assert arith.load("train", n=20, seed=5) != arith.load("train", n=20, seed=6)
    assert count.load("test", n=20, seed=1) == count.load("test", n=20, seed=1)


def test_no_arithmetic_test_chain_is_a_prefix_of_a_training_chain(arith):
    # small numbers, so that without the prefix hash about ten training chains would start like a test chain
    test = [ex["expression"] for ex in arith.load("test", n=100, difficulty="easy", low=1, high=9)]
    train = [ex["expression"] for ex in arith.load("train", n=300, difficulty="mixed", low=1, high=9)]
    assert not any(tr.startswith(te) or te.startswith(tr) for te in test for tr in train)


def test_partition_shares():
    counts = {"test": 0, "train": 0, "corpus": 0}
    for i in range(20_000):
        counts[partition_of(f"k{i}")] += 1
    assert abs(counts["test"] / 20_000 - 0.10) < 0.01
    assert abs(counts["train"] / 20_000 - 0.40) < 0.015


@pytest.mark.parametrize("task, options, line", [
    ("arithmetic", {"difficulty": []}, "task 'arithmetic': difficulty is an empty list; name one of: easy, medium, hard, expert, mixed"),
    ("countdown", {"difficulty": []}, "task 'countdown': difficulty is an empty list; name one of: easy, medium, hard, expert, mixed"),
    ("arithmetic", {"difficulty": {"a": 1}}, "task 'arithmetic': unknown difficulty {'a': 1}; choose one of: easy, medium, hard, expert, mixed"),
    ("arithmetic", {"operands": 3.5}, "task 'arithmetic': operands must be a whole number, got 3.5"),
    ("arithmetic", {"operands": [3, "4"]}, "task 'arithmetic': operands must be a whole number, got '4'"),
    ("arithmetic", {"low": 1.5}, "task 'arithmetic': low must be a whole number, got 1.5"),
    ("arithmetic", {"high": "a"}, "task 'arithmetic': high must be a whole number, got 'a'"),
])
def test_task_options_of_the_wrong_kind_are_one_line(task, options, line):
    """An empty difficulty list, a mapping, a fractional or text number: IndexError, TypeError or ValueError tracebacks
    from the draw (`ponder eval --option operands=3.5`)."""
    from ponder.config import TaskSpec
    from ponder.tasks import load_examples

    with pytest.raises(UserError) as e:
        load_examples(TaskSpec(name=task, n=5, options=options), 0)
    assert str(e.value) == line


def test_a_level_smaller_than_the_default_count_gives_all_it_holds_and_an_asked_n_past_it_is_one_line():
    """countdown's easy level holds 813 train problems: its default of 2,000 always failed, after seconds of drawing.
    Without n a level gives all it holds (up to the default); an n it cannot give is still refused."""
    from ponder.config import TaskSpec
    from ponder.tasks import load_examples

    rows = load_examples(TaskSpec(name="countdown", options={"difficulty": "easy"}), 0)
    assert len(rows) == 813 and len({(tuple(r["numbers"]), r["target"]) for r in rows}) == 813
    with pytest.raises(UserError, match="^task 'countdown': only 813 distinct 'train' problems found at this difficulty"):
        load_examples(TaskSpec(name="countdown", n=900, options={"difficulty": "easy"}), 0)
    # a level with room for the default draws exactly the default, as before
    assert len(load_examples(TaskSpec(name="countdown", split="test", options={"difficulty": "medium"}), 0)) == 200


def test_an_n_far_past_a_levels_size_is_one_line_after_a_bounded_number_of_draws(monkeypatch):
    """`--n 100000` of countdown's easy level (813 train problems) drew for minutes: 200 draws were allowed per problem
    asked for. A run of misses ends it now, with the same line; the draws are counted, not timed."""
    from ponder.config import TaskSpec
    from ponder.tasks import load_examples

    real, draws = cd.sample_problem, [0]

    def counted(*a):
        draws[0] += 1
        if draws[0] > 500_000:  # the old bound was 20 million draws
            pytest.fail("still drawing after 500,000 draws")
        return real(*a)

    monkeypatch.setattr(cd, "sample_problem", counted)
    with pytest.raises(UserError) as e:
        load_examples(TaskSpec(name="countdown", n=100_000, options={"difficulty": "easy"}), 0)
    assert str(e.value) == ("task 'countdown': only 813 distinct 'train' problems found at this difficulty; "
                            "ask for fewer (n) or a harder level")


def test_problems_that_come_ever_more_rarely_are_all_drawn():
    """The last problems of a level are its rarest: here the draws that find a new one are 1, 2, 4, ..., 262,144 (the
    last after 131,071 that found nothing new). 200 draws per problem asked for, or a fixed 50,000 misses in a row,
    stopped short of them; a run of misses under three times the draws before it does not."""
    from itertools import count

    from ponder.tasks.partition import draw_unique

    arrivals = {2**j for j in range(19)}  # draws 1, 2, 4, ..., 262,144 find a new problem; all the others repeat one
    ticks = count(1)

    def draw():
        i = next(ticks)
        return {"k": i if i in arrivals else 1}

    rows = draw_unique(draw, key=lambda ex: str(ex["k"]), part=lambda ex: "train", split="train", n=19, task="t")
    assert sorted(ex["k"] for ex in rows) == sorted(arrivals)
