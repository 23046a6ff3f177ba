"""ponder config: every setting of a command, resolved, with its comment from the code; the output is a recipe."""

import glob

import pytest

from ponder.cli import main
from ponder.config import to_dict
from ponder.show_config import KINDS, annotated, resolve


def _kind(recipe: str) -> list[str]:
    text = open(recipe).read()
    if "pretrain" in recipe or recipe.endswith("distill-student-base.yaml"):
        return ["pretrain"]
    if "distill" in recipe:
        return ["distill"]
    return ["sft"] if "coldstart:" in text and "tasks:" not in text.split("coldstart:")[0] else ["train"]


@pytest.mark.parametrize("recipe", sorted(glob.glob("recipes/*.yaml")))
def test_the_printed_settings_read_back_as_the_same_recipe(recipe, tmp_path):
    for kind in _kind(recipe):
        cfg = resolve(kind, recipe, [])
        (tmp_path / "all.yaml").write_text(annotated(cfg))
        assert to_dict(resolve(kind, str(tmp_path / "all.yaml"), [])) == to_dict(cfg), kind


def test_each_setting_is_printed_with_its_value_and_comment(capsys):
    assert main(["config", "train", "recipes/zero-tiny.yaml", "algorithm.eps_high=0.28", "optim.lr=3e-4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "  eps_high: 0.28  # clip-higher (DAPO: 0.28)" in out
    assert "  lr: 0.0003" in out
    assert "  dynamic_sampling: false  # DAPO: drop groups answered all right or all wrong, draw more prompts" in out
    # a comment above a field is its note too, and a nested section is a block
    ratio = next(line for line in out if line.startswith("  ratio: token  # Importance ratio."))
    assert ratio.endswith("(at mu = 1 every ratio is 1).")
    assert "guardrails:" in out and "  entropy_collapse:" in out and "    action: warn" in out
    # without a recipe: the defaults, overrides still apply
    assert main(["config", "sft", "optim.lr=0.5"]) == 0
    assert "  lr: 0.5" in capsys.readouterr().out.splitlines()
    assert set(KINDS) == {"train", "sft", "sample", "distill", "pretrain"}


def test_a_mistake_in_the_recipe_is_one_line(error_line):
    assert error_line("config", "train", "recipes/zero-tiny.yaml", "algorithm.eps_hihg=0.3").startswith(
        "ponder: error: unknown config key 'algorithm.eps_hihg'")
