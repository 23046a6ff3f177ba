"""The synthetic web: no RL prompt or test item in it, and each behaviour present at its rate."""

import re
from collections import Counter
from itertools import islice

import pytest

from ponder.errors import UserError
from ponder.tasks import get_task
from ponder.tasks import arithmetic as ar
from ponder.tasks import countdown as cd
from ponder.tasks.corpus import CorpusConfig, corpus_text, countdown_trace, documents
from ponder.tasks.partition import partition_of
from ponder.templates import render

N_DOCS = 6000


@pytest.fixture(scope="module")
def docs():
    return list(islice(documents(seed=0), N_DOCS))


@pytest.fixture(scope="module")
def text(docs):
    return "\n\n".join(d.text for d in docs)


def test_every_problem_shown_is_from_the_corpus_partition(docs):
    keys = [k for d in docs for k in d.keys]
    assert len(keys) > N_DOCS / 2
    assert {partition_of(k) for k in keys} == {"corpus"}


def _items():
    arith, count = get_task("arithmetic"), get_task("countdown")
    items = []
    for split in ("test", "train"):
        for level in ("easy", "medium", "hard", "expert"):
            items += arith.load(split, n=150, seed=0, difficulty=level)
            items += count.load(split, n=150, seed=0, difficulty=level)
    return items


CHAIN = re.compile(r"(?<!\d)\d+(?: [-+] \d+)+")  # maximal runs of + and -, also inside brackets


def _leaks(items, text):
    """Items whose problem shows in the text: a countdown prompt, or a +/- run of the text that begins
    with an arithmetic item's first three numbers (the item itself, or a chain extending it)."""
    starts = {" ".join(c.split()[:5]) for c in CHAIN.findall(text) if len(c.split()) >= 5}
    out = []
    for ex in items:
        if ex["task"] == "arithmetic":
            if " ".join(ex["expression"].split()[:5]) in starts:
                out.append(ex["prompt"])
        elif ex["prompt"] in text:
            out.append(ex["prompt"])
    return out


def test_corpus_has_no_test_or_train_prompt(text):
    assert _leaks(_items(), text) == []


def test_the_leak_check_finds_planted_items(text):
    items = _items()
    a = next(ex for ex in items if ex["task"] == "arithmetic")
    c = next(ex for ex in items if ex["task"] == "countdown")
    assert _leaks([a], text + f"\nQ: What is {a['expression']}?") == [a["prompt"]]
    assert _leaks([a], text + f"\n({a['expression']} + 4) * 2") == [a["prompt"]]
    assert _leaks([c], text + "\n" + render("r1_zero", c["prompt"])) == [c["prompt"]]


def test_behaviours_appear_at_their_rates(docs):
    kinds = Counter(d.kind for d in docs)
    cfg = CorpusConfig()
    total = sum(cfg.kinds.values())
    for kind, weight in cfg.kinds.items():
        assert abs(kinds[kind] / N_DOCS - weight / total) < 0.03, kind
    r1 = [d.text for d in docs if d.kind == "r1_arithmetic"]
    completions = [t.rsplit("Assistant:", 1)[1] for t in r1]
    tagged = [c for c in completions if c.lstrip().startswith("<think>")]
    worked = [c for c in completions if re.search(r"\d+ [-+] \d+ = \d+", c)]
    corrected = [c for c in worked if "wait" in c]
    assert abs(len(worked) / len(r1) - cfg.steps) < 0.05
    tagged_worked = [c for c in tagged if c in worked]
    assert abs(len(tagged_worked) / len(worked) - cfg.tags_worked) < 0.06
    assert abs((len(tagged) - len(tagged_worked)) / (len(r1) - len(worked)) - cfg.tags) < 0.05
    assert 0.03 < len(corrected) / len(worked) < 0.15
    assert all(t.startswith(render("r1_zero", "")[:60]) for t in r1)
    assert kinds["filler"] > 0 and any("<answer>" in d.text for d in docs if d.kind == "web_arithmetic")


def test_worked_steps_are_right_and_bare_answers_often_wrong(docs):
    right = wrong = 0
    for d in docs:
        if d.kind != "r1_arithmetic":
            continue
        prompt, completion = d.text.rsplit("Assistant:", 1)
        expr = prompt.rsplit("Compute ", 1)[1].rstrip(". ")
        gold = ar.running_totals([int(t) for t in expr.split()[::2]], expr.split()[1::2])[-1]
        m = re.search(r"<answer>\s*(-?\d+)\s*</answer>", completion)
        if not m:
            continue
        steps = re.findall(r"(\d+) ([-+]) (\d+) = (\d+)(?!, wait)", completion.split("wait")[-1])
        for a, op, b, c in steps:  # every step after the last correction is right
            assert (int(a) + int(b) if op == "+" else int(a) - int(b)) == int(c)
        if steps:
            assert int(m.group(1)) == gold
        elif len(expr.split()) >= 9:  # bare answers to chains of five or more numbers
            right += int(m.group(1)) == gold
            wrong += int(m.group(1)) != gold
    assert wrong > 3 * right > 0


def test_countdown_retry_pays_over_one_try():
    import random

    cfg = CorpusConfig()
    from ponder.tasks.corpus import corpus_countdown

    rng = random.Random(0)
    hits = Counter()
    for mode in ("one_try", "retry"):
        for _ in range(300):
            ex = corpus_countdown(rng, cfg)
            think, answer = countdown_trace(rng, ex, mode) or ("", "")
            hits[mode] += answer != "" and cd.evaluate(answer, ex["numbers"]) == ex["target"]
            if mode == "retry":  # every check compares the value just computed with the target, rightly
                assert think.startswith(f"need {ex['target']}.")
                checks = re.findall(r"= (\d+)\. (\d+) vs (\d+): (yes|no)", think)
                assert checks
                for last_step, value, target, verdict in checks:
                    assert last_step == value and int(target) == ex["target"]
                    assert (verdict == "yes") == (int(value) == ex["target"])
                assert think.count("wait") == sum(v == "no" for *_, v in checks)  # a retry follows each miss
    assert hits["retry"] > 1.8 * hits["one_try"]


def test_corpus_is_deterministic_and_ascii():
    a = corpus_text(20_000, seed=4)
    assert a == corpus_text(20_000, seed=4) and a != corpus_text(20_000, seed=5)
    assert sum(len(doc) + 2 for doc in a) >= 20_000
    assert all(ch.isascii() and (ch.isprintable() or ch in "\n") for doc in a for ch in doc)


def test_unknown_document_kind_is_a_user_error():
    with pytest.raises(UserError, match="unknown kind 'blog'"):
        next(documents(0, CorpusConfig(kinds={"blog": 1.0})))
