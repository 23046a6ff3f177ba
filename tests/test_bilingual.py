"""The bilingual miniature world (docs/bilingual.md): Chinese numerals, the task and its exact verifier,
the corpus, the tokenizer, the mixing-rate metric and the language reward in both directions."""

import hashlib
import re
from itertools import islice

import pytest
import torch

from ponder.errors import UserError
from ponder.evaluate import evaluate
from ponder.filters import Candidate, FilterConfig, check_config, first_failure
from ponder.models.tiny import char_tokenizer
from ponder.rewards import RewardSet, get_reward
from ponder.rewards.language import is_mixed, mixing_rate
from ponder.rollout import Completion, RolloutEngine
from ponder.tasks import arithmetic as ar
from ponder.tasks import get_task
from ponder.tasks.bilingual import ZH_CHARS
from ponder.tasks.corpus import CorpusConfig, documents
from ponder.tasks.partition import partition_of
from ponder.tasks.zh_numerals import from_zh, to_zh

BILINGUAL = CorpusConfig(kinds={"bi_r1_arithmetic": 0.45, "bi_web_arithmetic": 0.25, "zh_numbers": 0.05,
                                "r1_other": 0.04, "filler": 0.13, "zh_filler": 0.08})

# ---------------------------------------------------------------------------------------------
# numerals


@pytest.mark.parametrize("n, zh", [(0, "零"), (7, "七"), (10, "十"), (12, "十二"), (20, "二十"), (45, "四十五"),
                                   (100, "一百"), (105, "一百零五"), (110, "一百一十"), (115, "一百一十五"),
                                   (150, "一百五十"), (999, "九百九十九"), (1001, "一千零一"), (1010, "一千零一十"),
                                   (1100, "一千一百"), (2005, "二千零五")])
def test_numerals_are_written_in_their_standard_form(n, zh):
    assert to_zh(n) == zh and from_zh(zh) == n


def test_numerals_round_trip_and_refuse_everything_else():
    assert all(from_zh(to_zh(n)) == n for n in range(10_000))
    for bad in ["一百五", "两百", "一十二", "十十", "二二", "百", "一千零零五", "一百零", "", "12", "四十二加七十三"]:
        assert from_zh(bad) is None, bad
    with pytest.raises(ValueError):
        to_zh(10_000)


# ---------------------------------------------------------------------------------------------
# the task and its verifiers


def test_tasks_are_well_formed_in_both_languages():
    task = get_task("bilingual_arithmetic")
    rows = task.load("test", n=40, seed=0, difficulty="hard")
    assert [r["target"] for r in rows] == ["en", "zh"] * 20
    assert {r["eval_group"] for r in rows} == {"bilingual_arithmetic/en", "bilingual_arithmetic/zh"}
    plain = ar.Arithmetic().load("test", n=40, seed=0, difficulty="hard")
    for row, same in zip(rows, plain):  # the arithmetic task's problems, in the test partition
        assert row["expression"] == same["expression"] and row["answer"] == same["answer"]
        assert partition_of(ar.problem_key(row["expression"])) == "test"
        if row["target"] == "en":
            assert row["prompt"] == f"Compute {row['expression']}"
        else:  # 计算 then numerals joined by 加 / 减: read back, it is the same chain
            assert re.fullmatch(r"计算[零一二三四五六七八九十百千加减]+", row["prompt"])
            nums = [from_zh(x) for x in re.split("[加减]", row["prompt"][2:])]
            ops = ["+" if o == "加" else "-" for o in re.findall("[加减]", row["prompt"])]
            assert ar.expression(nums, ops) == row["expression"]
    assert [r["target"] for r in task.load("train", n=3, language="zh")] == ["zh"] * 3
    with pytest.raises(UserError, match=r"^task 'bilingual_arithmetic': language 'fr' is not supported; choose one of: en, zh$"):
        task.load("train", n=3, language="fr")


def test_verifier_is_exact_in_each_language():
    task = get_task("bilingual_arithmetic")
    en = {"prompt": "Compute 42 + 73 - 27", "answer": "88", "target": "en", "expression": "42 + 73 - 27"}
    zh = dict(en, prompt="计算四十二加七十三减二十七", target="zh")
    for ex in (en, zh):
        for right in ["88", " 88. ", "= 88", "42 + 73 - 27 = 88", "八十八", "八十八。", "得八十八", "等于八十八", "答案是八十八"]:
            assert task.verify(right, ex) == 1.0, right
        for wrong in ["87", "八十七", "89", "八十九", "42 + 73 - 27", "四十二加七十三减二十七", "八八", "八十", "", "eighty-eight"]:
            assert task.verify(wrong, ex) == 0.0, wrong
        assert task.verify(None, ex) == 0.0
    assert task.verify("一百五", dict(en, answer="150")) == 0.0  # colloquial: not the standard 一百五十
    assert task.verify("一百五十", dict(en, answer="150")) == 1.0


def test_every_test_problem_verifies_its_own_gold_in_both_writings():
    task = get_task("bilingual_arithmetic")
    for ex in task.load("test", n=100, seed=1, difficulty="expert"):
        gold = int(ex["answer"])
        assert task.verify(str(gold), ex) == task.verify(to_zh(gold), ex) == 1.0
        assert task.verify(str(gold + 1), ex) == task.verify(to_zh(gold + 1), ex) == 0.0


# ---------------------------------------------------------------------------------------------
# the corpus and the tokenizer

STEP = re.compile(r"(\d+) (plus|minus) (\d+) is (\d+)|([零一二三四五六七八九十百千]+)([加减])([零一二三四五六七八九十百千]+)得([零一二三四五六七八九十百千]+)")


@pytest.fixture(scope="module")
def bi_docs():
    return list(islice(documents(seed=0, cfg=BILINGUAL), 3000))


def test_bilingual_corpus_is_well_formed(bi_docs):
    kinds = {d.kind for d in bi_docs}
    assert kinds == set(BILINGUAL.kinds)
    keys = [k for d in bi_docs for k in d.keys]
    assert len(keys) > 1000 and {partition_of(k) for k in keys} == {"corpus"}
    steps = wrong_fixed = 0
    for d in bi_docs:
        for m in STEP.finditer(d.text):
            if m.group(1):
                a, op, b, c = int(m.group(1)), "+" if m.group(2) == "plus" else "-", int(m.group(3)), int(m.group(4))
            else:
                a, op, b, c = from_zh(m.group(5)), "+" if m.group(6) == "加" else "-", from_zh(m.group(7)), from_zh(m.group(8))
            steps += 1
            if (a + b if op == "+" else a - b) != c:  # only a slip that is fixed at once: ", wait" / "，等等"
                assert re.match(r"(,|，)\s*(wait|hmm|等等|嗯)", d.text[m.end():]), d.text[m.start():m.end() + 20]
                wrong_fixed += 1
    assert steps > 3000 and 0 < wrong_fixed < steps * 0.05


def test_bilingual_corpus_has_both_languages_and_solutions_that_switch(bi_docs):
    r1 = [d.text.split("Assistant:", 1)[1] for d in bi_docs if d.kind == "bi_r1_arithmetic"]
    prompts = [d.text.split("User: ", 1)[1] for d in bi_docs if d.kind == "bi_r1_arithmetic"]
    zh_share = sum(p.startswith("计算") for p in prompts) / len(prompts)
    assert 0.33 < zh_share < 0.47  # zh_share: 0.4
    switched = [c for c in r1 if is_mixed(c)]
    assert 0.02 < len(switched) / len(r1) < 0.05  # 30% worked x (40% x 0.2 + 60% x 0.05) = 3.3%


def test_tokenizer_covers_the_corpus_and_keeps_tiny_bases_ids(bi_docs):
    from ponder.models import resolve
    from ponder.pretrain import corpus_tokenizer

    ascii_tok, bi_tok = char_tokenizer(), corpus_tokenizer(BILINGUAL)
    assert corpus_tokenizer(CorpusConfig()).get_vocab() == ascii_tok.get_vocab()
    shipped = char_tokenizer().__class__.from_pretrained(str(resolve("tiny-base")))
    assert shipped.get_vocab() == ascii_tok.get_vocab()  # tiny-base's tokenizer is what char_tokenizer() builds
    assert len(bi_tok) == len(ascii_tok) + len(ZH_CHARS)
    assert all(bi_tok.convert_tokens_to_ids(c) == i for c, i in ascii_tok.get_vocab().items())
    text = "".join(d.text for d in bi_docs)
    assert bi_tok.unk_token_id not in bi_tok(text)["input_ids"]
    assert bi_tok.decode(bi_tok("计算四十二加七十三。")["input_ids"]) == "计算四十二加七十三。"


def test_default_corpus_is_unchanged():
    """tiny-base's corpus: these documents hash as they did before the bilingual world was added."""
    blob = "\x00".join(d.text for d in islice(documents(seed=3), 500))
    assert hashlib.sha256(blob.encode()).hexdigest() == "2faf77d8a51cc42bc5f858a6e4887ab3f8fe9bf839f20def9363d6bde696d747"


def test_pretrain_tokens_of_the_bilingual_corpus_decode_to_the_text():
    from ponder.pretrain import PretrainConfig, corpus_tokenizer, corpus_tokens

    cfg = PretrainConfig(corpus_chars=20_000, workers=1, corpus=BILINGUAL)
    tok = corpus_tokenizer(cfg.corpus)
    ids = corpus_tokens(cfg, tok)
    docs = tok.decode(ids.tolist()).split("<eos>")
    first = next(documents(seed=cfg.seed * 100_003, cfg=BILINGUAL)).text
    assert docs[0] == first and any(re.search("[加减]", d) for d in docs)


# ---------------------------------------------------------------------------------------------
# mixing rate and the language reward

EN = "<think> 42 plus 73 is 115. 115 minus 27 is 88. </think> <answer> 88 </answer>"
ZH = "<think> 四十二加七十三得一百一十五。 </think> <answer> 一百一十五 </answer>"
MIXED = "<think> 四十二加七十三得一百一十五。115 minus 27 is 88. </think> <answer> 88 </answer>"  # 13 Han, 2 Latin words
NO_WORDS = "<think> 42 + 73 = 115 </think> <answer> 一百一十五 </answer>"  # the answer is not the chain of thought
VARIABLE = "<think> x = 计算 </think>"  # a single letter is a variable, not a word
UNTAGGED = "Let me 计算 it"  # no tags: the whole text is the thinking


def test_mixing_rate_counts_hand_written_examples():
    assert [is_mixed(t) for t in (EN, ZH, MIXED, NO_WORDS, VARIABLE, UNTAGGED)] == [False, False, True, False, False, True]
    assert mixing_rate([EN, ZH, MIXED, NO_WORDS, VARIABLE, UNTAGGED]) == 2 / 6
    assert mixing_rate([]) == 0.0


def test_language_reward_scores_a_mixed_chain_below_a_pure_one_in_both_directions():
    lang = get_reward("language")
    assert lang([ZH, MIXED], prompts=["p"] * 2, target="zh") == [1.0, 13 / 15]
    assert lang([EN, MIXED], prompts=["p"] * 2, target="en") == [1.0, 2 / 15]
    # each example's own target, from the bilingual task's column
    assert lang([ZH, MIXED, EN, MIXED], prompts=["p"] * 4, target=["zh", "zh", "en", "en"]) == [1.0, 13 / 15, 1.0, 2 / 15]
    with pytest.raises(UserError, match=r"^target language 'fr' is not supported; choose one of: en, zh$"):
        lang([EN], prompts=["p"], target=["fr"])
    # tags and names of a language, as datasets write them: a zh-CN column read as English trained toward English
    assert lang([ZH] * 5, prompts=["p"] * 5, target=["zh-CN", "zh_Hans", "ZH", "Chinese", "en-US"]) == [1.0] * 4 + [0.0]
    assert lang([ZH], prompts=["p"], target="zh-TW") == [1.0]
    assert lang([ZH], prompts=["p"], target=["Simplified Chinese"]) == [1.0]
    for other in ("fr-FR", "pt_BR", "Spanish", "chinesisch"):
        with pytest.raises(UserError, match=rf"^target language '{other}' is not supported; choose one of: en, zh$"):
            lang([EN], prompts=["p"], target=[other])
    assert lang([EN, EN], prompts=["p"] * 2, target=[24, "24"]) == [1.0, 1.0]  # Countdown's number: no language, English


def test_reward_set_reads_the_target_column():
    rewards = RewardSet({"accuracy": 1.0, "format": 1.0, "language": 1.0})
    ex = get_task("bilingual_arithmetic").load("train", n=2, seed=0)
    rewards.check(ex[1])  # contract check on a real Chinese example
    _, per_fn = rewards.score([MIXED, MIXED], [e["prompt"] for e in ex],
                                   {k: [e[k] for e in ex] for k in ex[0] if k != "prompt"})
    assert [e["target"] for e in ex] == ["en", "zh"] and per_fn["language"] == [2 / 15, 13 / 15]


def test_filter_asks_each_example_for_its_own_language():
    cfg = FilterConfig(language="target", correct=False)
    check_config(cfg)
    assert first_failure(Candidate(ZH, 10, False, 1.0, target="zh"), cfg) is None
    assert first_failure(Candidate(MIXED, 10, False, 1.0, target="zh"), cfg) == "language"  # 13/15 < 0.95
    assert first_failure(Candidate(EN, 10, False, 1.0, target="en"), cfg) is None
    assert first_failure(Candidate(ZH, 10, False, 1.0, target="en"), cfg) == "language"
    with pytest.raises(UserError, match="choose en, zh, target"):
        check_config(FilterConfig(language="fr"))


class Scripted(RolloutEngine):
    """Each prompt's completions, from SCRIPT."""

    def generate(self, prompts, params):
        return [[Completion(self.tokenizer(t).input_ids, "stop") for t in SCRIPT[self.tokenizer.decode(ids)]] for ids in prompts]


SCRIPT = {"Compute 42 + 73 - 27": [EN, MIXED, EN, NO_WORDS], "计算四十二加七十三减二十七": [ZH, MIXED, MIXED, ZH]}


def test_evaluation_reports_mixing_per_language():
    tok = char_tokenizer(ZH_CHARS)
    examples = [{"prompt": p, "answer": "88", "task": "bilingual_arithmetic", "target": t, "eval_group": f"bilingual_arithmetic/{t}"}
                for p, t in zip(SCRIPT, ["en", "zh"])]
    res = evaluate(torch.nn.Linear(1, 1), tok, examples, template="plain", k=4, engine=Scripted(None, tok),
                   progress=False, n_boot=10)
    en, zh = res["tasks"]["bilingual_arithmetic/en"], res["tasks"]["bilingual_arithmetic/zh"]
    assert en["mixing_rate"] == 1 / 4 and zh["mixing_rate"] == 2 / 4 and res["metrics"]["mixing_rate"] == 3 / 8
    assert en["pass@1"] == 3 / 4 and zh["pass@1"] == 2 / 4  # 88 three times / twice; 一百一十五 is not 88


def test_trainer_logs_mixing_and_accuracy_per_target_language(smoke_cfg, monkeypatch):
    """One GRPO step on bilingual prompts: the per-language figures are computed on that language's groups."""
    import ponder.rl.trainer as trainer_module
    from ponder.rl.trainer import GRPOTrainer

    seen = []
    monkeypatch.setattr(trainer_module, "mixing_rate", lambda texts: seen.append(len(texts)) or float(len(texts)))
    cfg = smoke_cfg("name=bilingual", "train.steps=1", "train.save_every=0", "rollout.prompts_per_step=8",
                    "rollout.group_size=2", "data.tasks=[{name: bilingual_arithmetic, n: 8, options: {language: both}}]",
                    "rewards={accuracy: 1.0, language: 1.0}")
    m = GRPOTrainer(cfg).step()
    # the whole batch, then each language's groups: 16 completions, split between en and zh
    assert m["mixing_rate"] == 16 and m["mixing_rate/en"] + m["mixing_rate/zh"] == 16
    assert m["mixing_rate/en"] > 0 and m["mixing_rate/zh"] > 0 and seen[0] == 16
    assert "accuracy/en" in m and "accuracy/zh" in m


def test_rejection_sampling_filters_each_example_by_its_own_target():
    """`ponder sample` with filters.language=target keeps a pure chain in the prompt's language and
    drops a mixed one, for an English and a Chinese prompt alike (and logs the share it measured)."""
    from ponder.sample import SampleConfig, _judge

    tok = char_tokenizer(ZH_CHARS)
    task = get_task("bilingual_arithmetic")
    en_ex = dict(task.load("train", n=1, language="en")[0], answer="88")
    zh_ex = dict(task.load("train", n=1, language="zh")[0], answer="88")
    en_ok, zh_ok = EN, "<think> 四十二加七十三得一百一十五。 </think> <answer> 八十八 </answer>"
    outs = [[Completion(tok(t).input_ids, "stop") for t in texts] for texts in ([en_ok, MIXED], [zh_ok, MIXED])]
    cfg = SampleConfig(filters=FilterConfig(language="target", ngram_max_count=0))
    (en_cands, en_kept), (zh_cands, zh_kept) = _judge([("a", 0, en_ex), ("b", 1, zh_ex)], outs, tok, cfg, [False, False])
    assert [c.reason for c in en_cands] == [None, "language"] and [c.reason for c in zh_cands] == [None, "language"]
    assert zh_kept[0][2]["language"] == 1.0 and en_kept[0][2]["language"] == 1.0


def test_a_target_column_is_a_language_only_for_the_target_filter():
    """A user's JSONL with a `target` column of its own ("yes") stopped `ponder sample` with "target language 'yes'
    is not supported" though the language filter was off or fixed."""
    from ponder.sample import SampleConfig, _judge

    tok = char_tokenizer(ZH_CHARS)
    ex = {"prompt": "42+73", "answer": "115", "task": "arithmetic", "target": "yes"}
    outs = [[Completion(tok(EN).input_ids, "stop")]]
    for language in (None, "en"):
        cfg = SampleConfig(filters=FilterConfig(language=language, correct=False, ngram_max_count=0))
        (cands, kept), = _judge([("a", 0, ex)], outs, tok, cfg, [False])
        assert len(cands) == 1
    with pytest.raises(UserError, match="target language 'yes' is not supported"):
        _judge([("a", 0, ex)], outs, tok, SampleConfig(filters=FilterConfig(language="target")), [False])


def test_comparison_table_averages_the_seeds_per_language(tmp_path, monkeypatch):
    """bench/bilingual_mixing.py's table: each cell the mean of the seeds' held-out figure (min-max)."""
    import json
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import bilingual_mixing

    def run(name, mix_zh, pass_en):
        d = tmp_path / name
        d.mkdir()
        for tag, scale in (("before", 0.5), ("after", 1.0)):
            tasks = {"bilingual_arithmetic/zh": {"mixing_rate": mix_zh * scale, "pass@1": 0.25},
                     "bilingual_arithmetic/en": {"mixing_rate": 0.0, "pass@1": pass_en * scale}}
            metrics = {"mean_length": 80.0, "format_rate": 1.0}
            (d / f"eval_{tag}.json").write_text(json.dumps({"bilingual_arithmetic/test": {"tasks": tasks, "metrics": metrics}}))
        return d

    text = bilingual_mixing.table({"zero": [run("a", 0.2, 0.6), run("b", 0.4, 0.8)]})
    before, after = text.splitlines()[2:]
    assert before == "| zero | 2 | before | 0.150 (0.10-0.20) | 0.000 (0.00-0.00) | 0.250 (0.25-0.25) | 0.350 (0.30-0.40) | 80.000 (80.00-80.00) | 1.000 (1.00-1.00) |"
    assert after.split(" | ")[3:7] == ["0.300 (0.20-0.40)", "0.000 (0.00-0.00)", "0.250 (0.25-0.25)", "0.700 (0.60-0.80)"]


def test_pretrain_probe_counts_worked_steps_in_both_languages():
    from ponder.pretrain import STEP_RE

    assert len(STEP_RE.findall(MIXED)) == 2 and len(STEP_RE.findall(EN)) == 2 and len(STEP_RE.findall(NO_WORDS)) == 1
    assert STEP_RE.findall("四十二加七十三减二十七") == []  # a prompt's chain is not a step


def test_dollar_amounts_are_no_inline_math():
    """`$5, ... $3` read as one inline-math span: the words between two amounts vanished from the count (a mixed chain
    scored as all English). 2 Latin words and 7 Han characters here."""
    chain = "<think> Tom has $5, 然后他又得到了 $3. </think> <answer> 8 </answer>"
    lang = get_reward("language")
    assert lang([chain] * 2, prompts=["p"] * 2, target=["en", "zh"]) == [2 / 9, 7 / 9]
    assert is_mixed(chain)
    assert lang(["<think> so $x + y$ is 5 </think>"], prompts=["p"], target="en") == [1.0]  # (so, is; x + y is math)


def test_reflection_words_count_in_running_chinese_text_and_whole_words_elsewhere():
    """The pattern asked for \\b around each word: between two Han characters regex sees no boundary (both are word
    characters), so `等等` in `我算错了等等重新算` went uncounted and only words set off by punctuation counted."""
    from ponder.metrics import reflection_rate

    words = ["wait", "等等", "检查", "check"]
    counted = ["我算错了等等重新算", "让我检查一下", "，等等，不对", "我wait了", "Wait. 3 + 4 = 7", "(check)"]
    not_counted = ["checkpoint", "awaiting", "rechecked", "check_it", "check2", "等一下"]
    assert [reflection_rate([t], words) for t in counted] == [1.0] * len(counted)
    assert [reflection_rate([t], words) for t in not_counted] == [0.0] * len(not_counted)
