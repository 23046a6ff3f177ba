"""`ponder report`: embedded plots, early/late completions with think and answer set apart, escaping,
the before/after table, gracefully missing data, and the one-line error for a directory that is no run."""

import errno
import html
import json
import os
import re

import pytest

from ponder.cli import main
from ponder.report import completion_html, series, write_report

IMG = "<img alt='"
EMBEDDED = re.compile(r"<img alt='([^']*)' src='data:image/png;base64,[A-Za-z0-9+/=]{200,}'>")
EARLY = "<think>5 + 3 = 8 <script>alert('x')</script> & so</think> <answer>8</answer>"
LATE = "<think>7 * 6 = 42, wait, check: 6 * 7 = 42</think> <answer>42</answer>"


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _train_row(step):
    return {
        "step": step, "time": 1000.0 + 2 * step, "reward": step / 40, "reward/accuracy": step / 40,
        "reward/format": 1.0, "accuracy": step / 40, "format_rate": 1.0, "completion_len/mean": 10.0 + step,
        "completion_len/max": 20.0 + step, "reflection_rate": 0.1, "kl": 0.0, "entropy": 2.0 - step / 40,
        "clip_low_frac": 0.0, "clip_high_frac": 0.0, "zero_var_groups_frac": 0.5, "time/generate": 1.0,
        "time/reward": 0.1, "time/train": 0.5, "time/total": 1.6,
        # a mix of tasks: each one's own curves (they were logged, and no panel drew them)
        "accuracy/arithmetic": step / 30, "accuracy/countdown": step / 60, "completion_len/arithmetic": 8.0 + step,
        "completion_len/countdown": 14.0 + step, "reflection_rate/countdown": step / 80, "mixing_rate": 0.0,
    }


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "zero-demo"
    run.mkdir()
    rows = [_train_row(s) for s in range(1, 41)]
    rows[2]["reward"] = None  # a NaN step, written as null
    rows.insert(20, {"step": 20, "time": 1041.0, "eval/arithmetic/test/pass@1": 0.5, "eval/arithmetic/test/k": 4,
                     "eval/arithmetic/test/format_rate": 0.9, "eval/arithmetic/test/mean_length": 30.0})
    rows.append({"step": 40, "time": 1090.0, "eval/arithmetic/test/pass@1": 0.8, "eval/arithmetic/test/k": 4,
                 "eval/arithmetic/test/format_rate": 1.0, "eval/arithmetic/test/mean_length": 40.0})
    _write_jsonl(run / "metrics.jsonl", rows)
    samples = [{"step": 1, "prompt": "What is 5 + 3?", "answer": "8", "completion": EARLY, "reward": 2.0,
                "rewards": {"accuracy": 1.0, "format": 1.0}},
               {"step": 1, "prompt": "What is 1 + 1?", "answer": "2", "completion": "3 <b>", "reward": 0.0,
                "rewards": {"accuracy": 0.0, "format": 0.0}},
               {"step": 20, "prompt": "middle", "answer": "0", "completion": "MIDDLE OF THE RUN", "reward": 0.0},
               {"step": 40, "prompt": "What is 7 * 6?", "answer": "42", "completion": LATE, "reward": 2.0,
                "rewards": {"accuracy": 1.0, "format": 1.0}}]
    _write_jsonl(run / "samples.jsonl", samples)
    (run / "config.yaml").write_text("name: zero-demo\nnote: '<i>raw</i>'\nalgorithm:\n  beta: 0.0\n")
    before = {"arithmetic/test": {"settings": {"k": 4}, "tasks": {}, "metrics": {"problems": 50, "pass@1": 0.25,
              "pass@1_ci": [0.2, 0.3], "format_rate": 0.5, "mean_length": 12.0}}}
    (run / "eval_before.json").write_text(json.dumps(before))
    (run / "eval_after.json").write_text(json.dumps({"arithmetic/test": {"pass@1": 0.8, "format_rate": 1.0, "mean_length": 40.0}}))
    return run


@pytest.fixture(scope="module")
def page(run_dir):  # drawn once: plotting is the slow part
    path = write_report(run_dir)
    assert path == run_dir / "report.html"
    return path.read_text(encoding="utf-8")


def test_report_embeds_one_png_per_panel_with_data(page):
    titles = EMBEDDED.findall(page)
    assert page.count(IMG) == len(titles)  # every image is embedded, none linked
    assert titles == [
        "reward (total and per reward function)", "accuracy and format rate", "completion length (tokens)",
        "reflection-word rate", "accuracy per task", "completion length per task (tokens)", "reflection-word rate per task",
        "entropy (nats per token)", "zero-variance groups (no signal)", "seconds per step",
        "held-out arithmetic/test: accuracy", "held-out arithmetic/test: rates", "held-out arithmetic/test: other figures",
    ]
    # KL and clipping are 0 at every step (beta = 0, one update per batch): no plot, a note instead
    assert ("0 at every step, not plotted: language mixing rate (mixing_rate); KL to the reference (kl); clipped token "
            "share (clip_low_frac, clip_high_frac)") in page
    assert "40 steps (last: 40)" in page and "1.5 min from first to last log line" in page
    assert "accuracy 0.025 &rarr; 1.000" in page
    assert "src=\"http" not in page and "src='http" not in page and "<link" not in page


def test_series_drop_nulls_keep_eval_lines_and_start_evaluations_at_step_0(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    data = series(rows, json.loads((run_dir / "eval_before.json").read_text()))
    steps, values = data["reward"]
    assert 3 not in steps and len(steps) == 39 and values[:2] == [1 / 40, 2 / 40]
    assert data["eval/arithmetic/test/pass@1"] == ([0, 20, 40], [0.25, 0.5, 0.8])
    assert data["completion_len/max"][1][-1] == 60.0
    assert "eval/arithmetic/test/pass@1_ci" not in data and "time" not in data


def test_early_and_late_completions_side_by_side_with_think_and_answer_apart(page):
    assert "<th>early (step 1)</th><th>late (step 40)</th>" in page
    assert "MIDDLE OF THE RUN" not in page
    first_row = page.split("<table class='samples'>")[1].split("</tr>")[1]
    early_cell, late_cell = first_row.split("</td><td>")
    assert "What is 5 + 3?" in early_cell and "What is 7 * 6?" in late_cell
    think, answer = EARLY.split(" <answer>")
    assert f"<pre class='think'>{html.escape(think)}</pre><pre class='answer'>{html.escape('<answer>' + answer)}</pre>" in early_cell
    assert "<pre class='answer'>&lt;answer&gt;42&lt;/answer&gt;</pre>" in late_cell
    assert "<pre class='other'>3 &lt;b&gt;</pre>" in page  # an untagged completion is shown whole
    assert "reward 2.000 (accuracy 1.000, format 1.000)" in early_cell


def test_html_in_completions_and_config_is_escaped(page):
    assert "<script" not in page and "<b>" not in page and "<i>raw" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; so" in page
    assert "<pre class='config'>name: zero-demo\nnote: &#x27;&lt;i&gt;raw&lt;/i&gt;&#x27;" in page


def test_completion_split_when_the_prompt_opened_the_think_block():
    out = completion_html("let me see</think> <answer>4</answer>")
    assert out == "<pre class='think'>let me see&lt;/think&gt;</pre><pre class='answer'>&lt;answer&gt;4&lt;/answer&gt;</pre>"
    # a completion cut off inside its thinking: the open block is still the thinking
    assert completion_html("<think>1 + 1 = 2, and") == "<pre class='think'>&lt;think&gt;1 + 1 = 2, and</pre>"


def test_before_after_table(page):
    table = page.split("before / after training</h2>")[1].split("</table>")[0]
    assert "<tr><th>arithmetic/test</th><th>before</th><th>after</th><th>change</th></tr>" in table
    assert "<tr><td>pass@1</td><td>0.250</td><td>0.800</td><td>+0.550</td></tr>" in table
    assert "<tr><td>mean_length</td><td>12.0</td><td>40.0</td><td>+28.0</td></tr>" in table
    assert "problems" not in table and "pass@1_ci" not in table


def _bare_run(root):
    run = root / "bare"
    run.mkdir()
    _write_jsonl(run / "metrics.jsonl", [{"step": s, "time": 0.0, "reward": s * 0.1, "kl": None} for s in (1, 2, 3)])
    return run


def test_minimal_run_and_out_path(tmp_path):
    run = _bare_run(tmp_path)
    path = write_report(run, tmp_path / "out" / "r.html")
    page = path.read_text(encoding="utf-8")
    assert path == tmp_path / "out" / "r.html" and not (run / "report.html").exists()
    assert EMBEDDED.findall(page) == ["reward (total and per reward function)"]
    assert "Completions" not in page and "before / after" not in page and "Config" not in page
    (run / "metrics.jsonl").write_text("")  # a run killed before its first step
    assert "No steps logged yet." in write_report(run).read_text(encoding="utf-8")
    # lines that are JSON but no row, or not UTF-8 (a disk's damage), are left out as a half line is (AttributeError,
    # UnicodeDecodeError before)
    (run / "metrics.jsonl").write_bytes(b'[1, 2]\n"text"\n\xff\xfe\n{"step": 1, "reward": 0.5}\n')
    (run / "samples.jsonl").write_text("[]\n")
    assert EMBEDDED.findall(write_report(run).read_text(encoding="utf-8")) == ["reward (total and per reward function)"]


def test_out_may_be_a_directory_and_one_step_still_draws_its_time_split(tmp_path, monkeypatch):
    """--out DIR stopped in IsADirectoryError and left DIR.tmp behind; a one-step run's stacked time split had no
    width, so the panel showed its legend alone."""
    from matplotlib.axes import Axes

    run = tmp_path / "one"
    run.mkdir()
    _write_jsonl(run / "metrics.jsonl", [{"step": 1, "time": 0.0, "reward": 0.5, "time/generate": 1.0, "time/reward": 0.1,
                                          "time/train": 0.5}])
    drawn, bar = [], Axes.bar
    monkeypatch.setattr(Axes, "bar", lambda ax, x, height, **kw: drawn.append((list(height), kw.get("bottom"))) or bar(ax, x, height, **kw))
    (tmp_path / "out").mkdir()
    assert write_report(run, tmp_path / "out") == tmp_path / "out" / "report.html"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "out"]  # no stray .tmp
    assert drawn == [([1.0], 0.0), ([0.1], 1.0), ([0.5], 1.1)]


def test_figures_too_large_to_plot_are_left_out_of_the_plots_and_shown_short(tmp_path):
    """A blown-up run's 1e308 was a matplotlib traceback (its axis cannot be laid out) and 309 digits in a table."""
    from ponder.report import _fmt

    run = tmp_path / "huge"
    run.mkdir()
    _write_jsonl(run / "metrics.jsonl", [{"step": s, "time": 0.0, "reward": s * 0.1, "kl": 1e308 * (-1) ** s}
                                         for s in (1, 2, 3)])
    page = write_report(run).read_text(encoding="utf-8")
    assert EMBEDDED.findall(page) == ["reward (total and per reward function)"]
    assert series([{"step": 1, "kl": 1e100, "grad_norm": 1.1e100}]) == {"kl": ([1], [1e100])}
    assert (_fmt(1e308), _fmt(-2.5e6, sign=True), _fmt(999999.0), _fmt(0.25)) == ("1e+308", "-2.5e+06", "999999.0", "0.250")


@pytest.mark.parametrize("code,line", [
    (errno.EPERM, "{} cannot be written (operation not permitted: immutable?); fix it, or choose another output path"),
    (errno.ENOSPC, "no space left on the device to write {}; free some, or choose another output path"),
])
def test_a_file_the_file_system_refuses_is_one_line_and_leaves_no_sibling(tmp_path, error_line, monkeypatch, code, line):
    """An immutable report.html (chattr +i) or a full disk was an OSError traceback, and write_atomic's sibling
    (report.html.tmp) stayed behind; the line names the file meant, not the sibling."""
    import ponder.files

    run = _bare_run(tmp_path)
    real = os.replace

    def refuse(src, dst):
        if str(dst).endswith("report.html"):
            raise OSError(code, os.strerror(code), str(src), None, str(dst))
        return real(src, dst)

    monkeypatch.setattr(ponder.files.os, "replace", refuse)
    assert error_line("report", str(run)) == "ponder: error: " + line.format(run / "report.html")
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]


def test_cli_writes_report_and_prints_path(tmp_path, capsys):
    run = _bare_run(tmp_path)
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out == f"{run / 'report.html'}\n"
    assert EMBEDDED.findall((run / "report.html").read_text(encoding="utf-8")) == ["reward (total and per reward function)"]


def test_cli_rejects_a_directory_that_is_no_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"ponder: error: no metrics.jsonl in {tmp_path}; is it a run directory?\n"


def test_the_console_prints_names_with_brackets_as_they_are(tmp_path, capsys):
    """Rich read `[...]` in printed text as a style and dropped it: a run named like a sweep (`sweep[lr=3e-3]`) got
    a report path that does not exist, and the evaluation lines lost their `[before]` / `[after]`."""
    from ponder.cli import main

    assert main(["train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}", "name=sweep[lr=3e-3]",
                 "train.steps=1", "rollout.prompts_per_step=4", "rollout.group_size=4",
                 "eval.tasks=[{name: first_digit, split: test, n: 4}]", "eval.k=1"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"report: {tmp_path / 'sweep[lr=3e-3]' / 'report.html'}" in out
    assert (tmp_path / "sweep[lr=3e-3]" / "report.html").is_file()
    assert "(4 problems, k=1) [before]" in out and "(4 problems, k=1) [after]" in out


def test_a_guardrails_example_is_not_shown_as_a_training_completion(tmp_path):
    """samples.jsonl holds, beside a step's completions, the example completion of each guardrail that fired ({guardrail,
    message, completion}); the report took them for completions of the step: no prompt, "gold answer: None", and
    neither the guardrail nor its message shown. The guardrails table shows the example, with its message."""
    import json

    run = _bare_run(tmp_path)
    rows = [{"step": 1, "prompt": "3+4", "answer": "7", "completion": "<answer>7</answer>", "reward": 1.0},
            {"step": 1, "guardrail": "repetition", "message": "a line repeats", "completion": "7\n7\n7\n7"}]
    (run / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    page = write_report(run).read_text(encoding="utf-8")
    completions = page[page.index("<h2>Completions</h2>"):]
    assert "3+4" in completions and "7\n7\n7\n7" not in completions and "gold answer: None" not in completions


@pytest.mark.parametrize("name, added, shown", [
    # metrics.jsonl: a row without a step to plot it at is left out (KeyError, unhashable list before), as are
    # guardrail events that are no list (not iterable) and an integer past a float's range (OverflowError)
    ("metrics.jsonl", b'{"time": 9.0, "reward": 0.9}\n', "3 steps (last: 3)"),
    ("metrics.jsonl", b'{"step": [4], "reward": 0.9}\n', "3 steps (last: 3)"),
    ("metrics.jsonl", b'{"step": 4, "guardrail_events": 5}\n', "4 steps (last: 4)"),
    ("metrics.jsonl", b'{"step": 4, "reward": 1' + b"0" * 500 + b"}\n", "4 steps (last: 4)"),
    # samples.jsonl: a prompt that is no chat shown as it is, rewards that are no mapping left out (AttributeError)
    ("samples.jsonl", b'{"step": 1, "prompt": [1, 2], "completion": "c"}\n', "<div class='prompt'>[1, 2]</div>"),
    ("samples.jsonl", b'{"step": 1, "prompt": "p", "reward": 1.0, "rewards": [1]}\n', "reward 1.000</div>"),
    # evaluations: a figure past a float's range left out (OverflowError), bytes that are not UTF-8 read as U+FFFD
    ("eval_before.json", b'{"arithmetic/test": {"pass@1": 1' + b"0" * 500 + b', "format_rate": 0.5}}',
     "<tr><th>arithmetic/test</th><th>before</th><th>after</th><th>change</th></tr>"
     "<tr><td>format_rate</td><td>0.500</td><td>-</td><td>-</td></tr></table>"),
    ("eval_after.json", b'{"arithmetic/test": {"pass@1": 0.8, "note": "caf\xe9"}}',
     "<tr><td>pass@1</td><td>-</td><td>0.800</td><td>-</td></tr>"),
    ("config.yaml", b"name: caf\xe9\n", "<pre class='config'>name: caf\ufffd\n</pre>"),
])
def test_a_hand_edited_or_damaged_file_does_not_stop_the_report(tmp_path, name, added, shown):
    """Odd contents of a run directory were tracebacks; what cannot be read is left out, as a half-written line is."""
    run = _bare_run(tmp_path)
    with open(run / name, "ab") as f:
        f.write(added)
    page = write_report(run).read_text(encoding="utf-8")
    assert shown in page
    assert EMBEDDED.findall(page)[0] == "reward (total and per reward function)" and "Guardrails fired" not in page

    # JSON past int()'s 4,300 digits is a ValueError, not a JSONDecodeError: the file is left out, as a half-written one
    (run / "eval_after.json").write_text('{"arithmetic/test": {"pass@1": ' + "1" * 5000 + "}}", encoding="utf-8")
    (run / "eval_before.json").unlink(missing_ok=True)
    assert "before / after" not in write_report(run).read_text(encoding="utf-8")


def test_out_refuses_a_file_that_is_not_a_report(tmp_path, error_line):
    """write_atomic renames the report over --out: `--out RUN/metrics.jsonl` replaced the run's metrics with HTML, a
    checkpoint's weights the same, and as root `--out /dev/full` the device with a file. An earlier report is
    written over."""
    import os

    run = _bare_run(tmp_path)
    (run / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    os.mkfifo(run / "fifo")
    for out in (run / "metrics.jsonl", run / "model.safetensors", run / "fifo"):
        before = out.read_bytes() if out.is_file() else None
        assert error_line("report", str(run), "--out", str(out)) == (
            f"ponder: error: --out '{out}' exists and is not a report ponder wrote (it would be replaced); choose a new "
            "file, or an earlier report to write over")
        assert (out.read_bytes() if out.is_file() else None) == before and (out.is_fifo() or out.is_file())
    assert not (run / "report.html").exists()
    earlier = write_report(run, tmp_path / "r.html")
    earlier.write_text(earlier.read_text(encoding="utf-8").replace("bare", "earlier"), encoding="utf-8")
    assert write_report(run, earlier) == earlier and "earlier" not in earlier.read_text(encoding="utf-8")
