"""Answer extraction: modes, think blocks, boxes."""

import pytest

from ponder.errors import UserError
from ponder.rewards.extract import boxes, extract_answer, last_boxed, outside_think


def test_modes():
    text = "<think>hmm</think> <answer>7</answer> so \\boxed{8}"
    assert extract_answer(text, "tags") == "7"
    assert extract_answer(text, "tags_or_boxed") == "7"
    assert extract_answer(text, "boxed") == "8"
    assert extract_answer("  just 9 ", "none") == "just 9"
    assert extract_answer("<think>a</think> \\boxed{5}", "tags") is None
    assert extract_answer("<think>a</think> \\boxed{5}", "tags_or_boxed") == "5"
    with pytest.raises(UserError, match=r"^unknown answer extraction mode 'tag'; choose one of: tags, boxed, tags_or_boxed, none$"):
        extract_answer(text, "tag")


def test_boxes_with_nested_braces_and_bare_form():
    assert boxes(r"\boxed{\frac{1}{2}} and \boxed 3 and \fbox{x}") == [r"\frac{1}{2}", "3", "x"]
    assert last_boxed(r"a \boxed{1} b \boxed{\sqrt{2}}") == r"\sqrt{2}"
    assert boxes(r"\boxed{unclosed") == []


def test_think_is_removed_and_prompt_opened_think_is_understood():
    assert outside_think("<think>a</think>b<think>c</think>d") == " b d"
    assert outside_think("reasoning opened by the prompt</think> <answer>4</answer>") == " <answer>4</answer>"
    assert outside_think("<think>never closed") is None
    assert extract_answer("the prompt opened it</think> <answer>4</answer>") == "4"
