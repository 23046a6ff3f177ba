"""Task adapters: GSM8K / MATH / plain JSONL and reasoning-gym, loaded offline and scored end to end."""

import json

import pytest

from ponder.errors import UserError
from ponder.rewards import verify_pool
from ponder.rewards.basic import accuracy
from ponder.config import TaskSpec
from ponder.tasks import get_task, load_examples
from ponder.tasks.gym import _dataset


@pytest.fixture(scope="module", autouse=True)
def stop_workers():
    yield
    verify_pool.shutdown()


def write(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def score(task, examples, completions):
    return accuracy(completions, prompts=[e["prompt"] for e in examples], answer=[e["answer"] for e in examples],
                    task=[task] * len(examples), **{k: [e.get(k) for e in examples] for k in ("gym_dataset", "gym_size", "gym_seed", "gym_index", "gym_config")})


def test_gsm8k_answer_follows_the_hashes(tmp_path):
    path = write(tmp_path, [{"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
                             "answer": "In May she sold 48/2 = 24.\nIn all 48+24 = 72.\n#### 72"},
                            {"question": "A big sum?", "answer": "Add.\n#### 1,234"}])
    rows = get_task("gsm8k").load(path=path)
    assert [(r["prompt"][:8], r["answer"], r["task"]) for r in rows] == [("Natalia ", "72", "gsm8k"), ("A big su", "1234", "gsm8k")]
    assert rows[0]["solution"].endswith("#### 72")
    assert score("gsm8k", rows, ["<answer>72</answer>", "<answer>1,234</answer>"]) == [1.0, 1.0]
    assert score("gsm8k", rows, ["<answer>24</answer>", "<answer>123</answer>"]) == [0.0, 0.0]


def test_gsm8k_row_without_hashes_is_a_user_error(tmp_path):
    path = write(tmp_path, [{"question": "q", "answer": "#### 1"}, {"question": "q2", "answer": "no final answer"}])
    with pytest.raises(UserError, match=r"data.jsonl:2: row has no final answer for task 'gsm8k' \(the answer field must end with '#### <number>'\)"):
        get_task("gsm8k").load(path=path)


def test_math_answer_is_the_last_box_or_the_answer_field(tmp_path):
    path = write(tmp_path, [{"problem": "Half of one?", "solution": "It is $\\boxed{\\frac{1}{2}}$."},
                            {"problem": "Roots?", "solution": "...", "answer": "\\{2, 3\\}"}])
    rows = get_task("math").load(path=path, n=2)
    assert [r["answer"] for r in rows] == ["\\frac{1}{2}", "\\{2, 3\\}"]
    assert score("math", rows, ["<answer>0.5</answer>", "<answer>3, 2</answer>"]) == [1.0, 1.0]
    assert score("math", rows, ["<answer>2</answer>", "<answer>2</answer>"]) == [0.0, 0.0]


def test_plain_takes_the_question_from_any_common_field(tmp_path):
    path = write(tmp_path, [{"prompt": "p?", "answer": 3}, {"question": "q?", "answer": "x=2"}, {"problem": "r?", "answer": "7"}])
    rows = get_task("plain").load(path=path)
    assert [(r["prompt"], r["answer"]) for r in rows] == [("p?", "3"), ("q?", "x=2"), ("r?", "7")]
    path = write(tmp_path, [{"text": "no question", "answer": "1"}], name="bad.jsonl")
    with pytest.raises(UserError, match=r"bad.jsonl:1: row has no question in any of the fields prompt, question, problem"):
        get_task("plain").load(path=path)
    with pytest.raises(UserError, match=r"task 'plain' needs a path"):
        get_task("plain").load()


def test_prompts_must_be_text_or_messages_and_answers_text_numbers_or_lists(tmp_path):
    """An empty `prompt` beside a `question` was taken (the model saw the template alone), a null one was said to be
    missing with the others; a prompt that was an object or a boolean reached the model as its Python repr, and an
    object answer became the gold "{'x': 1}"."""
    path = write(tmp_path, [{"prompt": "", "question": "What is 2+2?", "answer": "4"},
                            {"prompt": None, "problem": "3+4?", "answer": 7}], name="e.jsonl")
    assert [(r["prompt"], r["answer"]) for r in get_task("plain").load(path=path)] == [("What is 2+2?", "4"), ("3+4?", "7")]
    for rows, line in (([{"prompt": "2+2?", "answer": "4"}, {"prompt": {"question": "2+2?"}, "answer": "4"}],
                        "task 'jsonl' (PATH), example 2: a prompt must be text or chat messages, got dict \"{'question': '2+2?'}\""),
                       ([{"prompt": True, "answer": "4"}], "task 'jsonl' (PATH), example 1: a prompt must be text or chat "
                                                           "messages, got bool 'True'"),
                       ([{"prompt": "2+2?", "answer": {"x": 1}}], "PATH:1: an answer must be text, a number or a list of "
                                                                  "them, got an object \"{'x': 1}\"")):
        path = write(tmp_path, rows, name="odd.jsonl")
        with pytest.raises(UserError) as e:
            load_examples(TaskSpec(name="jsonl", path=str(path)), 0)
        assert str(e.value) == line.replace("PATH", str(path))


def test_a_task_weight_draws_that_share_of_its_examples():
    """weight x n examples of a task's n: the weight was rounded (1.4 counted as 1, 0.6 as 1), so a mix of 1.4 to 1
    drew the two tasks alike. The fraction is a seeded draw of distinct examples; below 1 it is a subset."""
    from ponder.tasks import load_examples, mix

    spec = lambda w: TaskSpec(name="arithmetic", n=10, weight=w)  # noqa: E731
    ex = load_examples(spec(1), 0)
    assert [len(mix([spec(w)], 0)) for w in (0.01, 0.3, 1, 1.4, 2.5, 3)] == [1, 3, 10, 14, 25, 30]
    rows = mix([spec(1.4)], 0)
    assert rows[:10] == ex and len({r["prompt"] for r in rows[10:]}) == 4 and all(r in ex for r in rows[10:])
    assert rows == mix([spec(1.4)], 0)  # seeded
    two = mix([spec(1.4), TaskSpec(name="countdown", n=10)], 0)
    assert sum(r["task"] == "arithmetic" for r in two) == 14 and sum(r["task"] == "countdown" for r in two) == 10


def test_reasoning_gym_by_name_scored_by_its_own_scorer():
    gym = get_task("reasoning_gym")
    train = gym.load("train", dataset="basic_arithmetic", size=40, seed=3)
    test = gym.load("test", dataset="basic_arithmetic", size=40, seed=3)
    assert len(train) == 40 and train[0]["task"] == "reasoning_gym"
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert gym.load("train", dataset="basic_arithmetic", size=40, seed=3) == train  # seeded
    ex = train[:3]
    right = [f"<think>compute</think> <answer>{e['answer']}</answer>" for e in ex]
    assert score("reasoning_gym", ex, right) == [1.0, 1.0, 1.0]
    # Tags are stripped before the library's scorer sees the answer (it would give partial credit otherwise).
    assert gym.verify(f"<answer>{ex[0]['answer']}</answer>", ex[0]) == 1.0
    assert score("reasoning_gym", ex[:1], ["<answer>not a number</answer>"]) == [0.0]


def test_a_small_reasoning_gym_test_set_leaves_out_every_question_of_a_default_train_set():
    """The size of a draw defaulted to n: a test set of 50 left out the questions of a train draw of 50, not of the
    1,000 trained on, and kept 24 of its 48 from those (a small question space: one-digit sums)."""
    opts = {"dataset": "basic_arithmetic", "min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    train = load_examples(TaskSpec(name="reasoning_gym", n=1000, options=opts), 0)
    test = load_examples(TaskSpec(name="reasoning_gym", split="test", n=50, options=opts), 0)
    assert len(train) == 1000 and test
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}


def test_a_reasoning_gym_train_draw_larger_than_the_default_needs_a_size_both_splits_share():
    """The size followed n on train: n 3,000 drew 3,000 questions while a test split of 200 left out those of a draw
    of 1,000 (88 of its questions were trained on). n past the size is now refused, naming options.size; with the
    size set on both splits, nothing overlaps. Sizes and seeds that are no whole numbers are one line too."""
    opts = {"dataset": "basic_arithmetic", "min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    with pytest.raises(UserError) as e:
        load_examples(TaskSpec(name="reasoning_gym", n=3000, options=opts), 0)
    assert str(e.value) == ("task 'reasoning_gym': n=3000 is more than the draw's size 1000; set data.tasks[].options.size to at least "
                            "3000, the same for the train and test splits of these options (the test split leaves out the "
                            "questions of the train draw of its size)")
    sized = {**opts, "size": 3000}
    train = load_examples(TaskSpec(name="reasoning_gym", n=3000, options=sized), 0)
    test = load_examples(TaskSpec(name="reasoning_gym", split="test", n=200, options=sized), 0)
    assert len(train) == 3000 and test and not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    with pytest.raises(UserError) as e:  # a typo drew a held-out set of its own
        load_examples(TaskSpec(name="reasoning_gym", split="tset", n=5, options=opts), 0)
    assert str(e.value) == "task 'reasoning_gym': unknown split 'tset'; choose one of: train, test, validation"
    for key, value in (("size", "ten"), ("size", 0), ("dataset_seed", 1.5)):
        with pytest.raises(UserError, match=rf"^task 'reasoning_gym': options.{key} must be a whole number"):
            load_examples(TaskSpec(name="reasoning_gym", n=5, options={**opts, key: value}), 0)


def test_reasoning_gym_options_its_asserts_reject_are_one_line():
    with pytest.raises(UserError) as e:
        load_examples(TaskSpec(name="reasoning_gym", n=5, options={"dataset": "basic_arithmetic", "min_terms": 9, "max_terms": 2}), 0)
    assert str(e.value) == ("task 'reasoning_gym': dataset 'basic_arithmetic' rejects its options (max_terms must be >= "
                            "min_terms); check data.tasks[].options")


def test_accuracy_of_a_row_without_a_gold_answer_is_none_whatever_was_answered():
    """docs/rewards.md: None means does not apply. A row with no gold scored None when it had an answer and 0 when it had
    none, which pulled the logged accuracy (the reward-hacking guardrail reads it) down for rows nobody can score."""
    out = accuracy(["no tags here", "<think>x</think> <answer>3</answer>", "<answer>3</answer>"], prompts=["p"] * 3,
                   answer=[None, None, "3"], task=["jsonl", "jsonl", "jsonl"])
    assert out == [None, None, 1.0]
    # a task that needs no gold (Countdown checks the numbers) still scores an unanswered completion 0
    assert accuracy(["no tags"], prompts=["p"], answer=[None], task=["countdown"], numbers=[[1, 2]], target=[3]) == [0.0]


def test_eval_problems_the_training_data_holds_are_named_at_start():
    from ponder.config import TaskSpec as Spec
    from ponder.rl.trainer import trained_on

    train = [{"prompt": p} for p in ("a", "b", [{"role": "user", "content": "c"}])]
    evals = [[{"prompt": "a"}, {"prompt": "z"}], [{"prompt": [{"content": "c", "role": "user"}]}], [{"prompt": "y"}]]
    specs = [Spec(name="jsonl", split="test"), Spec(name="gsm8k", split="test"), Spec(name="math", split="test")]
    assert trained_on(train, evals, specs) == [
        "ponder: eval task 'jsonl' (test): 1 of its 2 problems are in the training data too (the same prompt); its "
        "figures are not held out",
        "ponder: eval task 'gsm8k' (test): 1 of its 1 problems are in the training data too (the same prompt); its "
        "figures are not held out"]


def test_reasoning_gym_open_dataset_has_no_gold_and_is_scored_by_logic():
    gym = get_task("reasoning_gym")
    (ex,) = gym.load("train", dataset="propositional_logic", size=1, seed=0)
    assert ex["answer"] is None  # several conclusions are right; the library's scorer checks validity
    entry = _dataset(ex["gym_dataset"], ex["gym_size"], ex["gym_seed"], "{}")[ex["gym_index"]]
    conclusion = entry["metadata"]["example_answer"]  # one valid conclusion among many
    assert gym.verify(f"<think>derive</think><answer>{conclusion}</answer>", ex) == 1.0
    assert gym.verify("<answer>Z ∧ ¬Z</answer>", ex) == 0.0  # a variable the premises do not have


def test_reasoning_gym_unknown_dataset_is_a_user_error():
    with pytest.raises(UserError, match=r"^task 'reasoning_gym': Dataset 'no_such_set' not registered; known datasets: .*basic_arithmetic"):
        get_task("reasoning_gym").load(dataset="no_such_set", size=5)
    with pytest.raises(UserError, match=r"needs options.dataset"):
        get_task("reasoning_gym").load(size=5)


def test_review_of_the_tasks_fixes(tmp_path):
    """Found by a review of the tasks: a list option of a reasoning-gym dataset (YAML gives lists) broke its cache; a
    list answer of the plain task became its Python repr; a MATH solution's \\fbox was no answer; Countdown missed
    `(7 + 5) x 3`; a question mentioning an unclosed <think> tag counted as a prompt that opened one."""
    from ponder.rewards.extract import last_boxed
    from ponder.templates import opens_think

    rows = get_task("reasoning_gym").load("train", dataset="basic_arithmetic", size=5, seed=1, operators=["+", "-"])
    assert len(rows) == 5 and rows[0]["gym_config"] == {"operators": ["+", "-"]}
    assert get_task("reasoning_gym").verify(f"<answer>{rows[0]['answer']}</answer>", rows[0]) == 1.0

    path = write(tmp_path, [{"question": "roots?", "answer": [2, 3]}])
    row = get_task("plain").load(path=path)[0]
    assert row["answer"] == "2, 3" and get_task("plain").verify("2, 3", row) == 1.0

    assert last_boxed(r"so the answer is $\fbox{7}$.") == "7"
    ex = {"numbers": [7, 5, 3], "target": 36, "task": "countdown"}
    assert [get_task("countdown").verify(a, ex) for a in ("(7 + 5) x 3", "(7+5)X3", "3 x (7 + 5)")] == [1.0, 1.0, 1.0]
    assert not opens_think("Why does an unclosed <think> tag break a parser? Assistant:")
    assert opens_think("<|Assistant|><think>\n")


def test_code_tasks_keep_each_specs_sandbox_options_on_its_examples(tmp_path):
    """One task object serves every spec: the last load's options (unsafe included) ran every spec's programs."""
    path = write(tmp_path, [{"prompt": "add", "tests": "assert add(1, 2) == 3", "entry_point": "add"}])
    slow = get_task("code_jsonl").load(path=path, timeout=7.0)
    fast = get_task("code_jsonl").load(path=path, timeout=1.0)
    assert slow[0]["sandbox_options"]["timeout"] == 7.0 and fast[0]["sandbox_options"]["timeout"] == 1.0
    program = "```python\nimport time\ndef add(a, b):\n    time.sleep(1.5)\n    return a + b\n```"
    task = get_task("code_jsonl")
    assert (task.verify(program, slow[0]), task.verify(program, fast[0])) == (1.0, 0.0)
