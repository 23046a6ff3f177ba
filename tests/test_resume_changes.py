"""`--resume` refuses settings that differ from the run's config.yaml, except the safe ones, unless
`--allow-changes`; config.yaml then records each change and the step it applies from."""

import json

import yaml

from ponder.cli import main
from ponder.config import load_config

SAFE = ("train.steps, train.save_every, train.keep_last, train.log_samples, guardrails.non_finite.max_nan_steps, train.threads, "
        "train.log_to, eval.every, train.sharding, train.collective_timeout")
FAST = ["rollout.prompts_per_step=4", "rollout.group_size=4", "train.log_samples=1"]


def test_grpo_resume_refuses_changes_unless_allowed_and_records_them(capsys, tmp_path, error_line):
    base = ["train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}", "name=r", *FAST]
    assert main(base + ["train.steps=1"]) == 0
    config = tmp_path / "r" / "config.yaml"
    before = config.read_text()

    line = error_line(*base, "train.steps=2", "optim.lr=1e-3", "rollout.group_size=8", "--resume")
    assert line == (f"ponder: error: --resume with settings that differ from the run's {config}: rollout.group_size 4 -> 8, "
                    "optim.lr 0.003 -> 0.001; pass --allow-changes to continue with them (config.yaml records each change "
                    f"and the step it applies from), or leave them out. Safe to change on resume: {SAFE}")
    assert config.read_text() == before  # nothing rewritten, nothing trained
    assert [p.name for p in (tmp_path / "r" / "checkpoints").iterdir()] == ["step-1"]

    # safe keys change without the flag, and are recorded too
    assert main(base + ["train.steps=2", "eval.every=5", "--resume"]) == 0
    assert "resuming from step 1 with changes (recorded in config.yaml): train.steps 1 -> 2, eval.every 0 -> 5" in " ".join(capsys.readouterr().out.split())
    assert yaml.safe_load(config.read_text())["changes"] == [
        {"key": "train.steps", "old": 1, "new": 2, "from_step": 2}, {"key": "eval.every", "old": 0, "new": 5, "from_step": 2}]

    # the run's config.yaml is a recipe: resuming from it changes nothing
    assert load_config(config).train.steps == 2
    assert main(["train", str(config), "--resume"]) == 0

    assert main(base + ["train.steps=3", "eval.every=5", "optim.lr=1e-3", "--resume", "--allow-changes"]) == 0
    saved = yaml.safe_load(config.read_text())
    assert saved["optim"]["lr"] == 1e-3 and saved["train"]["steps"] == 3
    assert saved["changes"][2:] == [{"key": "optim.lr", "old": 0.003, "new": 0.001, "from_step": 3},
                                    {"key": "train.steps", "old": 2, "new": 3, "from_step": 3}]
    rows = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows] == [1, 2, 3]
    # the changed rate is the one trained with: step 3 as in a run at 1e-3 from the start (not the saved 3e-3)
    assert main(["train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}", "name=f", *FAST, "train.steps=3",
                 "optim.lr=1e-3"]) == 0
    fresh = [json.loads(l) for l in (tmp_path / "f" / "metrics.jsonl").read_text().splitlines()]
    assert rows[2]["lr"] == fresh[2]["lr"] and fresh[2]["lr"] < rows[1]["lr"]


def test_grpo_resume_refuses_changed_prompts_unless_allowed(capsys, tmp_path, error_line):
    """The task file rewritten between the stop and --resume: the settings are the same, so it resumed silently, its
    sampler's place (a count of prompts drawn) now falling on other prompts. `ponder sft` refused this already."""
    data = tmp_path / "d.jsonl"
    write = lambda op: data.write_text("".join(json.dumps({"prompt": f"{i} {op} 3 =", "answer": "0"}) + "\n"  # noqa: E731
                                           for i in range(12)))
    write("+")
    base = ["train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}", "name=d", *FAST,
            f"data.tasks=[{{name: jsonl, path: {data}}}]"]
    assert main(base + ["train.steps=1"]) == 0
    write("*")
    assert error_line(*base, "train.steps=2", "--resume") == (
        f"ponder: error: --resume: the prompts of data.tasks differ from those the run in {tmp_path / 'd'} trained on (a "
        "task file or dataset changed since, or how a weight draws: weight x n examples since 2026-12-07); pass "
        "--allow-changes to continue on the new prompts, or start a new run (name=...)")
    assert [p.name for p in (tmp_path / "d" / "checkpoints").iterdir()] == ["step-1"]
    assert main(base + ["train.steps=2", "--resume", "--allow-changes"]) == 0
    samples = [json.loads(l) for l in (tmp_path / "d" / "samples.jsonl").read_text().splitlines()]
    assert all("*" in r["prompt"] for r in samples if r["step"] == 2) and all("+" in r["prompt"] for r in samples
                                                                             if r["step"] == 1)
    write("*")  # unchanged since the last checkpoint: resumes without the flag
    assert main(base + ["train.steps=3", "--resume"]) == 0


def test_resume_compares_with_the_checkpoints_settings_where_config_yaml_is_gone(tmp_path, error_line):
    """config.yaml deleted or damaged: every settings check was skipped (a changed group size went through, unrecorded);
    the newest checkpoint holds the settings it was written with."""
    base = ["train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}", "name=c", *FAST]
    assert main(base + ["train.steps=1"]) == 0
    state = tmp_path / "c" / "checkpoints" / "step-1" / "trainer_state.pt"
    for damage in (b"name: c\nseed: [unclosed\n", b"name: c\xff\xfe\n", None):  # (non-UTF-8 bytes: a traceback)
        config = tmp_path / "c" / "config.yaml"
        config.write_bytes(damage) if damage else config.unlink()
        assert error_line(*base, "train.steps=2", "rollout.group_size=8", "--resume").startswith(
            f"ponder: error: --resume with settings that differ from the run's {state}: rollout.group_size 4 -> 8; pass "
            "--allow-changes")
    assert main(base + ["train.steps=2", "--resume"]) == 0


def test_a_config_yaml_cut_short_is_named_as_such_not_as_another_commands_run(tmp_path, error_line):
    """Its first lines alone (name, output_dir, seed, model) are SFT's sections: the run was called a `ponder sft` one,
    and that command then failed on settings the run never had."""
    base = ["train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}", "name=t", *FAST]
    assert main(base + ["train.steps=1"]) == 0
    config = tmp_path / "t" / "config.yaml"
    config.write_text("".join(config.read_text().splitlines(keepends=True)[:8]))
    line = (f"ponder: error: {config} lacks sections of the `ponder train` run its checkpoints were trained by (algorithm, "
            "data, eval, guardrails, optim, rewards, rollout, train): cut short? Restore it, or delete it and resume with "
            "the recipe the run started from (`ponder train RECIPE --resume`; step-1 holds its settings)")
    assert error_line("train", str(tmp_path / "t"), "--resume", "train.steps=2") == line
    assert error_line(*base, "train.steps=2", "--resume") == line
    config.unlink()
    assert main(base + ["train.steps=2", "--resume"]) == 0


def test_resume_leaves_out_damaged_lines_of_the_runs_files(tmp_path):
    """A metrics or samples line that is no row, or whose step is no number, and a `changes:` that is no list (a hand
    edit, damaged bytes) were tracebacks of --resume; they are left out, as the report leaves them out."""
    base = ["train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}", "name=d", *FAST]
    assert main(base + ["train.steps=1"]) == 0
    run = tmp_path / "d"
    for name in ("metrics.jsonl", "samples.jsonl"):
        with open(run / name, "a") as f:
            f.write('[1, 2]\n{"step": null}\n{"step": "x"}\n{"step": 9, "late": 1}\n')
    with open(run / "config.yaml", "a") as f:
        f.write("changes: 5\n")
    assert main(base + ["train.steps=2", "--resume"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(isinstance(r, dict) for r in rows)
    assert {json.loads(line)["step"] for line in (run / "samples.jsonl").read_text().splitlines()} == {1, 2}
    assert yaml.safe_load((run / "config.yaml").read_text())["changes"] == [  # (the 5 not carried on)
        {"key": "train.steps", "old": 1, "new": 2, "from_step": 2}]


def test_a_hand_edited_config_yaml_is_a_change_refused_unless_allowed(tmp_path, error_line):
    """`ponder train RUN_DIR --resume` takes config.yaml as its recipe and so compared it with itself: an lr edited there
    by hand trained on unrefused and unrecorded. Compared with the newest checkpoint's settings now; a change config.yaml
    records (a resume killed before its next checkpoint) is not an edit. And a config.yaml that no longer parses is
    named as such, not as missing."""
    base = ["train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}", "name=h", *FAST]
    assert main(base + ["train.steps=1"]) == 0
    run, config = tmp_path / "h", tmp_path / "h" / "config.yaml"
    kept = config.read_text()
    config.write_text(kept.replace("  lr: 0.003\n", "  lr: 0.001\n", 1))
    assert error_line("train", str(run), "--resume", "train.steps=2") == (
        f"ponder: error: --resume: {config} differs from the settings its run's newest checkpoint was trained with, and no "
        "`changes:` entry records it (edited by hand?): optim.lr 0.003 -> 0.001; pass --allow-changes to continue with "
        "them (config.yaml then records each change), or undo the edit")
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-1"]
    assert main(["train", str(run), "--resume", "--allow-changes", "train.steps=2"]) == 0
    assert yaml.safe_load(config.read_text())["changes"] == [
        {"key": "train.steps", "old": 1, "new": 2, "from_step": 2}, {"key": "optim.lr", "old": 0.003, "new": 0.001, "from_step": 2}]
    assert main(["train", str(run), "--resume", "train.steps=3"]) == 0  # recorded, and in step-2's settings now

    for text, line in (("optim: {lr: [0.1\n", f"recipe '{config}' is not valid YAML at line 2: fix the syntax"),
                       ("- 1\n", f"recipe '{config}' must be a mapping of options at its top level"),
                       ("# emptied\n", f"{config} holds no settings; restore it, or resume with the recipe the run "
                                        "started from (`ponder train RECIPE --resume`)")):
        config.write_text(text)
        assert error_line("train", str(run), "--resume", "train.steps=4") == f"ponder: error: {line}"


def test_sft_resume_refuses_changes_unless_allowed(tmp_path, error_line):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1", "completion": f"{i + 1}"}) + "\n" for i in range(4)))
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(f"name: s\noutput_dir: {tmp_path}\nmodel: {{path: tiny-random}}\ndata: {{files: [{data}]}}\n"
                      "train: {steps: 1, batch_size: 2, log_samples: 0}\n")
    assert main(["sft", str(recipe)]) == 0
    config = tmp_path / "s" / "config.yaml"
    line = error_line("sft", str(recipe), "train.steps=2", "train.batch_size=4", "--resume")
    assert line == (f"ponder: error: --resume with settings that differ from the run's {config}: train.batch_size 2 -> 4; "
                    "pass --allow-changes to continue with them (config.yaml records each change and the step it applies "
                    "from), or leave them out. Safe to change on resume: train.steps, train.epochs, train.save_every, "
                    "train.keep_last, train.log_samples, train.sample_max_new_tokens, train.max_nan_steps, train.threads, "
                    "train.log_to, optim.token_budget")
    assert main(["sft", str(recipe), "train.steps=2", "train.batch_size=4", "optim.lr=1e-3", "--resume",
                 "--allow-changes"]) == 0
    assert yaml.safe_load(config.read_text())["changes"] == [
        {"key": "optim.lr", "old": 1e-5, "new": 1e-3, "from_step": 2},
        {"key": "train.steps", "old": 1, "new": 2, "from_step": 2},
        {"key": "train.batch_size", "old": 2, "new": 4, "from_step": 2}]
    # trained at the new rate from step 2: the one a run at 1e-3 from the start has there
    assert main(["sft", str(recipe), "name=s2", "train.steps=2", "train.batch_size=4", "optim.lr=1e-3"]) == 0
    lrs = [[json.loads(l)["lr"] for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines() if '"lr"' in l]
           for run in ("s", "s2")]
    assert lrs[0][-1] == lrs[1][-1]


def test_resume_never_changes_the_adapters_shapes(tmp_path, error_line):
    """--allow-changes let a new LoRA rank, other targets, or LoRA added or removed through, and the run then died in
    a traceback loading the saved adapters or optimizer state."""
    base = ["train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}", *FAST, "train.steps=1"]
    assert main(base + ["name=l", "model.lora={r: 4, alpha: 8}"]) == 0
    assert main(base + ["name=f"]) == 0
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    more = ["train.steps=2", "--resume", "--allow-changes"]
    assert error_line(*base, "name=l", "model.lora={r: 8, alpha: 8}", *more) == (
        "ponder: error: --resume cannot change model.lora.r 4 -> 8: the run's saved adapters and optimizer state have "
        "the shapes it started with; start a new run (another name=) with these settings")
    assert error_line(*base, "name=l", "model.lora={r: 4, alpha: 8, target_modules: [q_proj]}", *more).startswith(
        'ponder: error: --resume cannot change model.lora.target_modules ["q_proj", "k_proj", "v_proj", "o_proj"] -> ["q_proj"]')
    assert error_line(*base, "name=f", "model.lora={r: 4, alpha: 8}", *more).startswith(
        "ponder: error: --resume cannot change model.lora.r null -> 4")
    assert error_line(*base, "name=l", *more).startswith("ponder: error: --resume cannot change model.lora.r 4 -> null")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert main(base + ["name=l", "model.lora={r: 4, alpha: 16}", *more]) == 0  # the scale alone may change


def test_a_runs_kind_is_told_by_its_sections_whatever_its_history():
    """A config.yaml with `changes:` (any resumed run) or a key that has moved since (an older run's
    train.max_nan_steps) is a run of the command that wrote it, not of no command, which let every command resume it."""
    from ponder.resume import run_kind

    grpo = yaml.safe_load(open("recipes/smoke-first-digit.yaml"))
    sft = yaml.safe_load(open("recipes/coldstart-tiny.yaml"))
    changes = [{"key": "train.steps", "old": 2, "new": 3, "from_step": 3}]
    assert run_kind(grpo | {"changes": changes, "train": {"steps": 3, "max_nan_steps": 2}}) == "train"
    assert run_kind(sft | {"changes": changes}) == "sft"
    assert run_kind({"changes": changes, "model": {}, "tasks": []}) == "sample"
    assert run_kind({"no_such_section": 1}) is None


def test_before_and_after_evaluations_of_other_problems_are_said_to_be(capsys):
    """A resume with another seed draws other held-out problems: the table set the old 'before' beside the new 'after'
    as one held-out set, without a word."""
    from ponder.train import _print_before_after

    before = {"arithmetic/test": {"task_hash": "sha256:aa", "metrics": {"pass@1": 0.25}}}
    _print_before_after(before, {"arithmetic/test": {"task_hash": "sha256:aa", "metrics": {"pass@1": 0.5}}})
    assert "other problems" not in capsys.readouterr().out
    _print_before_after(before, {"arithmetic/test": {"task_hash": "sha256:bb", "metrics": {"pass@1": 0.5}}})
    assert ("held-out arithmetic/test: the 'after' evaluation saw other problems than the 'before' one (the seed or the "
            "eval task changed on --resume); the two columns are not one held-out set") in " ".join(capsys.readouterr().out.split())
