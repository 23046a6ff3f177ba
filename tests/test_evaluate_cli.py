"""`ponder eval`: files written, their fields, the console table, --compare, and user errors."""

import argparse
import json
import shutil

import pytest

from ponder.errors import UserError
from ponder.evaluate import add_parser
from ponder.evaluation.command import _fmt


def ponder_eval(*argv):
    parser = argparse.ArgumentParser(prog="ponder")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", *argv])
    return args.func(args)


@pytest.fixture(scope="module")
def two_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    common = ["--model", "tiny-random", "--tasks", "first_digit", "--n", "3", "--k", "4", "--max-tokens", "5",
              "--template", "plain", "--extract", "none", "--quiet", "--device", "cpu"]
    ponder_eval(*common, "--greedy", "--out", str(root / "a"))
    ponder_eval(*common, "--seed", "1", "--temperature", "1.0", "--option", "digit=3", "--out", str(root / "b"))
    return root / "a", root / "b"


def test_eval_writes_results_and_samples(two_results, capsys):
    a, b = two_results
    res = json.loads((a / "results.json").read_text())
    assert res["model"] == "tiny-random" and res["device"] == "cpu" and res["dtype"] == "float32"
    for key, value in {"k": 4, "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 5, "greedy": True, "seed": 0,
                       "template": "plain", "extract": "none"}.items():
        assert res["settings"][key] == value, key
    assert res["task_specs"] == [{"label": "first_digit", "name": "first_digit", "path": None, "split": "test", "n": 3, "options": {}}]
    assert res["task_hash"].startswith("sha256:") and "samples" not in res
    figs = res["tasks"]["first_digit"]
    for key in ("pass@1", "pass@1_ci", "cons@4", "pass@2", "pass@4", "greedy", "format_rate", "mean_length",
                "truncation_rate", "reflection_rate", "answer_rate", "mean_score"):
        assert key in figs, key
    rows = [json.loads(line) for line in (a / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 4 + 3  # k samples and one greedy answer per problem
    assert set(rows[0]) >= {"task", "problem", "sample", "prompt", "gold", "completion", "answer", "score", "correct",
                            "format", "length", "finish_reason", "reflection", "voted"}
    sampled = [r for r in rows if not r["greedy"]]
    assert figs["pass@1"] == pytest.approx(sum(r["correct"] for r in sampled) / 12)
    # another digit is another problem set: the hash tells them apart
    res_b = json.loads((b / "results.json").read_text())
    assert res_b["task_specs"][0]["options"] == {"digit": 3} and res_b["task_hash"] != res["task_hash"]
    assert all(r["gold"] == "3" for r in map(json.loads, (b / "samples.jsonl").read_text().splitlines()))


def test_compare_lays_results_side_by_side(two_results, capsys):
    a, b = two_results
    assert ponder_eval("--compare", str(a), str(b / "results.json")) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "figure" in line)
    assert header.replace("┃", " ").split()[-2:] == ["a", "b"]
    settings_row = next(line for line in out.splitlines() if "sampling" in line)
    assert "k=4 T=0.6" in settings_row and "k=4 T=1.0" in settings_row
    figs_a = json.loads((a / "results.json").read_text())["tasks"]["first_digit"]
    figs_b = json.loads((b / "results.json").read_text())["tasks"]["first_digit"]
    length_row = next(line for line in out.splitlines() if "length (tokens)" in line)
    assert f"{figs_a['mean_length']:.1f}" in length_row and f"{figs_b['mean_length']:.1f}" in length_row
    greedy_row = next(line for line in out.splitlines() if "greedy" in line)
    assert greedy_row.rstrip(" │").endswith("-")  # b was run without --greedy
    assert "different problem sets" in out


def test_eval_user_errors(tmp_path):
    with pytest.raises(UserError, match="needs --model and --tasks"):
        ponder_eval("--model", "tiny-random")
    with pytest.raises(UserError, match="no results at"):
        ponder_eval("--compare", str(tmp_path / "missing"))
    with pytest.raises(UserError, match="not KEY=VALUE"):
        ponder_eval("--model", "tiny-random", "--tasks", "first_digit", "--option", "digit")
    with pytest.raises(UserError, match="unknown task 'first_digt'; did you mean 'first_digit'"):
        ponder_eval("--model", "tiny-random", "--tasks", "first_digt", "--quiet")


def test_file_tasks_are_reported_per_file(tmp_path, capsys):
    for name, answers in (("a", ["1", "2"]), ("b", ["3"])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}", "answer": a}) + "\n" for i, a in enumerate(answers)))
    out = tmp_path / "res"
    ponder_eval("--model", "tiny-random", "--tasks", f"jsonl:{tmp_path / 'a.jsonl'},jsonl:{tmp_path / 'b.jsonl'}", "--k", "2",
                "--max-tokens", "3", "--template", "plain", "--quiet", "--device", "cpu", "--out", str(out))
    res = json.loads((out / "results.json").read_text())
    assert [(t, f["problems"]) for t, f in res["tasks"].items()] == [(f"jsonl:{tmp_path / 'a.jsonl'}", 2), (f"jsonl:{tmp_path / 'b.jsonl'}", 1)]
    assert res["metrics"]["problems"] == 3 and [s["path"] for s in res["task_specs"]] == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    with pytest.raises(UserError, match="named twice"):
        ponder_eval("--model", "tiny-random", "--tasks", "first_digit,first_digit")


def test_a_task_of_ones_own_is_named_as_in_a_recipe(tmp_path):
    """`--tasks my_tasks.py:make`: the function's file and name, not NAME:PATH (there is no task 'my_tasks.py');
    a built-in's NAME:PATH keeps its meaning beside it."""
    (tmp_path / "my_tasks.py").write_text("def make(split, n, seed):\n"
                                          "    return [{'prompt': f'q{i}', 'answer': str(i)} for i in range(3)]\n")
    (tmp_path / "a.jsonl").write_text(json.dumps({"prompt": "q", "answer": "1"}) + "\n")
    out = tmp_path / "res"
    ponder_eval("--model", "tiny-random", "--tasks", f"{tmp_path / 'my_tasks.py'}:make,jsonl:{tmp_path / 'a.jsonl'}",
                "--k", "1", "--max-tokens", "2", "--template", "plain", "--quiet", "--device", "cpu", "--out", str(out))
    res = json.loads((out / "results.json").read_text())
    assert [f["problems"] for f in res["tasks"].values()] == [3, 1]


def test_compare_reads_a_runs_own_before_and_after_figures(two_results, tmp_path, capsys):
    """A training run's eval_before.json / eval_after.json (a result per task set) lay out beside ponder eval's
    results.json: a run directory is its before and after, and the run's figures share a row with ponder eval's
    on the same weights. The run keys its sets "first_digit/test", ponder eval its tasks "first_digit": they fell in
    rows of their own, and every such comparison was called one of different problem sets."""
    from ponder.cli import main

    assert main(["train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}", "name=run", "train.steps=1",
                 "rollout.prompts_per_step=2", "eval.tasks=[{name: first_digit, split: test, n: 3}]", "eval.k=4"]) == 0
    run = tmp_path / "run"
    # the run's evaluation, repeated by ponder eval with the recipe's settings (docs/evaluation.md)
    ponder_eval("--model", str(run / "checkpoints" / "step-1"), "--tasks", "first_digit", "--n", "3", "--k", "4",
                "--max-tokens", "4", "--template", "plain", "--extract", "none", "--stop", "--quiet", "--device", "cpu",
                "--out", str(tmp_path / "again"))
    capsys.readouterr()
    assert ponder_eval("--compare", str(run), str(tmp_path / "again")) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "figure" in line)
    assert header.replace("┃", " ").split()[-3:] == ["run/eval_before", "run/eval_after", "again"]
    after = json.loads((run / "eval_after.json").read_text())["first_digit/test"]["metrics"]
    again = json.loads((tmp_path / "again" / "results.json").read_text())["tasks"]["first_digit"]
    assert after == again  # the same answers, so the same figures
    for name, label in (("pass@1", "pass@1"), ("mean_length", "length (tokens)"), ("truncation_rate", "truncated")):
        row = next(line for line in out.splitlines() if f" {label} " in line).replace("│", " ").split()
        assert row[-2:] == [_fmt(name, after[name])] * 2, (name, row)  # in one row, after and again alike
    assert "first_digit/test" not in out and "different problem sets" not in out
    # a distill run's directory is its student's before and after (it was told that it evaluated nothing)
    distill = tmp_path / "distilled"
    (distill / "stages").mkdir(parents=True)
    shutil.copytree(run, distill / "student")
    capsys.readouterr()
    assert ponder_eval("--compare", str(distill), str(tmp_path / "again")) == 0
    told = capsys.readouterr().out
    header = next(line for line in told.splitlines() if "figure" in line)
    assert header.replace("┃", " ").split()[-3:] == ["student/eval_before", "student/eval_after", "again"]
    row = next(line for line in told.splitlines() if " pass@1 " in line).replace("│", " ").split()
    assert row[-2:] == [_fmt("pass@1", after["pass@1"])] * 2
    # a problem set of another digit is told apart, task by task
    capsys.readouterr()
    assert ponder_eval("--compare", str(run / "eval_after.json"), str(two_results[1])) == 0
    assert "different problem sets" in capsys.readouterr().out


@pytest.fixture
def no_sampling():
    """Engine "no-sampling": fails the test if anything is generated."""
    from ponder.rollout import RolloutEngine, register

    @register("no-sampling")
    class NoSampling(RolloutEngine):
        def __init__(self, model, tokenizer, **_):
            super().__init__(model, tokenizer)

        def generate(self, prompts, params):
            raise AssertionError("sampled, though the input was bad")

    return "no-sampling"


def test_bad_input_is_refused_before_sampling_and_earlier_results_are_kept(two_results, tmp_path, no_sampling, error_line):
    a, _ = two_results
    before = {p.name: p.read_bytes() for p in a.iterdir()}
    common = ["eval", "--model", "tiny-random", "--tasks", "first_digit", "--n", "2", "--k", "2", "--quiet", "--device", "cpu",
              "--engine", no_sampling]
    assert error_line(*common, "--out", str(a)) == (
        f"ponder: error: {a / 'results.json'} already exists; choose another --out, or delete it to evaluate again")
    assert {p.name: p.read_bytes() for p in a.iterdir()} == before
    assert error_line(*common, "--extract", "boxd", "--out", str(tmp_path / "new")) == (
        "ponder: error: --extract 'boxd' is not an answer extraction mode; choose one of: tags, boxed, tags_or_boxed, none")
    assert not (tmp_path / "new").exists()


def test_an_indexed_gpu_becomes_the_current_one_and_a_missing_one_is_named(monkeypatch):
    """Triton launches and CUDA graph captures go to the current GPU: `--device cuda:1` with cuda:0 current captured
    empty graphs over the model's tensors on cuda:1. The device is made current; one past those visible is named."""
    import torch

    from ponder.evaluation.command import _device

    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    assert _device("cuda:1") == torch.device("cuda", 1) and current == [torch.device("cuda", 1)]
    with pytest.raises(UserError, match=r"^--device cuda:2, but 2 CUDA GPUs are visible \(cuda:0 to cuda:1\)$"):
        _device("cuda:2")
    assert _device("cuda") == torch.device("cuda") and len(current) == 1  # unindexed: the current one as it is


def test_compare_names_a_training_run_that_evaluated_nothing(tmp_path):
    """A run without eval tasks has no eval_before.json / eval_after.json: --compare said to give a directory written
    by ponder eval, as if the run were not one."""
    from ponder.cli import main

    assert main(["train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}", "name=run", "train.steps=1",
                 "rollout.prompts_per_step=2"]) == 0
    run = tmp_path / "run"
    with pytest.raises(UserError) as e:
        ponder_eval("--compare", str(run))
    assert str(e.value) == (
        f"'{run}' is a training run without eval_before.json / eval_after.json: it evaluated nothing (its eval.tasks is "
        f"empty); evaluate one of its checkpoints with `ponder eval --model {run / 'checkpoints' / 'step-1'} --tasks ...` "
        "and compare that, or give a directory written by ponder eval")


@pytest.mark.parametrize("cut", [["--top-k", "1"], ["--min-p", "0.999"]])
def test_top_k_and_min_p_reach_the_samples_and_the_settings(tmp_path, cut, capsys):
    """--top-k 1, or --min-p just under 1, leaves one token at each step: every sample at temperature 1 is then the
    greedy answer (without either, tiny-random's samples differ). The settings name the cut, --compare shows it."""
    common = ["--model", "tiny-random", "--tasks", "first_digit", "--n", "3", "--k", "4", "--max-tokens", "5",
              "--template", "plain", "--extract", "none", "--quiet", "--device", "cpu", "--temperature", "1.0", "--greedy"]
    for name, extra in (("cut", cut), ("free", [])):
        ponder_eval(*common, *extra, "--out", str(tmp_path / name))
    for name in ("cut", "free"):
        rows = [json.loads(line) for line in (tmp_path / name / "samples.jsonl").read_text().splitlines()]
        greedy = {r["problem"]: r["completion"] for r in rows if r["greedy"]}
        same = [r["completion"] == greedy[r["problem"]] for r in rows if not r["greedy"]]
        assert all(same) if name == "cut" else not all(same), name
    settings = json.loads((tmp_path / "cut" / "results.json").read_text())["settings"]
    free = json.loads((tmp_path / "free" / "results.json").read_text())["settings"]
    key, value = cut[0][2:].replace("-", "_"), float(cut[1])
    assert settings[key] == value and key not in free
    capsys.readouterr()
    ponder_eval("--compare", str(tmp_path / "cut"), str(tmp_path / "free"))
    assert f"{key}={cut[1]}" in capsys.readouterr().out


def test_a_runs_evaluation_takes_eval_top_k_and_min_p(tmp_path):
    """eval.top_k and eval.min_p reach the evaluation `ponder train` runs (as --top-k and --min-p reach ponder eval's)."""
    from ponder.cli import main

    assert main(["train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}", "name=run", "train.steps=1",
                 "rollout.prompts_per_step=2", "eval.tasks=[{name: first_digit, split: test, n: 3}]", "eval.k=3",
                 "eval.top_k=1", "eval.min_p=0.2", "eval.temperature=1.0"]) == 0
    after = json.loads((tmp_path / "run" / "eval_after.json").read_text())["first_digit/test"]
    assert after["settings"]["top_k"] == 1 and after["settings"]["min_p"] == 0.2
    answers = {}
    for line in (tmp_path / "run" / "eval_after_samples.jsonl").read_text().splitlines():
        row = json.loads(line)
        answers.setdefault(row["problem"], set()).add(row["completion"])
    assert len(answers) == 3 and all(len(a) == 1 for a in answers.values())  # top-k 1: a problem's k samples agree


def test_a_task_mistake_on_the_command_line_gives_its_fix_as_flags(tmp_path, error_line):
    """ponder eval and ponder sample name their tasks with --tasks and --option: their lines gave a recipe's fix
    (`check data.tasks[].path`, `data.tasks: [{name: jsonl, path: my.jsonl}]`), which these commands do not read."""
    gone = tmp_path / "gone.jsonl"
    for command in (["eval"], ["sample", "--k", "1", "--out", str(tmp_path / "s.jsonl")]):
        line = error_line(*command, "--model", "tiny-random", "--tasks", f"jsonl:{gone}")
        assert line == f"ponder: error: data file '{gone}' not found; check the PATH of --tasks NAME:PATH"
        assert error_line(*command, "--model", "tiny-random", "--tasks", "gsm8k") == (
            "ponder: error: task 'gsm8k' needs a path: --tasks gsm8k:my.jsonl")
    # a sample recipe names its tasks `tasks`
    (tmp_path / "r.yaml").write_text(f"model: tiny-random\nk: 1\nout: {tmp_path / 'r.jsonl'}\ntasks: [{{name: jsonl}}]\n")
    assert error_line("sample", str(tmp_path / "r.yaml")) == (
        "ponder: error: task 'jsonl' needs a path: tasks: [{name: jsonl, path: my.jsonl}]")


RESULT = {"model": "m", "settings": {"k": 4, "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 5},
          "task_hash": "sha256:a", "task_hashes": {"arithmetic": "sha256:a"}, "metrics": {"problems": 3},
          "tasks": {"arithmetic": {"problems": 3, "pass@1": 0.5, "pass@1_ci": [0.1, 0.9], "pass@2": 0.6, "greedy": 0.5,
                                   "mean_length": 4.0}}}
SHAPE_FIX = (", as ponder eval writes it; give a results.json written by ponder eval, or a run's eval_before.json / "
             "eval_after.json")
TASKS = "'tasks' must be a mapping of task names to figures"


@pytest.mark.parametrize("content, told", [
    (json.dumps(RESULT | {"tasks": [1]}).encode(), f": {TASKS}{SHAPE_FIX}"),
    (json.dumps(RESULT | {"tasks": {"arithmetic": 5}}).encode(), f": {TASKS}{SHAPE_FIX}"),
    (json.dumps(RESULT | {"tasks": None}).encode(), f": {TASKS}{SHAPE_FIX}"),
    (json.dumps(RESULT | {"tasks": 5}).encode(), f": {TASKS}{SHAPE_FIX}"),
    (json.dumps(RESULT | {"settings": [1]}).encode(), f": 'settings' must be a mapping of sampling settings{SHAPE_FIX}"),
    (json.dumps(RESULT | {"task_hashes": [1]}).encode(), f": 'task_hashes' must be a mapping of task names to hashes{SHAPE_FIX}"),
    (json.dumps(RESULT | {"task_hash": [1]}).encode(), f": 'task_hash' must be a hash (text){SHAPE_FIX}"),
    # a run's eval_before.json / eval_after.json: a result per task set
    (b'{"arithmetic/test": {"metrics": 5}}',
     f": 'metrics' of 'arithmetic/test' must be a mapping of figure names to values{SHAPE_FIX}"),
    (b'{"arithmetic/test": {"metrics": {}, "tasks": [1]}}', f": 'tasks' of 'arithmetic/test' must be a mapping of task "
     f"names to figures{SHAPE_FIX}"),
    (b'{"model": "caf\xe9"}', ":1: not UTF-8 text (byte 0xe9); save the file as UTF-8"),
    (b'{"tasks": ' + b"1" * 5000 + b"}",
     ": not valid JSON (a number of more than 4,300 digits); give a results.json written by ponder eval"),
])
def test_compare_names_a_results_file_not_in_ponder_evals_shape(tmp_path, error_line, content, told):
    """A hand-edited results.json was a traceback (AttributeError, TypeError, UnicodeDecodeError): its shape is one line
    naming the file and the key."""
    (tmp_path / "good.json").write_text(json.dumps(RESULT))
    (tmp_path / "bad.json").write_bytes(content)
    assert error_line("eval", "--compare", str(tmp_path / "good.json"), str(tmp_path / "bad.json")) == (
        f"ponder: error: {tmp_path / 'bad.json'}{told}")


def test_compare_shows_a_figure_that_is_no_number_as_missing(tmp_path, capsys):
    """A figure of text, a CI that is no pair, an integer past a float's range and a pass@k named other than ponder eval
    names it were tracebacks (format code 'f', IndexError, OverflowError, int()): a figure is shown as "-", as one
    that is missing, and a name ponder eval does not write is not shown."""
    figures = RESULT["tasks"]["arithmetic"] | {"pass@1": "0.5", "pass@1_ci": [0.1], "greedy": True,
                                               "mean_length": 10 ** 400, "pass@3x": 0.5}
    (tmp_path / "good.json").write_text(json.dumps(RESULT))
    (tmp_path / "odd.json").write_text(json.dumps(RESULT | {"tasks": {"arithmetic": figures}}))
    assert ponder_eval("--compare", str(tmp_path / "good.json"), str(tmp_path / "odd.json")) == 0
    rows = [[c.strip() for c in line.split("│")[2:-1]] for line in capsys.readouterr().out.splitlines() if "│" in line]
    assert rows[2:] == [["problems", "3", "3"], ["pass@1", "0.500", "-"], ["pass@1 95% CI", "[0.100, 0.900]", "-"],
                        ["pass@2", "0.600", "0.600"], ["greedy", "0.500", "-"], ["length (tokens)", "4.0", "-"]]
