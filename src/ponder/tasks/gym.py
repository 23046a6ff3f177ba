"""Any dataset of the reasoning-gym library (procedural, offline), scored by the library's own scorer.

    data.tasks: [{name: reasoning_gym, options: {dataset: knights_knaves, size: 1000, dataset_seed: 3}}]

`dataset_seed` defaults to the run's seed; `size` (questions a draw holds) to 1,000, and `n` may not exceed it. Further
options go to the dataset's config (e.g. `min_terms: 3`). The test split draws from a different seed and drops questions
that also occur in the train split of the same options (the same size included).
"""

from __future__ import annotations

import functools
import json
import re

from ponder.errors import UserError
from ponder.tasks import Task, register, setting, whole_number

SPLITS = ("train", "test", "validation")
DEFAULT_SIZE = 1000  # questions a draw holds unless options.size says (train and test splits alike)
_TAGS = re.compile(r"<think>.*?</think>|</?answer>|</?think>", re.DOTALL)


@functools.lru_cache(maxsize=32)
def _dataset(name: str, size: int, seed: int, config: str):
    """`config`: the options as JSON (a cache key that lists can be part of: YAML gives `operators: [+, -]` as one)."""
    try:
        import reasoning_gym
    except ModuleNotFoundError:
        raise UserError("task 'reasoning_gym' needs the reasoning-gym library: pip install 'ponder[gym]'") from None

    try:
        return reasoning_gym.create_dataset(name, size=size, seed=seed, **json.loads(config))
    except ValueError as e:  # unknown name, or a config value the dataset rejects
        known = ", ".join(sorted(reasoning_gym.factory.DATASETS))
        hint = f"; known datasets: {known}" if "not registered" in str(e) else ""
        raise UserError(f"task 'reasoning_gym': {e}{hint}") from None
    except (TypeError, AssertionError) as e:  # reasoning-gym checks its configs with assert
        raise UserError(f"task 'reasoning_gym': dataset '{name}' rejects its options ({e or 'an assertion failed'}); "
                        f"check {setting('options')}") from None


def _split_seed(seed: int, split: str) -> int:
    return seed if split == "train" else seed + 1_000_003 * (1 + sum(map(ord, split)))


@register
class ReasoningGym(Task):
    """reasoning-gym datasets by name; the answer is scored by the dataset's `score_answer` in [0, 1]."""

    name = "reasoning_gym"

    def load(self, split="train", n=None, seed=0, dataset=None, size=None, dataset_seed=None, **config):
        if not dataset:
            raise UserError("task 'reasoning_gym' needs options.dataset, e.g. options: {dataset: basic_arithmetic, size: 1000}")
        if split not in SPLITS:  # any other name drew a held-out set of its own seed: a typo (`tset`) went unnoticed
            raise UserError(f"task 'reasoning_gym': unknown split '{split}'; choose one of: {', '.join(SPLITS)}")
        # The test split leaves out the questions of the train draw of the same `size`, so the size must not follow
        # `n`: a test set of 50 compared against 50 of the 1,000 questions trained on (and one of 200 against 1,000 of
        # 3,000), keeping the rest as held out. A fixed default, and n past it refused.
        size = DEFAULT_SIZE if size is None else size
        whole_number(self.name, "options.size", size, least=1)
        if dataset_seed is not None:
            whole_number(self.name, "options.dataset_seed", dataset_seed, least=0)
        if n and n > size:
            raise UserError(f"task 'reasoning_gym': n={n} is more than the draw's size {size}; set {setting('options.size')} to at least "
                            f"{n}, the same for the train and test splits of these options (the test split leaves out "
                            "the questions of the train draw of its size)")
        seed = seed if dataset_seed is None else dataset_seed
        frozen = json.dumps(config, sort_keys=True)
        ds_seed = _split_seed(int(seed), split)
        ds = _dataset(dataset, size, ds_seed, frozen)
        seen = set() if split == "train" else {e["question"] for e in _dataset(dataset, size, _split_seed(int(seed), "train"), frozen)}
        rows = []
        for i in range(size):
            entry = ds[i]
            if entry["question"] in seen:
                continue
            gold = entry["answer"]  # None for open datasets (several right answers): the scorer decides
            rows.append({"prompt": entry["question"], "answer": None if gold is None else str(gold), "task": self.name,
                         "gym_dataset": dataset, "gym_size": size, "gym_seed": ds_seed, "gym_index": i,
                         "gym_config": json.loads(frozen)})
        return rows[:n] if n else rows

    def verify(self, answer, example):
        ds = _dataset(example["gym_dataset"], example["gym_size"], example["gym_seed"], json.dumps(example["gym_config"], sort_keys=True))
        entry = ds[example["gym_index"]]
        text = _TAGS.sub(" ", answer or "").strip()
        try:
            return float(ds.score_answer(text, entry))
        except Exception:  # a scorer choking on a hostile answer scores it wrong, not the run
            return 0.0
