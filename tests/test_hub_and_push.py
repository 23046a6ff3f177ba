"""Models by Hub id from a local Hugging Face cache (offline), and `ponder push --dry-run`'s folder and card."""

import json
import shutil
from pathlib import Path

import pytest

from ponder import models
from ponder.cli import main
from ponder.config import load_config

COMMIT = "0123456789abcdef0123456789abcdef01234567"
EVAL = ["eval.tasks=[{name: first_digit, split: test, n: 8, options: {digit: 7}}]", "eval.k=2"]
SMALL = ["train.steps=2", "train.save_every=1", "rollout.prompts_per_step=4", "rollout.group_size=4"]


def _offline(mp, home):
    """A Hugging Face home of our own, offline; set after huggingface_hub was imported (read at call time)."""
    mp.setenv("HF_HOME", str(home))
    mp.delenv("HF_HUB_CACHE", raising=False)
    mp.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    mp.setenv("HF_HUB_OFFLINE", "1")


def _place_in_cache(home, repo, seed, commit=COMMIT, ref="main"):
    """A tiny model in the Hub cache's layout: hub/models--owner--name/{refs/<ref>, snapshots/<commit>/...}."""
    model, tok = models.tiny_random("nano", seed)
    root = home / "hub" / f"models--{repo.replace('/', '--')}"
    models.save(model, tok, root / "snapshots" / commit)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    return model


def _max_diff(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


@pytest.fixture(scope="module")
def hub_run(tmp_path_factory):
    """A GRPO run (2 steps, evaluated before and after) of `owner/tiny`, found only in the offline cache."""
    from ponder.train import train

    root = tmp_path_factory.mktemp("hub")
    with pytest.MonkeyPatch.context() as mp:
        _offline(mp, root / "hf")
        placed = _place_in_cache(root / "hf", "owner/tiny", seed=3)
        cfg = load_config("recipes/smoke-first-digit.yaml",
                          [f"output_dir={root}", "name=run", "model.path=owner/tiny", *SMALL, *EVAL])
        trainer = train(cfg)
    return root / "run", placed, trainer


def test_hub_id_from_the_cache_trains_and_evaluates(hub_run):
    run, placed, trainer = hub_run
    assert trainer.step_no == 2
    assert [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()][:2] == [1, 2]
    # the run started from the cached model (seed 3), not from a built-in one (a tiny-random would be seed 0)
    ckpt, _ = models.load(str(run / "checkpoints" / "step-2"))
    assert _max_diff(ckpt, placed) < 0.02 < _max_diff(ckpt, models.tiny_random("nano", 0)[0])
    for tag in ("before", "after"):
        figures = json.loads((run / f"eval_{tag}.json").read_text())["first_digit/test"]["metrics"]
        assert figures["problems"] == 8 and figures["k"] == 2


def test_hub_id_with_revision_loads_those_weights(tmp_path, monkeypatch):
    _offline(monkeypatch, tmp_path)
    main_branch = _place_in_cache(tmp_path, "owner/tiny", seed=5)
    tagged = _place_in_cache(tmp_path, "owner/tiny", seed=6, commit="f" * 40, ref="v1")
    model, tok = models.load("owner/tiny")
    assert _max_diff(model, main_branch) == 0.0 and tok.padding_side == "left"
    assert _max_diff(models.load("owner/tiny@v1")[0], tagged) == 0.0
    assert _max_diff(models.load(f"owner/tiny@{'f' * 40}")[0], tagged) == 0.0
    # ponder eval by Hub id records the snapshot (the commit) the weights came from
    out = tmp_path / "eval"
    assert main(["eval", "--model", "owner/tiny@v1", "--tasks", "first_digit", "--n", "4", "--k", "1",
                 "--max-tokens", "2", "--quiet", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["model"] == "owner/tiny@v1" and result["tasks"]["first_digit"]["problems"] == 4
    assert result["model_path"] == str(tmp_path / "hub" / "models--owner--tiny" / "snapshots" / ("f" * 40))


def test_resolve_keeps_builtin_names_and_local_dirs_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    models.save(*models.tiny_random("nano", 0), tmp_path / "owner" / "local")
    assert models.resolve("owner/local") == Path("owner/local")  # a local directory, though it looks like a Hub id
    assert models.resolve("tiny-base").name == "tiny-base"
    assert models.resolve("owner/other@v1.0") == models.HubModel("owner/other", "v1.0")
    for not_an_id in ("./owner/other", "a/b/c", "/abs/path", "owner/x..y"):
        with pytest.raises(models.UserError, match="not found: give a local Hugging Face model directory, a Hub id"):
            models.resolve(not_an_id)


def test_uncached_hub_id_offline_is_one_clear_line(tmp_path, monkeypatch, error_line):
    _offline(monkeypatch, tmp_path / "hf")
    _place_in_cache(tmp_path / "hf", "owner/tiny", seed=0)
    # `runs/student` before the run that makes it reads as a Hub id too: the line names both readings' fixes
    fix = ("a path: create it first (ponder pretrain, ponder train) or fix it; a Hub id: unset HF_HUB_OFFLINE to download "
           "it once (or run `hf download {}`), or set HF_HOME to a cache that holds it")
    cache = tmp_path / "hf" / "hub"
    line = error_line("train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}", "model.path=owner/missing")
    assert line == (f"ponder: error: model 'owner/missing' is not in the Hugging Face cache at {cache} (nor a local "
                    f"directory: there is no {Path.cwd() / 'owner' / 'missing'}) and HF_HUB_OFFLINE=1 is set; "
                    f"{fix.format('owner/missing')}")
    assert not (tmp_path / "smoke-first-digit").exists()  # nothing written
    line = error_line("eval", "--model", "owner/tiny@v2", "--tasks", "first_digit", "--out", str(tmp_path / "e"))
    assert line == (f"ponder: error: model 'owner/tiny@v2' is not in the Hugging Face cache at {cache} (nor a local "
                    f"directory: there is no {Path.cwd() / 'owner' / 'tiny'}) and HF_HUB_OFFLINE=1 is set; "
                    f"{fix.format('owner/tiny')}")


def test_trust_remote_code_reaches_transformers_only_when_asked(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ponder.config import ModelConfig

    _offline(monkeypatch, tmp_path)
    _place_in_cache(tmp_path, "owner/tiny", seed=0)
    seen = []
    for cls in (AutoModelForCausalLM, AutoTokenizer):
        original = cls.from_pretrained.__func__
        monkeypatch.setattr(cls, "from_pretrained", classmethod(
            lambda c, *a, _orig=original, **kw: seen.append(kw["trust_remote_code"]) or _orig(c, *a, **kw)))
    models.load_trainable(ModelConfig(path="owner/tiny"))
    models.load_trainable(load_config("recipes/smoke-first-digit.yaml",
                                      ["model.path=owner/tiny", "model.trust_remote_code=true"]).model)
    assert seen == [False, False, True, True]


def _table(card):
    """{figure: [before, after]} from the card's markdown table."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in card.splitlines() if line.startswith("| ")]
    return {r[1]: r[2:] for r in rows[1:]}


def test_push_dry_run_writes_the_folder_and_a_card_with_the_runs_figures(hub_run, tmp_path, capsys, monkeypatch, error_line):
    from ponder import push

    run = tmp_path / "run"
    shutil.copytree(hub_run[0], run)
    # distinct figures after training, so that the card shows the run's own and in the right column
    after = json.loads((run / "eval_after.json").read_text())
    after["first_digit/test"]["metrics"].update({"pass@1": 0.75, "format_rate": 0.625, "mean_length": 3.5})
    (run / "eval_after.json").write_text(json.dumps(after))
    before = json.loads((run / "eval_before.json").read_text())["first_digit/test"]["metrics"]
    monkeypatch.setattr(push, "upload", lambda *a, **k: pytest.fail("a dry run uploads nothing"))

    out = tmp_path / "out"
    assert main(["push", str(run / "checkpoints" / "step-2"), "--repo", "me/tiny-grpo", "--dry-run", str(out)]) == 0
    assert f"wrote 9 files to {out}" in capsys.readouterr().out
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["README.md", "recipe.yaml", "eval_before.json", "eval_after.json", "config.json",
                            "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"])
    assert (out / "model.safetensors").read_bytes() == (run / "checkpoints" / "step-2" / "model.safetensors").read_bytes()
    assert (out / "recipe.yaml").read_text() == (run / "config.yaml").read_text()
    assert json.loads((out / "eval_after.json").read_text()) == after
    card = (out / "README.md").read_text()
    assert "base_model: owner/tiny" in card and "# me/tiny-grpo" in card
    assert "```bash\nponder train recipe.yaml\n```" in card
    assert "model:\n  path: owner/tiny" in card  # the recipe, in the card
    table = _table(card)
    assert table["pass@1"] == [f"{before['pass@1']:.3f}", "0.750"]
    assert table["format"] == [f"{before['format_rate']:.3f}", "0.625"]
    assert table["length (tokens)"] == [f"{before['mean_length']:.1f}", "3.5"]
    assert table["problems"] == ["8", "8"]

    # an earlier checkpoint was not evaluated: the final figures are not claimed for it
    out1 = tmp_path / "out1"
    assert main(["push", str(run / "checkpoints" / "step-1"), "--repo", "me/tiny-grpo", "--dry-run", str(out1)]) == 0
    card = (out1 / "README.md").read_text()
    assert not (out1 / "eval_after.json").exists() and "0.750" not in card
    assert "`step-1` itself was not evaluated" in card
    # a folder that exists is not written into
    line = error_line("push", str(run / "checkpoints" / "step-2"), "--repo", "me/tiny-grpo", "--dry-run", str(out))
    assert line == f"ponder: error: --dry-run: '{out}' already exists and is not an empty folder; give a new folder"


# ---------------------------------------------------------------------------------------------
# ponder pretrain's tokenizer by Hub id


def _bpe_tokenizer(eos="<|eos|>"):
    """A byte-level BPE trained on the corpus (not character-level: its tokens span several characters)."""
    from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ponder.tasks.corpus import corpus_text

    raw = Tokenizer(tok_models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[eos] if eos else [],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator(corpus_text(30_000, seed=1), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=eos, clean_up_tokenization_spaces=False)


def _place_tokenizer_in_cache(home, repo, tok, commit=COMMIT):
    """A tokenizer alone (no config.json, no weights) in the Hub cache's layout. AutoTokenizer asks for config.json
    first; when a download finds none, huggingface_hub records that in .no_exist/<commit>/, as here."""
    root = home / "hub" / f"models--{repo.replace('/', '--')}"
    tok.save_pretrained(root / "snapshots" / commit)
    (root / ".no_exist" / commit).mkdir(parents=True)
    (root / ".no_exist" / commit / "config.json").touch()
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)


def _pretrain_recipe(tmp_path, **kw):
    import yaml

    cfg = dict(output=str(tmp_path / "model"), shape="nano", steps=3, batch_size=2, block=32, max_len=64,
               corpus_chars=20_000, workers=1, threads=1, warmup_steps=1, probe={"n": 0}) | kw
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(cfg))
    return str(tmp_path / "r.yaml")


def test_pretrain_tokenizer_by_hub_id_from_the_cache(tmp_path, monkeypatch):
    import numpy as np

    from ponder.pretrain import PretrainConfig, corpus_tokens, pretrain

    _offline(monkeypatch, tmp_path / "hf")
    bpe = _bpe_tokenizer()
    _place_tokenizer_in_cache(tmp_path / "hf", "owner/bpe", bpe)
    recipe = _pretrain_recipe(tmp_path, tokenizer="owner/bpe")
    cfg = load_config(recipe, [], cls=PretrainConfig)

    # the same documents as the built-in character path, each encoded by the Hub tokenizer and ended by its EOS
    stream = corpus_tokens(cfg, bpe)
    chars = corpus_tokens(load_config(recipe, ["tokenizer=char"], cls=PretrainConfig), models.tiny.char_tokenizer())

    def docs(ids, tok):
        """The documents of a stream, split at EOS (the character table puts one between documents only)."""
        ids = ids[:-1] if ids[-1] == tok.eos_token_id else ids
        return [tok.decode(d.tolist(), skip_special_tokens=True) for d in np.split(ids, np.flatnonzero(ids == tok.eos_token_id))]

    assert stream[-1] == bpe.eos_token_id  # every document ended, the last one included
    assert docs(stream, bpe) == docs(chars, models.tiny.char_tokenizer()) and len(docs(stream, bpe)) > 10
    assert len(stream) < 0.6 * len(chars)  # multi-character tokens: it really is the BPE, not a character table

    out = pretrain(cfg, recipe=recipe)
    model, tok = models.load(str(out))
    assert model.config.vocab_size == len(bpe) and model.config.eos_token_id == bpe.eos_token_id
    assert tok("12 + 7 = 19")["input_ids"] == bpe("12 + 7 = 19")["input_ids"]
    assert f"with the tokenizer of `owner/bpe` (snapshot {COMMIT})" in (out / "README.md").read_text()


def test_pretrain_tokenizer_hub_id_offline_not_cached_is_one_line(tmp_path, monkeypatch, error_line):
    _offline(monkeypatch, tmp_path / "hf")
    _place_tokenizer_in_cache(tmp_path / "hf", "owner/bpe", _bpe_tokenizer())
    cache = tmp_path / "hf" / "hub"
    recipe = _pretrain_recipe(tmp_path)
    line = error_line("pretrain", recipe, "tokenizer=owner/missing")
    assert line == (f"ponder: error: tokenizer 'owner/missing' is not in the Hugging Face cache at {cache} (nor a local "
                    f"directory: there is no {Path.cwd() / 'owner' / 'missing'}) and HF_HUB_OFFLINE=1 is set; a path: "
                    "create it first (ponder pretrain, ponder train) or fix it; a Hub id: unset HF_HUB_OFFLINE to "
                    "download it once (or run `hf download owner/missing`), or set HF_HOME to a cache that holds it")
    assert not (tmp_path / "model").exists()  # nothing written
    # a model repo cached without its tokenizer files is not taken for a cached tokenizer
    _place_in_cache(tmp_path / "hf", "owner/weights-only", seed=0)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (cache / "models--owner--weights-only" / "snapshots" / COMMIT / name).unlink()
    assert error_line("pretrain", recipe, "tokenizer=owner/weights-only").startswith(
        "ponder: error: tokenizer 'owner/weights-only' is not in the Hugging Face cache at")


def test_pretrain_tokenizer_mistakes_are_one_line(tmp_path, monkeypatch, error_line):
    _offline(monkeypatch, tmp_path / "hf")
    _place_tokenizer_in_cache(tmp_path / "hf", "owner/no-eos", _bpe_tokenizer(eos=None))
    recipe = _pretrain_recipe(tmp_path)
    assert error_line("pretrain", recipe, "tokenizer=owner/no-eos") == (
        "ponder: error: config tokenizer: 'owner/no-eos' has no EOS token, which ends every corpus document; "
        "choose a tokenizer that has one")
    (tmp_path / "empty").mkdir()
    assert error_line("pretrain", recipe, f"tokenizer={tmp_path / 'empty'}") == (
        f"ponder: error: tokenizer directory '{tmp_path / 'empty'}' has no tokenizer_config.json or tokenizer.json; "
        f"give a Hugging Face tokenizer or model directory")
    assert not (tmp_path / "model").exists()


def test_pretrain_tokenizer_trusts_remote_code_only_when_the_recipe_says_so(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from ponder.pretrain import PretrainConfig, pretrain_tokenizer

    _offline(monkeypatch, tmp_path / "hf")
    _place_tokenizer_in_cache(tmp_path / "hf", "owner/bpe", _bpe_tokenizer())
    seen = []
    original = AutoTokenizer.from_pretrained.__func__
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(
        lambda c, *a, **kw: seen.append((a[0], kw["trust_remote_code"], kw["local_files_only"])) or original(c, *a, **kw)))
    recipe = _pretrain_recipe(tmp_path, tokenizer="owner/bpe")
    pretrain_tokenizer(load_config(recipe, [], cls=PretrainConfig))
    pretrain_tokenizer(load_config(recipe, ["trust_remote_code=true"], cls=PretrainConfig))
    snapshot = str(tmp_path / "hf" / "hub" / "models--owner--bpe" / "snapshots" / COMMIT)  # offline: its directory
    assert seen == [(snapshot, False, True), (snapshot, True, True)]


def test_a_hub_model_without_tokenizer_files_is_refused_as_a_local_one_is(tmp_path, monkeypatch):
    """A repository of weights only: transformers built an empty tokenizer from config.json (Qwen2: every text encoded
    to []), where a local directory without tokenizer files is refused."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    _offline(monkeypatch, tmp_path)
    root = tmp_path / "hub" / "models--owner--weights-only"
    Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(root / "snapshots" / COMMIT)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    with pytest.raises(models.UserError, match=r"^model 'owner/weights-only' has no tokenizer files on the Hugging Face Hub"):
        models.load("owner/weights-only")


def test_a_cached_tokenizer_of_tokenizer_json_alone_loads_offline(tmp_path, monkeypatch):
    """resolve takes a local directory with only tokenizer.json; in the Hub cache the same files read as 'not in the
    cache' offline (only tokenizer_config.json was looked for, and transformers asked the cache for it)."""
    _offline(monkeypatch, tmp_path)
    tok = _bpe_tokenizer()
    _place_tokenizer_in_cache(tmp_path, "owner/tokjson", tok)
    snapshot = tmp_path / "hub" / "models--owner--tokjson" / "snapshots" / COMMIT
    for f in snapshot.iterdir():
        if f.name != "tokenizer.json":
            f.unlink()
    import shutil

    shutil.rmtree(snapshot.parent.parent / ".no_exist")  # a cache copied without its records of missing files
    loaded = models.load_tokenizer("owner/tokjson")
    assert loaded("a b").input_ids == tok("a b").input_ids and len(loaded) == len(tok)


def test_push_refuses_a_checkpoint_that_a_kill_left_unfinished(hub_run, tmp_path, error_line):
    """A save cut by a kill leaves .tmp-step-N-PID (weights possibly cut, no trainer_state.pt): it was pushed as a
    checkpoint. It, or a step-N without its trainer state, is refused with the finished checkpoints to push instead."""
    run = tmp_path / "run"
    shutil.copytree(hub_run[0], run)
    ckpts = run / "checkpoints"
    shutil.copytree(ckpts / "step-2", ckpts / ".tmp-step-3-999", ignore=shutil.ignore_patterns("trainer_state.pt"))
    shutil.copytree(ckpts / "step-2", ckpts / "step-4", ignore=shutil.ignore_patterns("trainer_state.pt"))
    out = tmp_path / "out"
    for folder in (".tmp-step-3-999", "step-4"):
        line = error_line("push", str(ckpts / folder), "--repo", "me/tiny-grpo", "--dry-run", str(out))
        assert line == (f"ponder: error: '{ckpts / folder}' is not a finished checkpoint (a save that was interrupted leaves "
                        f"such a folder); push one of {ckpts.resolve()}: step-1, step-2")
        assert not out.exists()


def test_push_refuses_a_damaged_checkpoint_or_run_in_one_line(hub_run, tmp_path, error_line):
    """Weights deleted or cut short, or the tokenizer gone, went up as a model (exit 0); a config.yaml or evaluation file
    of another shape, and a --dry-run folder under a file, were tracebacks."""
    run = tmp_path / "run"
    shutil.copytree(hub_run[0], run)
    ckpt, out = (run / "checkpoints" / "step-2").resolve(), tmp_path / "out"
    push = lambda: error_line("push", str(ckpt), "--repo", "me/tiny-grpo", "--dry-run", str(out))
    weights = ckpt / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])
    assert push() == (f"ponder: error: {weights} is damaged (Error while deserializing header: incomplete metadata, file "
                      "not fully covered); push another checkpoint")
    weights.unlink()
    assert push() == f"ponder: error: {ckpt} holds no weights (*.safetensors); push a complete checkpoint"
    weights.write_bytes(whole)
    (ckpt / "tokenizer.json").rename(ckpt / "kept.json")
    assert push() == f"ponder: error: {ckpt} holds no tokenizer (tokenizer.json); push a complete checkpoint"
    (ckpt / "kept.json").rename(ckpt / "tokenizer.json")
    config, kept = run / "config.yaml", (run / "config.yaml").read_text()
    for damage, where in (("- 1\n", "its top level"), (kept + "model: 5\n", "'model'")):
        config.write_text(damage)
        assert push() == (f"ponder: error: {config} is not a ponder run's settings ({where} must be a mapping, as ponder "
                          "writes it); restore it")
    config.write_bytes(b"name: run\xff\n")
    assert push() == (f"ponder: error: {config} is damaged (not UTF-8 text); restore it from the checkpoint's settings "
                      "or a copy")
    config.write_text(kept)
    evals = run / "eval_after.json"
    for damage in ("[1, 2]", '{"arith": 5}', '{"arith": {"metrics": [1]}}', '{"arith": {"metrics": {}, "settings": 5}}'):
        evals.write_text(damage)
        assert push() == (f"ponder: error: {evals} is not an evaluation ponder wrote (task names, each with its 'metrics' "
                          "and 'settings' mappings); the run's evaluation file is damaged")
    assert not out.exists()
    evals.unlink()
    (tmp_path / "afile").write_text("")
    assert error_line("push", str(ckpt), "--repo", "me/tiny-grpo", "--dry-run", str(tmp_path / "afile" / "sub")) == (
        f"ponder: error: --dry-run: cannot make '{tmp_path / 'afile' / 'sub'}' (Not a directory); give a new folder")


def test_the_card_names_the_evaluations_top_k_and_min_p_where_set(tmp_path):
    """The card's sentence on how pass@1 was sampled reads the results' settings: a run evaluated at top-k 20 and
    min-p 0.05 was described as sampled at plain top-p 0.95."""
    from ponder.push import model_card

    run = tmp_path / "run"
    for extra, said in (({"top_k": 20, "min_p": 0.05}, "top-p 0.95, top-k 20, min-p 0.05, at most 256 new tokens"),
                        ({}, "top-p 0.95, at most 256 new tokens")):
        settings = {"k": 4, "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 256, "template": "r1_zero", **extra}
        after = {"arith/test": {"settings": settings, "tasks": {"arith/test": {"pass@1": 0.5}}, "metrics": {"pass@1": 0.5}}}
        card = model_card("me/x", run / "checkpoints" / "step-2", run, {"model": {"path": "tiny"}, "rollout": {}}, None, after)
        assert said in next(line for line in card.splitlines() if "pass@1 is" in line)
