"""Real models' chat templates. One that writes BOS itself (Llama 3, DeepSeek-R1-Distill) over a tokenizer that adds
BOS: every prompt ponder encodes (GRPO, SFT, evaluation, sampling) holds one BOS, as apply_chat_template(tokenize=True)
gives. One that opens the think block in the prompt (R1-Distill's ends with "<think>\n"): the format checks read the
answer as its continuation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from tokenizers import processors

from ponder.models.tiny import char_tokenizer
from ponder.rollout import Completion, RolloutEngine
from ponder.sft.data import encode
from ponder.templates import R1_ZERO, opens_think, prompt_ids


@pytest.fixture
def tok():
    t = char_tokenizer()
    t.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{t.bos_token} $A", special_tokens=[(t.bos_token, t.bos_token_id)])
    t.chat_template = ("{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% if m.role == 'assistant' %}"
                       "{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    assert t("ab").input_ids[0] == t.bos_token_id  # the tokenizer adds BOS, as Llama 3's does
    return t


def bos_count(tok, ids):
    return sum(i == tok.bos_token_id for i in ids)


def test_chat_prompts_hold_one_bos_and_text_templates_keep_theirs(tok):
    msgs = [{"role": "user", "content": "3+4"}]
    want = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert prompt_ids("chat", "3+4", tok) == want and bos_count(tok, want) == 1
    plain = prompt_ids("plain", "3+4", tok)
    assert plain[0] == tok.bos_token_id and bos_count(tok, plain) == 1


def test_sft_rows_under_the_chat_template_hold_one_bos(tok):
    pair = encode({"prompt": "3+4", "completion": "7"}, tok, "chat")
    assert tok.decode(pair.ids) == "<bos>[user]3+4[assistant]7<eos>" and bos_count(tok, pair.ids) == 1
    msgs = encode({"messages": [{"role": "user", "content": "3+4"}, {"role": "assistant", "content": "7"}]}, tok, "chat")
    assert msgs.ids == pair.ids


def test_sft_rows_opening_with_a_system_turn_under_a_template_that_needs_a_user_turn(tok):
    """Qwen3's template refuses messages with no user turn ("No user query found in messages."). SFT checked for a
    chat template by rendering a row's first message alone, so every row opening with a system turn was refused."""
    tok.chat_template = ("{% if not (messages | selectattr('role', 'equalto', 'user') | list) %}"
                         "{{ raise_exception('No user query found in messages.') }}{% endif %}" + tok.chat_template)
    row = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3+4"},
                        {"role": "assistant", "content": "7"}]}
    enc = encode(row, tok, "chat")
    assert tok.decode(enc.ids) == "<bos>[system]Be brief.[user]3+4[assistant]7<eos>"
    assert tok.decode([i for i, m in zip(enc.ids, enc.mask) if m]) == "7<eos>"


class Recording(RolloutEngine):
    def __init__(self, model, tokenizer, answer="7"):
        super().__init__(model, tokenizer)
        self.prompts, self.answer = [], answer

    def generate(self, prompts, params):
        self.prompts += prompts
        return [[Completion(self.tokenizer.encode(self.answer, add_special_tokens=False), "stop") for _ in range(params.n)]
                for _ in prompts]


def test_evaluation_prompts_under_the_chat_template_hold_one_bos(tok):
    from ponder.evaluation.runner import evaluate

    eng = Recording(None, tok)
    out = evaluate(None, tok, [{"prompt": "3+4", "answer": "7", "task": "arithmetic"}], template="chat", k=2, engine=eng,
                   progress=False, extract="none", n_boot=10)
    assert eng.prompts and all(bos_count(tok, p) == 1 for p in eng.prompts)
    assert out["metrics"]["pass@1"] == 1.0


def test_a_prompt_that_opens_the_think_block_is_read_as_such():
    from ponder.filters import Candidate, FilterConfig, first_failure
    from ponder.rewards.format import format_reward

    assert not opens_think(R1_ZERO.format(prompt="3+4"))  # names both tags in its instructions
    assert opens_think("<｜User｜>3+4<｜Assistant｜><think>\n")
    answer = "7 is 3+4.\n</think>\n\n<answer> 7 </answer>"
    assert format_reward([answer, answer], prompts=["3+4"] * 2, think_opened=[True, False]) == [1.0, 0.0]
    assert format_reward(["<think>" + answer], prompts=["3+4"]) == [1.0]  # the column is optional
    cfg = FilterConfig(format=True, correct=False)
    assert first_failure(Candidate(answer, 10, False, 1.0, think_opened=True), cfg) is None
    assert first_failure(Candidate(answer, 10, False, 1.0), cfg) == "format"


def test_evaluation_reads_answers_under_r1_distills_template(tok):
    from ponder.evaluation.runner import evaluate

    tok.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|><think>\n"
    eng = Recording(None, tok, answer="3+4=7\n</think>\n\n<answer> 7 </answer>")
    out = evaluate(None, tok, [{"prompt": "3+4", "answer": "7", "task": "arithmetic"}], template="chat", k=2, engine=eng,
                   progress=False, n_boot=10)
    assert out["metrics"]["pass@1"] == 1.0
    assert [s["format"] for s in out["samples"]] == [1.0, 1.0]
    cut = Recording(None, tok, answer="3+4 is \\boxed{7}? wait, let me")  # still thinking: no answer yet
    out = evaluate(None, tok, [{"prompt": "3+4", "answer": "7", "task": "arithmetic"}], template="chat", k=2, engine=cut,
                   progress=False, n_boot=10)
    assert out["metrics"]["pass@1"] == 0.0 and [s["answer"] for s in out["samples"]] == [None, None]


def test_a_model_directory_without_a_tokenizer_is_one_line(tmp_path, error_line, capsys):
    """transformers 5 builds an empty Qwen2 tokenizer for such a directory: every prompt encodes to nothing."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=64)).save_pretrained(tmp_path / "m")
    capsys.readouterr()  # the save's progress bar
    assert error_line("eval", "--model", str(tmp_path / "m"), "--tasks", "arithmetic") == (
        f"ponder: error: model directory '{tmp_path / 'm'}' has no tokenizer files (tokenizer.json, tokenizer_config.json); "
        "save the tokenizer there too (tokenizer.save_pretrained)")


def test_weights_cloned_without_git_lfs_or_cut_short_are_one_line(tmp_path, error_line):
    """A clone without git-lfs leaves pointer files; a copy cut short leaves a partial safetensors file: both failed
    inside safetensors (SafetensorError, "header too large"), in a traceback."""
    import shutil

    from ponder import models

    pointer = "version https://git-lfs.github.com/spec/v1\noid sha256:4d7a2146\nsize 988097824\n"
    for name in ("weights", "tokenizer", "cut"):
        shutil.copytree(Path(models.__file__).parent.parent / "assets" / "tiny-base", tmp_path / name)
    (tmp_path / "weights" / "model.safetensors").write_text(pointer)
    (tmp_path / "tokenizer" / "tokenizer.json").write_text(pointer)
    data = (tmp_path / "cut" / "model.safetensors").read_bytes()
    (tmp_path / "cut" / "model.safetensors").write_bytes(data[: len(data) // 2])
    for name, file in (("weights", "model.safetensors"), ("tokenizer", "tokenizer.json")):
        assert error_line("eval", "--model", str(tmp_path / name), "--tasks", "arithmetic") == (
            f"ponder: error: model directory '{tmp_path / name}': {file} is a Git LFS pointer, not the file itself (cloned "
            "without git-lfs?); fetch the files (`git lfs pull` in that directory, or `hf download`)")
    assert error_line("eval", "--model", str(tmp_path / "cut"), "--tasks", "arithmetic") == (
        f"ponder: error: model directory '{tmp_path / 'cut'}': model.safetensors is damaged or cut short (Error while "
        "deserializing header: incomplete metadata, file not fully covered); copy or download it again")


def test_a_runs_directory_given_as_a_model_names_its_newest_checkpoint(tmp_path, error_line):
    for step in (2, 10):
        (tmp_path / "run" / "checkpoints" / f"step-{step}").mkdir(parents=True)
        (tmp_path / "run" / "checkpoints" / f"step-{step}" / "trainer_state.pt").write_bytes(b"")
    assert error_line("eval", "--model", str(tmp_path / "run"), "--tasks", "arithmetic") == (
        f"ponder: error: model directory '{tmp_path / 'run'}' has no config.json (a run's directory: its newest checkpoint "
        f"is {tmp_path / 'run' / 'checkpoints' / 'step-10'}); give a Hugging Face model directory")


def test_a_tokenizer_without_an_eos_token_is_one_line(tmp_path, error_line):
    """No answer could end and padding had no token: ponder train stopped in the packed pass (TypeError), ponder eval
    --engine hf in torch.full."""
    from ponder import models

    model, tok = models.load("tiny-base")
    tok.eos_token = None
    tok.pad_token = None
    models.save(model, tok, tmp_path / "noeos")
    assert error_line("eval", "--model", str(tmp_path / "noeos"), "--tasks", "arithmetic") == (
        f"ponder: error: the tokenizer of '{tmp_path / 'noeos'}' names no end-of-sequence token; set one "
        "(tokenizer.eos_token = ..., then save_pretrained, or \"eos_token\" in its tokenizer_config.json)")


def test_checkpoints_keep_the_tokenizers_own_padding(tmp_path, capsys):
    """ponder pads on the left with EOS where a model has no pad token (Llama 3); a checkpoint written with that
    pad token would make DataCollatorForLanguageModeling mask every real EOS label of the exported model."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast

    from ponder import models

    t = char_tokenizer()
    fast = PreTrainedTokenizerFast(tokenizer_object=t.backend_tokenizer, bos_token=t.bos_token, eos_token=t.eos_token)
    fast.save_pretrained(tmp_path / "src")
    AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=2, num_key_value_heads=1,
                                                 vocab_size=len(t))).save_pretrained(tmp_path / "src")
    model, tok = models.load(str(tmp_path / "src"))
    assert tok.pad_token == tok.eos_token and tok.padding_side == "left"  # for generation
    models.save(model, tok, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert saved.get("pad_token") is None and saved.get("padding_side", "right") == "right"
    assert AutoTokenizer.from_pretrained(tmp_path / "out").pad_token is None
    assert tok.pad_token == tok.eos_token and tok.padding_side == "left"  # the run's tokenizer as it was


def test_rollouts_past_the_models_positions_are_named_once(capsys):
    from types import SimpleNamespace

    from ponder.rl.trainer import GRPOTrainer

    t = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(max_position_embeddings=64)), rank=0,
                        cfg=SimpleNamespace(rollout=SimpleNamespace(max_new_tokens=48)), _past_context=False)
    GRPOTrainer._check_context(t, 16)  # 64 positions: within
    assert capsys.readouterr().err == ""
    GRPOTrainer._check_context(t, 17)
    GRPOTrainer._check_context(t, 30)
    assert capsys.readouterr().err.splitlines() == [
        "ponder: a prompt of 17 tokens + rollout.max_new_tokens 48 = 65 positions, past the model's "
        "max_position_embeddings (64); lower rollout.max_new_tokens or drop long prompts"]


def test_sft_messages_under_r1_distills_template_name_the_cause(tok):
    from ponder.errors import UserError

    # R1-Distill's shape: the generation prompt opens the think block; a rendered assistant turn does not
    tok.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}")
    row = {"messages": [{"role": "user", "content": "3+4"}, {"role": "assistant", "content": "7"}]}
    with pytest.raises(UserError, match=r"writes an assistant turn without the '<think>\\n' its generation prompt ends with"):
        encode(row, tok, "chat")
    assert encode({"prompt": "3+4", "completion": "</think> 7"}, tok, "chat").ids  # the way that works


def test_bf16_weights_keep_float32_rotary_frequencies():
    """train.precision=bf16 cast every buffer with the weights; transformers' own bf16 load keeps inv_freq in float32,
    and bf16 frequencies moved the angles far out by up to 0.4%."""
    import torch

    from ponder.models import load, to_dtype

    model, _ = load("tiny-base")
    before = {n: b.clone() for n, b in model.named_buffers() if "inv_freq" in n}
    to_dtype(model, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    after = dict(model.named_buffers())
    assert before and all(after[n].dtype == torch.float32 and torch.equal(after[n], b) for n, b in before.items())
    bf16, _ = load("tiny-base", dtype=torch.bfloat16)
    assert all(torch.equal(dict(bf16.named_buffers())[n], b) for n, b in before.items())
    from ponder.config import ModelConfig
    from ponder.models import load_trainable
    from ponder.runtime import PrecisionChooser

    policy, _ = load_trainable(ModelConfig(path="tiny-base"), precision=PrecisionChooser("bf16", torch.device("cpu"), announce=False))
    assert {p.dtype for p in policy.parameters()} == {torch.bfloat16}
    assert all(torch.equal(dict(policy.named_buffers())[n], b) for n, b in before.items())


@pytest.mark.parametrize("target", ["lm_head", "embed_tokens"])
def test_lora_on_a_tied_embedding_is_refused(target):
    """Qwen2.5-0.5B ties its head to its embedding: an adapter on either, merged for rollouts and the export,
    changed both uses of the matrix where training changed one (the export's logits off by 1.4-25)."""
    from ponder.config import LoraConfig, ModelConfig
    from ponder.errors import UserError
    from ponder.models import load_trainable

    with pytest.raises(UserError, match=rf"model.lora.target_modules: '{target}' shares its matrix with the .* "
                                        r"\(tie_word_embeddings\); leave it out of target_modules"):
        load_trainable(ModelConfig(path="tiny-random", lora=LoraConfig(target_modules=["q_proj", target])))
    load_trainable(ModelConfig(path="tiny-random", lora=LoraConfig(target_modules=["q_proj", "v_proj"])))


RECIPE = "recipes/smoke-first-digit.yaml"
# refuses a system turn in its own words (Gemma's does), and, to stand for a failure no single shape shows, one message
REFUSING = ("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
            "{% if 'forbidden' in m.content %}{{ raise_exception('Forbidden word') }}{% endif %}"
            "[{{ m.role }}]{{ m.content }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")


def chat_model(path, template):
    """tiny-random saved as a model directory whose tokenizer has `template` as its chat template."""
    from ponder.models.tiny import tiny_random

    model, t = tiny_random()
    t.chat_template = template
    model.save_pretrained(path)
    t.save_pretrained(path)
    return str(path)


def jsonl(path, *prompts):
    import json

    path.write_text("".join(json.dumps({"prompt": p, "answer": "7"}) + "\n" for p in prompts))
    return f"data.tasks=[{{name: jsonl, path: {path}}}]"


def test_a_chat_template_refusing_the_data_is_one_line_before_the_model_loads(tmp_path, error_line, capsys, no_model):
    """jinja's TemplateError went up as a traceback from the first step (or the evaluation before it); then it was one
    line after the model had loaded (minutes for a large one). An eval task's prompts are checked alike."""
    model = chat_model(tmp_path / "m", REFUSING)
    capsys.readouterr()  # the save's progress bar
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3+4"}]
    args = ["train", RECIPE, f"output_dir={tmp_path}", f"model.path={model}", "data.template=chat"]
    line = ("ponder: error: the tokenizer's chat template fails on the prompt '3+4' (roles: system, user): System role not "
            "supported; change those chat messages (templates may refuse a system turn, or turns that do not alternate "
            "user/assistant), or use another template (r1_zero or plain)")
    assert error_line(*args, jsonl(tmp_path / "d.jsonl", "3+4", system)) == line
    jsonl(tmp_path / "e.jsonl", system)
    assert error_line(*args, jsonl(tmp_path / "t.jsonl", "3+4"), f"eval.tasks=[{{name: jsonl, path: {tmp_path / 'e.jsonl'}}}]") == line
    assert not (tmp_path / "smoke-first-digit").exists()  # nothing written


def test_a_chat_template_needing_a_system_turn_takes_data_that_has_one(tmp_path, no_model):
    """ponder train checked the chat template on a made-up one-question prompt of its own, which a template that needs
    a system turn refused (naming that prompt and telling the user to change it), however the data's prompts were
    made. The data's own prompts judge it: here they pass, and the run goes on to load the model."""
    from ponder.cli import main

    needs_system = ("{% if messages[0].role != 'system' %}{{ raise_exception('A system turn is required') }}{% endif %}"
                    "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    model = chat_model(tmp_path / "m", needs_system)
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3+4"}]
    with pytest.raises(AssertionError, match="the model was loaded before the data was checked"):
        main(["train", RECIPE, f"output_dir={tmp_path}", f"model.path={model}", "data.template=chat",
              jsonl(tmp_path / "d.jsonl", system, system)])


def test_chat_messages_without_a_user_turn_are_one_line_under_a_chat_template(tmp_path, error_line, capsys):
    """A chat template refused them in its own words from the first step (Qwen3's: "No user query found in messages."),
    or rendered a prompt with no question."""
    model = chat_model(tmp_path / "m", REFUSING.replace("raise_exception('System role not supported')", "''"))
    capsys.readouterr()
    data = jsonl(tmp_path / "d.jsonl", [{"role": "system", "content": "Be brief."}])
    assert error_line("train", RECIPE, f"output_dir={tmp_path}", f"model.path={model}", "data.template=chat", data) == (
        f"ponder: error: task 'jsonl' ({tmp_path / 'd.jsonl'}), example 1: the prompt's chat messages have no user turn "
        '(roles: system); add a {"role": "user", "content": ...} message holding the question')


def test_a_chat_template_failing_on_one_message_mid_run_is_one_line(tmp_path, smoke_cfg):
    """A failure that only a message's text brings out (the check before training renders one prompt of each shape)."""
    from ponder.errors import UserError
    from ponder.train import train

    model = chat_model(tmp_path / "m", REFUSING)
    cfg = smoke_cfg(f"model.path={model}", "data.template=chat", jsonl(tmp_path / "d.jsonl", "3+4", "a forbidden sum"),
                    "rollout.prompts_per_step=4", "rollout.group_size=2", "train.steps=2", "train.save_every=0")
    with pytest.raises(UserError) as e:
        train(cfg)
    assert str(e.value) == ("the tokenizer's chat template fails on the prompt 'a forbidden sum' (roles: user): Forbidden "
                            "word; change that prompt or fix the chat_template in the tokenizer's files, or use another "
                            "template (r1_zero or plain)")


def eval_or_sample_line(tmp_path, error_line, capsys, command, prompts) -> str:
    """The one line `ponder eval` or `ponder sample` ends with on a jsonl task of `prompts`, under REFUSING as the chat
    template."""
    import json

    model = chat_model(tmp_path / "m", REFUSING)
    capsys.readouterr()  # the save's progress bar
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": "7"}) + "\n" for p in prompts))
    common = ["--model", model, "--tasks", f"jsonl:{data}", "--k", "1", "--max-tokens", "2", "--quiet", "--out", str(tmp_path / "o")]
    return error_line(command, *common, *(["--template", "chat", "--device", "cpu"] if command == "eval" else ["template=chat"]))


@pytest.mark.parametrize("command", ["eval", "sample"])
def test_a_chat_template_refusing_a_prompt_is_one_line_in_eval_and_sample(tmp_path, error_line, capsys, command):
    """ponder eval and ponder sample render prompts through the same function as training (templates.render): jinja's
    TemplateError from the template's raise_exception was a traceback there, naming neither the prompt nor a fix."""
    assert eval_or_sample_line(tmp_path, error_line, capsys, command, ["3+4", "a forbidden  sum\nof two"]) == (
        "ponder: error: the tokenizer's chat template fails on the prompt 'a forbidden sum of two' (roles: user): Forbidden "
        "word; change that prompt or fix the chat_template in the tokenizer's files, or use another template (r1_zero or "
        "plain)")


@pytest.mark.parametrize("command", ["eval", "sample"])
def test_eval_and_sample_tell_a_refused_chat_prompt_before_the_model_loads(tmp_path, error_line, capsys, monkeypatch, command):
    """One prompt of each sequence of roles is rendered under the template with the tokenizer alone, before the model
    loads (minutes for a large one): a template refusing a system turn was told once the model had loaded."""
    from ponder import models

    monkeypatch.setattr(models, "load", no_model_loads)
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3+4"}]
    assert eval_or_sample_line(tmp_path, error_line, capsys, command, ["3+4", system]) == (
        "ponder: error: the tokenizer's chat template fails on the prompt '3+4' (roles: system, user): System role not "
        "supported; change those chat messages (templates may refuse a system turn, or turns that do not alternate "
        "user/assistant), or use another template (r1_zero or plain)")


def test_sft_rows_a_chat_template_refuses_are_one_line(tok):
    from ponder.errors import UserError
    from ponder.sft.data import load_data
    from types import SimpleNamespace

    tok.chat_template = REFUSING
    rows = [{"prompt": "3+4", "completion": "7"}, {"messages": [{"role": "system", "content": "Be brief."},
                                                                {"role": "user", "content": "3+4"}, {"role": "assistant", "content": "7"}]}]
    cfg = SimpleNamespace(data=SimpleNamespace(max_len=64, template="chat", add_eos=True))
    with pytest.raises(UserError) as e:
        load_data(cfg, tok, SimpleNamespace(config=SimpleNamespace(max_position_embeddings=64)), rows)
    assert str(e.value).startswith("the tokenizer's chat template fails on the prompt '3+4' (roles: system, user): System "
                                   "role not supported; change those")


def gpt2_model(path, positions: int):
    """A tiny GPT-2 (a learned table of `positions` positions) with the character tokenizer, saved at `path`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    t = char_tokenizer()
    GPT2LMHeadModel(GPT2Config(vocab_size=len(t), n_embd=32, n_layer=1, n_head=2, n_positions=positions,
                               bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id)).save_pretrained(path)
    t.save_pretrained(path)
    return str(path)


def test_prompts_past_a_learned_position_table_are_one_line_before_training(tmp_path, error_line, capsys, smoke_cfg,
                                                                           monkeypatch):
    """GPT-2's positions are a table (n_positions): a prompt plus the new tokens past it was an IndexError deep in the
    model, in the step that first met it. The longest prompt is measured before the model loads (the table's size read
    from its config), the evaluation's with its own max_new_tokens."""
    from ponder import models, positions
    from ponder.models import load, position_limit

    model = gpt2_model(tmp_path / "g", 24)
    capsys.readouterr()
    assert position_limit(load(model)[0]) == 24 and position_limit(load("tiny-random")[0]) is None  # rotary: none
    data = jsonl(tmp_path / "d.jsonl", "3+4", "What is three plus four?")  # 24 tokens
    args = ["train", RECIPE, f"output_dir={tmp_path}", f"model.path={model}", "rollout.engine=hf", "rollout.max_new_tokens=4"]
    line = ("ponder: error: a prompt of 24 tokens (example 2 of task 'jsonl') + rollout.max_new_tokens 4 = 28 positions, past "
            "the model's 24 (max_position_embeddings, a learned position table); shorten prompts to 20 tokens or fewer")
    with monkeypatch.context() as m:
        m.setattr(models, "load_trainable", no_model_loads)
        assert error_line(*args, data) == line
    with monkeypatch.context() as m:  # a config not at hand before the model loads (a Hub model not downloaded yet)
        m.setattr(positions, "weightless", lambda *_: None)
        assert error_line(*args, data) == line
    short = jsonl(tmp_path / "s.jsonl", "3+4", "Three plus four?")  # 16 tokens
    assert error_line(*args, short, "eval.tasks=[{name: jsonl, path: " + str(tmp_path / "d.jsonl") + "}]",
                      "eval.max_new_tokens=2") == (
        "ponder: error: a prompt of 24 tokens (example 2 of task 'jsonl') + eval.max_new_tokens 2 = 26 positions, past "
        "the model's 24 (max_position_embeddings, a learned position table); shorten prompts to 22 tokens or fewer")
    assert error_line(*args[:-1], "rollout.max_new_tokens=10", short) == (
        "ponder: error: a prompt of 16 tokens (example 2 of task 'jsonl') + rollout.max_new_tokens 10 = 26 positions, past "
        "the model's 24 (max_position_embeddings, a learned position table); lower rollout.max_new_tokens to 8 or "
        "shorten prompts to 14 tokens or fewer")
    from ponder.train import train

    fits = smoke_cfg(f"model.path={model}", "rollout.engine=hf", "rollout.max_new_tokens=8", short, "train.save_every=0",
                     "rollout.prompts_per_step=2", "rollout.group_size=2")
    assert train(fits, stop_after=1).step_no == 1  # 16 + 8 positions: within the table, and GPT-2 trains


def test_eval_and_sample_refuse_prompts_past_a_learned_position_table_in_one_line(tmp_path, error_line, monkeypatch):
    """`ponder eval` and `ponder sample` ran no such check: past GPT-2's table they failed with an IndexError traceback
    from deep in the model, after every earlier batch had been sampled. Now one line before the model loads, or just
    after where its config was not at hand."""
    from ponder import models, positions

    model = gpt2_model(tmp_path / "g", 24)
    data = tmp_path / "d.jsonl"
    jsonl(data, "3+4", "What is three plus four?")  # 24 tokens under the plain template
    evaluate = ["eval", "--model", model, "--tasks", f"jsonl:{data}", "--k", "1", "--template", "plain", "--quiet",
                "--out", str(tmp_path / "ev")]
    sample = ["sample", "template=plain", "--model", model, "--tasks", f"jsonl:{data}", "--k", "1", "--quiet",
              "--out", str(tmp_path / "s" / "t.jsonl")]
    for argv, key in ((evaluate, "--max-tokens"), (sample, "max_new_tokens")):
        line = (f"ponder: error: a prompt of 24 tokens (example 2 of task 'jsonl') + {key} 4 = 28 positions, past the "
                "model's 24 (max_position_embeddings, a learned position table); shorten prompts to 20 tokens or fewer")
        with monkeypatch.context() as m:
            m.setattr(models, "load", no_model_loads)
            assert error_line(*argv, "--max-tokens", "4") == line
        with monkeypatch.context() as m:  # the config not at hand before the model loads: told once it has
            m.setattr(positions, "weightless", lambda *_: None)
            assert error_line(*argv, "--max-tokens", "4") == line
    assert not (tmp_path / "ev" / "results.json").exists() and not (tmp_path / "s" / "t.jsonl").exists()


def test_a_prompt_past_a_rotary_models_positions_is_one_line_before_the_model_loads(tmp_path, error_line, monkeypatch):
    """A rotary model runs on past max_position_embeddings: a prompt of 421,755 tokens on the 1,024 of tiny-random was
    a notice, then a prefill that took hours and no SIGTERM stopped (ponder eval: not even the notice). The prompt alone
    past the positions times the rope scaling factor (YaRN's, where the config has one) is one line now; the
    prompt and its new tokens past them stay a notice (the model runs on)."""
    from transformers import Qwen2Config

    from ponder import models

    long = "1 + " * 600 + "1"  # 2,401 characters: a token each under the tiny models' character vocabulary
    for argv in (["train", RECIPE, f"output_dir={tmp_path}", jsonl(tmp_path / "d.jsonl", "3+4", long)],
                 ["eval", "--model", "tiny-random", "--tasks", f"jsonl:{tmp_path / 'd.jsonl'}", "--k", "1", "--template",
                  "plain", "--out", str(tmp_path / "ev")]):
        with monkeypatch.context() as m:
            m.setattr(models, "load", no_model_loads)
            m.setattr(models, "load_trainable", no_model_loads)
            assert re.fullmatch(r"ponder: error: a prompt of 2,4\d\d tokens \(example 2 of task 'jsonl'\) is past the 1,024 "
                                r"positions the model was made for \(max_position_embeddings, times its rope scaling "
                                r"factor\) before a token is generated; shorten prompts to 1,024 tokens or fewer",
                                error_line(*argv)), argv
    yarn = Qwen2Config(max_position_embeddings=32768, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                                    "original_max_position_embeddings": 32768})
    holder = type("M", (), {"config": yarn})()
    assert models.computed_limit(holder) == 131072
    assert models.computed_limit(type("M", (), {"config": Qwen2Config(max_position_embeddings=4096)})()) == 4096


def test_the_position_table_is_the_text_models_not_a_vision_towers():
    """A multimodal checkpoint (Gemma 3: AutoModelForCausalLM.from_config gives Gemma3ForConditionalGeneration) has a
    vision tower whose patch position table (16 here, 4096 in Gemma-3-4B) was taken for the text's: prompts past it
    were refused, where Gemma 3's text is rotary (no table). The limit is read from the text's config: BLIP-2's OPT
    table holds 2 more rows than its 64 positions, and the top config has no max_position_embeddings."""
    import transformers as T

    from ponder.models import position_limit

    text = T.Gemma3TextConfig(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, hidden_size=16, head_dim=8,
                              intermediate_size=32, vocab_size=300, max_position_embeddings=32768)
    vision = T.SiglipVisionConfig(num_hidden_layers=1, num_attention_heads=2, hidden_size=16, intermediate_size=32,
                                  image_size=56, patch_size=14)  # 16 patches: a table of 16 positions
    gemma3 = T.AutoModelForCausalLM.from_config(T.Gemma3Config(
        text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4, image_token_index=299,
        boi_token_index=298, eoi_token_index=297))
    assert type(gemma3).__name__ == "Gemma3ForConditionalGeneration" and position_limit(gemma3) is None
    opt = T.OPTConfig(num_hidden_layers=1, num_attention_heads=2, hidden_size=16, ffn_dim=32, max_position_embeddings=64,
                      vocab_size=100, word_embed_proj_dim=16)
    blip2 = T.Blip2ForConditionalGeneration(T.Blip2Config(
        vision_config=dict(num_hidden_layers=1, num_attention_heads=2, hidden_size=16, intermediate_size=32, image_size=28,
                           patch_size=14),
        qformer_config=dict(num_hidden_layers=1, num_attention_heads=2, hidden_size=16, intermediate_size=32,
                            encoder_hidden_size=16),
        text_config=opt.to_dict(), num_query_tokens=2))
    assert position_limit(blip2) == 64
    gpt2 = T.GPT2LMHeadModel(T.GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=40, vocab_size=100))
    assert position_limit(gpt2) == 40  # a text model alone: its table, as before


def no_model_loads(*_, **__):
    raise AssertionError("the model was loaded before the data was checked")


@pytest.fixture
def no_model(monkeypatch):
    """Fails a test that loads a model: what is checked here must be told before one loads (minutes for a large one)."""
    from ponder import models

    monkeypatch.setattr(models, "load_trainable", no_model_loads)


BROKEN = "{% for m in messages %}[{{ m.content }}"  # no endfor


@pytest.mark.parametrize("template, model, line", [
    ("Q: {prompt} A:", None, "unknown template 'Q: {prompt} A:'; choose one of: r1_zero, plain, chat"),
    ("chat", None, "template 'chat' needs a tokenizer with a chat template; use the r1_zero or plain template (data.template; ponder sample: template; ponder eval: --template)"),
    ("chat", BROKEN, "the tokenizer's chat template does not parse: Unexpected end of template. Jinja was looking for the "
                     "following tags: 'endfor' or 'else'. The innermost block that needs to be closed is 'for'.; fix the "
                     "chat_template in the tokenizer's files, or use another template (r1_zero or plain)"),
])
def test_a_template_the_tokenizer_cannot_render_is_told_before_the_model_loads(tmp_path, error_line, capsys, no_model,
                                                                               template, model, line):
    """A custom text template, or `chat` over a tokenizer without one (or a broken one), was told when the first prompt
    was rendered, after the model had loaded; the tokenizer alone tells, and loads in a moment."""
    path = chat_model(tmp_path / "m", model) if model else "tiny-random"
    capsys.readouterr()
    assert error_line("train", RECIPE, f"output_dir={tmp_path}", f"model.path={path}", f"data.template={template}") == (
        "ponder: error: " + line)


def test_sft_rows_a_template_cannot_take_are_told_before_the_model_loads(tmp_path, no_model, capsys):
    import json

    from ponder.config import load_config
    from ponder.errors import UserError
    from ponder.sft.config import SFTConfig
    from ponder.sft.trainer import SFTTrainer

    model = chat_model(tmp_path / "m", REFUSING)
    capsys.readouterr()
    data = tmp_path / "sft.jsonl"
    rows = [{"prompt": "3+4", "completion": "7"},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3+4"}, {"role": "assistant", "content": "7"}]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for template, model_path, want in [
        ("Q: {prompt} A:", model, "unknown template 'Q: {prompt} A:'; choose one of: r1_zero, plain, chat"),
        ("chat", "tiny-random", "template 'chat' needs a tokenizer with a chat template; use the r1_zero or plain template (data.template; ponder sample: template; ponder eval: --template)"),
        ("chat", model, "the tokenizer's chat template fails on the prompt '3+4' (roles: system, user): System role not "
                        "supported; change those chat messages (templates may refuse a system turn, or turns that do not "
                        "alternate user/assistant), or use another template (r1_zero or plain)"),
    ]:
        cfg = load_config(None, [f"output_dir={tmp_path}", f"data.files={json.dumps([str(data)])}", f"data.template={template}",
                                 f"model.path={model_path}"], cls=SFTConfig)
        with pytest.raises(UserError) as e:
            SFTTrainer(cfg)
        assert str(e.value) == want


def test_the_tokenizer_the_data_was_checked_with_is_the_models(tmp_path, monkeypatch, capsys):
    """`data.template: chat` (GRPO, `ponder eval` and `ponder sample`) and SFT's data check load the model's tokenizer
    before the model: the model's loading takes that one, not a second parse of its files (a large tokenizer.json
    takes about a second)."""
    import json

    from transformers import AutoTokenizer

    from ponder import models
    from ponder.config import load_config
    from ponder.rl.trainer import GRPOTrainer
    from ponder.sft.trainer import SFTTrainer
    from ponder.sft.config import SFTConfig

    model = chat_model(tmp_path / "m", "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
                                       "{% if add_generation_prompt %}[assistant]{% endif %}")
    capsys.readouterr()
    real, loads = AutoTokenizer.from_pretrained, []
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: loads.append(str(a[0])) or real(*a, **k))
    t = GRPOTrainer(load_config(RECIPE, [f"output_dir={tmp_path}", f"model.path={model}", "data.template=chat",
                                         jsonl(tmp_path / "d.jsonl", "3+4", "5+6")]))
    assert loads == [model] and t.tokenizer.padding_side == "left"
    (tmp_path / "s.jsonl").write_text(json.dumps({"prompt": "3+4", "completion": " 7"}) + "\n")
    SFTTrainer(load_config(None, [f"output_dir={tmp_path}/sft", f"model.path={model}", "data.template=chat",
                                  f"data.files={json.dumps([str(tmp_path / 's.jsonl')])}"], cls=SFTConfig))
    assert loads == [model] * 2
    from ponder.cli import main

    common = ["--model", model, "--tasks", "first_digit", "--n", "2", "--k", "1", "--max-tokens", "2", "--quiet"]
    assert main(["eval", *common, "--template", "chat", "--out", str(tmp_path / "eval")]) == 0
    assert loads == [model] * 3
    assert main(["sample", *common, "--out", str(tmp_path / "s.out.jsonl"), "template=chat"]) == 0
    assert loads == [model] * 4


def test_a_tokenizer_that_appends_eos_does_not_end_a_text_templates_prompt_with_it():
    """A tokenizer whose post-processor appends EOS as well as BOS (LlamaTokenizerFast's add_eos_token, as some
    fine-tunes set it): every prompt of a text template ended with EOS, asking the model to go on after the end of the
    document. The BOS stays; chat templates write their own special tokens and are encoded without the tokenizer's."""
    from ponder.templates import encoded_prompt

    t = char_tokenizer()
    t.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{t.bos_token} $A {t.eos_token}", special_tokens=[(t.bos_token, t.bos_token_id), (t.eos_token, t.eos_token_id)])
    for template in ("plain", "r1_zero"):
        ids = encoded_prompt(template, "2+3?", t)[0]
        assert ids[0] == t.bos_token_id and ids[-1] != t.eos_token_id and t.eos_token_id not in ids, template
    assert encoded_prompt("plain", "2+3?", t)[0] == [t.bos_token_id] + t("2+3?", add_special_tokens=False).input_ids


def test_turns_a_text_template_leaves_out_are_told_at_start(tmp_path, smoke_cfg, capsys):
    """r1_zero and plain show a chat prompt's last user turn alone: a system turn never reached the model, unsaid."""
    from ponder.rl.trainer import GRPOTrainer
    from ponder.sft import sft
    from ponder.sft.config import load_sft_config
    from ponder.templates import left_out_turns

    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3+4"}]
    line = ("ponder: 2 of 3 prompts are chat messages with turns besides the last user turn (system); the plain template "
            "shows that turn alone, so the model never sees the others; data.template=chat renders them all")
    assert left_out_turns("plain", [system, "1+1", system]) == line
    assert left_out_turns("chat", [system]) is None and left_out_turns("plain", ["3+4", system[1:]]) is None
    t = GRPOTrainer(smoke_cfg(jsonl(tmp_path / "d.jsonl", system, "1+1", system), "rollout.prompts_per_step=2"))
    assert line in t.start_notices
    # ponder sft: a messages row's turns before the answer are its prompt
    rows = tmp_path / "s.jsonl"
    rows.write_text(json.dumps({"messages": [*system, {"role": "assistant", "content": "7"}]}) + "\n")
    sft(load_sft_config("recipes/coldstart-tiny.yaml", [f"output_dir={tmp_path}", "name=s", f"data.files=[{rows}]",
                                                        "data.coldstart=[]", "train.steps=1", "eval.tasks=[]"]))
    assert "ponder: 1 of 1 prompts are chat messages with turns besides the last user turn (system); the r1_zero" in capsys.readouterr().out


CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chatml_model(path, eos=None):
    """tiny-random with ChatML turns, its EOS the tokenizer's own (<eos>) as a base model's is; `eos`: the
    generation_config's EOS id instead."""
    from ponder.models.tiny import tiny_random

    model, t = tiny_random()
    t.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    model.resize_token_embeddings(len(t))
    t.chat_template = CHATML
    if eos is not None:
        model.generation_config.eos_token_id = eos
    model.save_pretrained(path)
    t.save_pretrained(path)
    return str(path), t


def test_generation_stops_at_the_tokenizers_eos_and_the_chat_templates_end_of_turn(tmp_path):
    """Generation stopped at generation_config's EOS alone: a base model with a ChatML template, cold-started on chat
    messages, learnt to end its turn with <|im_end|> and ran on to the token limit; so did a fine-tune whose tokenizer
    EOS was not its generation_config's (ponder sft ends rows with the tokenizer's)."""
    from ponder import models
    from ponder.templates import end_of_turn

    path, t = chatml_model(tmp_path / "base")
    assert end_of_turn(t) == "<|im_end|>" and end_of_turn(char_tokenizer()) is None
    model, tok = models.load(path)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.eos_token_id == [tok.eos_token_id, end]
    path, t = chatml_model(tmp_path / "tuned", eos=5)  # generation_config names another EOS than the tokenizer's
    model, tok = models.load(path)
    assert model.generation_config.eos_token_id == [5, tok.eos_token_id, end]
    # both engines stop at generation_config's EOS ids (tests/test_fast_engine.py), and checkpoints keep them
    models.save(model, tok, tmp_path / "saved")
    assert models.load(str(tmp_path / "saved"))[0].generation_config.eos_token_id == [5, tok.eos_token_id, end]


def test_a_tokenizer_larger_than_the_models_embedding_is_one_line(tmp_path, error_line, capsys):
    """Tokens added (a pad, think tags) without resize_token_embeddings: torch.embedding's IndexError at the first
    such id, in a traceback."""
    from ponder.models.tiny import tiny_random

    model, t = tiny_random()
    t.add_tokens(["<think>", "</think>"])
    model.save_pretrained(tmp_path / "m")
    t.save_pretrained(tmp_path / "m")
    rows = model.get_input_embeddings().num_embeddings
    capsys.readouterr()  # (save_pretrained's progress bars)
    assert error_line("eval", "--model", str(tmp_path / "m"), "--tasks", "arithmetic", "--n", "2") == (
        f"ponder: error: the tokenizer of '{tmp_path / 'm'}' has ids up to {rows + 1} ('</think>') and the model's "
        f"embedding {rows} rows: tokens were added without resizing it; call model.resize_token_embeddings(len(tokenizer)) "
        "and save_pretrained both, or use the tokenizer the model was trained with")
    # a special token no text encodes to may lie past the embedding (Gemma 3's <image_soft_token>): it loads
    from ponder import models

    model, t = tiny_random()
    t.add_special_tokens({"additional_special_tokens": ["<image_soft_token>"]})
    model.save_pretrained(tmp_path / "g")
    t.save_pretrained(tmp_path / "g")
    assert len(models.load(str(tmp_path / "g"))[1]) == rows + 1


def test_think_and_answer_tags_made_special_tokens_stay_in_decoded_completions():
    """Tags added as special tokens (the usual recipe: additional_special_tokens) were skipped in every decoded
    completion: a well-formed answer reached the rewards as ' 3 plus 4 is 7   7 ' and scored 0 on format and accuracy."""
    from ponder.rewards import get_reward
    from ponder.rollout import decode_text, decode_texts

    tok = char_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<think>", "</think>", "<answer>", "</answer>"]})
    ids = [tok.bos_token_id, *tok.encode("<think>", add_special_tokens=False), *tok.encode("3+4", add_special_tokens=False),
           *tok.encode("</think> <answer>7</answer>", add_special_tokens=False), tok.eos_token_id, tok.pad_token_id]
    assert len(ids) == 12  # each tag one token
    text = decode_text(tok, ids)
    assert text == "<think>3+4</think> <answer>7</answer>"  # BOS, EOS and padding still left out
    assert decode_texts(tok, [ids, ids[:3]]) == [text, "<think>3"]
    assert get_reward("format")([text], prompts=["p"]) == [1.0]
    assert decode_text(char_tokenizer(), ids[:1] + [5, 6]) == char_tokenizer().decode([5, 6])  # others as before


THINKING = ("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{% if add_generation_prompt %}[assistant]"
            "{% if enable_thinking is defined and enable_thinking is false %}<think></think>{% endif %}{% endif %}")


def test_chat_template_options_reach_every_rendering(tmp_path, smoke_cfg, capsys, monkeypatch):
    """model.chat_template_kwargs (Qwen3's enable_thinking) is passed to the chat template by train, sft, sample and
    eval (--chat-template-kwargs); without it Qwen3 could only be run in its thinking mode."""
    from ponder.config import TaskSpec
    from ponder.rl.trainer import GRPOTrainer
    from ponder.sample import SampleConfig, sample
    from ponder.sft.config import load_sft_config
    from ponder.sft.trainer import SFTTrainer

    model = chat_model(tmp_path / "m", THINKING)
    data = jsonl(tmp_path / "d.jsonl", "3+4")
    base = [f"model.path={model}", "data.template=chat", data, "rollout.prompts_per_step=1", "rollout.group_size=2"]
    text = lambda t: t.tokenizer.decode(t._encode(t.examples[0]))  # noqa: E731
    assert text(GRPOTrainer(smoke_cfg("name=a", *base))).endswith("[user]3+4[assistant]")
    t = GRPOTrainer(smoke_cfg("name=b", *base, "model.chat_template_kwargs={enable_thinking: false}"))
    assert text(t).endswith("[user]3+4[assistant]<think></think>")
    rows = tmp_path / "s.jsonl"
    rows.write_text(json.dumps({"prompt": "3+4", "completion": "7"}) + "\n")
    sft = SFTTrainer(load_sft_config("recipes/coldstart-tiny.yaml", [
        f"output_dir={tmp_path}", "name=s", f"model.path={model}", "data.template=chat", f"data.files=[{rows}]",
        "data.coldstart=[]", "train.steps=1", "eval.tasks=[]", "model.chat_template_kwargs={enable_thinking: false}"]))
    assert sft.tokenizer.decode(sft.examples[0].ids).startswith("[user]3+4[assistant]<think></think>7")
    import ponder.rollout

    seen, make = [], ponder.rollout.make_engine

    def recording(*a, **kw):
        engine = make(*a, **kw)
        generate = engine.generate
        engine.generate = lambda prompts, params, **k: seen.extend(prompts) or generate(prompts, params, **k)
        return engine

    monkeypatch.setattr(ponder.rollout, "make_engine", recording)
    sample(SampleConfig(model=model, template="chat", tasks=[TaskSpec(name="jsonl", path=str(tmp_path / "d.jsonl"))], k=1,
                        max_new_tokens=2, chat_template_kwargs={"enable_thinking": False}, out=str(tmp_path / "t.jsonl")))
    assert sft.tokenizer.decode(seen[0]).endswith("[user]3+4[assistant]<think></think>")
    from ponder.cli import main

    assert main(["eval", "--model", model, "--tasks", f"jsonl:{tmp_path / 'd.jsonl'}", "--k", "1", "--max-tokens", "2",
                 "--template", "chat", "--chat-template-kwargs", '{"enable_thinking": false}', "--out", str(tmp_path / "e")]) == 0
    done = json.loads((tmp_path / "e" / "results.json").read_text())  # in the settings: --compare tells the two modes apart
    assert done["settings"]["chat_template_kwargs"] == {"enable_thinking": False}
    assert json.loads((tmp_path / "e" / "samples.jsonl").read_text().splitlines()[0])["prompt"] == "3+4"
    with pytest.raises(SystemExit) as stop:  # argparse's own line, before anything loads
        main(["eval", "--model", model, "--tasks", "arithmetic", "--chat-template-kwargs", "enable_thinking"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "ponder eval: error: argument --chat-template-kwargs: 'enable_thinking' is not a JSON object; give one, e.g. "
        "'{\"enable_thinking\": false}' (see ponder eval --help)"]
