"""Math datasets as JSONL in their common formats: GSM8K, MATH and plain answer fields.

- gsm8k: `question`, and `answer` holding the worked solution that ends in `#### 42`.
- math: `problem`, and `solution` with the final answer in `\\boxed{}` (an `answer` field, as in
  MATH-500, is used when present).
- plain: `answer`, and the question in `prompt`, `question` or `problem`.

Every row becomes an example with `prompt`, `answer` (the bare final answer) and `task`; answers are
checked by mathematical equivalence (ponder.rewards.match). Other fields are kept as metadata.
"""

from __future__ import annotations

from ponder.errors import UserError
from ponder.rewards.extract import last_boxed
from ponder.tasks import Task, answer_text, path_fix, register
from ponder.tasks.jsonl import read_jsonl

PROMPT_FIELDS = ("prompt", "question", "problem")


def gsm8k_final(text) -> str | None:
    """GSM8K: the final answer follows the last `####` of the worked solution (thousands commas dropped)."""
    text = str(text)
    return text.rsplit("####", 1)[1].strip().replace(",", "") if "####" in text else None


# How to find the final answer in an answer field, by name (also the `hf` task's `answer_format` option).
FINAL_ANSWER = {
    "plain": lambda text: answer_text(text).strip(),  # the field is the answer (a list: its parts joined by ", ")
    "gsm8k": gsm8k_final,  # "... #### 42"
    "boxed": lambda text: last_boxed(str(text)),  # MATH: the last \boxed{} of the solution
}


class _MathJsonl(Task):
    """Shared loading; subclasses say which fields hold the question and how to find the final answer."""

    required: tuple[str, ...] = ()

    def gold(self, row: dict) -> str | None:
        raise NotImplementedError

    def extra(self, row: dict) -> dict:
        return {}

    def question(self, row: dict):
        """The first of the question fields that holds something (an empty `prompt` beside a `question` was taken)."""
        return next((row[k] for k in PROMPT_FIELDS if row.get(k) not in (None, "")), None)

    def load(self, split="train", n=None, seed=0, path=None, **_):
        if path is None:
            raise UserError(f"task '{self.name}' needs a path: {path_fix(self.name)}")
        out = []
        for line, row in read_jsonl(path, required=self.required, with_lines=True):
            prompt, gold = self.question(row), self.gold(row)
            if prompt is None:
                raise UserError(f"{path}:{line}: row has no question in any of the fields {', '.join(PROMPT_FIELDS)}; task "
                                f"'{self.name}' needs the question in one of them")
            if gold is None or not str(gold).strip():
                raise UserError(f"{path}:{line}: row has no final answer for task '{self.name}' ({self.where}); fix the row or use another task")
            out.append({**row, **self.extra(row), "prompt": prompt, "answer": answer_text(gold).strip(), "task": self.name})
        return out[:n] if n else out


@register
class Gsm8k(_MathJsonl):
    """GSM8K rows: the final answer follows `####` in the solution."""

    name = "gsm8k"
    required = ("question", "answer")
    where = "the answer field must end with '#### <number>'"

    def extra(self, row):
        return {"solution": row["answer"]}  # the worked solution stays available as metadata

    def gold(self, row):
        return gsm8k_final(row["answer"])

    def question(self, row):
        return row["question"]


@register
class MathBoxed(_MathJsonl):
    """MATH rows: the final answer is the last \\boxed{} of the solution, or the `answer` field."""

    name = "math"
    required = ("problem",)
    where = "give it an 'answer' field or a \\boxed{} in 'solution'"

    def gold(self, row):
        if row.get("answer") not in (None, ""):
            return str(row["answer"])
        return FINAL_ANSWER["boxed"](row.get("solution", ""))

    def question(self, row):
        return row["problem"]


@register
class PlainAnswer(_MathJsonl):
    """Rows with an `answer` field and the question in `prompt`, `question` or `problem`."""

    name = "plain"
    required = ("answer",)
    where = "the answer field is empty"

    def gold(self, row):
        return row["answer"]
