"""Answer extraction: modes, think blocks, boxes."""

import pytest

from ponder.errors import UserError
from ponder.rewards.extract import MAX_BOXES, boxes, extract_answer, last_boxed, outside_think
from ponder.rewards.language import chain_of_thought, language


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


def test_tag_blocks_are_found_as_the_lazy_patterns_found_them():
    """extract_answer, outside_think and format_soft scan for tags in one pass (the lazy regexes they replace took time
    growing with the square of a completion that repeats a tag); on random strings of tags and text they agree with the
    regexes."""
    import random
    import re

    from ponder.rewards.extract import tag_spans
    from ponder.rewards.format import soft_format

    rng = random.Random(0)
    pieces = ["<think>", "</think>", "<answer>", "</answer>", " ", "\n", "x", "42", "\\boxed{7}"]
    soft = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))
        for a, b in (("<answer>", "</answer>"), ("<think>", "</think>")):
            found = [text[s:e] for s, e in tag_spans(text, a, b)]
            assert found == re.findall(f"{a}(.*?){b}", text, re.DOTALL), text
        assert soft_format(text) == bool(soft.search(text)), text
        assert outside_think(text) == regex_outside_think(text), text
    assert outside_think("<think> a </think> b <think> c </think> d") == "  b   d"


def regex_outside_think(completion):
    """outside_think as it was written with a lazy regex (the reference of the test above)."""
    import re

    head, sep, tail = completion.partition("</think>")
    text = tail if sep and "<think>" not in head else completion
    text = re.sub(r"<think>.*?</think>", " ", text, flags=re.DOTALL)
    return None if "<think>" in text else text.replace("</think>", " ")


def test_agreeing_boxes_up_to_the_limit_are_one_answer_and_one_more_is_spam():
    assert MAX_BOXES == 3
    boxed = "\\boxed{5} "
    assert extract_answer("<think>x</think> " + boxed * MAX_BOXES, "boxed") == "5"
    assert extract_answer("<think>x</think> " + boxed * (MAX_BOXES + 1), "boxed") is None


def test_a_box_inside_the_answer_block_is_unwrapped():
    assert extract_answer("<think>a</think> <answer>\\boxed{7}</answer>") == "7"
    assert extract_answer("<think>a</think> <answer>\\boxed{7}</answer>", "tags") == "7"
    assert extract_answer("<think>a</think> <answer>so \\boxed{\\frac{1}{2}}.</answer>") == "\\frac{1}{2}"


def test_language_reads_the_thinking_before_the_close_tag_when_the_prompt_opened_it():
    """R1-Distill's template opens <think> in the prompt: the completion's chain of thought is what comes before
    `</think>`; the answer after it (Chinese here) is not part of it."""
    text = "I think in English here</think> <answer>答案</answer>"
    assert chain_of_thought(text) == "I think in English here"
    assert language([text], prompts=["q"]) == [1.0]  # think, in, English, here ("I" is a single letter)
    assert language([text], prompts=["q"], target="zh") == [0.0]


def test_language_without_think_tags_leaves_the_answer_block_out_of_the_thinking():
    text = "reasoning in English words <answer>中文</answer>"
    assert language([text], prompts=["q"]) == [1.0]  # 4 English words; the 2 Han characters are the answer's
    assert language(["reasoning in English words <answer>中文"], prompts=["q"]) == [1.0]  # unclosed: to the end
