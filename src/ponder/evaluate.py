"""Entry points of evaluation: `evaluate(...)` for the trainer and the demo, `add_parser` for `ponder eval`.

The code lives in ponder.evaluation (stats, runner, command); see docs/evaluation.md.
"""

from ponder.evaluation.command import add_parser, compare_table, load_result, main, run, write_results
from ponder.evaluation.runner import evaluate, figures, flat_metrics, run_metrics, task_hash
from ponder.evaluation.stats import bootstrap_ci, majority, pass_at_k, pass_ks, vote_groups

__all__ = [
    "add_parser", "bootstrap_ci", "compare_table", "evaluate", "figures", "flat_metrics", "run_metrics",
    "load_result", "main", "majority", "pass_at_k", "pass_ks", "run", "task_hash", "vote_groups", "write_results",
]

if __name__ == "__main__":
    raise SystemExit(main())
