"""Answer equivalence: fast path, math-verify in workers (hard time limit), bad golds, agreement with hand labels."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ponder.rewards import match, verify_pool
from ponder.rewards.basic import accuracy

PAIRS = Path(__file__).parent / "data" / "math_pairs.jsonl"


pytestmark = pytest.mark.usefixtures("stop_verify_workers")


def test_plain_numbers_never_reach_a_worker(monkeypatch):
    def no_pool():
        raise AssertionError("plain numbers must be compared in process")

    monkeypatch.setattr(verify_pool, "pool", no_pool)
    cases = [("42", "42", 1.0), ("43", "42", 0.0), ("1,000", "1000", 1.0), ("0.5", r"\frac{1}{2}", 1.0),
             ("3/4", "0.75", 1.0), ("-0.5", r"-\frac{1}{2}", 1.0), ("18 dollars", "18", 1.0), (r"\$18.00", "18", 1.0),
             ("5.01", "5", 0.0), ("twelve", "12", 1.0), ("1e6", "1000000", 1.0), ("Monday", r"\text{Monday}", 1.0)]
    for answer, gold, want in cases:
        assert match.answers_match(answer, gold) == want, (answer, gold)


def test_real_notations_that_were_misjudged(monkeypatch):
    """Found by a review of real models' answers: a thin-space thousands separator (math-verify read 1\\,000 as a
    product, 1*0, so it matched 0), scale words inside \\text{} (dropped as units: 72 thousand matched 72), and a
    Unicode degree sign. All but the degree are decided in process."""
    def no_pool():
        raise AssertionError("decided in process")

    cases = [(r"1\,000", "1000", 1.0), (r"10\,000", "10000", 1.0), (r"1\,000", "0", 0.0),
             (r"72 \text{ hundred}", "72", 0.0), (r"72 \text{ thousand}", "72", 0.0), (r"12 \text{ squared}", "12", 0.0),
             (r"72 \text{ thousand}", "72000", 1.0), (r"1.5 \text{ million}", "1500000", 1.0), ("72 thousand", "72000", 1.0)]
    with monkeypatch.context() as m:
        m.setattr(verify_pool, "pool", no_pool)
        for answer, gold, want in cases:
            assert match.answers_match(answer, gold) == want, (answer, gold)
    assert match.answers_match("30°", r"30^\circ") == 1.0
    assert match.answers_match("31°", r"30^\circ") == 0.0


def test_an_answer_that_never_closes_the_think_block_its_prompt_opened_commits_to_nothing():
    """R1-Distill's template opens <think> in the prompt: a completion cut off before </think> is all thinking, and a
    tentative box in it scored 1."""
    guess = r"Okay, 48/2 is 24, total 72, so \boxed{72}? Wait, let me check May again, maybe"
    final = r"Okay, 48/2 is 24, total 72.\n</think>\n\nSo the answer is \boxed{72}."
    got = accuracy([guess, final, guess], prompts=["q"] * 3, answer=["72"] * 3, task=["arithmetic"] * 3,
                   think_opened=[True, True, False])
    assert got == [0.0, 1.0, 1.0]  # without an opened block, the text outside any think block is the answer


def test_one_value_boxed_twice_in_two_notations_is_one_answer():
    """R1 boxes its answer in the summary and again under **Final Answer**, not always written the same way; two
    different values stay no answer."""
    from ponder.rewards.extract import extract_answer

    end = "\n\n**Final Answer**\n\\[\\boxed{%s}\\]"
    assert extract_answer(r"</think> Thus $x = \boxed{\frac{1}{2}}$." + end % r"\dfrac{1}{2}") == r"\dfrac{1}{2}"
    assert extract_answer(r"</think> So \boxed{72 \text{ clips}}." + end % "72") == "72"
    assert extract_answer(r"</think> So \boxed{\$1,000}." + end % "1000") == "1000"
    assert extract_answer(r"</think> So \boxed{72}." + end % "73") is None


def test_math_equivalence_through_math_verify():
    assert match.answers_match(r"\frac{1}{\sqrt{2}}", r"\frac{\sqrt{2}}{2}") == 1.0
    assert match.answers_match("x = 2", "2") == 1.0
    assert match.answers_match(r"\{3, 2, 1\}", r"\{1, 2, 3\}") == 1.0
    assert match.answers_match("[0, 1]", "[0, 1)") == 0.0
    assert match.answers_match(r"2\sqrt{3}", r"3\sqrt{2}") == 0.0
    assert match.answers_match("\\begin{pmatrix} 1 \\\\\n 2 \\end{pmatrix}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}") == 1.0


def test_no_gold_and_no_answer():
    assert match.answers_match("3", None) is None
    assert match.answers_match(None, "3") == 0.0
    assert match.answers_match("   ", "3") == 0.0


def test_unparseable_gold_is_skipped_and_reported_once():
    gold = r"\frac{7}{"
    with pytest.warns(UserWarning) as caught:
        assert match.answers_match("7", gold) is None
        assert match.answers_match("8", gold) is None
    messages = [str(w.message) for w in caught if "cannot be parsed" in str(w.message)]
    assert messages == [rf"gold answer {gold!r} cannot be parsed as math; its examples are skipped (reward None). Fix the data's answer field."]
    out = accuracy(["<answer>7</answer>"], prompts=["q"], answer=[gold], task=["plain"])
    assert out == [None]


def test_equivalent_groups_answers_for_voting():
    assert match.equivalent("1/2", r"\frac{1}{2}")
    assert match.equivalent("0.5", "1/2")
    assert match.equivalent(r"\frac{1}{2}", "0.5")
    assert not match.equivalent("2", "3")
    assert not match.equivalent("abc{", "abd{")  # neither parses: only identical text is equivalent
    assert match.equivalent("abc{", "abc{")
    assert not match.equivalent(None, "1")


def test_works_off_the_main_thread():
    # math-verify's own signal.alarm timeout raises off the main thread; ponder's workers do not care.
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("v", match.answers_match(r"\sqrt{4}", r"\frac{4}{2}")))
    t.start()
    t.join(30)
    assert out["v"] == 1.0


def test_power_tower_times_out_as_wrong_and_the_pool_recovers(short_limit):
    pool = verify_pool.pool()
    pool.start()  # workers up and ready outside the timed part
    before = pool.timeouts
    start = time.monotonic()
    assert match.answers_match(r"9^{9^{9}}", "11") == 0.0
    assert time.monotonic() - start < pool.timeout + 1.0
    assert pool.timeouts == before + 1
    assert match.answers_match(r"\sqrt{16}", "4") == 1.0  # a fresh worker took over


def test_pool_is_reused_and_shut_down_cleanly():
    match.answers_match(r"\sqrt{25}", "5")
    pids = verify_pool.pool().pids
    match.answers_match(r"\sqrt{36}", "6")
    assert verify_pool.pool().pids == pids
    verify_pool.shutdown()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_agreement_with_hand_labels_at_least_99_percent():
    rows = [json.loads(line) for line in PAIRS.read_text().splitlines()]
    assert len(rows) >= 200
    completions = [r.get("completion", f"<think>work</think> <answer>{r.get('prediction', '')}</answer>") for r in rows]
    got = accuracy(completions, prompts=[""] * len(rows), answer=[r["gold"] for r in rows], task=["plain"] * len(rows))
    wrong = [(r["gold"][:40], r.get("prediction", r.get("completion", ""))[:40], r["label"], g) for r, g in zip(rows, got) if g != r["label"]]
    assert len(wrong) <= 0.01 * len(rows), wrong


def test_a_worker_killed_from_outside_costs_no_answer_its_reward():
    pool = verify_pool.pool()
    match.answers_match(r"\sqrt{49}", "7")
    victim = pool.pids[0]
    os.kill(victim, signal.SIGKILL)
    pairs = [(rf"\sqrt{{{k * k}}}", str(k)) for k in range(11, 31)]
    match.prefetch(pairs)
    assert [match.answers_match(a, g) for a, g in pairs] == [1.0] * len(pairs)
    assert victim not in pool.pids


def test_workers_exit_when_their_parent_dies_mid_item(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(
        "import os, threading, time\n"
        "from ponder.rewards import verify_pool\n"
        "p = verify_pool.pool()\n"
        "p.map('ponder.rewards.math:compare', [('1', '1')])\n"
        "print(*p.pids, flush=True)\n"
        "threading.Thread(target=lambda: p.map('ponder.rewards.math:compare', [(r'9^{9^{9}}', '1')] * 2), daemon=True).start()\n"
        "time.sleep(0.3)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(verify_pool.__file__).parents[2]))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == verify_pool._SETTINGS["workers"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_workers_that_cannot_start_give_a_clear_error(monkeypatch):
    monkeypatch.setattr(sys, "executable", "/bin/false")
    pool = verify_pool.VerifyPool(workers=1, timeout=1.0)
    with pytest.raises(RuntimeError, match=r"^verification workers fail to start \(exit code 1\); run `python -m ponder.rewards.verify_pool` to see its error$"):
        pool.map("ponder.rewards.math:compare", [("1", "1")])
    assert pool.workers == []


@pytest.mark.parametrize("answer, gold", [("5 hundreds", "5"), ("2 millions", "2"), ("3 tenths", "3"), ("1 half", "1"),
                                          ("2 fourths", "2"), ("5 negative", "5"), ("5 reciprocal", "5")])
def test_words_that_change_a_numbers_value_are_no_units(answer, gold):
    """The fast path dropped any word after a number it did not list as a unit: `3 tenths` matched 3. math-verify
    (the reference it must agree with) scores each of these 0; `5 apples` stays 5."""
    assert match.answers_match(answer, gold) == 0.0
    assert match.answers_match("5 apples", "5") == 1.0


def test_a_percent_answer_matches_the_gold_as_a_percent_or_a_fraction(monkeypatch):
    """math-verify takes `25\\%` for 25 and for 0.25, yet `12.5\\%` for 0.125 only (12.5 scored 0): the fast path decides
    a number with a percent sign either way, in process."""
    def no_pool():
        raise AssertionError("decided in process")

    monkeypatch.setattr(verify_pool, "pool", no_pool)
    cases = [(r"12.5\%", "12.5", 1.0), (r"12.5\%", "0.125", 1.0), (r"2.5\%", "2.5", 1.0), (r"25\%", "0.25", 1.0),
             ("50%", "50", 1.0), (r"50 \text{percent}", "0.5", 1.0), (r"30\%", "0.4", 0.0), (r"12.5\%", "12", 0.0)]
    assert [match.answers_match(a, g) for a, g, _ in cases] == [want for *_, want in cases]


def test_a_list_of_words_is_compared_case_folded_part_by_part(monkeypatch):
    """README: a list answer is read as its parts joined by ", ", words compared case-folded. A word list went to
    math-verify, which reads capitals as symbols: PARIS, FRANCE scored 0 against Paris, France (PARIS alone 1)."""
    def no_pool():
        raise AssertionError("decided in process")

    monkeypatch.setattr(verify_pool, "pool", no_pool)
    cases = [("PARIS, FRANCE", "Paris, France", 1.0), ("paris,france", "Paris, France", 1.0),
             ("France, Paris", "Paris, France", 1.0), ("Paris", "Paris, France", 0.0),
             ("Paris, Spain", "Paris, France", 0.0), ("Paris, France, Spain", "Paris, France", 0.0),
             (r"\text{Москва}, Россия", "москва, россия", 1.0)]
    assert [match.answers_match(a, g) for a, g, _ in cases] == [want for *_, want in cases]
    from ponder.tasks import answer_text

    assert match.answers_match("RED, BLUE", answer_text(["red", "blue"])) == 1.0
