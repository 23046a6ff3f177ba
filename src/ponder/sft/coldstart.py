"""Cold-start traces for the miniature world: a few readable think/answer solutions, written by rule.

R1's cold start is a few thousand curated long chains of thought in a readable format, supervised
before RL so that RL starts from an answer shape worth reinforcing. In the miniature world the
"curation" is done by construction: each trace works the problem step by step, restates the result,
and closes with the answer in tags (countdown: a try or two that miss, each checked against the target,
then the solution, checked). Problems come from the task's own split (train by default), as RL
prompts do; only correct traces are written, and no +/- chain shown is an arithmetic test problem.
"""

from __future__ import annotations

import random
from dataclasses import replace

from ponder.errors import UserError

ENDINGS = ["So the result is {a}.", "So the total is {a}.", "That gives {a}."]


def arithmetic_trace(rng: random.Random, ex: dict) -> str:
    from ponder.tasks.corpus import CorpusConfig, worked_steps

    steps = worked_steps(rng, CorpusConfig(), ex, correct_slip=False)
    return f"{steps} {rng.choice(ENDINGS).format(a=ex['answer'])}"


def _shows_no_test_item(nums: list[int], ops: list[str]) -> bool:
    """False for a +/- chain that is an arithmetic problem of the test split (it must not be trained on)."""
    from ponder.tasks import arithmetic as ar

    return not set(ops) <= set("+-") or ar.split_of(ar.expression(nums, ops)) != "test"


def countdown_trace(rng: random.Random, ex: dict) -> str | None:
    from ponder.tasks import countdown as cd

    def steps(nums, ops):
        return ", ".join(f"{a} {op} {b} = {r}" for a, op, b, r in cd.chain_steps(nums, ops))

    tokens = ex["answer"].replace("(", " ").replace(")", " ").split()
    solution = [int(t) for t in tokens[::2]], tokens[1::2]
    if not _shows_no_test_item(*solution):
        return None
    target, ops = ex["target"], cd.level_params(ex.get("difficulty", "medium"))[0]["ops"]
    lines = []
    for _ in range(rng.choice([0, 1, 1, 2])):  # misses, each checked and rejected
        for _ in range(20):
            order, chosen = cd.random_chain(rng, ex["numbers"], ops)
            value = cd.chain_value(order, chosen)
            if value is not None and value != target and _shows_no_test_item(order, chosen):
                lines.append(f"{steps(order, chosen)}. {value} is not {target}, wait, try again.")
                break
    lines.append(f"{steps(*solution)}. check: {target} is the target. yes.")
    return " ".join(lines)


def bilingual_trace(rng: random.Random, ex: dict) -> str:
    """Worked steps wholly in the prompt's language (`target`), no slip, then the result restated."""
    from ponder.tasks import bilingual as bl
    from ponder.tasks.corpus import CorpusConfig
    from ponder.tasks.corpus_bilingual import worked

    lang = ex["target"]
    steps, _ = worked(rng, CorpusConfig(correction=0.0), ex, lang, switch=False)
    return steps + ("" if lang == "zh" else " ") + rng.choice(bl.WORDS[lang]["recaps"]).format(a=bilingual_answer(ex))


def bilingual_answer(ex: dict) -> str:
    from ponder.tasks import bilingual as bl

    return bl.number(int(ex["answer"]), ex["target"])


TRACES = {"arithmetic": arithmetic_trace, "countdown": countdown_trace, "bilingual_arithmetic": bilingual_trace}
ANSWERS = {"bilingual_arithmetic": bilingual_answer}  # the answer as the trace writes it; default: the gold answer


def coldstart_rows(spec, seed: int = 0) -> list[dict]:
    """{prompt, completion} rows (with the example's other fields) for `spec.n` problems of one TaskSpec."""
    from ponder.tasks import load_examples, tasks_named_by

    if spec.name not in TRACES:
        raise UserError(f"data.coldstart: no built-in traces for task '{spec.name}'; choose one of: {', '.join(TRACES)}")
    rng = random.Random(f"coldstart/{spec.name}/{seed}")
    want = spec.n or 100
    rows = []
    with tasks_named_by("data.coldstart"):
        examples = load_examples(replace(spec, n=2 * want), seed, say_short=False)
    for ex in examples:  # spares for problems without a clean trace
        think = TRACES[spec.name](rng, ex)
        if think is not None:
            answer = ANSWERS[spec.name](ex) if spec.name in ANSWERS else ex["answer"]
            rows.append({**ex, "completion": f" <think> {think} </think> <answer> {answer} </answer>"})
        if len(rows) == want:
            break
    return rows
