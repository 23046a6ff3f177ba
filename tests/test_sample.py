"""Rejection sampling: every filter rejects what it must and keeps what it must; the command's outputs."""

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from ponder.config import TaskSpec
from ponder.filters import Candidate, FilterConfig, first_failure, jaccard, max_ngram_count, select, shingles

GOOD = "<think> 23 + 45 = 68. 68 - 17 = 51. So the result is 51. </think> <answer> 51 </answer>"


def cand(text=GOOD, tokens=None, truncated=False, score=1.0):
    return Candidate(text, len(text) if tokens is None else tokens, truncated, score)


def reason(c, **cfg):
    return first_failure(c, FilterConfig(**cfg))


def test_a_good_answer_passes_every_filter():
    assert reason(cand()) is None


def test_truncated_answers_are_rejected_unless_kept_on_purpose():
    assert reason(cand(truncated=True)) == "truncated"
    assert reason(cand(truncated=True), keep_truncated=True) is None


def test_length_bounds_are_inclusive():
    assert reason(cand(tokens=10), min_tokens=10, max_tokens=20) is None
    assert reason(cand(tokens=20), min_tokens=10, max_tokens=20) is None
    assert reason(cand(tokens=9), min_tokens=10) == "length"
    assert reason(cand(tokens=21), max_tokens=20) == "length"


@pytest.mark.parametrize("text", [
    "51", "<answer> 51 </answer>", "<think> x </think>", "<think> a </think> <answer> 5 </answer> <answer> 6 </answer>",
    "<think> a <think> b </think> <answer> 5 </answer>", "so <think> a </think> <answer> 5 </answer>",
])
def test_format_rejects_anything_but_one_think_then_one_answer(text):
    assert reason(cand(text)) == "format"
    assert reason(cand(text), format=False) is None


def test_correctness_needs_full_marks_from_the_verifier():
    assert reason(cand(score=0.0)) == "correct"
    assert reason(cand(score=0.5)) == "correct"
    assert reason(cand(score=None)) == "correct"  # not scorable is not verified
    assert reason(cand(score=0.0), correct=False) is None


def test_language_rejects_mixed_thinking_and_keeps_math_only_thinking():
    mixed = "<think> 我们 先 计算 这个 then we add the numbers </think> <answer> 51 </answer>"
    assert reason(cand(mixed)) == "language"
    assert reason(cand(mixed), language=None) is None
    math_only = "<think> 23 + 45 = 68, 68 - 17 = 51 </think> <answer> 51 </answer>"
    assert reason(cand(math_only)) is None  # no words: nothing to mix
    chinese = "<think> 我们 先 计算 加法 </think> <answer> 51 </answer>"
    assert reason(cand(chinese), language="zh") is None
    assert reason(cand(chinese)) == "language"
    # the answer block does not count, only the thinking
    assert reason(cand("<think> add them up </think> <answer> 五十一 </answer>")) is None


def test_one_word_of_another_script_is_mixing_as_evaluation_counts_it():
    """R1 filtered mixed-language outputs; `ponder eval`'s mixing rate counts any Han character in English thinking.
    At the old 0.95 share, 38 English words and one Han character passed the filter that evaluation calls mixed."""
    from ponder.rewards.language import is_mixed

    text = "<think> " + "we add the two numbers and check the sum " * 4 + "和 so the result is fifty one </think> <answer> 51 </answer>"
    assert is_mixed(text)
    assert reason(cand(text)) == "language"
    assert reason(cand(text), language_min=0.95, ngram_max_count=0) is None


def test_code_blocks_in_the_thinking_of_a_problem_that_is_not_code_are_rejected():
    fenced = "<think> ```python\nprint(23 + 45 - 17)\n``` prints 51 </think> <answer> 51 </answer>"
    assert reason(cand(fenced)) == "code_block"
    assert reason(cand(fenced), code_blocks=False) is None
    coding = Candidate(fenced, 40, False, 1.0, code_task=True)  # a problem with tests: code is the point
    assert reason(coding) is None
    assert reason(cand(fenced.replace("</think> <answer> 51", "</think> <answer> ```51```"))) == "code_block"  # (thinking only)
    assert reason(cand("<think> 23 + 45 = 68 </think> <answer> `51` </answer>")) is None


def test_a_paragraph_of_more_than_max_paragraph_words_is_rejected():
    words = " ".join(["add"] * 300)
    one = f"<think> {words} {words} </think> <answer> 51 </answer>"  # one paragraph of 605 words (tags included)
    two = f"<think> {words}\n\n{words} </think> <answer> 51 </answer>"
    assert reason(cand(one), ngram_max_count=0) == "long_paragraph"
    assert reason(cand(two), ngram_max_count=0) is None
    assert reason(cand(one), ngram_max_count=0, max_paragraph_words=None) is None
    assert reason(cand(one), ngram_max_count=0, max_paragraph_words=605) is None
    assert reason(cand(one), ngram_max_count=0, max_paragraph_words=604) == "long_paragraph"


def test_repeated_phrases_are_rejected():
    loop = "<think> " + "12 + 3 = 15. " * 3 + "</think> <answer> 15 </answer>"
    assert max_ngram_count(loop, 8) == 2
    assert reason(cand(loop)) == "repetition"
    assert reason(cand(loop), ngram_max_count=2) is None
    assert reason(cand(loop), ngram_max_count=0) is None  # off
    assert max_ngram_count(GOOD, 8) == 1


def test_first_failing_filter_names_the_rejection():
    c = cand("no format and wrong", score=0.0, truncated=False)
    assert reason(c) == "format"
    assert reason(cand(truncated=True, score=0.0)) == "truncated"


def test_duplicates_near_duplicates_and_the_per_prompt_cap():
    near = GOOD.replace("So the result is 51.", "So the result is 51!")
    other = "<think> 45 + 23 = 68, minus 17 is 51. </think> <answer> 51 </answer>"
    third = "<think> left to right: 23 + 45 = 68 and 68 - 17 = 51 </think> <answer> 51 </answer>"
    assert jaccard(shingles(GOOD), shingles(near)) >= 0.8 > 0.5 > jaccard(shingles(GOOD), shingles(other))
    group = [cand(), cand("  " + GOOD.replace("So the", "so  the") + " "), cand(near), cand(other), cand(score=0.0), cand(third)]
    kept = select(group, FilterConfig(per_prompt=2))
    assert [c.text for c in kept] == [GOOD, other]
    assert [c.reason for c in group] == [None, "duplicate", "near_duplicate", None, "correct", "per_prompt"]
    assert len(select(group, FilterConfig(per_prompt=0))) == 3  # no cap: the third distinct answer stays
    assert len(select(group, FilterConfig(per_prompt=0, near_dup=0.0))) == 4  # near duplicates allowed
    assert len(select(group, FilterConfig(per_prompt=0, near_dup=0.0, dedup=False))) == 5


# ---------------------------------------------------------------------------------------------
# the command, with a scripted engine: known answers, so every count is known


def scripted_engine(script):
    """An engine whose completions for a prompt text are given: script[prompt text] -> list of k texts."""
    from ponder.rollout import Completion, RolloutEngine, register

    @register("scripted")
    class Scripted(RolloutEngine):
        def __init__(self, model, tokenizer, **_):
            super().__init__(model, tokenizer)

        def generate(self, prompts, params):
            out = []
            for p in prompts:
                texts = script[self.tokenizer.decode(p)][: params.n]
                out.append([Completion(self.tokenizer(t, add_special_tokens=False).input_ids + [self.tokenizer.eos_token_id], "stop") for t in texts])
            return out

    return "scripted"


def test_sample_writes_accepted_answers_with_provenance_and_reports_unsolved(tmp_path, capsys):
    from ponder.models import load
    from ponder.sample import SampleConfig, sample
    from ponder.tasks import load_examples
    from ponder.templates import render

    spec = TaskSpec(name="arithmetic", n=3, options={"difficulty": "easy"})
    exs = load_examples(spec, 0)
    model, tok = load("tiny-random")
    wrong = lambda ex: f"<think> hmm </think> <answer> {int(ex['answer']) + 1} </answer>"
    right = lambda ex, s="": f"<think> worked{s} out </think> <answer> {ex['answer']} </answer>"
    script = {
        render("r1_zero", exs[0]["prompt"]): [right(exs[0]), right(exs[0]), wrong(exs[0]), right(exs[0], " it")],
        render("r1_zero", exs[1]["prompt"]): [wrong(exs[1])] * 4,
        render("r1_zero", exs[2]["prompt"]): [f"{exs[2]['answer']}", right(exs[2]), wrong(exs[2]), wrong(exs[2])],
    }
    cfg = SampleConfig(model="tiny-random", tasks=[spec], k=4, engine=scripted_engine(script), out=str(tmp_path / "t.jsonl"))
    cfg.filters.near_dup = 0.0
    summary = sample(cfg, progress=False, model=model, tokenizer=tok)
    rows = [json.loads(l) for l in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert [(r["prompt_id"], r["sample"]) for r in rows] == [("arithmetic/train/0", 0), ("arithmetic/train/0", 3),
                                                              ("arithmetic/train/2", 1)]
    r = rows[0]
    assert r["prompt"] == exs[0]["prompt"] and r["answer"] == exs[0]["answer"] and r["completion"] == right(exs[0])
    assert r["rewards"]["accuracy"] == 1.0 and r["rewards"]["format"] == 1.0
    assert r["source"]["model"] == "tiny-random" and r["source"]["k"] == 4 and r["source"]["template"] == "r1_zero"
    assert r["meta"]["expression"] == exs[0]["expression"]
    n = summary["tasks"]["arithmetic"]
    assert (n["prompts"], n["samples"], n["accepted"], n["solved_prompts"]) == (3, 12, 3, 2)
    assert n["acceptance_rate"] == pytest.approx(3 / 12)
    assert n["rejected"]["correct"] == 7 and n["rejected"]["duplicate"] == 1 and n["rejected"]["format"] == 1
    assert (tmp_path / "t.unsolved.txt").read_text() == "arithmetic/train/1\n"
    assert json.loads((tmp_path / "t.summary.json").read_text())["unsolved_prompts"] == 1
    out = capsys.readouterr().out
    assert "arithmetic: accepted 3 of 12 answers (25.0%); 2 of 3 prompts solved; rejected: correct 7, format 1, duplicate 1" in out
    assert "1 prompts have no accepted answer" in out
    # the output is SFT data as it stands
    from ponder.sft.data import read_rows

    assert len(read_rows([str(tmp_path / "t.jsonl")])) == 3


def test_sample_command_runs_a_real_model_and_reports_each_task(tmp_path, capsys):
    from ponder.cli import main

    out = tmp_path / "s.jsonl"
    code = main(["sample", "--model", "tiny-random", "--tasks", "first_digit,arithmetic", "--n", "2", "--k", "2",
                 "--max-tokens", "3", "--out", str(out), "--quiet", "filters.format=false", "filters.keep_truncated=true",
                 "filters.correct=false", "template=plain"])
    assert code == 0
    summary = json.loads((tmp_path / "s.summary.json").read_text())
    assert set(summary["tasks"]) == {"first_digit", "arithmetic"}
    assert summary["accepted"] == len(out.read_text().splitlines()) > 0
    out_text = capsys.readouterr().out
    assert "first_digit: accepted" in out_text and "arithmetic: accepted" in out_text


def test_top_k_reaches_the_sampling_and_the_provenance(tmp_path):
    """--top-k 1 at temperature 1 samples the greedy answer k times: the duplicate filter then keeps one answer a
    prompt, where tiny-random's free samples differ; each row's source names the cut."""
    from ponder.cli import main

    kept = {}
    for name, extra in (("cut", ["--top-k", "1"]), ("free", [])):
        out = tmp_path / f"{name}.jsonl"
        assert main(["sample", "--model", "tiny-random", "--tasks", "first_digit", "--n", "3", "--k", "4", "--max-tokens",
                     "4", "--temperature", "1.0", *extra, "--out", str(out), "--quiet", "filters.format=false",
                     "filters.keep_truncated=true", "filters.correct=false", "template=plain"]) == 0
        kept[name] = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(kept["cut"]) == 3 and len(kept["free"]) > 3
    assert all(r["source"]["top_k"] == 1 for r in kept["cut"]) and "top_k" not in kept["free"][0]["source"]


@pytest.mark.parametrize("args,message", [
    (["--k", "0"], "k must be at least 1"),
    (["filters.language=fr"], "filters.language: 'fr' is not supported"),
    (["filters.neardup=0.5"], "unknown config key 'filters.neardup'"),
    (["filters.min_tokens=10", "filters.max_tokens=5"], "max_tokens is below filters.min_tokens"),
    (["filters.language_min=95"], "filters.language_min must be between 0 and 1"),
    (["filters.max_paragraph_words=0"], "filters.max_paragraph_words must be >= 1, or null (off)"),
    (["--per-prompt", "-1"], "ponder: error: config filters.per_prompt must be 0 (no cap) or more (--per-prompt); got -1"),
    (["filters.ngram=0"], "ponder: error: config filters.ngram must be at least 1 (words a repeated phrase); got 0"),
    (["filters.ngram_max_count=-2"], "ponder: error: config filters.ngram_max_count must be 0 (off) or more; got -2"),
    (["a.yaml", "b.yaml"], "takes one recipe"),
])
def test_bad_sample_input_is_one_line(tmp_path, capsys, args, message):
    from ponder.cli import main

    assert main(["sample", "--model", "tiny-random", "--tasks", "first_digit", "--out", str(tmp_path / "x.jsonl"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.fixture
def flaky():
    """Registers engine "flaky": it answers every first_digit prompt rightly and dies (KeyboardInterrupt) on
    call number calls["fail_at"]. Gives the calls dict; calls["n"] counts the calls."""
    from ponder.rollout import Completion, RolloutEngine, register

    calls = {"n": 0, "fail_at": 0}

    @register("flaky")
    class Flaky(RolloutEngine):
        def __init__(self, model, tokenizer, **_):
            super().__init__(model, tokenizer)

        def generate(self, prompts, params):
            calls["n"] += 1
            if calls["n"] == calls["fail_at"]:
                raise KeyboardInterrupt
            out = []
            for p in prompts:
                digit = self.tokenizer.decode(p).split("#")[1][0]
                texts = [f"<think> it is {digit}{i} </think> <answer> 7{i} </answer>" for i in range(params.n)]
                out.append([Completion(self.tokenizer(t).input_ids, "stop") for t in texts])
            return out

    return calls


def test_interrupted_sampling_resumes_after_its_last_chunk(tmp_path, flaky):
    from ponder.errors import UserError
    from ponder.models import load
    from ponder.sample import SampleConfig, sample

    model, tok = load("tiny-random")
    spec = TaskSpec(name="first_digit", n=7)
    make = lambda out, **kw: SampleConfig(model="tiny-random", tasks=[spec], k=2, batch_size=4, engine="flaky",
                                          out=str(tmp_path / out), **kw)
    sample(make("full.jsonl"), progress=False, model=model, tokenizer=tok)
    flaky.update(n=0, fail_at=3)  # chunks of 2 prompts: dies in the third chunk
    with pytest.raises(KeyboardInterrupt):
        sample(make("cut.jsonl"), progress=False, model=model, tokenizer=tok)
    partial, ledger = tmp_path / "cut.jsonl.partial", tmp_path / "cut.jsonl.partial.json"
    assert json.loads(ledger.read_text())["chunks"] == 2
    kept = partial.read_bytes(), ledger.read_bytes()

    # other settings, or no --resume, would lose the 4 prompts sampled: refused, the files left as they are
    flaky.update(n=0, fail_at=0)
    wider = TaskSpec(name="first_digit", n=8)
    with pytest.raises(UserError) as e:
        sample(replace(make("cut.jsonl", max_new_tokens=250), tasks=[wider]), progress=False, model=model, tokenizer=tok, resume=True)
    assert str(e.value) == (f"--resume with settings that differ from the interrupted run in {partial}: tasks[0].n 7 -> 8, "
                            f"max_new_tokens 256 -> 250; leave them out to continue it, or choose another --out, or "
                            f"delete {partial} to sample afresh")
    with pytest.raises(UserError) as e:
        sample(make("cut.jsonl"), progress=False, model=model, tokenizer=tok)
    assert str(e.value) == (f"{partial} holds an interrupted run of {tmp_path / 'cut.jsonl'} (4 prompts sampled); pass "
                            "--resume to continue it, choose another --out, or delete it to sample afresh")
    assert (partial.read_bytes(), ledger.read_bytes()) == kept and flaky["n"] == 0

    summary = sample(make("cut.jsonl"), progress=False, model=model, tokenizer=tok, resume=True)
    assert flaky["n"] == 2  # only the two chunks left were generated
    assert (tmp_path / "cut.jsonl").read_text() == (tmp_path / "full.jsonl").read_text()
    assert summary["tasks"]["first_digit"]["prompts"] == 7 and summary["accepted"] == 14
    assert not (tmp_path / "cut.jsonl.partial.json").exists()


def test_resume_refuses_changed_problems_and_rows_that_never_reached_the_disk(tmp_path, flaky):
    """The settings alone let a task file edited after the interruption resume: a question added at the top shifted
    every later one, so one was sampled twice and one never. And after a crash the ledger (synced) could record more
    bytes than the rows file held: resuming padded it with zeros. Both are refused now, the files left as they are."""
    from ponder.errors import UserError
    from ponder.models import load
    from ponder.sample import SampleConfig, sample

    model, tok = load("tiny-random")
    data = tmp_path / "q.jsonl"
    rows = [json.dumps({"prompt": f"first digit of #{i}{i}", "answer": "70"}) + "\n" for i in range(7)]
    data.write_text("".join(rows))
    make = lambda out: SampleConfig(model="tiny-random", tasks=[TaskSpec(name="jsonl", path=str(data))], k=2,
                                    batch_size=4, engine="flaky", out=str(tmp_path / out))
    sample(make("full.jsonl"), progress=False, model=model, tokenizer=tok)
    flaky.update(n=0, fail_at=3)
    with pytest.raises(KeyboardInterrupt):
        sample(make("cut.jsonl"), progress=False, model=model, tokenizer=tok)
    partial, ledger = tmp_path / "cut.jsonl.partial", tmp_path / "cut.jsonl.partial.json"
    kept = partial.read_bytes(), ledger.read_bytes()
    flaky.update(n=0, fail_at=0)

    data.write_text(json.dumps({"prompt": "first digit of #99", "answer": "70"}) + "\n" + "".join(rows))
    with pytest.raises(UserError) as e:
        sample(make("cut.jsonl"), progress=False, model=model, tokenizer=tok, resume=True)
    assert str(e.value) == (f"--resume: the problems differ from those the interrupted run in {partial} sampled (its task "
                            f"files or options changed since), so its rows and counts would not match them; restore them "
                            f"to continue it, or choose another --out, or delete {partial} to sample afresh")
    data.write_text("".join(rows))
    partial.write_bytes(kept[0][:-10])  # the last rows never reached the disk
    with pytest.raises(UserError) as e:
        sample(make("cut.jsonl"), progress=False, model=model, tokenizer=tok, resume=True)
    assert str(e.value) == (f"--resume: {partial} holds {len(kept[0]) - 10} bytes where its ledger records {len(kept[0])} "
                            f"(the machine stopped before the rows reached the disk); delete {partial} and {ledger} to "
                            f"sample afresh")
    assert ledger.read_bytes() == kept[1] and flaky["n"] == 0
    partial.write_bytes(kept[0])
    sample(make("cut.jsonl"), progress=False, model=model, tokenizer=tok, resume=True)
    assert (tmp_path / "cut.jsonl").read_text() == (tmp_path / "full.jsonl").read_text()


def test_two_specs_of_one_task_number_their_problems_apart(tmp_path, flaky):
    """Two files of the jsonl task (or easy and hard arithmetic) both numbered theirs jsonl/train/0, 1, ...: the rows'
    provenance and the unsolved list could not tell which problem was meant."""
    from ponder.models import load
    from ponder.sample import SampleConfig, sample

    model, tok = load("tiny-random")
    specs = []
    for name, digits in (("a.jsonl", "12"), ("b.jsonl", "345")):
        (tmp_path / name).write_text("".join(json.dumps({"prompt": f"first digit of #{d}0", "answer": "70"}) + "\n" for d in digits))
        specs.append(TaskSpec(name="jsonl", path=str(tmp_path / name)))
    sample(SampleConfig(model="tiny-random", tasks=specs, k=2, engine="flaky", out=str(tmp_path / "t.jsonl")),
           progress=False, model=model, tokenizer=tok)
    ids = [json.loads(line)["prompt_id"] for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert list(dict.fromkeys(ids)) == ["jsonl#0/train/0", "jsonl#0/train/1", "jsonl#1/train/0", "jsonl#1/train/1",
                                        "jsonl#1/train/2"]


def test_a_repeated_prompt_is_sampled_once(tmp_path, flaky, capsys):
    """Merged datasets repeat questions: each repeat got its own m answers (2 x per_prompt for the prompt, and the same
    (prompt, completion) rows twice, past the duplicate filter). Each prompt is sampled once now, with a notice."""
    from ponder.models import load
    from ponder.sample import SampleConfig, sample

    model, tok = load("tiny-random")
    data = tmp_path / "q.jsonl"
    prompts = ["first digit of #33", "first digit of #55", "first digit of #33"]
    data.write_text("".join(json.dumps({"prompt": p, "answer": "70"}) + "\n" for p in prompts))
    cfg = SampleConfig(model="tiny-random", tasks=[TaskSpec(name="jsonl", path=str(data))], k=3, engine="flaky",
                       out=str(tmp_path / "t.jsonl"))
    cfg.filters.per_prompt, cfg.filters.near_dup = 1, 0.0
    summary = sample(cfg, progress=False, model=model, tokenizer=tok)
    rows = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == prompts[:2]
    assert summary["tasks"]["jsonl"]["prompts"] == 2 and summary["repeated_prompts_skipped"] == 1
    assert ("ponder: sample: 1 problem(s) repeat an earlier one's prompt; each prompt is sampled once (its first), so "
            "that the per-prompt cap and the duplicate filters hold per prompt") in capsys.readouterr().err


@pytest.mark.parametrize("dies_at", ["summary", "unsolved", "rows"])
def test_a_run_killed_while_it_finishes_resumes(tmp_path, flaky, monkeypatch, dies_at):
    """The last steps write the summary, the unsolved ids and rename the rows to --out. Killed after the rename and
    before the summary, --out existed with no summary: --resume refused it as no finished run, and the prompts were
    lost. Now the rows take their name last; a kill at any of these steps leaves a run that resumes to the same files."""
    import ponder.sample as sample_mod
    from ponder.models import load
    from ponder.sample import SampleConfig, sample

    model, tok = load("tiny-random")
    make = lambda out: SampleConfig(model="tiny-random", tasks=[TaskSpec(name="first_digit", n=5)], k=2, batch_size=4,  # noqa: E731
                                    engine="flaky", out=str(tmp_path / out))
    sample(make("full.jsonl"), progress=False, model=model, tokenizer=tok)
    real = os.replace
    target = {"summary": "cut.summary.json", "unsolved": "cut.unsolved.txt", "rows": "cut.jsonl"}[dies_at]

    def replace_then_die(src, dst):
        if Path(dst).name == target:
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(sample_mod.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        sample(make("cut.jsonl"), progress=False, model=model, tokenizer=tok)
    monkeypatch.setattr(sample_mod.os, "replace", real)
    assert not (tmp_path / "cut.jsonl").exists()
    calls = flaky["n"]
    summary = sample(make("cut.jsonl"), progress=False, model=model, tokenizer=tok, resume=True)
    assert flaky["n"] == calls  # every chunk was done: nothing sampled again
    for name in ("{}.jsonl", "{}.unsolved.txt"):
        assert (tmp_path / name.format("cut")).read_text() == (tmp_path / name.format("full")).read_text()
    full = json.loads((tmp_path / "full.summary.json").read_text())
    assert {k: v for k, v in summary.items() if k not in ("out", "seconds")} == {
        k: v for k, v in full.items() if k not in ("out", "seconds")}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("cut")) == [
        "cut.jsonl", "cut.summary.json", "cut.unsolved.txt"]


def test_a_finished_output_is_never_sampled_over(tmp_path, flaky, error_line, capsys):
    from ponder.cli import main

    out = tmp_path / "t.jsonl"
    args = ["sample", "--model", "tiny-random", "--tasks", "first_digit", "--k", "2", "--out", str(out), "--quiet", "engine=flaky"]
    assert main([*args, "--n", "3"]) == 0
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    flaky["fail_at"] = flaky["n"] + 1  # any more sampling would end in KeyboardInterrupt, not in these answers

    assert error_line(*args, "--n", "2") == (
        f"ponder: error: {out} already exists; pass --resume to continue its run, choose another --out, or delete it "
        "to sample afresh")
    assert error_line(*args, "--n", "3", "--max-tokens", "200", "--resume") == (
        f"ponder: error: --resume with settings that differ from the finished run in {out}: max_new_tokens 256 -> 200; "
        "leave them out to keep it, or choose another --out, or delete it to sample afresh")
    assert main([*args, "--n", "3", "--resume"]) == 0
    assert f"{out} is complete (6 answers); nothing to resume" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files


def test_a_bad_extract_mode_is_refused_before_sampling(tmp_path, flaky, error_line):
    flaky["fail_at"] = 1
    line = error_line("sample", "--model", "tiny-random", "--tasks", "first_digit", "--n", "2", "--k", "2", "--quiet",
                      "--out", str(tmp_path / "t.jsonl"), "engine=flaky", "extract=boxd")
    assert line == ("ponder: error: config extract: unknown answer extraction mode 'boxd'; choose one of: tags, boxed, "
                    "tags_or_boxed, none")
    assert flaky["n"] == 0 and list(tmp_path.iterdir()) == []


def test_traces_of_a_teacher_whose_prompt_opened_think_are_written_whole_and_sft_fits_them_to_the_student():
    """R1-Distill's chat template opens <think> in the prompt: its answers start inside the block. Written as they
    were, a student trained under r1_zero never wrote <think> (format rate 0.887 -> 0.000). The trace is written
    whole; SFT drops the tag again where the student's own prompt opens it."""
    from ponder.models import load
    from ponder.sample import _row
    from ponder.sft.data import encode

    cand = Candidate("it is 7 </think> <answer>7</answer>", 9, False, 1.0, think_opened=True)
    row = _row({"prompt": "q", "answer": "7", "task": "t"}, "t/0", 0, cand, {}, {})
    assert row["completion"] == "<think>\nit is 7 </think> <answer>7</answer>"
    plain = Candidate("<think> x </think> <answer>7</answer>", 9, False, 1.0, think_opened=False)
    assert _row({"prompt": "q"}, "t/0", 0, plain, {}, {})["completion"] == plain.text

    _, tok = load("tiny-base")
    targets = lambda e: tok.decode([t for t, m in zip(e.ids, e.mask) if m], skip_special_tokens=True)  # noqa: E731
    assert targets(encode(row, tok, "r1_zero")).startswith("<think>\nit is 7")  # the student learns to open it
    tok.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|><think>\n"
    assert targets(encode(row, tok, "chat")).startswith("it is 7 </think>")  # its prompt opens it: not twice
