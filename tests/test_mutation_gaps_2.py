"""Behaviour that mutation testing found unguarded: each test here failed on a small plausible bug in the source that
every other test let through (rollout stops, the sandbox's count of tests, resume's diff, files, metrics, losses)."""

from __future__ import annotations

import math
import os

import pytest
import random_weights
import torch

from ponder.models.tiny import char_tokenizer

TOK = char_tokenizer()


# ---- rollout: where a completion ends -------------------------------------------------------------------------------


def test_truncate_at_stop_cuts_at_the_first_eos_and_never_searches_what_follows_it():
    """What follows an EOS is padding: a stop string there must not stretch the completion past its EOS."""
    from ponder.rollout import truncate_at_stop

    eos = TOK.eos_token_id
    ids = TOK.encode("ab") + [eos] + TOK.encode("cd")
    assert truncate_at_stop(ids, TOK, ("cd",), {eos}) == (TOK.encode("ab") + [eos], "stop")
    # a stop string before the EOS still ends it there, the string kept
    assert truncate_at_stop(ids, TOK, ("b",), {eos}) == (TOK.encode("ab"), "stop")
    assert truncate_at_stop(TOK.encode("abcd"), TOK, ("zz",), {eos}) == (TOK.encode("abcd"), None)


def test_completion_stops_ends_a_row_on_its_new_tokens_only():
    """The hf engine's stopping criterion: True for a row whose generated tokens hold a stop string, False for one whose
    stop string only forms across the prompt's end."""
    from ponder.rollout.hf import CompletionStops

    stops = CompletionStops(TOK, ("yz",), width=3)
    rows = torch.tensor([TOK.encode("abc") + TOK.encode("xyz"), TOK.encode("aby") + TOK.encode("zxx"),
                         TOK.encode("abc") + TOK.encode("xxx")])
    assert stops(rows, None).tolist() == [True, False, False]


def test_a_stop_string_ends_a_fast_engine_row_at_the_first_check_after_it():
    """The host's check every sync_every steps reads each row's new tokens with an overlap before them: a stop string
    split across two checks (or made in the steps just queued) ends the row at the next check; missed, the row ran on
    to max_tokens (the completion was cut to the same tokens afterwards, so only the decode steps tell)."""
    from ponder.models import load
    from ponder.rollout import SamplingParams
    from ponder.rollout.fast import FastEngine

    model = random_weights.randomized(load("tiny-random-micro", seed=2)[0], 0.15, 0).eval()
    model.generation_config.eos_token_id = len(TOK) + 5  # never sampled
    prompt = [TOK.encode("Q: 12+7=")]
    every = 4

    def run(stop):
        engine = FastEngine(model, TOK, sync_every=every, look_ahead=False)
        steps, decode = [0], engine._decode

        def counted(*args, **kwargs):
            steps[0] += 1
            return decode(*args, **kwargs)

        engine._decode = counted
        out = engine.generate(prompt, SamplingParams(temperature=1.0, max_tokens=40, seed=3, stop=stop))[0][0]
        return out, steps[0]

    full, _ = run(())
    text = TOK.decode(full.token_ids)
    tried = 0
    for i in range(12):
        stop = text[i:i + 3]
        if text.find(stop) != i:
            continue
        out, steps = run((stop,))
        assert out.finish_reason == "stop" and out.token_ids == full.token_ids[: i + 3]
        # the first token comes from the prefill; a check follows every `every` decode steps
        assert steps <= every * math.ceil((len(out.token_ids) - 1) / every), (stop, steps)
        tried += 1
    assert tried >= 8


# ---- the sandbox: which asserts are tests, and what a run reports ---------------------------------------------------


@pytest.fixture(scope="module")
def sandbox():
    from ponder.sandbox import Limits, Sandbox

    sb = Sandbox(Limits(timeout=3.0), workers=2)
    yield sb
    sb.close()


WRONG, RIGHT = "def add(a, b):\n    return 0\n", "def add(a, b):\n    return a + b\n"


def test_a_prefix_stub_with_an_ellipsis_body_is_the_programs_to_define(sandbox):
    """`def add(a, b): ...` in code_prefix is a signature, as one with a docstring is: the program's add is tested."""
    prefix = "def add(a, b):\n    ...\n"
    tests = "assert add(1, 2) == 3\n"
    assert sandbox.run(prefix + "\n" + RIGHT, tests, setup=prefix).status == "passed"
    r = sandbox.run(prefix + "\n" + WRONG, tests, setup=prefix)
    assert r.status == "failed" and r.detail == "assert add(1, 2) == 3: AssertionError"


def test_the_detail_names_the_first_failing_test_not_the_last(sandbox):
    r = sandbox.run(WRONG, ["assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert add(2, 2) == 4"])
    assert [t.passed for t in r.tests] == [False, True, False]
    assert r.detail == "assert add(1, 2) == 3: AssertionError"


def test_a_helper_whose_parameter_is_read_makes_no_test_of_a_call_about_nothing_the_program_made(sandbox):
    """`def check_eq(n): assert n >= 0` then `check_eq(5)` asserts nothing about the program: it passes with any, and
    counted it would pay half of partial credit to a program that fails the one real test."""
    r = sandbox.run(WRONG, ["def check_eq(n):\n    assert n >= 0", "check_eq(5)", "assert add(1, 2) == 3"])
    assert [t.source for t in r.tests] == ["assert add(1, 2) == 3"] and r.fraction == 0.0


def test_a_dotted_import_binds_its_first_name_so_asserts_about_it_are_no_tests(sandbox):
    r = sandbox.run(WRONG, "import os.path\nassert os.path.sep == '/'\nassert add(1, 2) == 3\n")
    assert [t.source for t in r.tests] == ["assert add(1, 2) == 3"] and r.fraction == 0.0


def test_a_recursive_helper_of_the_tests_is_followed_once(sandbox):
    """Following the functions a test calls stops at each one's first visit: a recursive helper is no endless walk."""
    tests = "def fact(n):\n    return 1 if n <= 1 else n * fact(n - 1)\nassert add(fact(3), 0) == 6\n"
    r = sandbox.run(RIGHT, tests)
    assert r.status == "passed" and [t.source for t in r.tests] == ["assert add(fact(3), 0) == 6"]
    assert sandbox.run(WRONG, tests).status == "failed"


def test_a_test_function_with_keyword_only_parameters_is_not_called(sandbox):
    """pytest would give it fixtures; called with none it failed with a TypeError, as the program's fault."""
    for tests in ("def test_add(*, x):\n    assert add(x, 2) == 3\n", "def test_add(**kw):\n    assert add(kw['x'], 2) == 3\n"):
        assert sandbox.run(WRONG, tests).status == "bad_tests", tests


# ---- resume: what counts as a changed setting -----------------------------------------------------------------------


def test_diff_leaves_out_where_the_run_is():
    """A run moved or named from another directory has another output_dir (and name) than its config.yaml: no change."""
    from ponder.resume import diff

    old = {"name": "a", "output_dir": "runs", "optim": {"lr": 0.001}}
    new = {"name": "b", "output_dir": "/elsewhere/runs", "optim": {"lr": 0.0001}}
    assert diff(old, new) == [("optim.lr", 0.001, 0.0001)]


def test_diff_of_lists_of_sections_of_other_lengths_shows_both_lists():
    from ponder.resume import diff

    one = [{"name": "x", "n": 20}]
    two = [{"name": "x", "n": 30}, {"name": "y", "n": 5}]
    assert diff({"tasks": one}, {"tasks": two}, lists=True) == [("tasks", one, two)]
    assert diff({"tasks": two[:1]}, {"tasks": [{"name": "x", "n": 40}]}, lists=True) == [("tasks[0].n", 30, 40)]


# ---- files ----------------------------------------------------------------------------------------------------------


def test_a_directory_that_cannot_be_entered_is_unwritable(tmp_path, monkeypatch):
    """Write permission without search (x) permission still refuses to create a file in a directory."""
    from ponder import files

    real = os.access
    monkeypatch.setattr(files.os, "access",
                        lambda p, mode: not mode & os.X_OK if str(p) == str(tmp_path) else real(p, mode))
    assert files.unwritable(tmp_path / "run" / "checkpoints") == tmp_path
    monkeypatch.setattr(files.os, "access", lambda p, mode: True)
    assert files.unwritable(tmp_path / "run") is None


# ---- metrics --------------------------------------------------------------------------------------------------------


def test_a_word_that_starts_in_an_unspaced_script_and_ends_in_a_spaced_one_is_whole_at_its_end():
    from ponder.metrics import reflection_pattern

    pat = reflection_pattern(["再check"])
    assert pat.search("我再check一下") and pat.search("我再check.")
    assert not pat.search("我再checkpoint一下")


def test_a_start_over_begins_a_new_mlflow_run_and_a_resume_continues_it(tmp_path, monkeypatch):
    """resume_step 0 is a start over (nothing of the attempt before is kept): the logging service gets a new run, not
    the old one continued (whose later steps would sit beside, or hide, the new ones)."""
    pytest.importorskip("mlflow")
    from ponder.metrics import MetricsWriter

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ids = []
    for resume_step in (0, 0, 1):
        w = MetricsWriter(run_dir, resume_step=resume_step, tensorboard=False, log_to=["mlflow"], config={})
        w.log(resume_step + 1, {"reward": 0.5})
        w.close()
        ids.append((run_dir / "mlflow_id").read_text().strip())
    assert ids[0] != ids[1] and ids[2] == ids[1]


# ---- losses ---------------------------------------------------------------------------------------------------------


def test_clip_low_counts_against_eps_low_where_the_clip_range_is_asymmetric():
    """Clip-higher (eps_high 0.28 > eps_low 0.2): a ratio of 0.75 or 0.78 with a negative advantage is clipped (below
    0.8); 0.85 is not; with a positive advantage only ratios above 1.28 count as clipped high."""
    from ponder.rl.losses import policy_loss

    ratios = torch.tensor([[0.75, 0.78, 0.85, 1.3], [0.75, 1.25, 1.3, 1.35]])
    logp = ratios.log()
    weight = torch.full_like(logp, 0.125)
    _, stats = policy_loss(logp, torch.zeros_like(logp), torch.tensor([-1.0, 1.0]), weight, eps_low=0.2, eps_high=0.28)
    assert stats["clip_low"].item() == 2.0 and stats["clip_high"].item() == 2.0


def test_the_kl_figure_sums_live_tokens_only():
    """Padding (weight 0) has log-probs too: the KL statistic leaves them out, as the loss does."""
    from ponder.rl.losses import policy_loss

    logp = torch.tensor([[0.5, 0.5]]).log()
    ref = torch.tensor([[0.25, 0.9]]).log()
    weight = torch.tensor([[1.0, 0.0]])
    loss, stats = policy_loss(logp, logp.detach(), torch.tensor([0.0]), weight, 0.2, 0.2, beta=0.1, ref_logp=ref)
    k3 = 0.5 - math.log(0.5) - 1  # exp(d) - d - 1, d = log(0.25 / 0.5)
    assert stats["kl"].item() == pytest.approx(k3, rel=1e-5) and stats["tokens"].item() == 1.0
    assert loss.item() == pytest.approx(0.1 * k3, rel=1e-5)


# ---- the trainer's start notices ------------------------------------------------------------------------------------


def test_the_gspo_clip_range_notice_is_for_both_bounds_wide_only():
    from ponder.config import AlgoConfig
    from ponder.rl.trainer import ratio_notices

    assert ratio_notices(AlgoConfig(ratio="sequence", mu=2, eps_low=0.2, eps_high=0.28)) == [
        "ponder: algorithm.ratio=sequence clips a sequence's mean ratio to [0.8, 1.28], which it seldom leaves; GSPO "
        "clips at algorithm.eps_low=3e-4 algorithm.eps_high=4e-4"]
    # one bound narrow: a sequence's mean ratio leaves the range on that side, so the clip does its work
    assert ratio_notices(AlgoConfig(ratio="sequence", mu=2, eps_low=3e-4, eps_high=0.2)) == []
    assert ratio_notices(AlgoConfig(ratio="sequence", minibatches=2, eps_low=0.2, eps_high=4e-4)) == []
