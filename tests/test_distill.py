"""Distillation: teacher -> sample -> SFT of a student with another tokenizer; stages, markers, resume."""

import json

import pytest

from ponder.errors import UserError

RIGHT = "<think> {e} step by step </think> <answer> {a} </answer>"
WRONG = "<think> guess </think> <answer> 1000 </answer>"


@pytest.fixture
def teacher_engine():
    """A scripted teacher: for each prompt, one right answer and one wrong one. Counts its calls."""
    from ponder.rollout import Completion, RolloutEngine, register

    calls = {"n": 0}

    @register("teacher-script")
    class Teacher(RolloutEngine):
        def __init__(self, model, tokenizer, **_):
            super().__init__(model, tokenizer)

        def generate(self, prompts, params):
            calls["n"] += 1
            out = []
            for p in prompts:
                text = self.tokenizer.decode(p)
                expr = text.split("User: Compute ", 1)[1].split(". Assistant:")[0]
                answer = _value(expr)
                texts = [RIGHT.format(e=expr, a=answer), WRONG][: params.n]
                out.append([Completion(self.tokenizer(t, add_special_tokens=False).input_ids, "stop") for t in texts])
            return out

    return calls


def _value(expr):
    tokens = expr.split()
    total = int(tokens[0])
    for op, x in zip(tokens[1::2], tokens[2::2]):
        total = total + int(x) if op == "+" else total - int(x)
    return total


def other_tokenizer_student(path):
    """A nano Llama whose tokenizer numbers the characters the other way round."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from ponder.models.tiny import CHARS, SPECIAL_TOKENS, tiny_config

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + CHARS[::-1])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    raw.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                  unk_token="<unk>", clean_up_tokenization_spaces=False)
    LlamaForCausalLM(tiny_config("nano", tok, max_len=512)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def make_cfg(tmp_path, student, *extra, n=4):
    from ponder.distill import load_distill_config

    recipe = tmp_path / "d.yaml"
    recipe.write_text(f"""
name: d
output_dir: {tmp_path}
sample:
  model: tiny-random
  engine: teacher-script
  tasks: [{{name: arithmetic, n: {n}, options: {{difficulty: easy}}}}]
  k: 2
sft:
  model: {{path: {student}}}
  optim: {{lr: 1.0e-3}}
  train: {{steps: 2, batch_size: 2, save_every: 1, log_samples: 0}}
""")
    return load_distill_config(recipe, list(extra))


def test_distill_runs_both_stages_into_a_student_with_another_tokenizer(tmp_path, teacher_engine):
    from ponder.distill import distill
    from ponder.models import load

    student = other_tokenizer_student(tmp_path / "student-base")
    cfg = make_cfg(tmp_path, student)
    out = distill(cfg, quiet=True)
    run = tmp_path / "d"
    traces = [json.loads(l) for l in (run / "traces.jsonl").read_text().splitlines()]
    assert len(traces) == 4 and all(t["rewards"]["accuracy"] == 1.0 for t in traces)  # the wrong half filtered out
    assert out["sample"]["accepted"] == 4 and out["sft"]["steps"] == 2
    assert json.loads((run / "stages" / "sft.done").read_text())["student"] == str(run / "student" / "final")
    _, teacher_tok = load("tiny-random")
    _, student_tok = load(str(run / "student" / "final"))
    text = traces[0]["completion"]
    assert student_tok(text).input_ids != teacher_tok(text).input_ids  # different ids ...
    assert student_tok.decode(student_tok(text).input_ids) == text  # ... same text
    assert json.loads((run / "student" / "data.json").read_text())["rows"] == 4


def test_stages_are_skipped_once_done_and_an_interrupted_sft_continues(tmp_path, teacher_engine):
    from ponder.distill import distill
    from ponder.sft import sft

    cfg = make_cfg(tmp_path, "tiny-random")
    with pytest.raises(UserError, match="stage sft needs the teacher's traces"):
        distill(cfg, stage="sft", quiet=True)
    distill(cfg, stage="sample", quiet=True)
    assert teacher_engine["n"] == 1 and not (tmp_path / "d" / "stages" / "sft.done").exists()
    with pytest.raises(UserError, match="already holds distill stages; pass --resume"):
        distill(cfg, quiet=True)
    sft(cfg.sft, stop_after=1, quiet=True)  # as if killed after the first SFT checkpoint
    distill(cfg, resume=True, quiet=True)
    assert teacher_engine["n"] == 1  # the teacher was not asked again
    steps = [json.loads(l)["step"] for l in (tmp_path / "d" / "student" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_the_teachers_problems_are_loaded_once(tmp_path, teacher_engine, monkeypatch):
    """The checks before sampling load sample.tasks (a missing file is named before the teacher loads); the sample
    stage takes those examples rather than reading a large dataset a second time."""
    import ponder.tasks
    from ponder.distill import distill

    real, calls = ponder.tasks.load_examples, []
    monkeypatch.setattr(ponder.tasks, "load_examples", lambda spec, seed: calls.append(spec.name) or real(spec, seed))
    assert distill(make_cfg(tmp_path, "tiny-random"), stage="sample", quiet=True)["sample"]["accepted"] == 4
    assert calls == ["arithmetic"]


def test_no_accepted_trace_is_a_clear_error(tmp_path, teacher_engine, capsys):
    from ponder.distill import distill

    cfg = make_cfg(tmp_path, "tiny-random", "sample.k=2", "sample.filters.max_tokens=3")
    with pytest.raises(UserError, match="no teacher answer passed the filters"):
        distill(cfg, quiet=True)
    assert not (tmp_path / "d" / "stages" / "sample.done").exists()
    # nothing was accepted, so nothing is there to resume: the next attempt, with looser filters, starts afresh
    assert distill(make_cfg(tmp_path, "tiny-random"), stage="sample", quiet=True)["sample"]["accepted"] == 4


def test_distill_command_line(tmp_path, teacher_engine, capsys):
    from ponder.cli import main

    make_cfg(tmp_path, "tiny-random")  # writes the recipe d.yaml
    recipe = tmp_path / "d.yaml"
    assert main(["distill", str(recipe), "--stage", "sample"]) == 0
    assert (tmp_path / "d" / "stages" / "sample.done").is_file()
    assert main(["distill", str(recipe), "--stage", "sample"]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main(["distill", str(recipe), "sample.kk=3"]) == 2
    assert "unknown config key 'sample.kk'" in capsys.readouterr().err


def test_keys_distill_sets_are_said_not_taken_where_given_otherwise(tmp_path, capsys):
    """sample.out, sft.output_dir, sft.name and the stages' seeds are set by distill: given otherwise they went unused,
    unsaid. A distill run's own config.yaml, as a recipe for another, gives them as that run set them: no line."""
    import yaml

    from ponder.config import to_dict
    from ponder.distill import load_distill_config

    make_cfg(tmp_path, "tiny-random")
    recipe = tmp_path / "d.yaml"
    cfg = load_distill_config(recipe, ["sample.out=mine.jsonl", "sft.name=kid", "sample.seed=5", "seed=5", "sft.seed=7"])
    err = capsys.readouterr().err.splitlines()
    assert err == [f"ponder: {key} is not taken: ponder distill sets it from {by} (the run's directory holds the traces "
                   "and the student); set those instead"
                   for key, by in (("sample.out=mine.jsonl", "output_dir and name"), ("sft.name=kid", "output_dir and name"),
                                   ("sft.seed=7", "seed"))]
    assert cfg.sample.out == str(tmp_path / "d" / "traces.jsonl") and cfg.sft.seed == 5
    (tmp_path / "again.yaml").write_text(yaml.safe_dump(to_dict(load_distill_config(recipe))))
    load_distill_config(tmp_path / "again.yaml", ["name=other"])
    assert capsys.readouterr().err == ""


def test_experiment_recipes_load_and_the_rl_arm_is_the_demo_recipe_on_the_student():
    from ponder.config import read_recipe
    from ponder.distill import load_distill_config

    cfg = load_distill_config("recipes/distill-tiny.yaml", ["output_dir=/nonexistent"])
    zero = read_recipe("recipes/zero-tiny.yaml")
    rl = read_recipe("recipes/rl-student-tiny.yaml")  # base: zero-tiny.yaml
    assert rl.pop("name") == "rl-student-tiny" and zero.pop("name") == "zero-tiny"
    assert rl["model"].pop("path") == cfg.sft.model.path == "runs/student-base"
    zero["model"].pop("path")
    assert rl == zero
    assert cfg.sample.model == f"runs/zero-tiny/checkpoints/step-{zero['train']['steps']}"
    assert {t.name for t in cfg.sample.tasks} == {t["name"] for t in zero["data"]["tasks"]}
    assert cfg.sft.eval.tasks[0].options == zero["eval"]["tasks"][0]["options"] and cfg.sft.eval.k == zero["eval"]["k"]


def test_resume_refuses_changed_settings_of_begun_stages_and_records_only_those_used(tmp_path, teacher_engine):
    import yaml

    from ponder.distill import distill
    from ponder.sft import sft

    distill(make_cfg(tmp_path, "tiny-random"), stage="sample", quiet=True)
    config = tmp_path / "d" / "config.yaml"
    before = config.read_text()
    refused = lambda listed: (f"--resume with settings that differ from the run's {config}: {listed}; the stages begun "
                              "used the old ones, so leave these out to continue the run, or choose another name (name=...) "
                              "to start a new one")
    with pytest.raises(UserError) as e:
        distill(make_cfg(tmp_path, "tiny-random", "sample.k=3", n=6), resume=True, quiet=True)
    assert str(e.value) == refused("sample.tasks[0].n 4 -> 6, sample.k 2 -> 3")
    assert config.read_text() == before and teacher_engine["n"] == 1

    # an interrupted SFT stage takes what `ponder sft --resume` takes, and nothing else
    sft(make_cfg(tmp_path, "tiny-random").sft, stop_after=1, quiet=True)
    with pytest.raises(UserError) as e:
        distill(make_cfg(tmp_path, "tiny-random", "sft.optim.lr=2e-3"), resume=True, quiet=True)
    assert str(e.value) == refused("sft.optim.lr 0.001 -> 0.002")
    distill(make_cfg(tmp_path, "tiny-random", "sft.train.steps=3"), resume=True, quiet=True)
    assert yaml.safe_load(config.read_text())["sft"]["train"]["steps"] == 3
    steps = [json.loads(l)["step"] for l in (tmp_path / "d" / "student" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3] and teacher_engine["n"] == 1

    # a finished stage takes nothing: more steps would not be trained, so they are not recorded either
    before = config.read_text()
    with pytest.raises(UserError) as e:
        distill(make_cfg(tmp_path, "tiny-random", "sft.train.steps=4"), resume=True, quiet=True)
    assert str(e.value) == refused("sft.train.steps 3 -> 4")
    assert config.read_text() == before


def test_a_damaged_config_or_stage_marker_is_one_line_on_resume(tmp_path, teacher_engine):
    """A config.yaml that no longer parsed let any settings through, then was rewritten with them (the traces made with
    k=2 recorded as k=4); a damaged stage marker was a traceback."""
    from ponder.distill import distill

    distill(make_cfg(tmp_path, "tiny-random"), stage="sample", quiet=True)
    config, done = tmp_path / "d" / "config.yaml", tmp_path / "d" / "stages" / "sample.done"
    kept = config.read_text()
    config.write_text("{{{")
    with pytest.raises(UserError) as e:
        distill(make_cfg(tmp_path, "tiny-random", "sample.k=4"), resume=True, quiet=True)
    assert str(e.value) == (f"--resume: {config} is missing or damaged, so the settings the run's stages began with are "
                            "unknown; restore it, or choose another name (name=...) to start a new run")
    assert config.read_text() == "{{{"
    config.write_text(kept)
    distill(make_cfg(tmp_path, "tiny-random"), stage="sample", resume=True, quiet=True)  # restored: the stage done
    for damage in (b"garbage", b"\xff\xfe", b"[1]"):
        done.write_bytes(damage)
        with pytest.raises(UserError) as e:
            distill(make_cfg(tmp_path, "tiny-random"), stage="sample", resume=True, quiet=True)
        assert str(e.value) == (f"{done} is damaged (not what the stage wrote when it finished); delete it to run the "
                                "stage again (with --resume), or restore it")
    assert teacher_engine["n"] == 1


def test_later_stages_are_checked_before_the_teacher_samples(tmp_path, teacher_engine, error_line, monkeypatch):
    make_cfg(tmp_path, "tiny-random")  # writes the recipe d.yaml
    line = error_line("distill", str(tmp_path / "d.yaml"), "sft.model.path=nope")
    assert line.startswith("ponder: error: model 'nope' not found: give a local Hugging Face model directory")
    assert teacher_engine["n"] == 0 and not (tmp_path / "d").exists()
    # recipes/distill-tiny.yaml's runs/student-base before `ponder pretrain` made it: a path, not a Hub id
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    line = error_line("distill", str(tmp_path / "d.yaml"), "sft.model.path=runs/student-base")
    assert line == ("ponder: error: model 'runs/student-base': there is no directory runs/student-base (and runs/ is a "
                    "local folder, so it is not taken for a Hub id); create it first (ponder pretrain, ponder train) or fix "
                    "the path")
    assert teacher_engine["n"] == 0 and not (tmp_path / "d").exists()
    line = error_line("distill", str(tmp_path / "d.yaml"), f"sft.data.files=[{tmp_path / 'gone.jsonl'}]")
    assert line == f"ponder: error: config sft.data.files: '{tmp_path / 'gone.jsonl'}' not found; give an existing JSONL file or leave it out"
    assert teacher_engine["n"] == 0 and not (tmp_path / "d").exists()


def test_a_setting_out_of_range_is_named_by_its_section(tmp_path, teacher_engine, error_line):
    """The sample and sft checks name keys from their own top level; in a distill recipe the key is sample.k."""
    make_cfg(tmp_path, "tiny-random")
    assert error_line("distill", str(tmp_path / "d.yaml"), "sample.k=0") == (
        "ponder: error: config sample.k must be at least 1 (answers per prompt); got 0")
    assert error_line("distill", str(tmp_path / "d.yaml"), "sft.optim.lr=-1") == (
        "ponder: error: config sft.optim.lr must be between 0 (weights frozen) and 1 (AdamW moves each weight by about "
        "lr a step; R1's RL: 3e-6); got -1")
    assert teacher_engine["n"] == 0 and not (tmp_path / "d").exists()


def test_the_sft_stage_after_the_sample_stage_trains_on_its_traces(tmp_path, teacher_engine, error_line, capsys):
    """`--stage sample`, then `--stage sft` with the same recipe and run (the docstring's and the docs' two-step use):
    the second was refused ('already holds distill stages; pass --resume'), the finished sample stage counted as
    one it would run again. A stage that is to run again still needs --resume, and the settings the traces were
    made with still may not change."""
    from ponder.cli import main

    make_cfg(tmp_path, "tiny-random")  # writes the recipe d.yaml
    recipe, run = str(tmp_path / "d.yaml"), tmp_path / "d"
    assert main(["distill", recipe, "--stage", "sample"]) == 0
    assert main(["distill", recipe, "--stage", "sft"]) == 0
    assert teacher_engine["n"] == 1 and json.loads((run / "stages" / "sft.done").read_text())["steps"] == 2
    assert json.loads((run / "student" / "data.json").read_text())["rows"] == 4  # the 4 accepted traces
    capsys.readouterr()
    assert error_line("distill", recipe, "--stage", "sft").startswith(f"ponder: error: run directory {run} already holds "
                                                                        "distill stages; pass --resume")
    # another run: the sft stage under sample settings other than the traces': refused, config.yaml kept
    assert main(["distill", recipe, "name=e", "--stage", "sample"]) == 0
    config = tmp_path / "e" / "config.yaml"
    before = config.read_text()
    capsys.readouterr()
    assert error_line("distill", recipe, "name=e", "sample.k=3", "--stage", "sft") == (
        f"ponder: error: --stage sft with settings that differ from the run's {config}: sample.k 2 -> 3; the stages "
        "begun used the old ones, so leave these out to continue the run, or choose another name (name=...) to start "
        "a new one")
    assert config.read_text() == before and not (tmp_path / "e" / "student").exists()


@pytest.mark.parametrize("override, line", [
    ("sft.eval.tasks=[{name: arithmetic, split: test, n: 4, options: {difficulty: hardd}}]",
     "config sft.eval.tasks[0]: task 'arithmetic': unknown difficulty 'hardd'; choose one of: easy, medium, hard, expert, mixed"),
    ("sft.model.lora={r: 4, target_modules: [lm_head]}",
     "sft.model.lora.target_modules: 'lm_head' shares its matrix with the input embedding in this model "
     "(tie_word_embeddings); leave it out of target_modules"),
    ("sft.model.lora={r: 4, target_modules: [q_proj, v_prj]}",
     "sft.model.lora.target_modules ['v_prj'] of ['q_proj', 'v_prj'] name no layer of this llama model; its linear layers "
     "are down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj: set sft.model.lora.target_modules to some of them"),
    ("sft.data.coldstart=[{name: arithmetic, n: 2, options: {difficulty: hardd}}]",
     "config sft.data.coldstart[0]: task 'arithmetic': unknown difficulty 'hardd'; choose one of: easy, medium, hard, "
     "expert, mixed"),
    ("sft.data.template=chat",  # tiny-random's character tokenizer has no chat template
     "template 'chat' needs a tokenizer with a chat template; use the r1_zero or plain template (sft.data.template; "
     "ponder sample: template; ponder eval: --template)"),
])
def test_sft_stage_settings_are_checked_before_the_teacher_samples(tmp_path, teacher_engine, error_line, override, line):
    """Each of these failed in the SFT stage, after the teacher had sampled (hours, at scale), and the LoRA ones named
    model.lora.target_modules, a key a distill recipe does not have."""
    make_cfg(tmp_path, "tiny-random")  # writes the recipe d.yaml
    assert error_line("distill", str(tmp_path / "d.yaml"), override) == f"ponder: error: {line}"
    assert teacher_engine["n"] == 0 and not (tmp_path / "d").exists()  # nothing sampled, nothing written


def test_sft_data_rows_and_device_are_checked_before_the_teacher_samples(tmp_path, teacher_engine, error_line):
    import torch

    make_cfg(tmp_path, "tiny-random")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1 + 1"}\n')
    assert error_line("distill", str(tmp_path / "d.yaml"), f"sft.data.files=[{bad}]") == (
        f"ponder: error: {bad}:1: no 'completion' field; rows need prompt and completion (or messages)")
    assert teacher_engine["n"] == 0 and not (tmp_path / "d").exists()
    # the sample stage's tasks are the recipe's sample.tasks (the line named data.tasks, which a distill recipe lacks)
    assert error_line("distill", str(tmp_path / "d.yaml"), "sample.tasks=[{name: jsonl}]") == (
        "ponder: error: task 'jsonl' needs a path: sample.tasks: [{name: jsonl, path: my.jsonl}]")
    assert teacher_engine["n"] == 0
    if not torch.cuda.is_available():
        assert error_line("distill", str(tmp_path / "d.yaml"), "sft.train.device=cuda") == (
            "ponder: error: sft.train.device=cuda but no CUDA device is visible; use sft.train.device=auto or cpu")
        assert teacher_engine["n"] == 0 and not (tmp_path / "d").exists()


def test_good_sft_settings_pass_the_checks_before_sampling(tmp_path):
    """The checks refuse only what the SFT stage would: LoRA's default targets on a student directory, eval and
    cold-start tasks that load."""
    from ponder.distill import _check_before_sampling

    student = other_tokenizer_student(tmp_path / "student-base")
    cfg = make_cfg(tmp_path, student, "sft.model.lora={r: 4}", "sft.data.coldstart=[{name: arithmetic, n: 2}]",
                   "sft.eval.tasks=[{name: arithmetic, split: test, n: 4, options: {difficulty: hard}}]")
    _check_before_sampling(cfg, ["sample", "sft"])


def test_lora_without_peft_is_one_line_before_the_teacher_samples(tmp_path, teacher_engine, error_line, monkeypatch):
    import sys

    make_cfg(tmp_path, "tiny-random")
    monkeypatch.setitem(sys.modules, "peft", None)  # as if not installed
    assert error_line("distill", str(tmp_path / "d.yaml"), "sft.model.lora={r: 4}") == (
        "ponder: error: sft.model.lora needs peft: pip install 'ponder[lora]'")
    assert teacher_engine["n"] == 0 and not (tmp_path / "d").exists()
