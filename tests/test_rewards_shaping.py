"""Format, language, length and repetition rewards against hand-computed values; start-up contract check."""

import math

import re

import pytest

from ponder.errors import UserError
from ponder.rewards import REWARDS, RewardSet, get_reward, register

P = ["q"]


def call(name, completions, **kw):
    return get_reward(name)(completions, prompts=["q"] * len(completions), **kw)


GOOD = "<think>add them</think> <answer>4</answer>"
CASES = [GOOD, "  <think>a</think>\n<answer>4</answer>\n", "<think>a</think> <answer>4</answer> extra",
         "intro <think>a</think><answer>4</answer>", "<think>a</think><think>b</think><answer>4</answer>",
         "<answer>4</answer>", "<think>a</think>", "<think>a <answer>4</answer></think>"]


def test_format_strict_soft_and_tag_count():
    assert call("format", CASES) == [1, 1, 0, 0, 0, 0, 0, 0]
    assert call("format_soft", CASES) == [1, 1, 1, 1, 1, 0, 0, 0]
    assert call("tag_count", CASES) == [1, 1, 1, 1, 0.5, 0.5, 0.5, 1]


def test_language_share_of_words_in_the_target():
    en = "<think>First add the numbers, then check the sum.</think><answer>4</answer>"
    mixed = "<think>First add 数字 then check</think>"  # 4 English words, 2 Han characters
    zh = "<think>我们先计算 $x^2 + y^2 = 25$ 然后 check</think>"  # 7 Han characters, 1 English word
    assert call("language", [en, mixed, zh]) == [1.0, 4 / 6, 1 / 8]
    assert call("language", [en, mixed, zh], target="zh") == [0.0, 2 / 6, 7 / 8]


def test_language_ignores_math_code_and_variables():
    text = ("<think>Let x = 3. Then $\\frac{\\alpha}{\\beta} + \\sqrt{x}$ and \\(\\mathrm{foo}\\).\n"
            "```python\nfor item in range(10): print(item)\n```\nWe use `numpy.linalg` here. 计算</think>")
    # words: Let, Then, and, We, use, here (6 English), 计算 (2 Han)
    assert call("language", [text]) == [6 / 8]
    assert call("language", ["<think>2 + 2 = 4</think>"]) == [0.0]  # no words at all


def test_language_survives_a_dataset_column_named_target():
    zh = "<think>我们先计算 check</think>"
    assert call("language", [zh], target=[21]) == [1 / 6]  # Countdown's `target` column: default en
    assert call("language", [zh], target=[21], lang="zh") == [5 / 6]


def test_language_rejects_unknown_target():
    with pytest.raises(UserError, match=r"^reward 'language': target 'fr' is not supported; choose one of: en, zh$"):
        call("language", [GOOD], target="fr")


def test_overlong_is_dapo_soft_punishment():
    lengths = [100, 448, 449, 480, 512, 600]
    got = call("overlong", ["x"] * 6, completion_length=lengths, max_len=512, buffer=64)
    assert got == [0.0, 0.0, -1 / 64, -32 / 64, -1.0, -1.0]


def test_overlong_options_are_checked():
    with pytest.raises(UserError, match="reward 'overlong' needs max_len"):
        call("overlong", ["x"], completion_length=[3])
    with pytest.raises(UserError, match=r"buffer \(600\) must not exceed max_len \(512\)"):
        call("overlong", ["x"], completion_length=[3], max_len=512, buffer=600)
    with pytest.raises(UserError, match="needs the completion_length column"):
        call("overlong", ["x"], max_len=512)
    assert call("overlong", ["x"], completion_length=[460], max_len=500) == [-0.6]  # default buffer: max_len / 5


def test_cosine_length_follows_the_paper():
    right, wrong = "<answer>4</answer>", "<answer>5</answer>"
    got = call("cosine_length", [right, right, wrong, wrong, right, right], completion_length=[0, 256, 0, 256, 511, 100],
               truncated=[False, False, False, False, False, True], max_len=512, answer=["4"] * 6, task=["plain"] * 6)
    half = 1 + (2 - 1) * (1 + math.cos(math.pi / 2)) / 2  # 1.5 at half length for right answers
    assert got[0] == pytest.approx(2.0) and got[1] == pytest.approx(half)
    assert got[2] == pytest.approx(-10.0) and got[3] == pytest.approx(-5.0)
    assert got[4] == pytest.approx(1 + (1 + math.cos(math.pi * 511 / 512)) / 2)
    assert got[5] == -10.0  # truncated: the exceed value
    assert call("cosine_length", [right], completion_length=[3], max_len=8) == [None]  # no task, no gold


def test_repetition_penalty():
    assert call("repetition", ["a b c d e f"]) == [0.0]
    assert call("repetition", ["a b a b a b"], n=2) == [pytest.approx(-(1 - 2 / 5))]
    assert call("repetition", ["go " * 101], n=3, max_penalty=-0.5) == [pytest.approx(-0.5 * (1 - 1 / 99))]
    assert call("repetition", ["too short"]) == [0.0]
    with pytest.raises(UserError, match="max_penalty must be a number <= 0"):
        call("repetition", ["x"], max_penalty=1)


def test_every_reward_passes_the_startup_check_on_a_real_example():
    example = {"prompt": "What is 2+2?", "answer": "4", "task": "plain"}
    spec = {"accuracy": 1.0, "format": 1.0, "format_soft": 0.5, "tag_count": 0.5, "language": {"weight": 0.1, "target": "en"},
            "overlong": {"weight": 1.0, "max_len": 512, "buffer": 64}, "cosine_length": {"weight": 1.0, "max_len": 512},
            "repetition": {"weight": 1.0, "n": 3, "max_penalty": -1.0}}
    rewards = RewardSet(spec)
    rewards.check(example)
    totals, per_fn = rewards.score([GOOD], ["What is 2+2?"], {"answer": ["4"], "task": ["plain"], "completion_length": [9], "truncated": [False]})
    assert per_fn["accuracy"] == [1.0] and per_fn["format"] == [1.0] and per_fn["language"] == [1.0]


@pytest.fixture
def temp_reward():
    names = []

    def add(name, fn):
        register(name)(fn)
        names.append(name)

    yield add
    for name in names:
        REWARDS.pop(name, None)


def test_startup_check_names_a_function_with_a_wrong_return(temp_reward):
    example = {"prompt": "q", "answer": "4", "task": "plain"}
    temp_reward("_short", lambda completions, *, prompts, **_: [])
    temp_reward("_text", lambda completions, *, prompts, **_: ["yes"] * len(completions))
    temp_reward("_strict", lambda completions, *, prompts: [1.0] * len(completions))
    with pytest.raises(UserError, match=r"^reward '_short' returned 0 values for 2 completions; it must return one value per completion$"):
        RewardSet({"_short": 1.0}).check(example)
    with pytest.raises(UserError, match=r"^reward '_text' returned 'yes'; values must be numbers or None$"):
        RewardSet({"_text": 1.0}).check(example)
    with pytest.raises(UserError, match=r"^reward '_strict' could not be called with the reward contract"):
        RewardSet({"_strict": 1.0}).check(example)


def test_a_reward_option_that_is_no_parameter_is_named_with_the_one_meant():
    """`**columns` would swallow a misspelt option and the run would train with the default."""
    with pytest.raises(UserError, match=r"^config rewards.overlong: the reward has no option 'bufer'; did you mean "
                                        r"'buffer'\? its options: buffer, max_len \(and weight\)$"):
        RewardSet({"overlong": {"weight": 1.0, "max_len": 300, "bufer": 10}})
    # a column the reward reads is no option: given one, it reached the reward as an int where a list goes (a traceback)
    with pytest.raises(UserError, match=r"^config rewards.overlong: 'completion_length' is a column the reward reads "
                                        r"from each example, not an option; remove it from the recipe$"):
        RewardSet({"overlong": {"weight": 1.0, "max_len": 300, "completion_length": 3}})
    assert RewardSet({"overlong": {"weight": 1.0, "max_len": 300, "buffer": 10}}).options["overlong"] == {"max_len": 300, "buffer": 10}


def test_an_error_inside_a_reward_of_ones_own_is_one_line_with_its_place_and_a_shadowing_column_is_refused(tmp_path):
    """A brevity reward with a `target=200` default on Countdown examples, whose `target` column took the default's
    place and failed inside it (a list divided): such a clash is now refused before the call, naming the fix; an error
    inside the reward is one line naming the reward, the exception, file and line."""
    (tmp_path / "my_rewards.py").write_text(
        "def brevity(completions, *, prompts, target=200, **columns):\n"
        "    return [min(1.0, target / (len(c) - 3)) for c in completions]\n")
    ref = f"{tmp_path}/my_rewards.py:brevity"
    example = {"prompt": "q", "answer": "4", "task": "countdown", "target": 24}
    with pytest.raises(UserError, match=rf"^reward '{re.escape(ref)}': its option 'target' \(default 200\) has the name of "
                                        "a column of the data"):
        RewardSet({ref: 1.0}).score(["abcd"], ["q"], {"target": [[24]], "answer": ["4"]})
    rewards = RewardSet({ref: {"weight": 1.0, "target": 100}})  # set in the recipe: the option wins
    rewards.check(example)
    with pytest.raises(UserError) as e:
        rewards.score(["abc"], ["q"], {"target": [[24]], "answer": ["4"]})
    assert str(e.value) == f"reward '{ref}' raised ZeroDivisionError at my_rewards.py:2: division by zero"
