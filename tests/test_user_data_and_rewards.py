"""Users' own data and rewards: `datasets` sources (Parquet, save_to_disk) with a column mapping train,
rewards named by module or file are called with the right columns and logged under their own names, and
mistakes (a reward of the wrong shape, an unknown task option, a null answer) end in one exact line."""

import json
import sys
from dataclasses import replace
import textwrap
from pathlib import Path

import pytest

from ponder.config import TaskSpec, load_config
from ponder.errors import UserError
from ponder.tasks import load_examples

try:
    import datasets
except ImportError:  # the `hf` extra: only the tests of the hf task need it
    datasets = None
needs_datasets = pytest.mark.skipif(datasets is None, reason="needs the datasets library (pip install 'ponder[hf]')")
REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes/smoke-first-digit.yaml")
SMALL = ["rollout.prompts_per_step=4", "rollout.group_size=4", "train.steps=3", "train.save_every=0", "train.log_samples=1"]

# GSM8K-shaped rows under other column names: the question in `q`, the worked solution in `sol`.
ROWS = [{"q": f"Write a number #{i}:", "sol": f"seven hundred #### 7{i % 3},000", "level": i % 4, "src": "synthetic"} for i in range(40)]

REWARDS = textwrap.dedent("""
    import asyncio
    CALLS = []

    def seen_columns(completions, *, prompts, **columns):
        CALLS.append({"n": len(completions), "prompts": len(prompts), "columns": sorted(columns),
                      "answers": sorted(set(columns["answer"])), "levels": sorted(set(columns.get("level", [])))})
        return [len(c) / 10 for c in completions]

    async def batch_len(completions, *, prompts, scale=1.0, **columns):
        await asyncio.sleep(0)
        values = [scale * c.count("7") for c in completions]
        CALLS.append({"n": len(completions), "columns": sorted(columns), "values": values, "scale": scale})
        return values

    def one_value(completions, **_):
        return [1.0]

    def text_values(completions, **_):
        return ["high"] * len(completions)

    def huge(completions, **_):
        return [1e6 if i == 0 else -1e20 for i in range(len(completions))]

    def not_finite(completions, *, prompts, answer, **_):
        return [float("nan") if i == 1 else 0.0 for i in range(len(completions))]
""")


def _train(tmp_path, *overrides):
    from ponder.train import train

    cfg = load_config(RECIPE, [f"output_dir={tmp_path / 'runs'}", *SMALL, *overrides])
    trainer = train(cfg, stop_after=2)  # two steps of three: no final report (plots take seconds)
    metrics = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    return trainer, metrics


def _calls(ref):
    from ponder.plugins import load_function

    return load_function(ref, "reward").__globals__["CALLS"]


@needs_datasets
def test_parquet_file_trains_with_a_column_mapping_and_a_reward_from_a_module(tmp_path, monkeypatch):
    datasets.Dataset.from_list(ROWS).to_parquet(tmp_path / "gsm.parquet")
    (tmp_path / "mypkg_a").mkdir()
    (tmp_path / "mypkg_a/__init__.py").write_text("")
    (tmp_path / "mypkg_a/scores.py").write_text(REWARDS)
    monkeypatch.chdir(tmp_path)  # the module is found from the working directory
    task = ("data.tasks=[{name: hf, path: gsm.parquet, n: 12, options: {prompt: q, answer: sol, answer_format: gsm8k,"
            " filter: {level: [1, 2]}, metadata: [level]}}]")
    trainer, metrics = _train(tmp_path, task, "rewards.mypkg_a.scores:seen_columns=0.5")

    ex = trainer.examples
    assert len(ex) == 12 and {e["level"] for e in ex} == {1, 2}  # filtered, n rows taken
    assert ex[0] == {"level": 1, "sol": "seven hundred #### 71,000", "prompt": "Write a number #1:", "answer": "71000", "task": "hf"}
    calls = _calls("mypkg_a.scores:seen_columns")
    assert [c["n"] for c in calls] == [2, 16, 16]  # the start-up check, then the batch of each step (4 prompts x 4)
    assert all(c["prompts"] == c["n"] for c in calls)
    assert calls[-1]["columns"] == ["answer", "completion_length", "level", "sol", "task", "think_opened", "truncated"]
    assert set(calls[-1]["levels"]) <= {1, 2} and set(calls[-1]["answers"]) <= {"70000", "71000", "72000"}
    assert len(metrics) == 2 and all("reward/seen_columns" in m and "reward/accuracy" in m for m in metrics)
    assert not any(k.startswith("reward/mypkg") for m in metrics for k in m)


@needs_datasets
def test_save_to_disk_folder_trains_with_an_async_reward_from_a_file(tmp_path, monkeypatch):
    rows = [{"problem": r["q"], "solution": f"So it is $\\boxed{{7{i}}}$.", "kind": "a" if i % 2 else "b"} for i, r in enumerate(ROWS)]
    datasets.DatasetDict(train=datasets.Dataset.from_list(rows[:30]), test=datasets.Dataset.from_list(rows[30:])).save_to_disk(tmp_path / "saved")
    (tmp_path / "rw").mkdir()
    (tmp_path / "rw/my_rewards.py").write_text(REWARDS)
    monkeypatch.chdir(tmp_path)  # the file's relative path is from the working directory
    task = "data.tasks=[{name: hf, path: saved, split: test, options: {answer: solution, answer_format: boxed, filter: {kind: a}}}]"
    trainer, metrics = _train(tmp_path, task, "rewards.rw/my_rewards.py:batch_len={weight: 0.5, scale: 2}")

    assert [(e["prompt"], e["answer"], e["kind"]) for e in trainer.examples] == [(rows[i]["problem"], f"7{i}", "a") for i in (31, 33, 35, 37, 39)]
    calls = _calls("rw/my_rewards.py:batch_len")
    assert [c["n"] for c in calls] == [2, 16, 16] and "kind" in calls[-1]["columns"]
    for m, call in zip(metrics, calls[1:]):  # logged under the function's name: the mean of what it returned
        assert m["reward/batch_len"] == pytest.approx(sum(call["values"]) / 16)
    assert {c["scale"] for c in calls} == {2}  # the recipe's option reaches the function


@pytest.mark.parametrize("fn, line", [
    ("one_value", "ponder: error: reward 'bad.py:one_value' returned 1 value for 2 completions; it must return one value per completion"),
    ("text_values", "ponder: error: reward 'bad.py:text_values' returned 'high'; values must be numbers or None"),
])
def test_a_reward_of_the_wrong_shape_fails_at_start_up(tmp_path, monkeypatch, fn, line, error_line):
    (tmp_path / "bad.py").write_text(REWARDS)
    monkeypatch.chdir(tmp_path)
    assert error_line("train", RECIPE, f"output_dir={tmp_path}", f"rewards.bad.py:{fn}=1.0") == line
    assert not (tmp_path / "smoke-first-digit" / "metrics.jsonl").exists()  # stopped before the first step


def test_a_missing_reward_function_is_named(tmp_path, monkeypatch, error_line):
    (tmp_path / "bad.py").write_text(REWARDS)
    monkeypatch.chdir(tmp_path)
    assert error_line("train", RECIPE, f"output_dir={tmp_path}", "rewards.bad.py:seen=1.0") == (
        "ponder: error: reward 'bad.py:seen': bad.py has no 'seen'; it defines: batch_len, huge, not_finite, one_value, seen_columns, text_values")


def test_a_reward_file_that_does_not_parse_is_one_line(tmp_path, monkeypatch, error_line):
    (tmp_path / "typo.py").write_text("def r(completions, **_):\n    return [1.0 for c in completions\n")
    monkeypatch.chdir(tmp_path)
    assert error_line("train", RECIPE, f"output_dir={tmp_path}", "rewards.typo.py:r=1.0") == (
        "ponder: error: reward 'typo.py:r': typo.py:2: '[' was never closed; fix the file")
    # one that parses but fails as it is imported: a traceback before
    (tmp_path / "misspelt.py").write_text("import math\nimport sympyy\n\ndef r(completions, **_):\n    return [1.0]\n")
    (tmp_path / "top.py").write_text("SCALE = 2 * scael\n\ndef r(completions, **_):\n    return [1.0]\n")
    assert error_line("train", RECIPE, f"output_dir={tmp_path}", "rewards.misspelt.py:r=1.0") == (
        "ponder: error: reward 'misspelt.py:r': importing it raised ModuleNotFoundError at misspelt.py:2: No module named "
        "'sympyy'; fix the module (or install what it imports)")
    assert error_line("train", RECIPE, f"output_dir={tmp_path}", "rewards.top:r=1.0") == (
        "ponder: error: reward 'top:r': importing it raised NameError at top.py:1: name 'scael' is not defined; fix the "
        "module (or install what it imports)")


def test_unknown_task_option_names_the_closest(tmp_path, error_line):
    line = error_line("train", RECIPE, f"output_dir={tmp_path}", "data.tasks=[{name: first_digit, options: {digt: 3}}]")
    assert line == "ponder: error: task 'first_digit' has no option 'digt'; did you mean 'digit'? valid options: digit"
    line = error_line("train", RECIPE, f"output_dir={tmp_path}", f"eval.tasks=[{{name: jsonl, path: {tmp_path / 'held.jsonl'}}}]")
    assert line == f"ponder: error: data file '{tmp_path / 'held.jsonl'}' not found; check eval.tasks[].path"
    # a relative path is said to be read from the working directory; a directory is told as one
    line = error_line("train", RECIPE, f"output_dir={tmp_path}", "data.tasks=[{name: jsonl, path: data/held.jsonl}]")
    assert line == (f"ponder: error: data file 'data/held.jsonl' not found (relative paths are from the working directory, "
                    f"{Path.cwd()}); check data.tasks[].path")
    line = error_line("train", RECIPE, f"output_dir={tmp_path}", f"data.tasks=[{{name: jsonl, path: {tmp_path}}}]")
    assert line == f"ponder: error: data file '{tmp_path}' is a directory; give a JSONL file in data.tasks[].path"
    line = error_line("train", RECIPE, f"output_dir={tmp_path}", "seed=18446744073709551617")  # torch's overflow
    assert line == "ponder: error: config seed must be an integer of at most 63 bits (e.g. 0); got 18446744073709551617"
    line = error_line("train", RECIPE, f"output_dir={tmp_path}", "name=" + "n" * 300)  # was an OSError traceback
    assert line == (f"ponder: error: a file name is too long for this file system ({str(tmp_path / ('n' * 300))[:40]}..."
                    f"{'n' * 30}); choose a shorter name or output path")
    for name in ("a/../..", "../up", "/abs/run"):
        line = error_line("train", RECIPE, f"output_dir={tmp_path}", f"name={name}")
        assert line.startswith("ponder: error: config name must name the run's own directory under output_dir"), line
    line = error_line("eval", "--model", "tiny-random", "--tasks", "arithmetic", "--option", "difficulti=hard",
                       "--out", str(tmp_path / "ev"))
    assert line == ("ponder: error: task 'arithmetic' has no option 'difficulti'; did you mean 'difficulty'? "
                    "valid options: difficulty, operands, low, high")


@pytest.mark.parametrize("answer, what", [("null", "a null"), ("NaN", "a NaN"), ('"  "', "an empty"), ("[]", "an empty"),
                                          ('["", " "]', "an empty")])
def test_null_or_empty_answer_names_file_and_line(tmp_path, answer, what, error_line):
    data = tmp_path / "data.jsonl"
    data.write_text(f'{{"prompt": "1+1", "answer": "2"}}\n\n{{"prompt": "2+2", "answer": {answer}}}\n')
    line = error_line("train", RECIPE, f"output_dir={tmp_path}", f"data.tasks=[{{name: jsonl, path: {data}}}]")
    assert line == f"ponder: error: {data}:3: row has {what} 'answer' field; every row needs prompt, answer"


def test_a_list_answer_with_an_empty_part_names_file_line_and_item(tmp_path, error_line):
    """Its parts are joined by ", ": ["Paris", ""] was the gold "Paris, ", which no answer matches."""
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "Capital and country?", "answer": ["Paris", ""]}\n')
    line = error_line("train", RECIPE, f"output_dir={tmp_path}", f"data.tasks=[{{name: jsonl, path: {data}}}]")
    assert line == f"ponder: error: {data}:1: row's 'answer' list has an empty part (item 2); fill it in or remove it"


def test_a_file_with_a_bom_words_lists_as_answers_and_words_of_any_script_score(tmp_path):
    """Notepad and Excel start UTF-8 files with a BOM, which failed line 1 as invalid JSON; a list answer became its
    Python repr ("['a', 'b']"), which no answer matched; a gold word outside a-z (café, 東京) was no word and went
    unscored. Each row's right answer now scores 1, a wrong one 0."""
    from ponder.rewards import RewardSet
    from ponder.tasks import load_examples

    data = tmp_path / "data.jsonl"
    rows = [("Capital of Japan?", "東京", "大阪"), ("French for coffee?", "Café", "thé"), ("Two primes below 4?", ["2", "3"], "2, 5"),
            ("1+1?", 2, "3")]
    data.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps({"prompt": p, "answer": a}, ensure_ascii=False) + "\n"
                                            for p, a, _ in rows).encode("utf-8"))
    examples = load_examples(TaskSpec(name="jsonl", path=str(data)), 0)
    assert [e["answer"] for e in examples] == ["東京", "Café", "2, 3", "2"]
    right = [{"東京": "東京", "Café": "café", "2, 3": "2, 3"}.get(e["answer"], e["answer"]) for e in examples]
    reward = RewardSet({"accuracy": 1.0})
    for answers, want in ((right, 1.0), ([w for _, _, w in rows], 0.0)):
        totals, _ = reward.score([f"<think>x</think> <answer>{a}</answer>" for a in answers], [e["prompt"] for e in examples],
                                 {"answer": [e["answer"] for e in examples], "task": ["jsonl"] * 4})
        assert totals == [want] * 4


@needs_datasets
def test_a_local_dataset_repository_reads_the_config_asked_for(tmp_path):
    """A folder as `hf download --repo-type dataset --local-dir` writes it, with configs default and main: `config:
    main` read the default config's rows (and an unknown config read them too)."""
    repo = tmp_path / "repo"
    for config, split, rows in (("data", "train", ROWS[:4]), ("data", "test", ROWS[4:6]), ("main", "train", ROWS[6:9])):
        (repo / config).mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_list(rows).to_parquet(repo / config / f"{split}-00000-of-00001.parquet")
    (repo / "README.md").write_text(textwrap.dedent("""\
        ---
        configs:
        - config_name: default
          data_files:
          - {split: train, path: data/train-*}
          - {split: test, path: data/test-*}
        - config_name: main
          data_files:
          - {split: train, path: main/train-*}
        ---
    """))
    spec = lambda **o: TaskSpec(name="hf", path=str(repo), options={"prompt": "q", "answer": "sol", "answer_format": "gsm8k", **o})
    assert [e["prompt"] for e in load_examples(spec(config="main"), 0)] == [r["q"] for r in ROWS[6:9]]
    assert [e["prompt"] for e in load_examples(spec(), 0)] == [r["q"] for r in ROWS[:4]]
    with pytest.raises(UserError, match=f"^task 'hf': {repo} has no split 'test'; its splits: train$"):
        load_examples(replace(spec(config="main"), split="test"), 0)
    with pytest.raises(UserError, match=f"^task 'hf': {repo} could not be read \\(ValueError: .*no_such"):
        load_examples(spec(config="no_such"), 0)


@needs_datasets
@pytest.mark.parametrize("name, content, line", [
    ("broken.jsonl", '{"q": "a", "sol": "#### 1"}\n{not json\n', "could not be read (ArrowInvalid: JSON parse error"),
    ("empty.jsonl", "", "holds no rows"),
    ("ragged.csv", "q,sol\na,#### 1\nb,#### 2,extra\n", "could not be read (ParserError: Error tokenizing data"),
    ("short.parquet", "PA", "could not be read (ArrowInvalid: Parquet file size is 2 bytes"),
    ("empty_folder", None, "could not be read (EmptyDatasetError:"),
])
def test_a_local_data_file_the_libraries_cannot_read_is_one_line(tmp_path, name, content, line):
    path = tmp_path / name
    path.mkdir() if content is None else path.write_text(content)
    with pytest.raises(UserError) as e:
        load_examples(TaskSpec(name="hf", path=str(path), options={"prompt": "q", "answer": "sol", "answer_format": "gsm8k"}), 0)
    assert str(e.value).startswith(f"task 'hf': {path} {line}") and "\n" not in str(e.value)


@needs_datasets
@pytest.mark.parametrize("answer, what", [(None, "a null"), (" ", "an empty"), (float("nan"), "a NaN")])
def test_null_answer_in_a_dataset_names_the_row(tmp_path, answer, what):
    """(A column of numbers with a missing one, as pandas writes it: NaN, whose text "nan" was the gold answer.)"""
    rows = [{"question": "1+1", "answer": 2.0 if isinstance(answer, float) else "2"}, {"question": "2+2", "answer": answer}]
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "d.parquet")
    with pytest.raises(UserError) as e:
        load_examples(TaskSpec(name="hf", path=str(tmp_path / "d.parquet")))
    assert str(e.value) == (f"{tmp_path / 'd.parquet'}: row 2 has {what} 'answer' column; "
                            "every row needs an answer (fix the data, or filter the row out)")


@needs_datasets
@pytest.mark.parametrize("prompt, value, line", [
    (None, float("nan"), "row 2 has a NaN prompt ('x')"),
    ("Add {x} and {y}.", None, "row 2 has a null 'y' column, which the prompt template fills (fix the data, or filter the row out)"),
    ("Add {x} and {y}.", float("nan"), "row 2 has a NaN 'y' column, which the prompt template fills (fix the data, or filter the row out)"),
])
def test_a_missing_value_in_a_prompts_columns_names_the_row(tmp_path, prompt, value, line):
    """Missing values (null, or NaN as pandas writes them) would reach the model as the text "None" or "nan"."""
    rows = [{"x": 1.5, "y": 2.0, "answer": "3.5"}, {"x": value if prompt is None else 1.0, "y": value, "answer": "3"}]
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "d.parquet")
    options = {"prompt": prompt or "x"}
    with pytest.raises(UserError) as e:
        load_examples(TaskSpec(name="hf", path=str(tmp_path / "d.parquet"), options=options))
    assert str(e.value) == f"{tmp_path / 'd.parquet'}: {line}"


def test_without_datasets_the_error_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(UserError) as e:
        load_examples(TaskSpec(name="hf", path=str(tmp_path / "d.parquet")))
    assert str(e.value) == "task 'hf' needs the datasets library: pip install 'ponder[hf]' (or pip install datasets)"


def test_a_custom_task_is_a_function_that_yields_examples(tmp_path, monkeypatch):
    (tmp_path / "my_tasks.py").write_text(textwrap.dedent("""
        def sums(split, n, seed, top=9):
            for i in range(1000):
                yield {"prompt": f"{i % top} + 1 =", "answer": i % top + 1, "split": split}
    """))
    monkeypatch.chdir(tmp_path)
    rows = load_examples(TaskSpec(name="my_tasks.py:sums", n=3, split="test", options={"top": 2}))
    assert rows == [{"prompt": "0 + 1 =", "answer": "1", "split": "test", "task": "my_tasks.py:sums"},
                    {"prompt": "1 + 1 =", "answer": "2", "split": "test", "task": "my_tasks.py:sums"},
                    {"prompt": "0 + 1 =", "answer": "1", "split": "test", "task": "my_tasks.py:sums"}]
    from ponder.tasks import verify

    assert verify(rows[1], "2.0") == 1.0
    with pytest.raises(UserError) as e:
        load_examples(TaskSpec(name="my_tasks.py:sums", options={"tpo": 2}))
    assert str(e.value) == "task 'my_tasks.py:sums' has no option 'tpo'; did you mean 'top'? valid options: top"


def test_a_custom_task_that_fails_or_lacks_an_option_is_one_line(tmp_path, monkeypatch):
    """As for a reward of one's own: the exception and where it was raised (while called or while yielding), and an
    option the function requires that the recipe does not give, instead of the user's traceback."""
    (tmp_path / "t.py").write_text(textwrap.dedent("""
        def boom(split="train"):
            raise ValueError("no data")

        def needs(level, split="train"):
            return [{"prompt": "x", "answer": level}]

        def later(split="train"):
            yield {"prompt": "x", "answer": 1}
            raise KeyError("k")

        def blank(split="train"):
            return [{"prompt": "x", "answer": 1}, {"prompt": "  ", "answer": 2}]
    """))
    monkeypatch.chdir(tmp_path)
    messages = {}
    for name in ("boom", "needs", "later", "blank"):
        with pytest.raises(UserError) as e:
            load_examples(TaskSpec(name=f"t.py:{name}"))
        messages[name] = str(e.value)
    assert messages == {
        "boom": "task 't.py:boom' raised ValueError at t.py:3: no data",
        "needs": "task 't.py:needs' needs option 'level': give it in the recipe, data.tasks: [{name: 't.py:needs', "
                 "options: {level: ...}}]",
        "later": "task 't.py:later' raised KeyError at t.py:10: 'k'",
        "blank": "task 't.py:blank': example 2 has an empty prompt ('  '); every example needs one"}
    assert load_examples(TaskSpec(name="t.py:needs", options={"level": 3}))[0]["answer"] == "3"


@needs_datasets
def test_a_csv_prompt_template_keeps_latex_braces(tmp_path):
    """A template's `\\frac{1}{2}` or `\\boxed{}` went to str.format: "no column '1'" or a ValueError traceback. Only
    `{column}` is filled now; other braces are text, `{{x}}` a literal {x}. A CSV's columns show with its first rows:
    its default prompt column (question) was looked for before them, as 'prompt'."""
    data = tmp_path / "d.csv"
    data.write_text("question,answer\nWhat is \\frac{1}{2} + 1?,3/2\nHalf of {4}?,2\n")
    template = "{question} Put it in \\boxed{}, e.g. \\frac{1}{2} or {1, 2} or {{x}}{"
    rows = load_examples(TaskSpec(name="hf", path=str(data), options={"prompt": template}))
    assert [r["prompt"] for r in rows] == [
        "What is \\frac{1}{2} + 1? Put it in \\boxed{}, e.g. \\frac{1}{2} or {1, 2} or {x}{",
        "Half of {4}? Put it in \\boxed{}, e.g. \\frac{1}{2} or {1, 2} or {x}{"]
    assert [r["prompt"] for r in load_examples(TaskSpec(name="hf", path=str(data)))] == ["What is \\frac{1}{2} + 1?", "Half of {4}?"]


@needs_datasets
@pytest.mark.parametrize("template, prompt", [
    ("{question} in \\text{cm}", "Half of 4? in \\text{cm}"),
    ("{question} as \\frac{a}{b}, \\mathrm{d}x, x^{n}, a_{ij}, \\sqrt[3]{x}", "Half of 4? as \\frac{a}{b}, \\mathrm{d}x, x^{n}, a_{ij}, \\sqrt[3]{x}"),
    ("{question} Put it in \\boxed{answer}", "Half of 4? Put it in \\boxed{answer}"),
    ("{question}{hint}", "Half of 4?halve it"),  # a filled column's brace starts no LaTeX argument
    ("{question}\\n{hint}", "Half of 4?\\nhalve it"),  # "\n" as single-quoted YAML keeps it: no LaTeX command
    # a real newline (double-quoted YAML) after a line ending in a group: the next line's {hint} is a column (the
    # pattern's end of text matched before a final newline, so {hint} reached every prompt as text)
    ("{question}\nPut it within \\boxed{}\n{hint}", "Half of 4?\nPut it within \\boxed{}\nhalve it"),
    ("Typeset with \\LaTeX\n{question}", "Typeset with \\LaTeX\nHalf of 4?"),
    ("Reply as {answer: <number>} to {question}", "Reply as {answer: <number>} to Half of 4?"),  # no field: text
])
def test_a_brace_group_after_a_latex_command_is_text(tmp_path, template, prompt):
    """`\\text{cm}`, `\\frac{a}{b}`, `\\mathrm{d}x` were refused as a column 'cm', 'a' or 'd' that is missing, and
    `\\boxed{answer}` as giving the answer away: the group after a LaTeX command, `^`, `_` or another group is text."""
    data = tmp_path / "d.csv"
    data.write_text("question,hint,answer\nHalf of 4?,halve it,2\n")
    assert load_examples(TaskSpec(name="hf", path=str(data), options={"prompt": template}))[0]["prompt"] == prompt


@needs_datasets
@pytest.mark.parametrize("template, line", [
    ("{qestion} as \\frac{a}{b}", "task 'hf': the prompt template names '{qestion}', but {path} has no column 'qestion' "
                                  "(its columns: question, answer); for braces in the text write {{qestion}}"),
    ("{question} in {answer}", "task 'hf': the prompt template puts the answer column '{answer}' in the prompt, "
                               "giving the answer away; for braces in the text write {{answer}}"),
    # each of these gave every row the same literal prompt
    ("{ question }", "task 'hf': the prompt template's '{ question }' fills nothing, as only a plain {column} is filled: "
                     "write {question} (no spaces inside), or {{ question }} for braces in the text"),
    ("{question!r}", "task 'hf': the prompt template's '{question!r}' fills nothing, as only a plain {column} is filled: "
                     "write {question} (no conversion or format spec such as !r or :>5), or {{question!r}} for braces in the text"),
    ("{question:>5}", "task 'hf': the prompt template's '{question:>5}' fills nothing, as only a plain {column} is filled: "
                      "write {question} (no conversion or format spec such as !r or :>5), or {{question:>5}} for braces in the text"),
    ("Solve \\boxed{question}", "task 'hf': the prompt template 'Solve \\boxed{question}' fills no column, so every row would "
                                "get the same prompt; write a free-standing {column} (after a LaTeX command, ^, _ or } braces "
                                "are text); the columns of {path}: question, answer"),
])
def test_a_prompt_template_naming_no_column_is_one_line(tmp_path, error_line, template, line):
    data = tmp_path / "d.csv"
    data.write_text("question,answer\nHalf of 4?,2\n")
    task = f"data.tasks=[{{name: hf, path: {data}, options: {{prompt: '{template}'}}}}]"
    assert error_line("train", RECIPE, f"output_dir={tmp_path}", task) == "ponder: error: " + line.replace("{path}", str(data))


def test_a_column_named_like_a_builtin_rewards_option_leaves_the_option_alone():
    """Rows with an `n` or `extract` column (a count of operands, say) reached repetition's n and accuracy's extract:
    each stopped on a list ("n must be a positive integer, got [5, 5]", "unknown answer extraction mode"). A
    built-in's options are the recipe's or its defaults; the columns it reads (answer, task, language's target)
    still reach it."""
    from ponder.rewards import RewardSet

    rewards = RewardSet({"repetition": 1.0, "accuracy": 1.0, "language": 1.0})
    completions = ["<think>so go so go so go so go</think> <answer>7</answer>", "<think>二加五</think> <answer>6</answer>"]
    columns = {"answer": ["7", "7"], "task": ["jsonl", "jsonl"], "target": ["en", "zh"]}
    plain = rewards.score(completions, ["3+4"] * 2, columns)
    assert plain[1] == {"repetition": [pytest.approx(-2 / 7), 0.0], "accuracy": [1.0, 0.0], "language": [1.0, 1.0]}
    assert rewards.score(completions, ["3+4"] * 2, {**columns, "n": [5, 5], "extract": ["none", "none"]}) == plain
    set_n = RewardSet({"repetition": {"weight": 1.0, "n": 2}})  # the recipe's option is the one used
    assert set_n.score(completions, ["3+4"] * 2, {**columns, "n": [5, 5]})[1] == {"repetition": [-0.375, 0.0]}


def test_a_reward_registered_by_name_reads_its_columns_as_one_of_its_own():
    """register() is how plugins add rewards by name, as the built-ins do. The clash rule took every reward named
    without a colon for a built-in whose parameters are options, so such a reward's `answer` (no default) never
    reached it ("missing a required argument: 'answer'"), and a column clashing with its option went unseen."""
    from ponder.rewards import REWARDS, RewardSet, register

    @register("plugin_exact")
    def exact(completions, *, prompts, answer, strict=False, **_):
        return [float(c.strip() == a) for c, a in zip(completions, answer)]

    @register("plugin_declared", columns=("answer",))  # a column it reads, whatever its default
    def declared(completions, *, prompts, answer="", **_):
        return [float(c.strip() == a) for c, a in zip(completions, answer)]

    @register("plugin_boom")
    def boom(completions, *, prompts, **_):
        return [{}["missing"] for _ in completions]

    try:
        rewards = RewardSet({"plugin_exact": 1.0})
        assert rewards.score(["7", "8"], ["3+4"] * 2, {"answer": ["7", "7"]})[1] == {"plugin_exact": [1.0, 0.0]}
        with pytest.raises(UserError, match=r"^reward 'plugin_exact': its option 'strict' \(default False\) has the name of a column"):
            rewards.check_columns({"answer", "strict"})
        assert RewardSet({"plugin_declared": 1.0}).score(["7"], ["3+4"], {"answer": ["7"]})[1] == {"plugin_declared": [1.0]}
        with pytest.raises(UserError, match=r"^reward 'plugin_boom' raised KeyError"):  # one line, as for module:fn
            RewardSet({"plugin_boom": 1.0}).score(["7"], ["3+4"], {"answer": ["7"]})
    finally:
        for name in ("plugin_exact", "plugin_declared", "plugin_boom"):
            del REWARDS[name]


STRICT = textwrap.dedent("""
    def strict_len(completions, *, prompts, strict=False, level=None, **_):
        return [float(len(c) < 3 or not strict) + (lv or 0) for c, lv in zip(completions, level or [None] * len(completions))]
""")


def test_a_column_named_like_an_option_of_ones_own_reward_is_refused_at_start(tmp_path, monkeypatch):
    """A `strict` column silently took the place of strict=False (a list of False is truthy). Such a clash is refused
    before the first step, even where the first example lacks the column; set in the recipe, the option wins; a
    parameter with a default of None (`level`) reads its column. Told before the model loads (minutes for a large one)."""
    from ponder import models
    from ponder.rewards import RewardSet
    from ponder.train import train

    def no_model(*_, **__):
        raise AssertionError("the model was loaded before the data's columns were checked")

    monkeypatch.setattr(models, "load_trainable", no_model)
    (tmp_path / "mine.py").write_text(STRICT)
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1", "answer": "2", "strict": false, "level": 1}\n')
    tasks = f"data.tasks=[{{name: first_digit, n: 4}}, {{name: jsonl, path: {data}}}]"  # the first example has no strict
    cfg = load_config(RECIPE, [f"output_dir={tmp_path / 'runs'}", *SMALL, tasks, "rewards.mine.py:strict_len=1.0"])
    with pytest.raises(UserError) as e:
        train(cfg, stop_after=1)
    assert str(e.value) == ("reward 'mine.py:strict_len': its option 'strict' (default False) has the name of a column of the "
                            "data, whose values would take its place; set it under the reward (recipe: rewards: {mine.py:"
                            "strict_len: {weight: 1.0, strict: <value>}}; command line: rewards.mine.py:strict_len.strict=<value>), "
                            "or rename the parameter (one without a default, or with None, reads the column)")
    assert not (tmp_path / "runs" / "smoke-first-digit").exists()  # nothing written
    # the fix the line names works as written: the reward's name holds dots, and rewards.mine.py:strict_len.strict=...
    # named a reward 'mine.py:strict_len.strict'; now the name ends at the first dot after the function's
    told = load_config(RECIPE, [f"output_dir={tmp_path / 'runs'}", *SMALL, tasks, "rewards.mine.py:strict_len=1.0",
                                "rewards.mine.py:strict_len.strict=true"])
    assert told.rewards["mine.py:strict_len"] == {"weight": 1.0, "strict": True}
    RewardSet(told.rewards).check_columns({"answer", "task", "strict", "level"})
    set_in_recipe = RewardSet({"mine.py:strict_len": {"weight": 1.0, "strict": False}})
    _, per_fn = set_in_recipe.score(["abcd", "ab"], ["1+1"] * 2, {"answer": ["2", "2"], "strict": [True, True], "level": [1, 2]})
    assert per_fn == {"strict_len": [2.0, 3.0]}


CUT = textwrap.dedent("""
    def short_unless_cut(completions, *, prompts, truncated=False, completion_length=None, think_opened=False, **_):
        return [0.0 if t else 1.0 for t in (truncated or [False] * len(completions))]
""")


def test_a_reward_of_ones_own_may_default_the_columns_ponder_passes(tmp_path, monkeypatch):
    """`truncated=False` was refused at start-up as an option clashing with "a column of the data": ponder passes
    truncated, completion_length and think_opened for every completion, so they are columns whatever the default."""
    from ponder import models
    from ponder.rewards import RewardSet
    from ponder.train import train

    class Loading(Exception):
        pass

    def loading(*_, **__):
        raise Loading  # every check before the model loads has passed

    monkeypatch.setattr(models, "load_trainable", loading)
    (tmp_path / "mine.py").write_text(CUT)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(RECIPE, [f"output_dir={tmp_path / 'runs'}", *SMALL, "rewards.mine.py:short_unless_cut=1.0"])
    with pytest.raises(Loading):
        train(cfg, stop_after=1)
    columns = {"answer": ["2", "2"], "completion_length": [3, 9], "truncated": [False, True], "think_opened": [False, False]}
    assert RewardSet({"mine.py:short_unless_cut": 1.0}).score(["a", "b"], ["1+1"] * 2, columns)[1] == {"short_unless_cut": [1.0, 0.0]}


def test_a_column_that_only_some_tasks_have_reaches_the_reward_at_every_step(tmp_path, monkeypatch):
    """Each step passed the columns of its own batch: a reward reading `difficulty`, which one task's rows lack, failed
    ("missing a required argument") at the first batch without such rows, hours into a run; and with the tasks the other
    way round start-up refused it. Every step now passes every column of the data, None where a row has none."""
    for name, extra in (("a.jsonl", {"difficulty": "easy"}), ("b.jsonl", {})):
        (tmp_path / name).write_text("".join(json.dumps({"prompt": f"Write a number #{i}{name[0]}:", "answer": "7", **extra}) + "\n"
                                             for i in range(8)))
    (tmp_path / "by_level.py").write_text(textwrap.dedent("""
        SEEN = []

        def by_difficulty(completions, *, prompts, difficulty, **_):
            SEEN.append(list(difficulty))
            return [1.0 if d == "easy" else 0.0 for d in difficulty]
    """))
    monkeypatch.chdir(tmp_path)
    tasks = "data.tasks=[{name: jsonl, path: b.jsonl, weight: 3}, {name: jsonl, path: a.jsonl}]"
    trainer, metrics = _train(tmp_path, tasks, "rollout.prompts_per_step=1", "rewards={by_level.py:by_difficulty: 1.0}")
    from ponder.plugins import load_function

    seen = load_function("by_level.py:by_difficulty", "reward").__globals__["SEEN"]
    assert len(metrics) == 2
    steps = seen[1:]  # (the first call is the start-up check)
    assert len(steps) == 2 and any(all(d is None for d in call) for call in steps)  # a batch without the column ran


def test_an_eval_task_holding_training_problems_is_named_at_start(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Write a number #{i}:", "answer": "7"}) + "\n" for i in range(6)))
    _train(tmp_path, f"data.tasks=[{{name: jsonl, path: {data}}}]", f"eval.tasks=[{{name: jsonl, path: {data}, split: test}}]")
    assert ("ponder: eval task 'jsonl' (test): 6 of its 6 problems are in the training data too (the same prompt); its "
            "figures are not held out") in capsys.readouterr().err


def test_a_file_shorter_than_its_n_and_a_step_longer_than_the_data_are_named_at_start(tmp_path, capsys):
    """Both allowed (a file of a few rows, to try a setup) but silent: a run's figures were over fewer examples than its
    n asked for, and its steps drew prompts twice."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Write a number #{i}:", "answer": "7"}) + "\n" for i in range(3)))
    _train(tmp_path, f"data.tasks=[{{name: jsonl, path: {data}, n: 50}}]", "rollout.prompts_per_step=4")
    err = capsys.readouterr().err
    assert (f"ponder: task 'jsonl' ({data}) holds 3 examples for split 'train', fewer than its n=50: all 3 are "
            "used") in err
    assert ("ponder: rollout.prompts_per_step=4 is more than the run's 3 training prompts (data.tasks, weights "
            "applied): each step draws some of them more than once") in err
    _train(tmp_path, f"data.tasks=[{{name: jsonl, path: {data}, n: 3}}]", "rollout.prompts_per_step=2")
    err = capsys.readouterr().err
    assert "fewer than" not in err and "more than the run's" not in err


def test_greedy_rollouts_are_named_at_start_as_learning_nothing(tmp_path, capsys):
    """Allowed (0 means greedy), but every group's answers are alike: the run went to its end with no gradient."""
    _, metrics = _train(tmp_path, "rollout.temperature=0")
    assert ("ponder: rollout.temperature=0 decodes greedily: a prompt's 4 answers are alike, so every group's rewards "
            "are equal and GRPO learns nothing; sample with a temperature above 0 (R1-Zero: 1.0)") in capsys.readouterr().err
    assert all(m["zero_var_groups_frac"] == 1.0 for m in metrics)


def test_a_start_over_drops_the_evaluations_of_the_attempt_before(tmp_path, capsys):
    """A run that saved nothing, started again under its name without eval tasks: report.html showed the first
    attempt's held-out figures as this run's."""
    run = tmp_path / "runs" / "smoke-first-digit"
    run.mkdir(parents=True)
    (run / "eval_before.json").write_text(json.dumps({"first_digit/test": {"pass@1": 0.5}}))
    (run / "metrics.jsonl").write_text('{"step": 1, "reward": 0.5}\n{"step": 2, "reward": 0.6}\n')
    trainer, metrics = _train(tmp_path)
    assert not (run / "eval_before.json").exists() and trainer.run_dir == run
    assert [m["step"] for m in metrics] == [1, 2] and all("time" in m for m in metrics)  # this attempt's rows alone
    assert (f"ponder: {run} holds an earlier attempt's 2 logged steps and no checkpoint to resume from: starting over, "
            "they are replaced") in capsys.readouterr().err  # (replaced without a word)


def test_a_reward_of_nan_or_inf_is_one_line_naming_the_example(tmp_path, monkeypatch, error_line):
    """NaN was taken for "does not apply" unseen (DESIGN: that is None), and inf went into the group's mean and every
    advantage. Either is one line naming the function, the value and the example."""
    from ponder.rewards import RewardSet

    (tmp_path / "bad.py").write_text(REWARDS)
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "3+4=", "answer": "7"}\n')
    line = error_line("train", RECIPE, f"output_dir={tmp_path}", f"data.tasks=[{{name: jsonl, path: {data}}}]",
                      "rewards.bad.py:not_finite=1.0")
    assert line == ("ponder: error: reward 'bad.py:not_finite' returned nan for completion 2 of the batch (prompt '3+4=', "
                    "answer '7'); a reward must be a finite number of at most 1e+06 in size, or None where it does not apply")
    huge = RewardSet({"bad.py:huge": 1.0})  # (1e39: every advantage overflowed float32, the guardrail blamed the lr)
    with pytest.raises(UserError, match=r"^reward 'bad.py:huge' returned -1e\+20 for completion 2 of the batch \(prompt "
                                        r"'3\+4=', answer '7'\); a reward must be a finite number of at most 1e\+06 in size"):
        huge.score(["a", "b"], ["3+4=", "3+4="], {"answer": ["7", "7"], "task": ["jsonl"] * 2})
    assert RewardSet({"bad.py:huge": 1.0}).score(["a"], ["3+4="], {"answer": ["7"], "task": ["jsonl"]})
    shaped = RewardSet({"cosine_length": {"weight": 1.0, "max_len": 8, "exceed": float("-inf")}})
    with pytest.raises(UserError, match=r"^reward 'cosine_length' returned -inf for completion 1 of the batch \(prompt "
                                        r"\[\{'role': 'user', 'content': 'long'\}\], answer '7'\); a reward must be a finite"):
        shaped.score(["x" * 9], [[{"role": "user", "content": "long"}]], {"answer": ["7"], "task": ["jsonl"],
                                                                         "completion_length": [9], "truncated": [True]})


@pytest.mark.parametrize("template", ["plain", "r1_zero"])
def test_chat_messages_without_a_user_turn_are_one_line(tmp_path, error_line, template):
    """A text template shows the last user turn: with none, StopIteration's traceback (the chat template's case:
    tests/test_chat_templates.py)."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "3+4", "answer": "7"}\n{"prompt": [{"role": "system", "content": "Be brief."}], "answer": "7"}\n')
    line = error_line("train", RECIPE, f"output_dir={tmp_path}", f"data.template={template}", f"data.tasks=[{{name: jsonl, path: {data}}}]")
    assert line == (f"ponder: error: task 'jsonl' ({data}), example 2: the prompt's chat messages have no user turn (roles: system); "
                    'add a {"role": "user", "content": ...} message holding the question')
    data.write_text('{"prompt": "3+4", "answer": "7"}\n{"prompt": [{"role": "user", "content": " \\n "}], "answer": "7"}\n')
    line = error_line("train", RECIPE, f"output_dir={tmp_path}", f"data.template={template}", f"data.tasks=[{{name: jsonl, path: {data}}}]")
    assert line == (f"ponder: error: task 'jsonl' ({data}), example 2: the prompt's user turns are empty (or spaces only); "
                    "give the question as their content")  # (taken, where a text prompt of spaces was refused)


def test_sft_prompts_without_a_user_turn_are_one_line(tmp_path):
    from ponder.sft.data import encode, read_rows
    from ponder.models.tiny import char_tokenizer

    data = tmp_path / "sft.jsonl"
    data.write_text('{"prompt": [{"role": "system", "content": "Be brief."}], "completion": "7"}\n')
    with pytest.raises(UserError) as e:
        read_rows([str(data)])
    assert str(e.value) == (f"{data}:1: the prompt's chat messages have no user turn (roles: system); "
                            'add a {"role": "user", "content": ...} message holding the question')
    row = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "7"}]}
    with pytest.raises(UserError) as e:
        encode(row, char_tokenizer(), "r1_zero")
    assert str(e.value) == ("a messages row under data.template=r1_zero needs a user turn before the assistant's "
                            "(roles: system, assistant); add one, or use data.template=chat")


@needs_datasets
def test_hf_column_options_of_the_wrong_kind_are_one_line_and_one_metadata_column_may_be_named_alone(tmp_path):
    """A number for `prompt`, a list for `filter` or `answer`, a mapping as a filter value: TypeError or AttributeError
    tracebacks from the rows. `metadata: level` (one name, not a list) was read letter by letter ("no column 'l'")."""
    datasets.Dataset.from_list(ROWS).to_parquet(tmp_path / "gsm.parquet")
    base = {"prompt": "q", "answer": "sol", "answer_format": "gsm8k"}
    load = lambda **o: load_examples(TaskSpec(name="hf", path=str(tmp_path / "gsm.parquet"), n=2, options={**base, **o}))  # noqa: E731
    rows = load(metadata="level")
    assert [r["level"] for r in rows] == [0, 1] and "src" not in rows[0]
    for options, line in (({"prompt": 5}, "prompt must be a column name or a template with {column} fields, got 5"),
                          ({"answer": ["sol"]}, "answer must be a column name, got ['sol']"),
                          ({"metadata": [1]}, "metadata must be a list of column names, got [1]"),
                          ({"filter": ["level"]}, "filter must map columns to a value or a list of values, e.g. "
                                                  "{level: [1, 2]}; got ['level']"),
                          ({"filter": {"level": {"a": 1}}}, "filter must map columns to a value or a list of values, e.g. "
                                                            "{level: [1, 2]}; got {'level': {'a': 1}}"),
                          ({"streaming": "no"}, "streaming must be true or false, got 'no'")):
        with pytest.raises(UserError) as e:
            load(**options)
        assert str(e.value) == f"task 'hf': {line}"


def test_max_prompt_tokens_leaves_out_long_prompts_and_says_how_many(tmp_path, smoke_cfg, error_line, capsys):
    """data.max_prompt_tokens (verl's filter_overlong_prompts): a data set with a few very long questions needed
    cleaning by hand, or stopped the run at its position check."""
    from ponder.rl.trainer import GRPOTrainer
    from ponder.templates import encoded_prompt

    rows = ["1+1", "2+2", "3" * 200, "4+4" * 30]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "answer": "2"}) + "\n" for p in rows))
    task = f"data.tasks=[{{name: jsonl, path: {path}}}]"
    t = GRPOTrainer(smoke_cfg("name=all", task, "rollout.prompts_per_step=2"))
    lengths = [len(encoded_prompt("plain", p, t.tokenizer)[0]) for p in rows]
    assert lengths == [3, 3, 200, 90]  # the smoke recipe's plain template, one token a character
    t = GRPOTrainer(smoke_cfg("name=some", task, "rollout.prompts_per_step=2", "data.max_prompt_tokens=90"))
    assert [ex["prompt"] for ex in t.examples] == ["1+1", "2+2", "4+4" * 30]
    assert ("ponder: data.max_prompt_tokens=90: 1 of 4 training prompts are longer under the plain template (the longest "
            "200 tokens) and are left out") in t.start_notices
    capsys.readouterr()
    assert error_line("train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}", task, "data.max_prompt_tokens=2") == (
        "ponder: error: data.max_prompt_tokens=2 leaves no prompt: the shortest has 3 tokens under the plain template; "
        "raise it, or unset it")
