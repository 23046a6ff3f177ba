"""`evaluate`: figures against hand computation (scripted engine) and self-consistency on a real tiny model."""

import re
from itertools import combinations

import pytest
import torch

from ponder.errors import UserError
from ponder.evaluate import evaluate, flat_metrics
from ponder.models import load
from ponder.models.tiny import char_tokenizer
from ponder.rollout import Completion, RolloutEngine
from ponder.tasks import TASKS, Task, get_task

SCRIPT = {  # prompt -> (gold, k completions as (text, finish_reason))
    "2+2": ("4", [
        ("<think>Wait, 2+2</think> <answer>4</answer>", "stop"),  # right, format, reflection
        ("<think>x</think> <answer>5</answer>", "stop"),  # wrong, format
        ("<answer>4.0</answer>", "stop"),  # right by value, no think block
        ("<think>I check", "length"),  # truncated, no answer, reflection
    ]),
    "5+5": ("10", [
        ("<answer>3</answer>", "stop"),
        ("<answer>7</answer>", "stop"),
        ("<answer>10</answer>", "stop"),
        ("<answer>7</answer>", "stop"),  # "7" wins the vote 2 to 1 to 1, and is wrong
    ]),
    "1+1": ("2", [("I do not know", "stop"), ("<answer></answer>", "stop")]),  # never commits to an answer
    # Countdown, 3 5 2 -> 16: all three are 16, one vote; `2*8` uses numbers it was not given
    "3 5 2 -> 16": ("(3+5)*2", [("<answer>2*8</answer>", "stop"), ("<answer>(3+5)*2</answer>", "stop"),
                                ("<answer>(3 + 5) * 2</answer>", "stop")]),
}


class ScriptedEngine(RolloutEngine):
    """Returns SCRIPT's completions; greedy (temperature 0) returns the first one."""

    seeds: list

    def generate(self, prompts, params):
        self.seeds = getattr(self, "seeds", []) + [params.seed]
        out = []
        for ids in prompts:
            _, script = SCRIPT[self.tokenizer.decode(ids)]
            picked = script[:1] if params.temperature == 0 else script[: params.n]
            out.append([Completion(self.tokenizer(t).input_ids, r) for t, r in picked])
        return out


def scripted_examples(prompts=("2+2", "5+5")):
    return [{"prompt": p, "answer": SCRIPT[p][0], "task": "jsonl"} for p in prompts]


def test_figures_match_hand_computation():
    tok = char_tokenizer()
    engine = ScriptedEngine(None, tok)
    res = evaluate(torch.nn.Linear(1, 1), tok, scripted_examples(), template="plain", k=4, engine=engine,
                   greedy=True, progress=False, n_boot=500)
    f = res["tasks"]["jsonl"]
    assert f["problems"] == 2 and f["k"] == 4
    assert f["pass@1"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert f["pass@2"] == pytest.approx(((1 - 1 / 6) + (1 - 3 / 6)) / 2)  # 1 - C(n-c,2)/C(4,2) per problem
    assert f["pass@4"] == 1.0
    assert f["cons@4"] == 0.5  # "4" and "4.0" outvote "5"; "7" outvotes "10"
    assert f["greedy"] == 0.5
    assert f["answer_rate"] == 7 / 8
    assert f["format_rate"] == 2 / 8
    assert f["truncation_rate"] == 1 / 8
    assert f["reflection_rate"] == 2 / 8
    lengths = [len(t) for p in ("2+2", "5+5") for t, _ in SCRIPT[p][1]]  # one token per character
    assert f["mean_length"] == pytest.approx(sum(lengths) / 8)
    lo, hi = f["pass@1_ci"]
    assert 0.25 <= lo <= f["pass@1"] <= hi <= 0.5  # the two problems' pass@1 are 0.25 and 0.5
    votes = [s["voted"] for s in res["samples"] if s["problem"] == 0 and not s["greedy"]]
    assert votes == [True, False, True, False]
    assert res["metrics"] == f  # one task: the overall figures are its figures
    assert flat_metrics(res)["eval/jsonl/cons@4"] == 0.5 and flat_metrics(res)["eval/jsonl/pass@1_hi"] == hi


class PlainNumbers(Task):
    name = "plain_numbers"  # the base class verifies by text or numeric value


def test_figures_per_task_and_over_all_problems(monkeypatch):
    get_task("first_digit")  # load the built-in tasks before adding a test-only one
    monkeypatch.setitem(TASKS, "plain_numbers", PlainNumbers())
    tok = char_tokenizer()
    examples = scripted_examples()
    examples[1]["task"] = "plain_numbers"
    res = evaluate(torch.nn.Linear(1, 1), tok, examples, template="plain", k=4, engine=ScriptedEngine(None, tok),
                   progress=False, n_boot=200)
    assert list(res["tasks"]) == ["jsonl", "plain_numbers"]
    assert res["tasks"]["jsonl"]["pass@1"] == 0.5 and res["tasks"]["plain_numbers"]["pass@1"] == 0.25
    assert res["tasks"]["jsonl"]["cons@4"] == 1.0 and res["tasks"]["plain_numbers"]["cons@4"] == 0.0
    assert res["metrics"]["pass@1"] == 0.375 and res["metrics"]["problems"] == 2
    assert "greedy" not in res["metrics"]


def test_problems_never_answered_count_as_wrong():
    tok = char_tokenizer()
    res = evaluate(torch.nn.Linear(1, 1), tok, scripted_examples(["2+2", "1+1"]), template="plain", k=2,
                   engine=ScriptedEngine(None, tok), progress=False, n_boot=200)
    f = res["tasks"]["jsonl"]
    assert f["problems"] == f["scored_problems"] == 2
    assert f["pass@1"] == (1 / 2 + 0) / 2 and f["cons@2"] == 0.5 and f["answer_rate"] == 2 / 4
    assert [s["score"] for s in res["samples"] if s["problem"] == 1] == [0.0, 0.0]


def test_a_problem_whose_gold_does_not_parse_is_left_out_even_with_an_unanswered_sample():
    """docs/evaluation.md: such a problem is counted in `problems`, not in `scored_problems`. Its unanswered sample
    scored 0 without asking the verifier, which made it a scored problem with nothing right."""
    tok = char_tokenizer()
    examples = scripted_examples()
    examples[0]["answer"] = "\\frac{"  # 2+2's script has an unanswered (truncated) sample
    with pytest.warns(UserWarning, match="cannot be parsed as math"):
        res = evaluate(torch.nn.Linear(1, 1), tok, examples, template="plain", k=4, engine=ScriptedEngine(None, tok),
                       progress=False, n_boot=200)
    f = res["tasks"]["jsonl"]
    assert (f["problems"], f["scored_problems"]) == (2, 1)
    assert f["pass@1"] == 0.25 and f["cons@4"] == 0.0  # 5+5's alone
    assert [s["score"] for s in res["samples"] if s["problem"] == 0] == [None] * 4


def test_whether_a_problem_is_scored_does_not_depend_on_whether_the_model_answered_it():
    """A gold that does not parse leaves its problem out of every model's figures, also where no sample answered
    (the verifier is asked with the gold itself): before, such a problem counted as wrong for a model that never
    answered it and was left out for one that did, so two models were scored over different problems."""
    from rich.console import Console

    from ponder.evaluation.command import compare_table

    tok = char_tokenizer()
    examples = scripted_examples(["2+2", "1+1"])  # 1+1's samples never answer
    examples[1]["answer"] = "\\sqrt{"
    with pytest.warns(UserWarning, match="cannot be parsed as math"):
        res = evaluate(torch.nn.Linear(1, 1), tok, examples, template="plain", k=2, engine=ScriptedEngine(None, tok),
                       progress=False, n_boot=200)
    f = res["tasks"]["jsonl"]
    assert (f["problems"], f["scored_problems"]) == (2, 1)
    assert f["pass@1"] == 1 / 2 and f["cons@2"] == 1.0  # 2+2's alone
    assert [s["score"] for s in res["samples"] if s["problem"] == 1] == [None, None]
    console = Console(width=200, record=True)
    console.print(compare_table([res], ["run"]))
    assert re.search(r"scored \(gold parses\) +│ +1 ", console.export_text())


def test_examples_must_name_their_task():
    tok = char_tokenizer()
    with pytest.raises(UserError, match="example 1 has no 'task' field"):
        evaluate(None, tok, [{"prompt": "a", "task": "jsonl"}, {"prompt": "b"}], engine=ScriptedEngine(None, tok))
    with pytest.raises(UserError, match="no examples to evaluate"):
        evaluate(None, tok, [], engine=ScriptedEngine(None, tok))


class EvenFirstChar(Task):
    """About half of random strings pass: the first character's code is even."""

    name = "even_first_char"

    def verify(self, answer, example):
        return float(bool(answer) and ord(answer[0]) % 2 == 0)


@pytest.fixture(scope="module")
def tiny():
    return load("tiny-random")


def run_tiny(tiny, monkeypatch, task="even_first_char", n=5, **kw):
    get_task("first_digit")  # load the built-in tasks before adding a test-only one
    monkeypatch.setitem(TASKS, "even_first_char", EvenFirstChar())
    examples = [dict(ex, task=task) for ex in get_task("first_digit").load(split="test", n=n)]
    opts = dict(template="plain", extract="none", k=4, max_new_tokens=6, temperature=1.0, top_p=1.0, progress=False,
                n_boot=200, batch_size=8)
    return evaluate(*tiny, examples, **(opts | kw))


def test_tiny_model_figures_agree_with_samples(tiny, monkeypatch, capsys):
    rng_before = torch.get_rng_state()
    res = run_tiny(tiny, monkeypatch, greedy=True)
    assert torch.equal(torch.get_rng_state(), rng_before)  # a trainer's sampling is not disturbed
    assert capsys.readouterr().out == ""  # progress=False is quiet
    f = res["tasks"]["even_first_char"]
    sampled = [s for s in res["samples"] if not s["greedy"]]
    assert len(sampled) == 5 * 4 and len(res["samples"]) == 5 * 5
    assert all(s["answer"] == s["completion"].strip() for s in sampled)  # extract none
    assert f["pass@1"] == pytest.approx(sum(s["correct"] for s in sampled) / 20)
    assert 0 < f["pass@1"] < 1  # the check below is not vacuous
    per_problem = [[s["correct"] for s in sampled if s["problem"] == i] for i in range(5)]
    for kk in (2, 4):  # pass@k against enumeration of the samples' k-subsets
        brute = [sum(any(c[j] for j in sub) for sub in combinations(range(4), kk)) / len(list(combinations(range(4), kk)))
                 for c in per_problem]
        assert f[f"pass@{kk}"] == pytest.approx(sum(brute) / 5)
    first_voted = [next(s for s in sampled if s["problem"] == i and s["voted"]) for i in range(5)]
    assert f["cons@4"] == pytest.approx(sum(s["correct"] for s in first_voted) / 5)
    assert f["greedy"] == pytest.approx(sum(s["correct"] for s in res["samples"] if s["greedy"]) / 5)
    assert f["mean_length"] == pytest.approx(sum(s["length"] for s in sampled) / 20)
    assert f["truncation_rate"] == pytest.approx(sum(s["finish_reason"] == "length" for s in sampled) / 20)
    assert f["format_rate"] == 0.0 and f["reflection_rate"] == 0.0  # random characters, no tags or words
    assert res["settings"]["k"] == 4 and res["task_hash"].startswith("sha256:")


def test_tiny_model_sampling_is_seeded(tiny, monkeypatch):
    a = run_tiny(tiny, monkeypatch, n=3, k=2, seed=1)["samples"]
    b = run_tiny(tiny, monkeypatch, n=3, k=2, seed=1)["samples"]
    c = run_tiny(tiny, monkeypatch, n=3, k=2, seed=2)["samples"]
    assert [s["completion"] for s in a] == [s["completion"] for s in b]
    assert [s["completion"] for s in a] != [s["completion"] for s in c]


def test_first_digit_end_to_end(tiny):
    examples = get_task("first_digit").load(split="test", n=3)
    for ex in examples:
        ex["task"] = "first_digit"
    res = evaluate(*tiny, examples, template="plain", extract="none", k=2, max_new_tokens=4, progress=False, n_boot=100)
    f = res["tasks"]["first_digit"]
    sampled = res["samples"]
    assert f["pass@1"] == pytest.approx(sum(s["correct"] for s in sampled) / 6)
    assert all(s["correct"] == s["completion"].strip().startswith("7") for s in sampled)
    assert set(f) >= {"pass@1", "pass@1_ci", "cons@2", "pass@2", "format_rate", "mean_length", "truncation_rate", "reflection_rate"}


def test_cons_checks_the_majority_text_of_the_winning_vote():
    """Answers of one value vote together, but the task checks more than the value: the group's most frequent text is
    checked, not its first (cons@3 read 0 here, though 2 of the 3 answers are right and say the same)."""
    tok = char_tokenizer()
    ex = {"prompt": "3 5 2 -> 16", "answer": "(3+5)*2", "task": "countdown", "numbers": [3, 5, 2], "target": 16}
    res = evaluate(torch.nn.Linear(1, 1), tok, [ex], template="plain", k=3, engine=ScriptedEngine(None, tok),
                   progress=False, n_boot=100)
    f = res["tasks"]["countdown"]
    assert [s["correct"] for s in res["samples"]] == [False, True, True]
    assert f["pass@1"] == pytest.approx(2 / 3) and f["cons@3"] == 1.0
