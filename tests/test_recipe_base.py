"""`base:` in a recipe: start from another recipe, merge mappings key by key, replace the rest."""

import pytest

from ponder.config import load_config, read_recipe
from ponder.errors import UserError


def test_a_recipe_on_a_base_merges_mappings_and_replaces_other_values(tmp_path):
    (tmp_path / "a.yaml").write_text(
        "name: a\nseed: 3\nmodel: {path: tiny-random, gradient_checkpointing: true}\n"
        "data: {tasks: [{name: first_digit}, {name: arithmetic}]}\nrewards: {accuracy: 1.0, format: 1.0}\n"
    )
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yaml").write_text(  # the base path is read beside the recipe, not from the cwd
        "base: ../a.yaml\nname: b\nmodel: {path: tiny-random-micro}\ndata: {tasks: [{name: first_digit}]}\n"
        "rewards: {format: 0.5}\n"
    )
    got = read_recipe(tmp_path / "sub" / "b.yaml")
    assert got == {
        "name": "b", "seed": 3, "model": {"path": "tiny-random-micro", "gradient_checkpointing": True},
        "data": {"tasks": [{"name": "first_digit"}]},  # lists are replaced, not appended to
        "rewards": {"accuracy": 1.0, "format": 0.5},
    }
    cfg = load_config(tmp_path / "sub" / "b.yaml", ["seed=4"])
    assert (cfg.name, cfg.seed, cfg.model.path, len(cfg.data.tasks)) == ("b", 4, "tiny-random-micro", 1)


def test_a_base_loop_or_a_missing_base_is_one_clear_error(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\nname: a\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nname: b\n")
    with pytest.raises(UserError, match="leads back to itself"):
        read_recipe(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(UserError) as e:  # it was "recipe '.../nowhere.yaml' not found": as if c.yaml were missing
        read_recipe(tmp_path / "c.yaml")
    assert str(e.value) == (f"recipe '{tmp_path / 'c.yaml'}': its base 'nowhere.yaml' ({tmp_path / 'nowhere.yaml'}) not "
                            "found; a base is read from the recipe's own folder: fix the path, or remove base")


def test_the_experiment_recipes_are_the_demo_recipe_on_another_model():
    zero = load_config("recipes/zero-tiny.yaml")
    for recipe, path in [("recipes/coldstart-rl-tiny.yaml", "runs/coldstart-tiny/final"),
                         ("recipes/rl-student-tiny.yaml", "runs/student-base")]:
        cfg = load_config(recipe)
        assert cfg.model.path == path and cfg.name != zero.name
        cfg.model.path, cfg.name = zero.model.path, zero.name
        assert cfg == zero


def test_a_key_set_twice_is_one_line_naming_it(tmp_path):
    """YAML keeps the last of two equal keys without a word: `optim: {lr: 1e-3, lr: 2e-3}` trained at 2e-3."""
    from ponder.config import apply_override

    (tmp_path / "r.yaml").write_text("name: r\noptim:\n  lr: 1.0e-3\n  warmup_steps: 2\n  lr: 2.0e-3\n")
    with pytest.raises(UserError) as e:
        read_recipe(tmp_path / "r.yaml")
    assert str(e.value) == f"recipe '{tmp_path / 'r.yaml'}' sets 'lr' twice in one mapping (lines 3 and 5): keep one"
    with pytest.raises(UserError) as e:
        apply_override({}, "optim={lr: 1, lr: 2}")
    assert str(e.value) == "override 'optim={lr: 1, lr: 2}' sets 'lr' twice: keep one"
    # the same key in two mappings, and a merge key's keys overridden beside it, are no repeats
    (tmp_path / "ok.yaml").write_text("a: {lr: 1}\nb: {lr: 2}\nc: &x {k: 1}\nd: {<<: *x, k: 2}\n")
    assert read_recipe(tmp_path / "ok.yaml") == {"a": {"lr": 1}, "b": {"lr": 2}, "c": {"k": 1}, "d": {"k": 2}}
