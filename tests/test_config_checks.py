"""Config checks of the GRPO settings: each out-of-range setting is one line naming it; the defaults are R1's."""

import pytest

from ponder.config import RunConfig, load_config
from ponder.errors import UserError

RECIPE = "recipes/smoke-first-digit.yaml"


def error(*overrides):
    with pytest.raises(UserError) as e:
        load_config(None, list(overrides))
    return str(e.value)


def test_group_relative_advantages_need_two_samples_a_group(tmp_path, error_line):
    line = "config rollout.group_size must be at least 2 for group-relative advantages"
    assert error("rollout.group_size=1") == line
    assert error_line("train", RECIPE, f"output_dir={tmp_path}", "rollout.group_size=1") == f"ponder: error: {line}"
    # advantage none too: Dr. GRPO's r - mean is 0 for a group of one
    assert error("rollout.group_size=1", "algorithm.advantage=none") == line
    assert load_config(None, ["rollout.group_size=2", "algorithm.advantage=none"]).rollout.group_size == 2


def test_prompts_per_step_must_divide_into_the_minibatches():
    assert error("rollout.prompts_per_step=4", "algorithm.minibatches=3") == (
        "config rollout.prompts_per_step must be divisible by algorithm.minibatches")
    assert load_config(None, ["rollout.prompts_per_step=4", "algorithm.minibatches=2"]).algorithm.minibatches == 2


def test_eps_low_of_1_is_refused():
    """eps_low = 1 clips the ratio below at 0: no lower bound at all."""
    assert error("algorithm.eps_low=1") == (
        "config algorithm.eps_low must be in [0, 1) (the ratio is clipped below at 1 - eps_low); got 1")
    assert load_config(None, ["algorithm.eps_low=0.99"]).algorithm.eps_low == 0.99


def test_clip_defaults_are_grpos_symmetric_0_2():
    """R1 / GRPO clip at 1 -+ 0.2; clip-higher (DAPO's 0.28) is a recipe's choice. The shipped recipes all set
    eps_high, so only this test sees the default."""
    algorithm = RunConfig().algorithm
    assert (algorithm.eps_low, algorithm.eps_high) == (0.2, 0.2)


def test_an_empty_recipe_is_one_line_not_every_default(tmp_path, error_line):
    """An empty file (or comments alone) trained a tiny random model for 100 steps as run `run`, without a word."""
    for text in ("", "# name: mine\n\n   \n"):
        (tmp_path / "r.yaml").write_text(text)
        assert error_line("train", str(tmp_path / "r.yaml"), f"output_dir={tmp_path}") == (
            f"ponder: error: recipe '{tmp_path / 'r.yaml'}' holds no settings (it is empty, or comments only); write them "
            "there (see recipes/), or `{}` for every default")
    (tmp_path / "r.yaml").write_text("{}\n")
    assert load_config(tmp_path / "r.yaml").rollout.group_size == RunConfig().rollout.group_size
    assert not (tmp_path / "run").exists()


def test_absurd_counts_of_prompts_and_examples_are_one_line():
    """prompts_per_step=1e8 prepared 8e8 rollouts and a task's n=2**40 drew problems, both for minutes without a word
    and growing in memory."""
    assert error("rollout.prompts_per_step=100000000") == (
        "config rollout.prompts_per_step must be at most 125,000 with rollout.group_size=8 (1,000,000 rollouts a step; "
        "DAPO's steps hold 8,192); got 100000000")
    assert load_config(None, ["rollout.prompts_per_step=125000"]).rollout.prompts_per_step == 125_000
    assert error("data.tasks=[{name: arithmetic, n: 1099511627776}]") == (
        "config data.tasks[0].n must be at most 10,000,000 (a task's examples are held in memory), or unset (all of a "
        "file's rows); got 1099511627776")
    assert error("eval.tasks=[{name: arithmetic, split: test, n: 10000001}]").startswith("config eval.tasks[0].n must be at most")
