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


def test_a_recipe_path_that_is_a_directory_or_no_regular_file_is_named_as_such(tmp_path, error_line):
    """Each was "recipe ... not found", of a path that is there (ponder config of a run's directory)."""
    import os

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 1\n")
    assert error_line("config", "train", str(run)) == (
        f"ponder: error: recipe '{run}' is a directory; give the path of a YAML recipe (see recipes/), such as the run's "
        f"own {run / 'config.yaml'}")
    os.mkfifo(tmp_path / "pipe")  # (read, it would wait for a writer forever)
    assert error_line("config", "train", str(tmp_path / "pipe")) == (
        f"ponder: error: recipe '{tmp_path / 'pipe'}' is not a regular file; give the path of a YAML recipe (see recipes/)")


def test_yaml_too_deep_too_many_aliases_or_too_many_bases_is_one_line(tmp_path, error_line):
    """Thousands of nested lists and a chain of 1,200 bases ran out of Python's recursion (tracebacks); nine nested
    aliases of ten each ("a billion laughs") held every command for minutes as ponder copied them out."""
    from ponder.config import apply_override

    (tmp_path / "deep.yaml").write_text("seed: " + "[" * 5000 + "]" * 5000 + "\n")
    (tmp_path / "deeper.yaml").write_text("seed: " + "[" * 300 + "]" * 300 + "\n")  # (PyYAML reads it; copies did not)
    for name in ("deep", "deeper"):
        assert error_line("train", str(tmp_path / f"{name}.yaml")) == (
            f"ponder: error: recipe '{tmp_path / name}.yaml' nests too deep (lists or mappings inside one another hundreds "
            "of times); write it flat")
    laughs = ["data:\n  tasks:\n  - name: arithmetic\n    options:\n      l0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n"]
    laughs += [f"      l{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9)]
    (tmp_path / "laughs.yaml").write_text("".join(laughs))
    assert error_line("config", "train", str(tmp_path / "laughs.yaml")) == (
        f"ponder: error: recipe '{tmp_path / 'laughs.yaml'}' holds more than 100,000 values (aliases count each time they "
        "are used); a recipe needs far fewer: write out what is meant")
    with pytest.raises(UserError, match=r"^override 'seed' nests too deep"):
        apply_override({}, "seed=" + "[" * 3000 + "]" * 3000)
    for i in range(60):
        (tmp_path / f"b{i}.yaml").write_text((f"base: b{i + 1}.yaml\n" if i < 59 else "") + f"seed: {i}\n")
    with pytest.raises(UserError) as e:
        read_recipe(tmp_path / "b0.yaml")
    assert str(e.value) == (f"recipe '{tmp_path / 'b50.yaml'}' is a base past the 50 a chain of bases may have; join "
                            "some of them")
    assert read_recipe(tmp_path / "b10.yaml")["seed"] == 10  # (a chain of 50: b10 ... b59)


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
