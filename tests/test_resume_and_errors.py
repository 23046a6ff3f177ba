"""Kill-and-resume gives the same metrics as an uninterrupted run; user mistakes give one clear line."""

import datetime
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from ponder.cli import main

LR = "between 0 (weights frozen) and 1 (AdamW moves each weight by about lr a step; R1's RL: 3e-6)"

# A reward of weight 0 that kills its own process (SIGKILL: no clean-up at all; or KILL_SIGNAL) during a chosen
# step; with SIGTERM_IN_SAVE=N, a SIGTERM while the N-th checkpoint is being written.
KILLER = textwrap.dedent("""
    import os, signal, sys
    from ponder.rewards import register
    calls = {"n": 0}
    @register("killer")
    def killer(completions, *, prompts, **_):
        calls["n"] += 1
        if calls["n"] == int(os.environ.get("KILL_AT_CALL", "0")):
            os.kill(os.getpid(), getattr(signal, os.environ.get("KILL_SIGNAL", "SIGKILL")))
        return [0.0] * len(completions)
    if os.environ.get("SIGTERM_IN_SAVE"):
        from ponder import models
        real, saves = models.save, {"n": 0}
        def save(*args, **kwargs):  # what ponder.checkpoint.save calls to write the weights into its temporary directory
            saves["n"] += 1
            if saves["n"] == int(os.environ["SIGTERM_IN_SAVE"]):
                os.kill(os.getpid(), signal.SIGTERM)
            return real(*args, **kwargs)
        models.save = save
    from ponder.cli import main
    sys.exit(main(sys.argv[1:]))
""")

VOLATILE = ("time", "time/generate", "time/reward", "time/train", "time/total", "tokens_per_s")


def _run(tmp_path, name, *extra, kill_at=0, env=()):
    script = tmp_path / "run_with_killer.py"
    script.write_text(KILLER)
    args = [sys.executable, str(script), "train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}",
            f"name={name}", "train.steps=6", "train.save_every=3", "rewards.killer=0.0", *extra]
    env = {**os.environ, "KILL_AT_CALL": str(kill_at), **dict(env)}
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)


def _metrics(path):
    return [{k: v for k, v in json.loads(l).items() if k not in VOLATILE} for l in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Metrics of the 6-step run that the stopped-and-resumed runs must repeat."""
    root = tmp_path_factory.mktemp("full")
    full = _run(root, "full")
    assert full.returncode == 0, full.stderr
    return _metrics(root / "full" / "metrics.jsonl")


def test_kill_and_resume_repeats_the_uninterrupted_run(tmp_path, uninterrupted):
    # killed in step 5 (the start-up check is call 1, step k is call k+1): checkpoint step-3 exists
    killed = _run(tmp_path, "cut", kill_at=6)
    assert killed.returncode == -signal.SIGKILL
    ckpts = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir())
    assert ckpts == ["step-3"]
    resumed = _run(tmp_path, "cut", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    b = _metrics(tmp_path / "cut" / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert b == uninterrupted  # bit for bit on CPU: losses, rewards, grad norms, entropies


def test_checkpoint_write_killed_midway_leaves_previous_intact(tmp_path, monkeypatch):
    import torch

    from ponder import checkpoint
    from ponder.models import load

    model, tok = load("tiny-random")
    checkpoint.save(tmp_path, 1, model, tok, {"step": 1})

    def dying_save(*a, **k):
        raise KeyboardInterrupt  # as if killed while writing trainer_state.pt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, 2, model, tok, {"step": 2})
    assert checkpoint.latest(tmp_path).name == "step-1"
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-1"]


def test_unknown_key_suggests_the_closest(tmp_path, error_line):
    line = error_line("train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}", "optim.lrr=1e-4")
    assert line == "ponder: error: unknown config key 'optim.lrr'; did you mean 'optim.lr'?"


def test_a_list_item_override_says_to_give_the_whole_list(tmp_path, error_line):
    line = error_line("train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}", "data.tasks[0].n=5")
    assert line == ("ponder: error: override 'data.tasks[0].n': the items of a list (tasks) cannot be set one by one; "
                    "give the whole list, e.g. 'data.tasks=[{n: 5, ...}]'")


def test_pretrain_keys_are_suggested_from_pretrains_own_config(error_line):
    """A run recipe's key in a pretrain recipe: the suggestion is pretrain's own key (it once suggested the
    run recipe's 'output_dir' for 'output_dir' itself)."""
    line = error_line("pretrain", "recipes/pretrain-tiny.yaml", "output_dir=/tmp/nowhere")
    assert line == "ponder: error: unknown config key 'output_dir'; did you mean 'output'?"


def test_key_in_the_wrong_section_is_found(tmp_path, error_line):
    line = error_line("train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}", "rollout.beta=0.1")
    assert "unknown config key 'rollout.beta'" in line and "algorithm.beta" in line


def test_wrong_type(tmp_path, error_line):
    line = error_line("train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}", "rollout.group_size=many")
    assert line == "ponder: error: config rollout.group_size: expected an integer, got 'many'"


def test_missing_model_directory(tmp_path, error_line):
    line = error_line("train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}", f"model.path={tmp_path}/nope")
    assert f"model '{tmp_path}/nope' not found" in line and "tiny-random" in line


def test_dataset_row_without_answer_names_file_and_line(tmp_path, error_line):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "1+1", "answer": "2"}\n{"prompt": "2+2"}\n')
    line = error_line("train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}",
                       f"data.tasks=[{{name: jsonl, path: {data}}}]")
    assert line == f"ponder: error: {data}:2: row has no 'answer' field; every row needs prompt, answer"


def test_bad_data_is_told_before_a_model_is_loaded(tmp_path, error_line, monkeypatch):
    """Loading a 7B model takes minutes, and on CUDA prints what precision it chose: a mistake in the data or the
    rewards comes first, as the only line (GRPO and SFT)."""
    from ponder import models

    def no_model(*_, **__):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(models, "load_trainable", no_model)
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "1+1", "answer": "2"}\n{"prompt": "2+2"}\n')
    line = error_line("train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}",
                      f"data.tasks=[{{name: jsonl, path: {data}}}]")
    assert line == f"ponder: error: {data}:2: row has no 'answer' field; every row needs prompt, answer"
    assert error_line("train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}", "rewards.nope=1.0").startswith(
        "ponder: error: unknown reward 'nope'")
    sft = tmp_path / "sft.jsonl"
    sft.write_text('{"prompt": "x"}\n')
    assert error_line("sft", "recipes/coldstart-tiny.yaml", f"output_dir={tmp_path}", f"data.files=[{sft}]",
                      "data.coldstart=[]") == f"ponder: error: {sft}:1: no 'completion' field; rows need prompt and completion (or messages)"


def test_reward_returning_wrong_length_is_named(tmp_path, error_line):
    from ponder.rewards import REWARDS

    REWARDS["too_short"] = lambda completions, **_: [1.0]
    try:
        line = error_line("train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}",
                           "rewards.too_short=1.0", "rollout.prompts_per_step=2")
    finally:
        del REWARDS["too_short"]
    # the start-up check calls it with two completions, so the length error shows before any rollout
    assert line == "ponder: error: reward 'too_short' returned 1 value for 2 completions; it must return one value per completion"


def test_nan_losses_stop_the_run_and_keep_the_last_checkpoint(capsys, tmp_path, monkeypatch):
    from ponder.rl import trainer

    real, calls = trainer.policy_loss, {"n": 0}

    def nan_after_two_steps(*args, **kwargs):  # (a non-finite reward is refused before it gets here)
        calls["n"] += 1
        loss, stats = real(*args, **kwargs)
        return (loss * float("nan") if calls["n"] > 2 else loss), stats

    monkeypatch.setattr(trainer, "policy_loss", nan_after_two_steps)
    code = main(["train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}", "name=nan",
                 "train.save_every=2", "guardrails.non_finite.max_nan_steps=3", "rollout.prompts_per_step=2",
                 "train.skip_zero_advantage=false"])  # one loss a step, whatever the rewards
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    ckpt = tmp_path / "nan" / "checkpoints" / "step-2"
    assert err[0] == ("ponder: training stopped: guardrail non_finite at step 5: non-finite losses in a row 3 >= 3 "
                      "(guardrails.non_finite.max_nan_steps; those updates were skipped); the last good checkpoint is "
                      f"{ckpt} (continue it with --resume and --allow-changes, e.g. with a lower optim.lr, or "
                      "train.precision=fp32 where it ran in bf16)")
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["step-2"]
    rows = [json.loads(l) for l in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_updates"] for r in rows] == [0, 0, 1, 1, 1]  # the stopping step is logged, not saved
    assert [(e["guardrail"], e["action"]) for e in rows[-1]["guardrail_events"]] == [("non_finite", "stop")]
    assert (tmp_path / "nan" / "report.html").is_file()


def test_existing_run_is_not_overwritten(capsys, tmp_path, error_line):
    assert main(["train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}", "name=once",
                 "train.steps=2", "train.save_every=2", "rollout.prompts_per_step=2"]) == 0
    capsys.readouterr()
    line = error_line("train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}", "name=once", "train.steps=2")
    assert "already holds checkpoints; pass --resume" in line


def test_pretrain_refuses_to_overwrite_a_model_before_training(error_line):
    """The shipped recipe writes the package's own tiny-base: without --overwrite, a quick `steps=3` trial stops
    at once and leaves the model as it was."""
    from pathlib import Path

    base = Path("src/ponder/assets/tiny-base")
    before = {p.name: p.stat().st_mtime_ns for p in base.iterdir()}
    line = error_line("pretrain", "recipes/pretrain-tiny.yaml", "steps=3")
    assert line == (f"ponder: error: pretrain: output {base} already holds files (a model?); pass --overwrite to "
                    "replace them, or set output=DIR to a new directory")
    assert {p.name: p.stat().st_mtime_ns for p in base.iterdir()} == before


RANGE_ERRORS = [  # (command line, the line a user sees)
    (["rollout.temperature=-1"], "config rollout.temperature must be 0 (greedy) or more; got -1"),
    (["rollout.top_p=2"], "config rollout.top_p must be in (0, 1]; got 2"),
    (["eval.top_k=-2"], "config eval.top_k must be 0 (off) or more; got -2"),
    (["rollout.min_p=1"], "config rollout.min_p must be in [0, 1) (0: off; a share of the most likely token's probability); got 1"),
    (["rollout.max_new_tokens=0"], "config rollout.max_new_tokens must be at least 1; got 0"),
    (["rollout.prompts_per_step=0"], "config rollout.prompts_per_step must be at least 1; got 0"),  # was a traceback
    (["algorithm.eps_low=-1"], "config algorithm.eps_low must be in [0, 1) (the ratio is clipped below at 1 - eps_low); got -1"),
    (["algorithm.beta=-0.1"], "config algorithm.beta must be between 0 (no KL term) and 1,000 (R1: 0.001); got -0.1"),
    (["algorithm.beta=1e30"], "config algorithm.beta must be between 0 (no KL term) and 1,000 (R1: 0.001); got 1e+30"),
    (["algorithm.dual_clip=1.1"], "config algorithm.dual_clip must be above 1 + algorithm.eps_high = 1.28 (where the clip "
                                   "leaves off; 3 is usual), or null (off); got 1.1"),
    (["algorithm.top_entropy_quantile=0"], "config algorithm.top_entropy_quantile must be in (0, 1]: the share of tokens, "
                                            "those of highest entropy, that carry policy gradient (1: all; the paper: 0.2); got 0"),
    (["algorithm.entropy_coef=-0.01"], "config algorithm.entropy_coef must be between 0 (no entropy bonus) and 1,000 "
                                       "(0.001 is usual); got -0.01"),
    (["algorithm.entropy_coef=1e30"], "config algorithm.entropy_coef must be between 0 (no entropy bonus) and 1,000 "
                                      "(0.001 is usual); got 1e+30"),  # (every update non-finite, blamed on the lr)
    (["optim.lr=-1"], f"config optim.lr must be {LR}; got -1"),  # was torch's traceback
    (["optim.lr=1e39"], f"config optim.lr must be {LR}; got 1e+39"),  # overflowed float32 in AdamW: a traceback
    (["optim.warmup_steps=-3"], "config optim.warmup_steps must be 0 or more; got -3"),
    (["train.save_every=-1"], "config train.save_every must be 0 (only at the end) or more; got -1"),
    (["train.steps=0"], "config train.steps must be at least 1; got 0"),
    (["eval.k=0"], "config eval.k must be at least 1; got 0"),
    (["data.tasks=[{name: first_digit, n: 0}]"],  # was the task's default count, silently
     "config data.tasks[0].n must be at least 1 (or unset: the task's default); got 0"),
    (["data.tasks=[{name: first_digit}, {name: first_digit, weight: 0}]"],  # was counted once, as weight 1
     "config data.tasks[1].weight must be above 0 and at most 1,000 (weight x n of the task's n examples are drawn); got 0"),
    (["data.tasks=[{name: first_digit, weight: 1e12}]"],  # was a MemoryError traceback
     "config data.tasks[0].weight must be above 0 and at most 1,000 (weight x n of the task's n examples are drawn); "
     "got 1e+12"),
]


@pytest.mark.parametrize("overrides,line", RANGE_ERRORS)
def test_settings_out_of_range_are_one_line_before_anything_runs(tmp_path, error_line, overrides, line):
    assert error_line("train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}", *overrides) == f"ponder: error: {line}"
    assert not (tmp_path / "run").exists() and not any(tmp_path.iterdir())


def test_sampling_flags_out_of_range_are_one_line(tmp_path, error_line):
    common = ["--model", "tiny-random", "--tasks", "first_digit", "--out", str(tmp_path / "e")]
    assert error_line("eval", *common, "--temperature", "-1") == "ponder: error: --temperature must be 0 or more; got -1"
    assert error_line("eval", *common, "--top-p", "5") == "ponder: error: --top-p must be in (0, 1]; got 5"
    assert error_line("eval", *common, "--top-k", "-1") == "ponder: error: --top-k must be 0 (off) or more; got -1"
    assert error_line("eval", *common, "--min-p", "1") == "ponder: error: --min-p must be in [0, 1) (0: off); got 1"
    assert error_line("sample", "--model", "tiny-random", "--tasks", "first_digit", "--min-p", "2", "--out",
                      str(tmp_path / "s.jsonl")) == ("ponder: error: config min_p must be in [0, 1) (0: off; a share of "
                                                     "the most likely token's probability); got 2")
    assert error_line("eval", *common, "--max-tokens", "0") == "ponder: error: --max-tokens must be at least 1; got 0"
    assert error_line("eval", *common, "--n", "-2") == (
        "ponder: error: --n must be at least 1 and at most 10,000,000 (or left out: the task's default); got -2")
    assert error_line("eval", *common, "--n", str(2**40)) == (  # (drew problems for minutes, growing in memory)
        "ponder: error: --n must be at least 1 and at most 10,000,000 (or left out: the task's default); got 1099511627776")
    assert error_line("sample", "--model", "tiny-random", "--n", str(2**40), "--out", str(tmp_path / "s.jsonl")) == (
        "ponder: error: config tasks[0].n must be at most 10,000,000 (a task's examples are held in memory), or unset "
        "(all of a file's rows); got 1099511627776")
    assert error_line("sample", "--model", "tiny-random", "--n", "0", "--out", str(tmp_path / "s.jsonl")) == (
        "ponder: error: config tasks[0].n must be at least 1 (or unset: the task's default); got 0")  # 0 was "all"
    assert error_line("sample", "--model", "tiny-random", "--tasks", "first_digit", "--temperature", "-1",
                      "--out", str(tmp_path / "s.jsonl")) == "ponder: error: config temperature must be 0 (greedy) or more; got -1"
    assert error_line("sft", "recipes/coldstart-tiny.yaml", f"output_dir={tmp_path}", "optim.lr=-1") == (
        f"ponder: error: config optim.lr must be {LR}; got -1")
    assert error_line("sft", "recipes/coldstart-tiny.yaml", f"output_dir={tmp_path}", "eval.min_p=1.5") == (  # was taken:
        "ponder: error: config eval.min_p must be in [0, 1) (0: off; a share of the most likely token's probability); "
        "got 1.5")  # every token cut away, NaN log-probs in the evaluation
    assert not any(tmp_path.iterdir())


def test_overrides_may_follow_the_flags(tmp_path, capsys):
    """`ponder train RECIPE --resume train.steps=2` as `... train.steps=2 --resume` (argparse alone rejected it with
    the top-level usage line); what is not key=value after a flag stays an error."""
    from ponder.cli import main

    base = ["train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}", "name=r", "rollout.prompts_per_step=4"]
    assert main(base + ["train.steps=1"]) == 0
    assert main(base + ["--resume", "train.steps=2"]) == 0
    assert [json.loads(l)["step"] for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(base + ["--resume", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_a_recipe_given_to_another_command_is_named_as_that_commands(error_line):
    """A distill recipe to `ponder sample` had the hint "did you mean 'tasks.name'?"; a GRPO recipe to `ponder sft`
    one about data.tasks. A recipe of the command's own kind keeps its key suggestions."""
    line = error_line("sample", "recipes/distill-tiny.yaml")
    assert line == ("ponder: error: unknown config key 'name'; this recipe is one for `ponder distill` (its keys are "
                    "that command's): run it with `ponder distill`")
    line = error_line("sft", "recipes/zero-tiny.yaml")
    assert line.endswith("this recipe is one for `ponder train` (its keys are that command's): run it with `ponder train`")
    assert error_line("train", "recipes/zero-tiny.yaml", "optim.lrr=1") == "ponder: error: unknown config key 'optim.lrr'; did you mean 'optim.lr'?"


def test_every_shipped_recipe_loads_with_one_command_and_the_others_name_it():
    """Each recipe in recipes/ is valid for exactly one command; given to another, the error names the right one
    (so the range checks above forbid nothing a shipped recipe uses, and the hint holds for all of them)."""
    from pathlib import Path

    from ponder.config import load_config
    from ponder.distill import load_distill_config
    from ponder.errors import UserError
    from ponder.pretrain import PretrainConfig
    from ponder.sample import load_sample_config
    from ponder.sft.config import load_sft_config

    loaders = {"train": load_config, "sft": load_sft_config, "sample": load_sample_config, "distill": load_distill_config,
               "pretrain": lambda p: load_config(p, cls=PretrainConfig)}
    for recipe in sorted(Path("recipes").glob("*.yaml")):
        fits, errors = [], {}
        for command, load in loaders.items():
            try:
                load(recipe)
                fits.append(command)
            except UserError as e:
                errors[command] = str(e)
        assert len(fits) == 1, (recipe, fits)
        for command, error in errors.items():
            if command != "train":  # train and sft share their top-level keys: a typo-style hint there
                assert f"this recipe is one for `ponder {fits[0]}`" in error or "unknown config key" in error, (recipe, command, error)


@pytest.mark.parametrize("args, line", [
    (["train", "recipes/smoke-first-digit.yaml", 'rollout.stop=[""]'], "config rollout.stop must be non-empty strings; got ['']"),
    (["sample", "--model", "tiny-random", "--tasks", "first_digit", 'stop=[""]'], "config stop must be non-empty strings; got ['']"),
    (["eval", "--model", "tiny-random", "--tasks", "first_digit", "--stop", ""],
     "--stop must be non-empty strings (an empty one ends every answer at once); got ['']"),
    (["train", "recipes/smoke-first-digit.yaml", "model.lora={r: 4, alpha: 8, dropout: 0.5}"],
     "config model.lora.dropout must be 0 for ponder train; got 0.5: the update compares the policy's log-probs with the "
     "rollout's, and dropout makes their ratio noise (clipped tokens at unchanged weights); it is for ponder sft"),
    # Dr. GRPO's r - mean is 0 for a group of one: every step ran with no gradient
    (["train", "recipes/smoke-first-digit.yaml", "rollout.group_size=1", "algorithm.advantage=none"],
     "config rollout.group_size must be at least 2 for group-relative advantages"),
])
def test_settings_that_could_never_learn_or_answer_are_one_line(tmp_path, error_line, args, line):
    """An empty stop string occurs in every text: every completion ended after one token, without a word."""
    assert error_line(*args, *([f"output_dir={tmp_path}"] if args[0] == "train" else [])) == f"ponder: error: {line}"


def test_settings_at_the_edge_of_their_range_keep_their_meaning(tmp_path):
    """0 means something for these: greedy, no clipping, only the last checkpoint, keep every checkpoint, no KL."""
    from ponder.config import load_config

    cfg = load_config("recipes/smoke-first-digit.yaml", [f"output_dir={tmp_path}", "rollout.temperature=0",
                                                         "optim.grad_clip=0", "train.save_every=0", "train.keep_last=0",
                                                         "algorithm.beta=0", "optim.lr=0"])
    assert (cfg.rollout.temperature, cfg.optim.grad_clip, cfg.train.keep_last) == (0, 0, 0)


def test_pretrain_settings_out_of_range_are_one_line(tmp_path, error_line):
    common = ["pretrain", "recipes/pretrain-tiny.yaml", f"output={tmp_path / 'base'}"]
    assert error_line(*common, "steps=0") == "ponder: error: config steps must be at least 1; got 0"
    assert error_line(*common, "lr=-1") == "ponder: error: config lr must be 0 or more; got -1"
    assert error_line(*common, "block=2048") == ("ponder: error: config block must be at most max_len (1024), the "
                                                 "positions the model has; got 2048")
    assert not any(tmp_path.iterdir())


def test_a_run_saved_where_more_gpus_were_visible_restores_the_rng_of_those_there_are(monkeypatch):
    """The save keeps one CUDA RNG state a visible GPU; torch.cuda.set_rng_state_all indexes a generator for each,
    so a run saved on an 8-GPU node ended its resume on a one-GPU box in IndexError."""
    import torch

    from ponder import checkpoint

    state = checkpoint.rng_state()
    cuda = [torch.tensor([i], dtype=torch.uint8) for i in range(8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": restored.append((int(s[0]), device)))
    checkpoint.set_rng_state({**state, "cuda": cuda})
    assert restored == [(0, 0), (1, 1)]


def test_each_rank_takes_its_gpu_also_where_it_sees_only_its_own(monkeypatch):
    """torchrun numbers LOCAL_RANK 0..N-1; a launcher that shows each rank one GPU (CUDA_VISIBLE_DEVICES) made every
    rank but 0 ask for a device it does not see ("invalid device ordinal")."""
    import torch
    import torch.distributed as dist

    from ponder import distributed

    chosen = []
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: chosen.append((backend, timeout)))
    monkeypatch.setattr(dist, "get_rank", lambda: 3)
    monkeypatch.setattr(dist, "get_world_size", lambda: 4)
    assert distributed.setup(90) == (3, 4)
    assert chosen == [0, ("nccl", datetime.timedelta(minutes=90))]  # rank 0 may evaluate alone for long


def _whole_checkpoints(run):
    """The names in run/checkpoints, each checked to be a whole checkpoint (weights and trainer state)."""
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    for name in names:
        assert {"model.safetensors", "trainer_state.pt", "config.json"} <= {p.name for p in (run / "checkpoints" / name).iterdir()}, name
    return names


def test_sigterm_stops_in_one_line_and_resume_repeats_the_uninterrupted_run(tmp_path, uninterrupted):
    """SIGTERM (a cluster scheduler's stop, `kill PID`) ended the process at once, without a word. It ends as Ctrl-C
    does: one line, exit status 143, the checkpoints whole; --resume continues from the last one."""
    from ponder.cli import STOPPED

    stopped = _run(tmp_path, "cut", kill_at=6, env={"KILL_SIGNAL": "SIGTERM"})  # in step 5
    assert stopped.returncode == 143, stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == STOPPED and "Traceback" not in stopped.stderr
    assert STOPPED == ("ponder: stopped by SIGTERM; --resume continues from the last checkpoint, if one was written "
                       "(else run again)")
    assert _whole_checkpoints(tmp_path / "cut") == ["step-3"]
    resumed = _run(tmp_path, "cut", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert _metrics(tmp_path / "cut" / "metrics.jsonl") == uninterrupted


def test_sigterm_while_a_checkpoint_is_written_lets_it_finish(tmp_path, uninterrupted):
    """A SIGTERM that comes while a checkpoint is being written waits for it: the checkpoint is renamed into place
    whole (stopped in the middle, the save was lost and the run went back to the one before), then the run stops."""
    from ponder.cli import STOPPED

    stopped = _run(tmp_path, "cut", env={"SIGTERM_IN_SAVE": "1"})  # the save of step 3
    assert stopped.returncode == 143, stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == STOPPED and "Traceback" not in stopped.stderr
    assert _whole_checkpoints(tmp_path / "cut") == ["step-3"]  # and no .tmp-step-3-PID beside it
    resumed = _run(tmp_path, "cut", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert _metrics(tmp_path / "cut" / "metrics.jsonl") == uninterrupted


def test_a_save_that_a_kill_interrupted_leaves_nothing_behind_at_the_next_start(smoke_cfg):
    """A save writes a whole checkpoint into .tmp-step-N-PID and renames it; killed before the rename, the directory
    stayed for ever (a new run's pid never matches the old name)."""
    from ponder.rl.trainer import GRPOTrainer

    cfg = smoke_cfg("name=stale")
    left = cfg.run_dir / "checkpoints" / ".tmp-step-8-4105"
    (left / "model").mkdir(parents=True)
    kept = cfg.run_dir / "checkpoints" / "notes.txt"
    kept.write_text("mine")
    GRPOTrainer(cfg)
    assert not left.exists() and kept.read_text() == "mine"


class _Killed(BaseException):
    """A kill at that point: nothing after it runs (no except or finally clause of ponder's catches it)."""


@pytest.mark.parametrize("after_both", [False, True])
def test_a_kill_while_a_step_saved_again_is_renamed_keeps_one_step_n(tmp_path, monkeypatch, after_both):
    """A step-N saved again (a resumed run reaching the step it was stopped in) sets the old step-N aside, then renames
    the new one in. Killed between the two renames, the next start removed both; killed after them (before the old one
    is removed), the new one is kept."""
    from ponder import checkpoint, files

    ckpts = tmp_path / "checkpoints"

    def written(pid, text):  # a checkpoint as save leaves it in its temporary directory
        tmp = ckpts / f".tmp-step-3-{pid}"
        tmp.mkdir(parents=True)
        (tmp / "trainer_state.pt").write_text(text)
        return tmp

    def kill(*_):
        raise _Killed

    checkpoint._publish(ckpts, written(1, "old"), 3, keep_last=2)
    if after_both:
        monkeypatch.setattr(files, "fsync_dir", kill)  # between the renames and the old one's removal
    else:
        real = os.replace  # the second rename, the new one's into step-3 (the first set the old one aside)
        monkeypatch.setattr(files.os, "replace", lambda src, dst: kill() if src.name.startswith(".tmp") else real(src, dst))
    with pytest.raises(_Killed):
        checkpoint._publish(ckpts, written(2, "new"), 3, keep_last=2)
    monkeypatch.undo()
    # the next start: the trainers look for the checkpoint to resume from, then remove what the kill left
    assert checkpoint.resume_point(tmp_path, resume=True) == ckpts / "step-3"
    checkpoint.remove_unfinished(ckpts)
    assert [p.name for p in ckpts.iterdir()] == ["step-3"]
    assert (ckpts / "step-3" / "trainer_state.pt").read_text() == ("new" if after_both else "old")


def test_a_file_written_whole_is_on_disk_before_it_takes_its_name_and_a_stop_keeps_the_old_one(tmp_path, monkeypatch):
    """files.write_atomic, the one helper behind config.yaml, eval_*.json, results, markers, ledgers and reports."""
    from ponder import files

    path = tmp_path / "eval_after.json"
    path.write_text("old")
    events, fsync, rename = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync") or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append("rename") or rename(a, b))
    files.write_atomic(path, "new")
    assert path.read_text() == "new" and events == ["fsync", "rename"] and list(tmp_path.iterdir()) == [path]

    def stop(fd):  # stopped before the rename
        raise _Killed

    monkeypatch.setattr(os, "fsync", stop)
    with pytest.raises(_Killed):
        files.write_atomic(path, "newer")
    assert path.read_text() == "new"


def test_ponder_report_does_not_load_torch_for_the_helper_it_shares():
    """report shares write_atomic with the trainers (ponder.files, not the training plumbing of ponder.runtime): torch
    would cost it two seconds."""
    code = "import sys, ponder.report; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("command", ["train", "sft"])
def test_a_finished_run_resumed_keeps_its_evaluation_and_logs_nothing_again(tmp_path, command, capsys):
    """--resume on a finished run evaluated again: a second eval line in metrics.jsonl, eval_after.json rewritten."""
    recipe = "recipes/smoke-first-digit.yaml" if command == "train" else "recipes/coldstart-tiny.yaml"
    args = [command, recipe, f"output_dir={tmp_path}", "name=done", "train.steps=2",
            "eval.tasks=[{name: arithmetic, split: test, n: 3}]", "eval.k=1", "eval.max_new_tokens=8"]
    if command == "train":
        args += ["rollout.prompts_per_step=2"]
    else:
        args += ["data.coldstart=[{name: arithmetic, n: 8}]"]
    assert main(args) == 0
    run = tmp_path / "done"
    before = {p.name: p.read_bytes() for p in (run / "metrics.jsonl", run / "eval_after.json")}
    first = capsys.readouterr().out
    if command == "train":  # the before/after table's title on one line, however narrow the table
        assert "held-out arithmetic/test: before / after training\n" in first
    assert main([*args, "--resume"]) == 0
    assert {p.name: p.read_bytes() for p in (run / "metrics.jsonl", run / "eval_after.json")} == before
    out = capsys.readouterr().out  # each message one line: a path is not wrapped at the console's width
    assert f"{run} is complete at step 2; nothing to resume\n" in out and f"report: {run / 'report.html'}\n" in out
    # the after figures under the keys of eval_before.json (name/split): the report draws them in one panel
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert "eval/arithmetic/test/pass@1" in last and json.loads((run / "eval_before.json").read_text()).keys() == {"arithmetic/test"}
    # one scheme for both commands, the pass@1 interval included (ponder train logged it for sft only)
    assert {k for k in last if k.startswith("eval/")} >= {f"eval/arithmetic/test/{f}" for f in (
        "pass@1", "pass@1_lo", "pass@1_hi", "format_rate", "mean_length")}
    # stopped after eval_after.json was written and before its figures were logged: the resume found the file,
    # said the run was complete and logged nothing; it logs them from the file
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in lines[:-1]))
    assert main([*args, "--resume"]) == 0
    again = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(again) == len(lines) and {k: v for k, v in again[-1].items() if k != "time"} == {
        k: v for k, v in last.items() if k != "time"}
    assert main([*args, "--resume"]) == 0  # and once logged, not again
    assert len((run / "metrics.jsonl").read_text().splitlines()) == len(lines)
    # resumed to run on, its earlier end's file goes at once: a stop in the later end's evaluation left it, and the next
    # resume logged those figures as the later step's, the model of that step never evaluated
    from ponder.config import load_config
    from ponder.rl.trainer import GRPOTrainer
    from ponder.sft.config import load_sft_config
    from ponder.sft.trainer import SFTTrainer

    more = [a for a in args[2:] if not a.startswith("train.steps=")] + ["train.steps=3"]
    if command == "train":
        GRPOTrainer(load_config(recipe, more), resume=True)
    else:
        SFTTrainer(load_sft_config(recipe, more), resume=True)
    assert not (run / "eval_after.json").exists()


def test_a_finished_run_without_eval_tasks_resumed_says_it_is_complete(tmp_path, capsys):
    """Without eval tasks there is no eval_after.json to find: --resume printed the report's path alone."""
    args = ["train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}", "name=done", "train.steps=1",
            "rollout.prompts_per_step=2", "eval.tasks=[]"]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    assert f"{tmp_path / 'done'} is complete at step 1; nothing to resume\n" in capsys.readouterr().out


def test_resuming_a_run_of_the_other_command_is_one_line_naming_the_command_that_resumes_it(tmp_path, error_line, capsys):
    """`ponder sft --resume runs/x` where runs/x is a GRPO run (and the reverse): the directory was a recipe 'not
    found', its config.yaml an unknown key (or 'did you mean data.tasks'), and a recipe named at it every setting
    listed as a change. One line names the command that resumes it, and that command, given the directory, does."""
    out = f"output_dir={tmp_path}"
    grpo_recipe, sft_recipe = "recipes/smoke-first-digit.yaml", "recipes/coldstart-tiny.yaml"
    assert main(["train", grpo_recipe, out, "name=grpo", "train.steps=1", "rollout.prompts_per_step=2"]) == 0
    assert main(["sft", sft_recipe, out, "name=cold", "train.steps=1", "data.coldstart=[{name: arithmetic, n: 4}]", "eval.tasks=[]"]) == 0
    capsys.readouterr()
    runs = {"train": tmp_path / "grpo", "sft": tmp_path / "cold"}
    kept = {p: p.read_bytes() for run in runs.values() for p in (run / "config.yaml", run / "metrics.jsonl")}
    for command, kind in (("sft", "train"), ("train", "sft")):
        run, recipe = runs[kind], sft_recipe if command == "sft" else grpo_recipe
        line = (f"ponder: error: {run} is a `ponder {kind}` run, not a `ponder {command}` one; resume it with "
                f"`ponder {kind} {run} --resume`")
        assert error_line(command, "--resume", str(run)) == line
        assert error_line(command, str(run / "config.yaml"), "--resume") == line
        assert error_line(command, recipe, out, f"name={run.name}", "--resume", "--allow-changes") == line
    assert {p: p.read_bytes() for p in kept} == kept
    # what the line says to do works: a run's directory resumes it, here with one more step
    for kind, run in runs.items():
        assert main([kind, str(run), "--resume", "train.steps=2"]) == 0
        assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    # resumed with a change, each config.yaml records it under `changes:`, which no recipe takes: the kind was then
    # undecided and the other command went through, loaded the run's checkpoint and wrote its own into it
    kept = {p: p.read_bytes() for run in runs.values() for p in run.rglob("*") if p.is_file()}
    for command, kind in (("sft", "train"), ("train", "sft")):
        run, recipe = runs[kind], sft_recipe if command == "sft" else grpo_recipe
        assert "changes" in (run / "config.yaml").read_text()
        line = (f"ponder: error: {run} is a `ponder {kind}` run, not a `ponder {command}` one; resume it with "
                f"`ponder {kind} {run} --resume`")
        assert error_line(command, recipe, out, f"name={run.name}", "--resume", "--allow-changes") == line
        assert error_line(command, "--resume", str(run)) == line
    assert {p: p.read_bytes() for run in runs.values() for p in run.rglob("*") if p.is_file()} == kept
    # without --resume, a run's directory is told as one (it was a recipe 'not found'), for the command that resumes it
    for kind, run in runs.items():
        assert error_line(kind, str(run), "train.steps=3") == (
            f"ponder: error: '{run}' is a run directory, not a recipe; add --resume to continue the run "
            f"(`ponder {kind} {run} --resume`), or give a YAML recipe to start a new one")
    assert error_line("train", str(runs["sft"])) == (f"ponder: error: {runs['sft']} is a `ponder sft` run, not a `ponder "
                                                    f"train` one; resume it with `ponder sft {runs['sft']} --resume`")
    assert error_line("train", "--resume", str(tmp_path)) == (
        f"ponder: error: '{tmp_path}' is a directory without a run's config.yaml; give a YAML recipe, or the directory "
        "of a `ponder train` run to resume")
    # a path that is nowhere, with --resume: it was "recipe ... not found; give the path of a YAML recipe"
    assert error_line("sft", "--resume", str(tmp_path / "gone")) == (
        f"ponder: error: '{tmp_path / 'gone'}' not found; with --resume give the directory of a `ponder sft` run "
        "(runs/NAME) or the recipe it started from")


@pytest.mark.parametrize("command, setting, line", [
    ("train", "model.lora={r: 0}", "config model.lora.r must be at least 1; got 0"),
    ("sft", "model.lora={r: 4, dropout: 1.5}", "config model.lora.dropout must be in [0, 1); got 1.5"),
    ("train", "eval.tasks=[{name: arithmetic, split: test, n: 5}, {name: arithmetic, split: test, options: {difficulty: easy}}]",
     "config eval.tasks holds arithmetic/test twice (its figures are kept under that name); evaluate one of them on "
     "another split, or in a run of its own"),
    ("sft", "eval.every=5", "config eval.every=5: ponder sft evaluates before and after training only; leave it out (or "
                            "evaluate a checkpoint with ponder eval)"),
])
def test_settings_peft_or_the_evaluation_would_trip_on_later_are_one_line(tmp_path, error_line, command, setting, line):
    """A LoRA rank of 0 ended in peft's traceback after the model loaded; a second eval entry of one name and split
    overwrote the first's figures; SFT took eval.every and never evaluated there (found by the R1 pipeline review)."""
    recipe = "recipes/smoke-first-digit.yaml" if command == "train" else "recipes/coldstart-tiny.yaml"
    assert error_line(command, recipe, f"output_dir={tmp_path}", setting) == f"ponder: error: {line}"
    assert list(tmp_path.iterdir()) == []


def test_a_run_that_ends_in_skipped_updates_says_it_wrote_no_last_checkpoint(capsys, tmp_path, monkeypatch):
    """The final save is withheld in a streak of non-finite updates (the checkpoints before it are the good ones): the
    run says so, naming the newest checkpoint, where it used to end as if step-N had been written."""
    from ponder.rl import trainer

    real, calls = trainer.policy_loss, {"n": 0}

    def nan_in_the_last_step(*args, **kwargs):
        calls["n"] += 1
        loss, stats = real(*args, **kwargs)
        return (loss * float("nan") if calls["n"] > 2 else loss), stats

    monkeypatch.setattr(trainer, "policy_loss", nan_in_the_last_step)
    code = main(["train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}", "name=nan", "train.steps=3",
                 "train.save_every=2", "rollout.prompts_per_step=2", "train.skip_zero_advantage=false"])
    out = capsys.readouterr().out
    assert code == 0
    ckpts = tmp_path / "nan" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-2"]
    assert (f"no checkpoint of the last step (3): its last 1 update(s) were skipped (non-finite loss or gradients); "
            f"the newest checkpoint is {ckpts / 'step-2'}") in out


def test_resume_refuses_fewer_steps_than_the_run_reached(capsys, tmp_path, error_line):
    assert main(["train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}", "name=r", "train.steps=2",
                 "rollout.prompts_per_step=2"]) == 0
    capsys.readouterr()
    saved = (tmp_path / "r" / "config.yaml").read_text()
    line = error_line("train", str(tmp_path / "r"), "--resume", "train.steps=1")
    assert line == ("ponder: error: --resume: train.steps=1 is below the step the run reached (2); give train.steps=2 "
                    "or more to train on, or leave it out")
    assert (tmp_path / "r" / "config.yaml").read_text() == saved  # nothing recorded


@pytest.mark.parametrize("setting, shown", [("optim.lr=.inf", "config optim.lr: expected a finite number, got inf"),
                                            ("algorithm.beta=.nan", "config algorithm.beta: expected a finite number, got nan"),
                                            ("rewards.accuracy.weight=.nan", "config rewards.accuracy: weight must be a finite number, got nan"),
                                            ("rewards.accuracy.weight=1e160", "config rewards.accuracy: weight must be at "
                                             "most 1e+06 in size (larger ones overflow the advantages), got 1e+160"),
                                            # written as words, inf passed: NaN weights after one update
                                            ("optim.lr=inf", "config optim.lr: expected a finite number, got inf"),
                                            ("rollout.temperature=Infinity", "config rollout.temperature: expected a finite number, got inf"),
                                            ("data.tasks=[{name: first_digit, weight: inf}]", "config data.tasks[0].weight: expected a finite number, got inf")])
def test_non_finite_numbers_in_a_recipe_are_refused(tmp_path, error_line, setting, shown):
    assert error_line("train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}", setting) == f"ponder: error: {shown}"


def test_numbers_keep_how_they_were_written_where_a_setting_is_text(tmp_path):
    """YAML 1.1 read name=010 as the octal 8 (the run went to runs/8) and model.path=2024.10 as 2024.1; in a recipe file
    the same. A text setting keeps the text now; a number written with a leading zero is refused, not read as octal."""
    from pathlib import Path

    from ponder.config import load_config
    from ponder.errors import UserError

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base: {Path('recipes/smoke-first-digit.yaml').resolve()}\nname: 0100\n")
    cfg = load_config(recipe, ["model.path=2024.10", "optim.lr=1.50e-3", "seed=1_000", "rewards.format=1e-1"])
    assert (cfg.name, cfg.model.path, cfg.optim.lr, cfg.seed) == ("0100", "2024.10", 0.0015, 1000)
    assert type(cfg.seed) is int and type(cfg.optim.lr) is float
    assert load_config(recipe, ["name=010"]).name == "010"
    with pytest.raises(UserError) as e:
        load_config(recipe, ["train.steps=010"])
    assert str(e.value) == "config train.steps: 010 has a leading zero, which YAML reads as an octal number (8); write it without the zero"


def test_a_rewards_weight_given_alone_keeps_its_options(tmp_path):
    """rewards.brevity=0.5 (docs/rewards.md's way to set a weight) replaced {weight: 1.0, limit: 1} by 0.5: the option
    fell back to its default, unseen. And 1e-1, a string to YAML 1.1, was refused as no number."""
    from ponder.config import load_config
    from ponder.rewards import RewardSet

    cfg = load_config("recipes/smoke-first-digit.yaml", ["rewards={accuracy: 1.0, overlong: {weight: 1.0, max_len: 300}}",
                                                         "rewards.overlong=0.5", "rewards.accuracy=1e-1"])
    assert cfg.rewards == {"accuracy": "1e-1", "overlong": {"weight": 0.5, "max_len": 300}}
    rewards = RewardSet(cfg.rewards)
    assert rewards.weights == {"accuracy": 0.1, "overlong": 0.5} and rewards.options["overlong"]["max_len"] == 300


def test_run_directories_that_cannot_be_made_or_are_no_runs_own_are_refused_before_loading(tmp_path, error_line):
    blocker = tmp_path / "afile"
    blocker.write_text("mine\n")
    line = error_line("train", "recipes/smoke-first-digit.yaml", f"output_dir={blocker}")
    assert line == (f"ponder: error: output_dir/name '{blocker / 'smoke-first-digit'}' cannot be a directory: '{blocker}' is "
                    "a file; choose another output_dir/name")
    for name in ("''", "."):
        line = error_line("train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}", f"name={name}")
        assert line.startswith("ponder: error: config name must name the run's own directory under output_dir")
    line = error_line("eval", "--model", "tiny-random", "--tasks", "first_digit", "--out", str(blocker))
    assert line == f"ponder: error: --out '{blocker}' cannot be a directory: '{blocker}' is a file; choose another --out"
    line = error_line("sample", "--model", "tiny-random", "--tasks", "first_digit", "--out", str(tmp_path))
    assert line == (f"ponder: error: --out {tmp_path} is a directory; give a file path for the traces, e.g. "
                    f"{tmp_path / 'traces.jsonl'}")
    assert blocker.read_text() == "mine\n" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_a_run_directory_that_cannot_be_written_is_one_line_before_the_model_loads(tmp_path, error_line, monkeypatch):
    """A read-only output_dir (a new run) or run directory (--resume): an OSError traceback from the first write, once
    the model and data had loaded. The file system's answer is stood in for by os.access (CI runs as root, whom a
    directory's mode does not stop; a read-only mount does, which a test cannot make without root)."""
    from ponder import files, models

    def no_model_loads(*_, **__):
        raise AssertionError("the model was loaded before the run directory was checked")

    common = ["recipes/smoke-first-digit.yaml", f"output_dir={tmp_path / 'ro'}", "train.steps=1",
              "rollout.prompts_per_step=4", "rollout.group_size=4"]
    assert main(["train", *common, "name=r"]) == 0
    real = os.access
    monkeypatch.setattr(files.os, "access", lambda p, mode: False if str(p).startswith(str(tmp_path / "ro")) else real(p, mode))
    monkeypatch.setattr(models, "load_trainable", no_model_loads)
    for command, name, resume, stuck in (("train", "new", [], "ro"), ("train", "r", ["--resume", "train.steps=2"], "ro/r"),
                                         ("sft", "s", [], "ro")):
        recipe = ["recipes/coldstart-tiny.yaml", f"output_dir={tmp_path / 'ro'}"] if command == "sft" else common
        assert error_line(command, *recipe, f"name={name}", *resume) == (
            f"ponder: error: run directory {tmp_path / 'ro' / name} cannot be written ({tmp_path / stuck} is read-only or "
            "not yours); fix its permissions, or choose another output_dir")


def test_eval_sample_and_report_outputs_that_cannot_be_written_are_one_line_before_the_work(tmp_path, error_line, monkeypatch):
    """`ponder eval --out` into a read-only directory sampled every problem, then lost them all in a PermissionError
    traceback; `ponder sample` failed once its model had loaded; `ponder report` once its plots were drawn. The file
    system's answer is stood in for by os.access, as above."""
    from ponder import files, models, report

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "reward": 0.5}\n')
    real = os.access
    monkeypatch.setattr(files.os, "access", lambda p, mode: False if str(p).startswith(str(tmp_path / "ro")) else real(p, mode))
    (tmp_path / "ro").mkdir()

    def no_work(*_, **__):
        raise AssertionError("the work began before its output was checked")

    monkeypatch.setattr(models, "load", no_work)
    monkeypatch.setattr(report, "_plots", no_work)
    ro = tmp_path / "ro"
    assert error_line("eval", "--model", "tiny-base", "--tasks", "first_digit", "--out", str(ro / "ev")) == (
        f"ponder: error: --out '{ro / 'ev'}' cannot be written ('{ro}': read-only or not yours); fix its permissions or "
        "choose another --out")
    assert error_line("sample", "--model", "tiny-base", "--tasks", "first_digit", "--out", str(ro / "t" / "t.jsonl")) == (
        f"ponder: error: --out '{ro / 't'}' cannot be written ('{ro}': read-only or not yours); fix its permissions or "
        "choose another --out")
    assert error_line("report", str(tmp_path / "run"), "--out", str(ro / "r.html")) == (
        f"ponder: error: --out '{ro}' cannot be written ('{ro}': read-only or not yours); fix its permissions or choose "
        "another --out")
    assert error_line("report", str(tmp_path / "run"), "--out", str(tmp_path / "run" / "metrics.jsonl" / "r.html")) == (
        f"ponder: error: --out '{tmp_path / 'run' / 'metrics.jsonl'}' cannot be written: "
        f"'{tmp_path / 'run' / 'metrics.jsonl'}' is a file, not a directory; choose another --out")
    assert list(ro.iterdir()) == []


def test_a_damaged_checkpoint_is_one_line_naming_the_one_to_resume_from(tmp_path, error_line):
    """A checkpoint cut short after its save (a copy, a disk that filled later): torch.load's and safetensors' own
    tracebacks. Doing what the line says resumes."""
    import shutil

    run = ["train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}", "name=d", "train.save_every=1",
           "rollout.prompts_per_step=4", "rollout.group_size=4"]
    assert main([*run, "train.steps=2"]) == 0
    ckpts = tmp_path / "d" / "checkpoints"
    for name, reason in (("trainer_state.pt", "PytorchStreamReader failed reading zip archive"),
                         ("model.safetensors", "Error while deserializing header")):
        kept = (ckpts / "step-2" / name).read_bytes()
        (ckpts / "step-2" / name).write_bytes(kept[:1000])
        line = error_line(*run, "train.steps=3", "--resume")
        assert line.startswith(f"ponder: error: checkpoint {ckpts / 'step-2'} cannot be read ({reason}"), line
        assert line.endswith(f"); move it out of {ckpts} and --resume continues from step-1")
        (ckpts / "step-2" / name).write_bytes(kept)
    shutil.move(ckpts / "step-2", tmp_path / "step-2")
    assert main([*run, "train.steps=3", "--resume"]) == 0
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-2", "step-3"]


def test_user_files_in_utf16_are_read_and_other_encodings_named(tmp_path, error_line):
    """A recipe and a JSONL saved by Windows PowerShell (UTF-16 with its byte-order mark) read as they are; bytes that
    are not UTF-8 name the file, the line and the byte."""
    from ponder.config import load_config
    from ponder.tasks.jsonl import read_jsonl

    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(open("recipes/smoke-first-digit.yaml", encoding="utf-8").read().encode("utf-16"))
    assert load_config(recipe).rollout.group_size == 8
    rows = tmp_path / "rows.jsonl"
    rows.write_bytes('{"prompt": "a", "answer": 1}\n{"prompt": "é", "answer": 2}\n'.encode("utf-16"))
    assert [r["prompt"] for r in read_jsonl(rows, required=("prompt", "answer"))] == ["a", "é"]
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"prompt": "a", "answer": 1}\n{"prompt": "é", "answer": 2}\n'.encode("latin-1"))
    line = error_line("train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}",
                      f"data.tasks=[{{name: jsonl, path: {latin}}}]")
    assert line == f"ponder: error: {latin}:2: not UTF-8 text (byte 0xe9); save the file as UTF-8"


def test_an_interrupted_command_says_how_to_go_on_in_its_own_terms(capsys, monkeypatch):
    """Ctrl-C told every command to pass --resume, which `ponder eval` and `ponder report` do not take (`ponder eval
    --resume`: unrecognized arguments) and pretrain answers with --overwrite."""
    from ponder import cli, report

    def interrupt(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "write_report", interrupt)
    assert cli.main(["report", "runs/x"]) == 130
    assert capsys.readouterr().err.splitlines() == ["ponder: interrupted; run it again"]
    assert cli.stopped("pretrain") == "ponder: stopped by SIGTERM; run it again, with --overwrite if it began writing its output"
    assert cli.stopped("sample", "interrupted") == ("ponder: interrupted; --resume continues after the traces already "
                                                    "written (else run again)")


def test_lora_targets_that_name_no_layer_list_the_models_own(tmp_path, error_line, capsys):
    """GPT-2 names its layers c_attn, c_fc, c_proj: the default targets (q/k/v/o_proj) ended in peft's traceback."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from ponder.models.tiny import char_tokenizer

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=101, bos_token_id=1, eos_token_id=2)).save_pretrained(
        tmp_path / "gpt2")
    char_tokenizer().save_pretrained(tmp_path / "gpt2")
    capsys.readouterr()  # transformers' progress bar of the save
    line = error_line("train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}", f"model.path={tmp_path / 'gpt2'}",
                      "model.lora={r: 4, alpha: 8}")
    assert line == ("ponder: error: model.lora.target_modules ['q_proj', 'k_proj', 'v_proj', 'o_proj'] name no layer of "
                    "this gpt2 model; its linear layers are c_attn, c_fc, c_proj: set model.lora.target_modules to some of them")
    # a typo among names that match: peft adapted c_attn alone, without a word
    line = error_line("train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}", f"model.path={tmp_path / 'gpt2'}",
                      "model.lora={r: 4, alpha: 8, target_modules: [c_attn, c_prj]}")
    assert line == ("ponder: error: model.lora.target_modules ['c_prj'] of ['c_attn', 'c_prj'] name no layer of this gpt2 "
                    "model; its linear layers are c_attn, c_fc, c_proj: set model.lora.target_modules to some of them")


@pytest.mark.parametrize("why", ["own error", "another rank's error"])
def test_a_sigterm_while_a_stopping_command_leaves_is_not_a_second_stop(capsys, monkeypatch, why):
    """Under torchrun, once one rank exits on an error, torchrun sends SIGTERM to the others, which may already be on
    their way out, their one line said: the SIGTERM raised in their teardown (a traceback, or "Exception ignored in" a
    weak reference's callback during its garbage collection), one run in about eight of the two-rank error test on a
    loaded machine. Here the teardown itself receives the SIGTERM, every time."""
    from ponder import cli, distributed, report

    def fail(*_):
        if why == "own error":
            raise cli.UserError("runs/x/report.html is not writable")
        raise RuntimeError("[gloo] Connection closed by peer")  # the collective this rank waited in

    monkeypatch.setattr(report, "write_report", fail)
    monkeypatch.setattr(distributed, "another_rank_stopped", lambda: None if why == "own error" else "error")
    monkeypatch.setattr(distributed, "teardown", lambda clean=True, why="error": os.kill(os.getpid(), signal.SIGTERM))
    assert cli.main(["report", "runs/x"]) == (2 if why == "own error" else 1)
    said = "ponder: error: runs/x/report.html is not writable" if why == "own error" else cli.OTHER_STOPPED
    assert capsys.readouterr().err.splitlines() == [said]


@pytest.mark.parametrize("name,make", [("metrics.jsonl", "folder"), ("tensorboard", "file"), ("checkpoints", "file")])
def test_a_run_file_of_the_other_kind_is_one_line_before_anything_is_written(tmp_path, error_line, name, make):
    """metrics.jsonl a folder, tensorboard a file: IsADirectoryError / FileExistsError once the model had loaded, with
    config.yaml already rewritten."""
    run = tmp_path / "smoke-first-digit"
    run.mkdir()
    (run / name).mkdir() if make == "folder" else (run / name).write_text("mine")
    want = "file" if make == "folder" else "folder"
    assert error_line("train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}") == (
        f"ponder: error: {run / name} is a {make}, where the run keeps its {name} {want}; move it elsewhere, or choose "
        "another name (name=...)")
    assert sorted(p.name for p in run.iterdir()) == [name]


def test_the_engines_lines_name_the_commands_own_settings(tmp_path, capsys):
    """The engine says max_tokens and (k, group_size, n), its own words; `ponder train`'s line names its keys."""
    import re

    from ponder.cli import main

    assert main(["train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}", "rollout.prompts_per_step=125000",
                 "rollout.max_new_tokens=100000"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]  # (after the notices of these settings)
    assert re.fullmatch(r"ponder: error: fast engine: 1,000,000 samples of up to 100,000 tokens need 1,490\.4 GiB for their "
                        r"tokens and log-probs, and [\d,.]+ [GM]iB are free; ask for fewer samples \(rollout\.group_size, "
                        r"rollout\.prompts_per_step\) or shorten rollout\.max_new_tokens", line), line
    # the evaluations: ponder eval's flags, and a run's own evaluation its eval keys (they said max_tokens and n)
    assert main(["eval", "--model", "tiny-random", "--tasks", "first_digit", "--n", "1", "--k", "1000000",
                 "--max-tokens", "100000", "--out", str(tmp_path / "e")]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(r"ponder: error: fast engine: 1,000,000 samples of up to 100,000 tokens need 1,490\.4 GiB for their "
                        r"tokens and log-probs, and [\d,.]+ [GM]iB are free; ask for fewer samples \(--k, --batch-size\) "
                        r"or shorten --max-tokens", line), line
    assert main(["train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}", "name=evaluated", "eval.k=1000000",
                 "rollout.max_new_tokens=100000", "eval.tasks=[{name: first_digit, split: test, n: 1}]"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(r"ponder: error: fast engine: 1,000,000 samples of up to 100,000 tokens need 1,490\.4 GiB for their "
                        r"tokens and log-probs, and [\d,.]+ [GM]iB are free; ask for fewer samples \(eval\.k\) or shorten "
                        r"eval\.max_new_tokens \(unset, it takes rollout\.max_new_tokens\)", line), line
