"""`ponder pretrain`: the corpus as tokens, a short CPU run that learns, a loadable model, the shipped tiny-base."""

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ponder.config import load_config
from ponder.errors import UserError
from ponder.models import load
from ponder.models.tiny import char_tokenizer
from ponder.pretrain import PretrainConfig, add_parser, char_table, corpus_tokens, lr_at, pretrain, probe

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "pretrain-tiny.yaml"


def small(tmp_path, **kw) -> PretrainConfig:
    cfg = dict(output=str(tmp_path / "model"), shape="nano", steps=40, batch_size=8, block=128, max_len=256,
               corpus_chars=150_000, workers=1, threads=1, lr=3e-3, warmup_steps=5, log_every=1000, probe={"n": 0})
    cfg.update(kw)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(path, [], cls=PretrainConfig)


def test_char_table_agrees_with_the_tokenizer():
    tok = char_tokenizer()
    text = "User: Compute 12 + 7. Assistant: <think> 12 + 7 = 19. </think>\n<answer>19</answer>"
    lut = char_table(tok)
    assert lut[np.frombuffer(text.encode(), dtype=np.uint8)].tolist() == tok(text)["input_ids"]
    assert lut[0] == tok.eos_token_id


def test_corpus_tokens_are_deterministic_and_end_documents_with_eos(tmp_path):
    cfg, tok = small(tmp_path), char_tokenizer()
    a, b = corpus_tokens(cfg, tok), corpus_tokens(cfg, tok)
    assert np.array_equal(a, b) and len(a) >= 150_000 - 200_000 // 64
    text = tok.decode(a[:5000].tolist())
    assert "Assistant:" in text and (a == tok.eos_token_id).sum() > 50


def test_lr_warms_up_then_decays_to_min(tmp_path):
    cfg = small(tmp_path, steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3) and lr_at(99, cfg) == pytest.approx(1e-4, rel=0.01)


def test_short_cpu_run_lowers_the_loss_and_saves_a_loadable_model(tmp_path, capsys):
    from rich.console import Console

    cfg = small(tmp_path)
    out = pretrain(cfg, recipe="r.yaml", console=Console(width=120))
    printed = capsys.readouterr().out
    losses = [float(x.split()[3]) for x in printed.splitlines() if x.startswith("step ")]
    assert losses[0] > 4.0 and losses[-1] < losses[0] - 1.0  # from uniform over 101 characters to the corpus
    model, tok = load(str(out))
    assert model.config.hidden_size == 64 and tok("12 + 7")["input_ids"] == char_tokenizer()("12 + 7")["input_ids"]
    card = (out / "README.md").read_text()
    assert "ponder pretrain r.yaml" in card and "40 steps" in card
    # same seed, same weights (CPU runs repeat bit for bit)
    (tmp_path / "again").mkdir()
    again = pretrain(small(tmp_path / "again", output=str(tmp_path / "m2")), recipe="r.yaml", console=Console(width=120))
    m2, _ = load(str(again))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), m2.parameters()))


def test_probe_reports_figures_in_range():
    from ponder.models.tiny import tiny_random
    from ponder.pretrain import ProbeConfig

    model, tok = tiny_random("nano", seed=0)
    figs = probe(model, tok, ProbeConfig(n=2, k=2, temperatures=[1.0], max_new_tokens=6,
                                         tasks=["arithmetic:hard", "countdown:easy"]))
    assert set(figs) == {"arithmetic:hard@T1.0", "countdown:easy@T1.0"}
    for f in figs.values():
        assert f["pass@1"] == 0.0 and f["format"] == 0.0 and 0 < f["length"] <= 6 and f["n"] == 2 and f["k"] == 2


def test_config_mistakes_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown config key 'stpes'"):
        load_config(RECIPE, ["stpes=3"], cls=PretrainConfig)
    with pytest.raises(UserError, match="unknown tiny shape 'huge'"):
        pretrain(small(tmp_path, shape="huge", corpus_chars=1000))
    with pytest.raises(UserError, match="sizes.hiden_size: not a LlamaConfig field"):
        pretrain(small(tmp_path, sizes={"hiden_size": 8}, corpus_chars=1000))
    with pytest.raises(UserError, match=r"config block must be at most max_len \(256\), the positions the model has; got 512"):
        pretrain(small(tmp_path, block=512, max_len=256))


def test_cli_registers_pretrain_with_help():
    parser = argparse.ArgumentParser(prog="ponder")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["pretrain", "recipes/pretrain-tiny.yaml", "steps=5", "--probe-only"])
    assert args.recipe == "recipes/pretrain-tiny.yaml" and args.overrides == ["steps=5"] and args.probe_only
    assert callable(args.func)
    with pytest.raises(SystemExit):
        parser.parse_args(["pretrain", "--help"])


def test_shipped_tiny_base_matches_its_recipe_and_loads_by_name():
    cfg = load_config(RECIPE, [], cls=PretrainConfig)
    model, tok = load("tiny-base")
    for key, value in cfg.sizes.items():
        assert getattr(model.config, key) == value
    assert tok.padding_side == "left" and tok.eos_token_id == model.config.eos_token_id
    weights = ROOT / "src" / "ponder" / "assets" / "tiny-base" / "model.safetensors"
    assert weights.stat().st_size < 5 * 2**20
    card = (weights.parent / "README.md").read_text()
    assert "ponder pretrain recipes/pretrain-tiny.yaml" in card and "| arithmetic:hard@T1.0 |" in card


def test_tiny_base_answers_in_its_learned_forms():
    """The base model has the behaviours RL selects: under the R1-Zero template some completions are
    worked step by step inside the tags, some are bare answers (seeded sampling: fixed on CPU)."""
    from ponder.rollout import SamplingParams, make_engine
    from ponder.tasks import get_task
    from ponder.templates import render

    model, tok = load("tiny-base")
    examples = get_task("arithmetic").load("test", n=8, seed=0)
    prompts = [tok(render("r1_zero", ex["prompt"]))["input_ids"] for ex in examples]
    groups = make_engine("hf", model, tok).generate(prompts, SamplingParams(n=4, temperature=1.0, max_tokens=160, stop=("</answer>",), seed=0))
    texts = [tok.decode(c.token_ids, skip_special_tokens=True) for g in groups for c in g]
    assert any("<think>" in t and "</answer>" in t for t in texts)
    assert any(t.count(" = ") >= 2 for t in texts) and any(" = " not in t for t in texts)


def test_the_bf16_save_leaves_the_probed_model_as_the_saved_one(tmp_path):
    """save_dtype bfloat16: the cast to bf16 and back rounded the rotary frequencies of the model the probe then ran
    (0.4%: logits off by 2 at positions past 900 on trained weights), where a loader rebuilds them exactly."""
    from transformers import AutoModelForCausalLM

    from ponder.models import tiny_random
    from ponder.pretrain import save_as

    model, tok = tiny_random("micro", 0)
    fresh = dict(model.named_buffers())["model.rotary_emb.inv_freq"].clone()
    probed = save_as(model.float().eval(), tok, tmp_path / "m", "bfloat16")
    assert torch.equal(dict(probed.named_buffers())["model.rotary_emb.inv_freq"], fresh)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    ids = torch.randint(4, 40, (1, 300))
    with torch.no_grad():
        torch.testing.assert_close(probed(ids).logits, loaded(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cut_in", ["save_as", "probe"])
def test_an_interrupted_overwrite_leaves_the_old_model_whole(tmp_path, monkeypatch, cut_in):
    """Ctrl-C in the probe (or a stop in the save) of a run that replaces a model left the new weights beside the old
    card, in a directory nothing marked unfinished: the model is written aside and takes the name only when complete."""
    import ponder.pretrain as pt

    quick = dict(steps=3, corpus_chars=20_000, block=64, batch_size=4)
    out = pretrain(small(tmp_path, **quick), recipe="r.yaml")
    weights, card = (out / "model.safetensors").read_bytes(), (out / "README.md").read_text()
    real = getattr(pt, cut_in)

    def cut(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(pt, cut_in, cut)
    probe = {"n": 1, "k": 1, "max_new_tokens": 4, "temperatures": [1.0], "tasks": ["arithmetic:hard"]}
    with pytest.raises(KeyboardInterrupt):
        pretrain(small(tmp_path, **quick, seed=1, probe=probe), recipe="r.yaml")
    assert (out / "model.safetensors").read_bytes() == weights and (out / "README.md").read_text() == card
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "r.yaml"]  # no temporary directory left

    monkeypatch.undo()  # a run that completes replaces weights and card together, and leaves nothing aside
    pretrain(small(tmp_path, **{**quick, "steps": 4}), recipe="r.yaml")
    assert (out / "model.safetensors").read_bytes() != weights and "4 steps" in (out / "README.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "r.yaml"]


def test_an_output_that_cannot_be_written_is_one_line_before_training(tmp_path, monkeypatch, error_line):
    """A file in the output's path was found by the save, after all of training: a traceback, the model lost."""
    import ponder.pretrain as pt

    monkeypatch.setattr(pt, "corpus_tokens", lambda *a: pytest.fail("the corpus was written before the output was checked"))
    small(tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("kept")
    for out in (blocker / "model", blocker):
        line = error_line("pretrain", str(tmp_path / "r.yaml"), f"output={out}")
        assert line == f"ponder: error: output '{out}' cannot be a directory: '{blocker}' is a file; choose another output"
    assert blocker.read_text() == "kept"


@pytest.mark.parametrize("task, line", [
    ("arithmetic:hardd", "task 'arithmetic': unknown difficulty 'hardd'; choose one of: easy, medium, hard, expert, mixed"),
    ("arithmetc:hard", "unknown task 'arithmetc'; did you mean 'arithmetic'?"),
])
def test_a_misspelled_probe_task_is_one_line_before_training(tmp_path, monkeypatch, error_line, task, line):
    """The probe's tasks were first loaded after all of training: the error, and the trained model lost with it."""
    import ponder.pretrain as pt

    monkeypatch.setattr(pt, "corpus_tokens", lambda *a: pytest.fail("the corpus was written before the probe's tasks were checked"))
    small(tmp_path, probe={"n": 1, "k": 1})
    assert error_line("pretrain", str(tmp_path / "r.yaml"), f"probe.tasks=[{task}]") == f"ponder: error: {line}"
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("override, line", [
    ("probe.k=0", "config probe.k must be at least 1 (samples a problem); got 0"),
    ("probe.n=-1", "config probe.n must be 0 (no probe) or more; got -1"),
    ("probe.batch_size=0", "config probe.batch_size must be at least 1; got 0"),
    ("probe.max_new_tokens=0", "config probe.max_new_tokens must be at least 1; got 0"),
    ("probe.temperatures=[-1]", "config probe.temperatures must be 0 (greedy) or more each; got [-1.0]"),
    ("sizes={hidden_size: 0}", "config sizes.hidden_size must be a whole number from 1 to 65,536; got 0"),
    ("sizes={hidden_size: 1099511627776}", "config sizes.hidden_size must be a whole number from 1 to 65,536; got 1099511627776"),
    ("sizes={hidden_size: 96.5}", "config sizes.hidden_size must be a whole number from 1 to 65,536; got 96.5"),
    ("sizes={num_attention_heads: 0}", "config sizes.num_attention_heads must be a whole number from 1 to 65,536; got 0"),
    ("sizes={hidden_size: 100}", "config sizes.hidden_size must be num_attention_heads (4) times an even head width "
                                 "(rotary turns pairs of dimensions); got 100"),
    ("sizes={num_attention_heads: 3}", "config sizes.hidden_size must be num_attention_heads (3) times an even head width "
                                       "(rotary turns pairs of dimensions); got 64"),
    ("sizes={num_key_value_heads: 3}", "config sizes.num_key_value_heads must be a divisor of num_attention_heads (4); got 3"),
    ("min_lr=10", "config min_lr must be at most lr (0.003), where the cosine ends; got 10"),
    ("lr=1e39", "config lr must be between 0 (weights frozen) and 1 (AdamW moves each weight by about lr a step; R1's "
                "RL: 3e-6); got 1e+39"),
    ("seed=18446744073709551617", "config seed must be an integer of at most 63 bits (e.g. 0); got 18446744073709551617"),
    ("threads=-1", "config threads must be 0 (torch's default) or more; got -1"),
])
def test_settings_out_of_range_are_one_line_before_the_corpus(tmp_path, monkeypatch, error_line, override, line):
    """The probe's settings and the model's sizes failed in transformers or the probe after the corpus was written
    (or after all of training); a width of 2**40 tried to allocate 444 TB."""
    import ponder.pretrain as pt

    monkeypatch.setattr(pt, "corpus_tokens", lambda *a: pytest.fail("the corpus was written before the settings were checked"))
    small(tmp_path, probe={"n": 1, "k": 1})
    assert error_line("pretrain", str(tmp_path / "r.yaml"), override) == f"ponder: error: {line}"
    assert not (tmp_path / "model").exists()


def test_a_probe_that_fails_after_training_keeps_the_trained_model(tmp_path, monkeypatch, capsys):
    """A probe that raised (here a stand-in for any failure) took the model with it: it was written to a temporary
    directory removed on the way out. The model is saved with a card without figures, and the line says where."""
    import ponder.pretrain as pt

    def broken(*a, **k):
        raise RuntimeError("the probe broke")

    monkeypatch.setattr(pt, "probe", broken)
    probe = {"n": 1, "k": 1, "max_new_tokens": 4, "temperatures": [1.0], "tasks": ["arithmetic:hard"]}
    cfg = small(tmp_path, steps=3, corpus_chars=20_000, block=64, batch_size=4, probe=probe)
    with pytest.raises(RuntimeError, match="the probe broke"):
        pretrain(cfg, recipe="r.yaml")
    out = tmp_path / "model"
    model, tok = load(str(out))
    assert model.config.hidden_size == 64 and tok("12")["input_ids"] == char_tokenizer()("12")["input_ids"]
    card = (out / "README.md").read_text()
    assert "3 steps" in card and "## What it scores" not in card
    assert f"saved {out} without probe figures" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "r.yaml"]  # no temporary directory left
