"""SFT: completion-only loss (checked on values), packing equals unpacked, learning a new format, resume, errors."""

import json
import random
from pathlib import Path

import pytest
import torch

from ponder.config import load_config
from ponder.errors import UserError
from ponder.models import load
from ponder.rewards.format import STRICT_FORMAT
from ponder.sft import sft
from ponder.sft.config import SFTConfig, load_sft_config
from ponder.sft.data import Encoded, encode, fit
from ponder.sft.packing import as_sample, collate, loss_sum, micro_batches, pack, stream_loss_sum
from ponder.templates import render

ROWS = [
    {"prompt": "Compute 1 + 2", "completion": " <think> 1 + 2 = 3 </think> <answer> 3 </answer>"},
    {"prompt": "Compute 10 - 4 + 7", "completion": " <answer> 13 </answer>"},
    {"prompt": "hi", "completion": " there, friend"},
    {"prompt": "Compute 5 + 5 + 5", "completion": " <think> 5 + 5 = 10. 10 + 5 = 15 </think> <answer> 15 </answer>"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def cfg_for(tmp_path, files, *overrides):
    return load_config(None, [f"output_dir={tmp_path}", f"data.files={json.dumps(files)}", "train.log_samples=0",
                              "train.save_every=0", *overrides], cls=SFTConfig)


def full_logprobs(model, ids):
    """log p(ids[t] | ids[:t]) for t >= 1 from the plain full-logits forward pass."""
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    return logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)


def test_prompt_is_encoded_as_grpo_encodes_it_and_only_the_completion_and_eos_are_targets():
    _, tok = load("tiny-random")
    ex = encode(ROWS[0], tok, "r1_zero")
    prompt = tok(render("r1_zero", ROWS[0]["prompt"], tok)).input_ids  # GRPOTrainer._encode
    completion = tok(ROWS[0]["completion"], add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert ex.ids == prompt + completion
    assert ex.mask == [0] * len(prompt) + [1] * len(completion)
    assert encode(ROWS[0], tok, "r1_zero", add_eos=False).ids == prompt + completion[:-1]


def test_loss_is_hand_computed_cross_entropy_over_completion_tokens_only():
    torch.manual_seed(0)
    model, tok = load("tiny-random")
    ex = encode(ROWS[0], tok, "r1_zero")
    with torch.no_grad():
        lp = full_logprobs(model, ex.ids)  # lp[t-1] scores token t
        got = loss_sum(model, collate([ex], [[0]], tok.pad_token_id)).item()
    p = ex.prompt_len
    expected = -lp[p - 1 :].sum().item()  # tokens p.. (completion and EOS)
    assert got == pytest.approx(expected, rel=1e-5)
    assert abs(-lp.sum().item() - got) > 1.0  # prompt tokens would change it: the test can fail
    # targets of prompt positions do not matter: scoring the prompt as completion changes the loss,
    # replacing the prompt's own mask bits (0) by anything else is the only way they enter
    everything = Encoded(ex.ids, [0] + [1] * (len(ex.ids) - 1))
    with torch.no_grad():
        assert loss_sum(model, collate([everything], [[0]], tok.pad_token_id)).item() == pytest.approx(-lp.sum().item(), rel=1e-5)


def test_output_head_runs_on_completion_positions_only():
    """Prompt positions are never scored: the head (the chunked logits) sees only the target positions."""
    torch.manual_seed(0)
    model, tok = load("tiny-random")
    ex = encode(ROWS[3], tok, "plain")
    logits_seen = {}
    head = model.get_output_embeddings()
    hook = head.register_forward_hook(lambda m, i, o: logits_seen.update(rows=i[0].shape[0]))
    loss_sum(model, collate([ex], [[0]], tok.pad_token_id))
    hook.remove()
    assert logits_seen["rows"] == sum(ex.mask)  # the head runs on completion positions only


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_rows_give_the_loss_of_examples_run_one_by_one(impl):
    torch.manual_seed(0)
    model, tok = load("tiny-random")
    model.config._attn_implementation = impl
    examples = [encode(r, tok, "r1_zero") for r in ROWS]
    with torch.no_grad():
        alone = sum(loss_sum(model, collate(examples, [[i]], tok.pad_token_id)).item() for i in range(len(examples)))
        packed = loss_sum(model, collate(examples, [[0, 1, 2], [3]], tok.pad_token_id)).item()
        # the padding of the short row is attended by nothing and scored by nothing
        padded = loss_sum(model, collate(examples, [[2], [3, 0, 1]], tok.pad_token_id)).item()
    assert packed == pytest.approx(alone, rel=1e-5)
    assert padded == pytest.approx(alone, rel=1e-5)
    # and attention across examples would show: the same tokens as one sequence score differently
    merged = Encoded(sum((e.ids for e in examples[:3]), []), sum((e.mask for e in examples[:3]), []))
    with torch.no_grad():
        assert abs(loss_sum(model, collate([merged], [[0]], tok.pad_token_id)).item()
                   - sum(loss_sum(model, collate(examples, [[i]], tok.pad_token_id)).item() for i in range(3))) > 1e-3


def test_stream_pass_gives_the_hand_computed_loss_and_the_gradient_of_examples_run_one_by_one():
    from ponder.rl.forward import PolicyPass

    torch.manual_seed(0)
    model, tok = load("tiny-random")
    examples = [encode(r, tok, "r1_zero") for r in ROWS]
    # a second answer to the first prompt (the stream runs that prompt once for both), and a conversation whose
    # second user turn lies inside the completion, unscored
    examples.append(encode({"prompt": ROWS[0]["prompt"], "completion": " <answer> 3 </answer>"}, tok, "r1_zero"))
    ids = examples[2].ids + examples[1].ids[1:]
    mask = examples[2].mask + [0] * (examples[1].prompt_len - 1) + examples[1].mask[examples[1].prompt_len:]
    examples.append(Encoded(ids, mask))
    samples = [as_sample(e) for e in examples]
    assert samples[4].prompt_ids == samples[0].prompt_ids and 0 in samples[5].scored
    stream = stream_loss_sum(PolicyPass(True, tok.pad_token_id, "cpu", False), model, samples)
    with torch.no_grad():
        expected = -sum(full_logprobs(model, e.ids)[torch.tensor(e.mask[1:]) == 1].sum() for e in examples)
    assert stream.item() == pytest.approx(expected.item(), rel=1e-5)
    stream.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    sum(loss_sum(model, collate(examples, [[i]], tok.pad_token_id)) for i in range(len(examples))).backward()
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


def test_step_loss_is_the_mean_over_target_tokens_only(tmp_path):
    """The logged loss of a step is the cross entropy summed over the scored tokens (completion and EOS) divided by
    their count: dividing by every token of the batch, prompt included, made it smaller. Checked on one example
    against a forward pass by hand; optim.lr=0 keeps the weights the loss was computed with."""
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:1])
    tr = sft(cfg_for(tmp_path, [data], "name=one", "train.steps=1", "train.batch_size=1", "data.template=r1_zero",
                     "optim.lr=0"), quiet=True)
    logged = json.loads((tr.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    ex = encode(ROWS[0], tr.tokenizer, "r1_zero")
    tr.model.eval()
    with torch.no_grad():
        lp = full_logprobs(tr.model, ex.ids)[torch.tensor(ex.mask[1:]) == 1]
    assert logged["loss"] == pytest.approx(-lp.mean().item(), rel=1e-5)
    assert logged["target_tokens"] == len(lp) == sum(ex.mask) < len(ex.ids)  # the prompt's tokens are no targets


def test_first_fit_packing_and_micro_batches_respect_their_bounds():
    rng = random.Random(0)
    lengths = [rng.randint(5, 60) for _ in range(40)] + [90]
    rows = pack(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows if len(row) > 1)
    assert [40] in rows  # too long for any row: a row of its own
    assert len(rows) <= -(-sum(lengths) // 64) + 2  # first-fit decreasing packs close to the bound
    for mb in micro_batches(rows, lengths, 200):
        widest = max(sum(lengths[i] for i in row) for row in mb)
        assert widest * len(mb) <= 200 or len(mb) == 1


def test_step_loss_and_gradient_do_not_depend_on_micro_batching_or_the_pass(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS * 3)
    runs = {}
    for forward in ("packed", "padded"):
        for budget in (100_000, 64):
            cfg = cfg_for(tmp_path, [data], f"name={forward}{budget}", f"optim.token_budget={budget}", "train.steps=1",
                          "train.batch_size=12", "data.template=plain", f"train.forward={forward}")
            tr = sft(cfg, quiet=True)
            runs[forward, budget] = json.loads((tr.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    first = runs["packed", 100_000]
    assert first["micro_batches"] == 1 and runs["packed", 64]["micro_batches"] > 3  # really split differently
    assert runs["padded", 100_000]["micro_batches"] < runs["padded", 64]["micro_batches"]
    # the stream pads nothing (it was logged as real tokens over those it ran: above 1, with the prompts it runs once
    # and the completions' last tokens it never runs counted as real); rows pad up to the widest
    assert first["pack_efficiency"] == 1.0
    _, tok = load("tiny-random")
    lengths = [len(encode(r, tok, "plain").ids) for r in ROWS * 3]
    assert runs["padded", 100_000]["pack_efficiency"] == pytest.approx(sum(lengths) / (runs["padded", 100_000]["rows"]
                                                                                     * max(lengths)))
    for m in runs.values():
        assert m["loss"] == pytest.approx(first["loss"], rel=1e-5)
        assert m["grad_norm"] == pytest.approx(first["grad_norm"], rel=1e-4)


def format_rows(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        out.append({"prompt": f"Add {a} and {b}", "completion": f"<think> {a}+{b} </think> <answer> {a + b} </answer>"})
    return out


def greedy_texts(model, tok, prompts, max_tokens=48):
    from ponder.rollout import SamplingParams, make_engine

    outs = make_engine("hf", model, tok).generate([tok(p).input_ids for p in prompts],
                                                  SamplingParams(n=1, temperature=0.0, max_tokens=max_tokens))
    return [tok.decode(o[0].token_ids, skip_special_tokens=True) for o in outs]


def test_short_sft_teaches_a_random_model_the_think_answer_format(tmp_path):
    data = write_jsonl(tmp_path / "fmt.jsonl", format_rows(64, 0))
    held_out = [r["prompt"] for r in format_rows(6, 1)]
    model, tok = load("tiny-random")
    assert not any(STRICT_FORMAT.match(t) for t in greedy_texts(model, tok, held_out))  # it did not have the format
    cfg = cfg_for(tmp_path, [data], "name=fmt", "data.template=plain", "optim.lr=5e-3", "train.steps=24",
                  "train.batch_size=8", "train.log_samples=1")
    tr = sft(cfg, quiet=True)
    texts = greedy_texts(tr.model, tr.tokenizer, held_out)
    assert all(STRICT_FORMAT.match(t) for t in texts), texts
    # the saved model is a plain Hugging Face directory with the same behaviour
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tr.run_dir / "final")
    assert greedy_texts(again, tr.tokenizer, held_out[:2]) == texts[:2]
    # the run ends with its report: the loss curve, and a completion beside the reference it learnt from
    page = (tr.run_dir / "report.html").read_text()
    assert "alt='training loss'" in page and "<div class='meta'>reference</div>" in page


VOLATILE = ("time", "time/step", "tokens_per_s")


def _metrics(run_dir):
    return [{k: v for k, v in json.loads(l).items() if k not in VOLATILE} for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_repeats_the_uninterrupted_run(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS * 4)
    common = ["train.steps=4", "train.batch_size=3", "train.save_every=2", "optim.lr=1e-3", "optim.schedule=cosine",
              "optim.warmup_steps=1"]
    full = sft(cfg_for(tmp_path, [data], "name=full", *common), quiet=True)
    cut_cfg = cfg_for(tmp_path, [data], "name=cut", *common)
    sft(cut_cfg, stop_after=3, quiet=True)  # step 3 is logged but only step-2 is saved: it is redone
    with pytest.raises(UserError, match="already holds checkpoints; pass --resume"):
        sft(cut_cfg, quiet=True)
    sft(cut_cfg, resume=True, quiet=True)
    a, b = _metrics(full.run_dir), _metrics(cut_cfg.run_dir)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert a == b
    assert (cut_cfg.run_dir / "final").resolve().name == "step-4"


def test_a_stop_while_a_checkpoints_samples_are_drawn_loses_none_of_them(tmp_path, monkeypatch):
    """The samples of a checkpointed step were drawn after its save: a Ctrl-C while they were drawn (greedy decoding,
    seconds) left a checkpoint that --resume continued after, and that step's samples never written."""
    from ponder.sft.trainer import SFTTrainer

    data = write_jsonl(tmp_path / "d.jsonl", ROWS * 4)
    cfg = cfg_for(tmp_path, [data], "name=s", "train.steps=4", "train.batch_size=3", "train.save_every=2",
                  "train.log_samples=1")
    real = SFTTrainer.sample_rows

    def stopped_at_step_4(self, k):
        if self.step_no == 4:
            raise KeyboardInterrupt
        return real(self, k)

    with monkeypatch.context() as m:
        m.setattr(SFTTrainer, "sample_rows", stopped_at_step_4)
        with pytest.raises(KeyboardInterrupt):
            sft(cfg, quiet=True)
    resumed = sft(cfg, resume=True, quiet=True)
    rows = [json.loads(l) for l in (resumed.run_dir / "samples.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in rows}) == [2, 4]


@pytest.mark.parametrize("writer", ["torch.save", "safetensors"])
def test_a_full_disk_at_a_checkpoint_is_one_line_and_leaves_no_partial_directory(tmp_path, monkeypatch, writer):
    """A full disk is no OSError from these writers (torch.save: RuntimeError "unexpected pos"; safetensors:
    SafetensorError), so `ponder train` told it as a traceback and `ponder sft` caught nothing at all; the half-written
    directory kept the space the disk lacked. Both commands save through checkpoint.save."""
    import transformers.modeling_utils
    from safetensors import SafetensorError

    from ponder import checkpoint

    reason = {"torch.save": "[enforce fail at inline_container.cc:672] . unexpected pos 316672 vs 316560",
              "safetensors": "Error while serializing: I/O error: No space left on device (os error 28)"}[writer]

    def full(*_, **__):
        raise (RuntimeError if writer == "torch.save" else SafetensorError)(reason)

    data = write_jsonl(tmp_path / "d.jsonl", ROWS * 4)
    cfg = cfg_for(tmp_path, [data], "name=f", "train.steps=4", "train.batch_size=3", "train.save_every=2")
    sft(cfg, stop_after=2, quiet=True)
    if writer == "torch.save":
        monkeypatch.setattr(checkpoint.torch, "save", full)
    else:  # what save_pretrained calls
        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    with pytest.raises(UserError) as e:
        sft(cfg, resume=True, quiet=True)
    assert str(e.value) == (f"could not write checkpoint step-4 in {cfg.run_dir / 'checkpoints'}: {reason}; free space or "
                            "fix the permissions, then --resume continues from the last checkpoint written (if none, run "
                            "again)")
    assert sorted(p.name for p in (cfg.run_dir / "checkpoints").iterdir()) == ["step-2"]


def test_resume_on_other_rows_is_refused_unless_allowed(tmp_path):
    """The sampler's place in its epochs counts the rows the run began with: resumed on a changed file it went on
    silently (its epoch jumped)."""
    data = write_jsonl(tmp_path / "d.jsonl", ROWS * 4)
    cfg = cfg_for(tmp_path, [data], "name=r", "train.steps=4", "train.batch_size=3", "train.save_every=2")
    sft(cfg, stop_after=2, quiet=True)
    write_jsonl(tmp_path / "d.jsonl", ROWS * 3)
    with pytest.raises(UserError, match=r"^--resume: the rows of data.files / data.coldstart differ from those the run"):
        sft(cfg, resume=True, quiet=True)
    assert sft(cfg, resume=True, quiet=True, allow_changes=True).step_no == 4


def test_lora_trains_adapters_only_and_saves_a_merged_model(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    base, _ = load("tiny-random")
    cfg = cfg_for(tmp_path, [data], "name=lora", "model.lora={r: 4, alpha: 8}", "optim.lr=1e-2", "train.steps=2",
                  "train.batch_size=4", "train.save_every=1")
    tr = sft(cfg, stop_after=1, quiet=True)
    trained = {k for k, p in tr.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in k for k in trained)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tr.run_dir / "final")
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    resumed = sft(cfg, resume=True, quiet=True)  # the adapters come back from the trainer state
    assert resumed.step_no == 2


def test_chat_rows_score_assistant_turns_only(tmp_path):
    _, tok = load("tiny-random")
    tok.chat_template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% if m.role == 'assistant' %}<eos>{% endif %}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "bc"},
                        {"role": "user", "content": "d"}, {"role": "assistant", "content": "ef"}]}
    ex = encode(row, tok, "chat")
    scored = tok.decode([t for t, m in zip(ex.ids, ex.mask) if m])
    assert tok.decode(ex.ids) == "[user]a[assistant]bc<eos>[user]d[assistant]ef<eos>"
    assert scored == "bc<eos>ef<eos>"
    # one turn under a text template is a prompt/completion pair; several need the chat template
    single = encode({"messages": row["messages"][:2]}, tok, "plain")
    assert tok.decode([t for t, m in zip(single.ids, single.mask) if m], skip_special_tokens=True) == "bc"
    with pytest.raises(UserError, match="multi-turn chat rows need data.template=chat"):
        encode(row, tok, "plain")


def test_long_examples_are_cut_with_a_count_never_silently(tmp_path, capsys):
    ex = [Encoded(list(range(10)), [0] * 4 + [1] * 6), Encoded(list(range(30)), [0] * 25 + [1] * 5),
          Encoded(list(range(5)), [0, 1, 1, 1, 1])]
    index, kept, report = fit(ex, 20)
    assert index == [0, 2] and (report.truncated, report.dropped) == (0, 1)
    index, kept, report = fit(ex, 8)
    assert index == [0, 2] and kept[0].ids == list(range(8)) and kept[0].truncated and report.truncated == 1
    data = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "p", "completion": "x" * 80}, {"prompt": "q", "completion": "y"}])
    tr = sft(cfg_for(tmp_path, [data], "name=long", "data.max_len=40", "data.template=plain", "train.steps=1"), quiet=False)
    out = capsys.readouterr().out
    assert "1 of 2 examples are longer than 40 tokens and were cut" in out
    first = json.loads((tr.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["truncated_examples"] == 1
    assert json.loads((tr.run_dir / "data.json").read_text())["truncated"] == 1


def test_examples_with_nothing_to_learn_are_counted_and_named():
    """An example with no scored token that was not cut (an empty completion without EOS) was left out uncounted."""
    ex = [Encoded(list(range(10)), [0] * 4 + [1] * 6), Encoded(list(range(5)), [0] * 5), Encoded([1, 2], [0, 0])]
    index, kept, report = fit(ex, 20)
    assert index == [0] and (report.truncated, report.dropped, report.empty) == (0, 0, 2)
    assert report.warning() == ("2 of 3 examples have nothing to learn (no completion token is scored, e.g. an empty "
                                "completion with data.add_eos=false) and were left out; give them a completion or remove them")


def test_an_example_exactly_max_len_long_is_not_cut():
    index, kept, report = fit([Encoded([1, 2, 3, 4], [0, 0, 1, 1])], 4)
    assert index == [0] and kept[0].ids == [1, 2, 3, 4] and not kept[0].truncated
    assert (report.truncated, report.dropped, report.empty) == (0, 0, 0) and report.warning() is None
    _, kept, report = fit([Encoded([1, 2, 3, 4, 5], [0, 0, 1, 1, 1])], 4)  # one token more is cut
    assert kept[0].ids == [1, 2, 3, 4] and report.truncated == 1


def _error(capsys, *argv):
    from ponder.cli import main

    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    return err


def test_bad_input_ends_in_one_line(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path}\nname: bad\n")
    assert "SFT data is empty" in _error(capsys, "sft", str(recipe), f"data.files=[{empty}]")
    bad = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], {"prompt": "x"}])
    assert "bad.jsonl:2: no 'completion' field" in _error(capsys, "sft", str(recipe), f"data.files=[{bad}]")
    gaps = tmp_path / "gaps.jsonl"  # the line as an editor shows it, blank lines counted
    gaps.write_text(Path(bad).read_text().replace("\n", "\n\n", 1))
    assert "gaps.jsonl:3: no 'completion' field" in _error(capsys, "sft", str(recipe), f"data.files=[{gaps}]")
    assert "config data.files is empty" in _error(capsys, "sft", str(recipe))
    assert f"data file '{tmp_path / 'nope.jsonl'}' not found; check data.files" in _error(
        capsys, "sft", str(recipe), f"data.files=[{tmp_path / 'nope.jsonl'}]")
    # a held-out task's file is named where it is set (sft has no data.tasks), before the model loads
    good = write_jsonl(tmp_path / "good.jsonl", ROWS)
    assert _error(capsys, "sft", str(recipe), f"data.files=[{good}]", f"eval.tasks=[{{name: jsonl, path: {tmp_path / 'held.jsonl'}}}]") == (
        f"ponder: error: data file '{tmp_path / 'held.jsonl'}' not found; check eval.tasks[].path")
    assert _error(capsys, "sft", str(recipe), f"data.files=[{good}]", "eval.tasks=[{name: jsonl}]") == (
        "ponder: error: task 'jsonl' needs a path: eval.tasks: [{name: jsonl, path: my.jsonl}]")
    assert "--resume: no checkpoint" in _error(capsys, "sft", str(recipe), f"data.files=[{bad}]", "--resume")
    assert "unknown config key 'train.stesp'" in _error(capsys, "sft", str(recipe), "train.stesp=3")
    # out of range: torch's own RuntimeError (threads), or nothing said at all (data.n 0 trained on every row)
    for setting, line in (("train.threads=-1", "config train.threads must be 0 (torch's default) or more; got -1"),
                          ("data.n=0", "config data.n must be at least 1, or null (every row); got 0"),
                          ("train.log_samples=-1", "config train.log_samples must be 0 (none) or more; got -1"),
                          ("seed=18446744073709551617",  # torch.manual_seed's overflow
                           "config seed must be an integer of at most 63 bits (e.g. 0); got 18446744073709551617")):
        assert _error(capsys, "sft", str(recipe), f"data.files=[{good}]", setting) == f"ponder: error: {line}"
    for setting, line in (("threads=-1", "config threads must be 0 (torch's default) or more; got -1"),
                          ("seed=18446744073709551617",
                           "config seed must be an integer of at most 63 bits (e.g. 0); got 18446744073709551617"),
                          ("batch_size=-3", "config batch_size must be at least 1 (sequences generated at once); got -3")):
        assert _error(capsys, "sample", "--model", "tiny-base", "--tasks", "first_digit", setting,
                      "--out", str(tmp_path / "t.jsonl")) == f"ponder: error: {line}"
    assert _error(capsys, "sample", "--model", "tiny-base", "--tasks", "first_digit", "--out", "") == (
        "ponder: error: config out must be a file to write, e.g. traces.jsonl; got ''")


def test_coldstart_traces_are_correct_in_format_and_show_no_test_item():
    from ponder.config import TaskSpec
    from ponder.rewards import get_reward
    from ponder.sft.coldstart import coldstart_rows
    from ponder.tasks import arithmetic as ar

    for spec in (TaskSpec(name="arithmetic", n=30, options={"difficulty": ["medium", "expert"]}),
                 TaskSpec(name="countdown", n=30)):
        rows = coldstart_rows(spec)
        texts = [r["completion"] for r in rows]
        columns = {k: [r.get(k) for r in rows] for k in ("answer", "task", "numbers", "target")}
        assert len(rows) == 30
        assert get_reward("accuracy")(texts, prompts=[r["prompt"] for r in rows], **columns) == [1.0] * 30
        assert all(STRICT_FORMAT.match(t) for t in texts)
        assert all(ar.split_of(r["expression"]) == "train" for r in rows if "expression" in r)
    assert any("wait, try again" in t for t in texts)  # countdown: misses checked against the target
    from ponder.sft.coldstart import _shows_no_test_item

    test_chain = next(([a, b, c], ["+", "+"]) for a in range(1, 30) for b in range(1, 30) for c in range(1, 30)
                      if ar.split_of(f"{a} + {b} + {c}") == "test")
    assert not _shows_no_test_item(*test_chain)
    assert _shows_no_test_item(test_chain[0], ["*", "+"])
    with pytest.raises(UserError, match="no built-in traces for task 'first_digit'"):
        coldstart_rows(TaskSpec(name="first_digit"))


def test_coldstart_rl_recipe_is_the_r1_zero_recipe_from_the_cold_started_model():
    from ponder.config import read_recipe

    zero = read_recipe("recipes/zero-tiny.yaml")
    cold = read_recipe("recipes/coldstart-rl-tiny.yaml")  # base: zero-tiny.yaml
    assert cold.pop("name") == "coldstart-rl-tiny" and zero.pop("name") == "zero-tiny"
    assert cold["model"].pop("path") == "runs/coldstart-tiny/final" and zero["model"].pop("path") == "tiny-base"
    assert cold == zero
    sft_cfg = load_sft_config("recipes/coldstart-tiny.yaml")
    assert sum(s.n for s in sft_cfg.data.coldstart) <= 100  # the "at most 100 examples"
    assert {s.name for s in sft_cfg.data.coldstart} == {t["name"] for t in zero["data"]["tasks"]}


def test_sft_under_torchrun_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    from ponder.sft.trainer import SFTTrainer

    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets for each of two processes
    cfg = cfg_for(tmp_path, [write_jsonl(tmp_path / "d.jsonl", ROWS)], "name=two")
    with pytest.raises(UserError, match="ponder sft runs one process, and torchrun started 2; start it without torchrun"):
        SFTTrainer(cfg)
    assert not (tmp_path / "two").exists()


def test_epochs_take_each_example_once_even_when_the_batch_is_larger_than_the_data(tmp_path):
    """train.epochs (no train.steps): 11 examples, batch 4, 1.5 epochs: steps of 4, 4, 4, 4, 1 (17 examples,
    ceil(1.5 x 11)); batch 32: one step of the 11, not 32 draws that repeat them."""
    data = write_jsonl(tmp_path / "d.jsonl", (ROWS * 3)[:11])
    run = sft(cfg_for(tmp_path, [data], "name=e4", "train.batch_size=4", "train.epochs=1.5"), quiet=True)
    assert [(m["examples"], m["epoch"]) for m in _metrics(run.run_dir)] == [(4, 4 / 11), (4, 8 / 11), (4, 12 / 11),
                                                                            (4, 16 / 11), (1, 17 / 11)]
    run = sft(cfg_for(tmp_path, [data], "name=e32", "train.batch_size=32", "train.epochs=1"), quiet=True)
    assert [(m["examples"], m["epoch"]) for m in _metrics(run.run_dir)] == [(11, 1.0)]


def test_steps_with_a_batch_larger_than_the_data_take_each_example_once_a_step(tmp_path, capsys):
    """train.steps set, train.batch_size past the data: each step drew batch_size examples, the data over and over
    (2**40: hours without a word). A step takes each of the 11 once, and a warning says so."""
    data = write_jsonl(tmp_path / "d.jsonl", (ROWS * 3)[:11])
    run = sft(cfg_for(tmp_path, [data], "name=s", f"train.batch_size={2**40}", "train.steps=2"))
    assert [(m["examples"], m["epoch"]) for m in _metrics(run.run_dir)] == [(11, 1.0), (11, 2.0)]
    assert ("warning: train.batch_size=1,099,511,627,776 is more than the 11 training examples: each step takes all of "
            "them once") in capsys.readouterr().out


def test_a_folder_or_file_where_the_final_link_goes_is_one_line_before_training(tmp_path):
    """A folder named final in the run directory stopped the run after all of its training (IsADirectoryError at the
    last save); a file there was replaced without a word."""
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    for kind in ("folder", "file"):
        final = tmp_path / kind / "final"
        final.parent.mkdir()
        final.mkdir() if kind == "folder" else final.write_text("mine")
        with pytest.raises(UserError) as e:
            sft(cfg_for(tmp_path, [data], f"name={kind}", "train.steps=1"), quiet=True)
        assert str(e.value) == (f"{final} is a {kind}, where ponder sft keeps a link to the newest checkpoint; move it "
                                "elsewhere, or choose another name (name=...)")
        assert not (tmp_path / kind / "checkpoints").exists()


def test_more_epochs_on_resume_take_each_example_once_more_per_epoch(tmp_path):
    """train.epochs raised on --resume: 10 examples in batches of 4 take 4, 4, 2 an epoch. Counted from the start,
    2 epochs were ceil(20 / 4) = 5 steps, so the second epoch got 2 steps (18 of the 20 examples): the first
    epoch's short last batch had cost a step. It is 3 more steps, the 10 examples once more."""
    data = write_jsonl(tmp_path / "d.jsonl", (ROWS * 3)[:10])
    common = ["name=more", "train.batch_size=4", "train.save_every=0"]
    first = sft(cfg_for(tmp_path, [data], *common, "train.epochs=1"), quiet=True)
    assert first.total_steps == 3
    run = sft(cfg_for(tmp_path, [data], *common, "train.epochs=2"), resume=True, quiet=True)
    rows = _metrics(run.run_dir)
    assert [(m["step"], m["examples"]) for m in rows] == [(1, 4), (2, 4), (3, 2), (4, 4), (5, 4), (6, 2)]
    assert rows[-1]["epoch"] == 2.0 and run.step_no == run.total_steps == 6
    # and a third epoch, from a run that has ended twice on a short batch
    run = sft(cfg_for(tmp_path, [data], *common, "train.epochs=3"), resume=True, quiet=True)
    assert run.step_no == 9 and _metrics(run.run_dir)[-1]["epoch"] == 3.0



def test_more_epochs_on_resume_of_a_run_by_steps_say_they_change_nothing(tmp_path, capsys):
    """With train.steps set, a resume with more train.epochs recorded the change and trained nothing, unsaid."""
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    common = ["name=steps", "train.batch_size=4", "train.save_every=0", "train.steps=2"]
    sft(cfg_for(tmp_path, [data], *common), quiet=True)
    capsys.readouterr()
    run = sft(cfg_for(tmp_path, [data], *common, "train.epochs=5"), resume=True)
    assert run.step_no == 2
    assert ("warning: train.epochs changes nothing: train.steps=2 sets the run's length; change train.steps, or set it "
            "to null to run by epochs") in capsys.readouterr().out


def test_a_model_that_asks_for_dropout_trains_through_its_own_forward(tmp_path):
    """SFT trains with the dropout the model's config asks for (GRPO turns it off), and the packed pass runs none:
    auto takes the model's own forward for such a model, and packed is refused in one line."""
    from ponder.models import save
    from ponder.sft.trainer import SFTTrainer

    model, tok = load("tiny-random")
    model.config.attention_dropout = 0.1
    save(model, tok, tmp_path / "m")
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    args = [f"model.path={tmp_path / 'm'}", "data.template=plain", "train.steps=1"]
    trainer = SFTTrainer(cfg_for(tmp_path, [data], "name=auto", *args))
    assert not trainer.policy_pass.packed and trainer.model.model.layers[0].self_attn.attention_dropout == 0.1
    with pytest.raises(UserError, match=r"train.forward: packed runs no dropout, and this model asks for some "
                                        r"\(attention_dropout above 0\); use train.forward: auto or padded"):
        SFTTrainer(cfg_for(tmp_path, [data], "name=packed", "train.forward=packed", *args))
    # without dropout, auto is the packed pass
    assert SFTTrainer(cfg_for(tmp_path, [data], "name=plain", "data.template=plain", "train.steps=1")).policy_pass.packed


def test_mixed_precision_sft_computes_from_bf16_copies_refreshed_after_each_step(tmp_path, monkeypatch):
    """train.precision=mixed, packed: the linear layers and the head compute from bf16 copies of the float32 matrices
    (ponder.rl.copy_linear), refreshed after each optimizer step, not cast in every micro-batch. Both steps'
    gradients equal those of autocast's casts (biases within bf16's rounding of autocast's sums); a copy not
    refreshed after the first step would give the second step the first weights' gradients."""
    from ponder.rl import copy_linear
    from ponder.sft.trainer import SFTTrainer

    data = write_jsonl(tmp_path / "d.jsonl", ROWS * 3)
    calls = []
    real = copy_linear._FromCopy.apply
    monkeypatch.setattr(copy_linear._FromCopy, "apply", lambda *a: calls.append(1) or real(*a))
    grads = {}
    for name in ("copy", "autocast"):
        tr = SFTTrainer(cfg_for(tmp_path, [data], f"name={name}", "train.precision=mixed", "train.forward=packed",
                                "optim.token_budget=64", "train.batch_size=12", "data.template=plain", "optim.lr=0.05"))
        assert tr.precision.name == "mixed" and (tr.copy is not None)
        if name == "autocast":
            tr.policy_pass.copies = None
        seen = grads[name] = []
        tr.optimizer.register_step_pre_hook(lambda opt, args, kwargs, _t=tr, _s=seen: _s.append(
            {k: p.grad.clone() for k, p in _t.model.named_parameters() if p.grad is not None}))
        tr.step(), tr.step()
        assert bool(calls) == (name == "copy")
        calls.clear()
    assert len(grads["copy"]) == len(grads["autocast"]) == 2
    for mine, ref in zip(grads["copy"], grads["autocast"]):
        assert mine.keys() == ref.keys()
        for k, g in mine.items():
            scale = ref[k].abs().max().item()
            torch.testing.assert_close(g, ref[k], rtol=0, atol=2e-2 * scale if "bias" in k else 1e-6 * max(scale, 1), msg=k)


@pytest.mark.parametrize("kind", ["opt", "bloom", "llama"])
def test_examples_share_a_row_only_where_the_models_forward_keeps_them_apart(kind):
    """OPT builds its mask without position ids, Bloom's ALiBi takes none: examples packed in one row saw each other
    there (the loss moved by 4-10% on random models). The padded pass now puts one example a row for them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ponder.sft.packing import keeps_rows_apart

    shape = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    if kind == "opt":
        shape.update(ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=64)
    elif kind == "bloom":
        shape = dict(vocab_size=50, hidden_size=32, n_layer=2, n_head=4)
    else:
        shape.update(intermediate_size=64, num_key_value_heads=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **shape))
    assert keeps_rows_apart(model) == (kind == "llama")
