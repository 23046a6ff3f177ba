"""Guardrails (ponder.rl.guardrails): each failure provoked on the tiny random model by an injected fault makes
its guardrail fire within a few steps, with its message and its action; a healthy run with every detector
live fires none. Runs of two prompts a step (16 completions), a baseline of three steps."""

import statistics

import pytest
import torch

from ponder.rewards import register
from ponder.rl.trainer import GRPOTrainer

register("test_length")(lambda completions, completion_length, **_: [n / 4 for n in completion_length])

SMALL = ["rollout.prompts_per_step=2", "train.save_every=0", "guardrails.baseline_steps=3", "guardrails.window=3"]
# most characters end a completion, so a random model's answers are rarely cut at max_new_tokens (4)
STOPS = "rollout.stop=[" + ",".join(map(repr, "abcdefghijklmnopqrstuvwxyz0123456789")) + "]"


def _steps(t, n, before=None) -> list[dict]:
    rows = []
    for _ in range(n):
        if before:
            before(t)
        rows.append(t.step())
    return rows


def _fired(rows) -> list[tuple[int, str]]:
    return [(e["step"], e["guardrail"]) for r in rows for e in r.get("guardrail_events", [])]


def _event(rows, name) -> dict:
    return next(e for r in rows for e in r.get("guardrail_events", []) if e["guardrail"] == name)


def test_a_healthy_run_with_every_detector_live_fires_none(smoke_cfg, capsys):
    # a KL term, two passes per batch (clipping), stop strings (truncation varies), accuracy beside another reward
    t = GRPOTrainer(smoke_cfg("name=healthy", *SMALL, "algorithm.beta=0.04", "algorithm.mu=2", STOPS,
                              "rewards={accuracy: {weight: 1.0, extract: none}, test_char_hash: 1.0}"))
    rows = _steps(t, 10)
    assert _fired(rows) == [] and t.guardrails.stop_reason is None
    assert capsys.readouterr().err == ""
    # the figures the detectors read were there and moving
    assert all(r["kl"] > 0 and r["entropy"] > 4 for r in rows[1:])
    assert sum(r["clip_low_frac"] + r["clip_high_frac"] for r in rows) > 0
    assert 0 < max(r["truncated_frac"] for r in rows) and sum(r["truncated_frac"] for r in rows) / 10 < 0.5
    assert t.guardrails.history.baseline("reward/test_char_hash") > 0


def test_a_learning_rate_that_collapses_entropy_lowers_the_rate(smoke_cfg, capsys):
    t = GRPOTrainer(smoke_cfg("name=collapse", *SMALL, "optim.lr=0.05", "rewards={test_share_of_sevens: 1.0}",
                              "guardrails.entropy_collapse.action=lower_lr"))
    used = []  # the rate each update ran with
    rows = _steps(t, 7, before=lambda t: used.append(t.optimizer.param_groups[0]["lr"]))
    base = statistics.median(r["entropy"] for r in rows[:3])
    first = next(i for i, r in enumerate(rows) if i >= 3 and r["entropy"] < 0.1 * base) + 1
    assert first <= 6 and _fired(rows) == [(first, "entropy_collapse")]  # once, though entropy stays low
    v = rows[first - 1]["entropy"]
    message = (f"guardrail entropy_collapse at step {first}: entropy {v:.4g} < {0.1 * base:.4g} "
               f"(0.1 x its early median {base:.4g}); lr 0.05 -> 0.025")
    assert _event(rows, "entropy_collapse")["message"] == message
    assert capsys.readouterr().err == f"ponder: {message}\n"
    assert rows[first - 1]["guardrail/entropy_collapse"] == 1.0
    assert used == [0.05] * first + [0.025] * (7 - first)


def test_a_kl_spike_rolls_back_to_the_last_checkpoint_and_the_run_goes_on(smoke_cfg, capsys):
    from ponder import models

    cfg = smoke_cfg("name=kl", *SMALL, "algorithm.beta=0.04", "algorithm.mu=2", "rewards={test_char_hash: 1.0}")
    t = GRPOTrainer(cfg)
    _steps(t, 4)
    t.save()
    saved = models.load(str(cfg.run_dir / "checkpoints" / "step-4"))[0].state_dict()
    assert any(not torch.equal(p, saved[k]) for k, p in t.model.state_dict().items()) is False

    def blow_up(t):  # one step at a learning rate of 1 (the schedule sets the rate back after it)
        for g in t.optimizer.param_groups:
            g["lr"] = 1.0

    rows = _steps(t, 1, before=blow_up)
    e = _event(rows, "kl_spike")
    # the clipped share spiked too: one rollback, one lower rate
    assert _fired(rows) == [(5, "kl_spike"), (5, "clip_spike")] and rows[0]["kl"] > 100
    assert e["done"] == "restored step-4 (rollback 1 of at most 3); lr 0.003 -> 0.0015"
    assert _event(rows, "clip_spike")["done"] == "rolled back already at this step"
    assert e["message"].startswith(f"guardrail kl_spike at step 5: kl {rows[0]['kl']:.4g} > ")
    assert capsys.readouterr().err == f"ponder: {e['message']}\n"
    # the weights are the checkpoint's, and the run goes on from there at half the rate
    assert all(torch.equal(p, saved[k]) for k, p in t.model.state_dict().items())
    rows = _steps(t, 2)
    assert t.step_no == 7 and [r["lr"] for r in rows] == [0.0015, 0.0015]
    assert all(r["kl"] < 1 for r in rows) and _fired(rows) == []


def test_a_clip_spike_can_stop_the_run_naming_the_figure_and_threshold(smoke_cfg):
    t = GRPOTrainer(smoke_cfg("name=clip", *SMALL, "guardrails.window=4", "optim.lr=1e-3", "algorithm.mu=2",
                              "rewards={test_char_hash: 1.0}", "guardrails.clip_spike.action=stop"))

    def blow_up(t):
        if t.step_no == 4:
            for g in t.optimizer.param_groups:
                g["lr"] = 0.1

    rows = _steps(t, 5, before=blow_up)
    clip = [r["clip_low_frac"] + r["clip_high_frac"] for r in rows]
    median = statistics.median(clip[:4])
    assert 0 < median and clip[4] > 0.05 > 5 * median
    assert _fired(rows) == [(5, "clip_spike")]
    assert t.guardrails.stop_reason == (
        f"guardrail clip_spike at step 5: clip_low_frac + clip_high_frac {clip[4]:.4g} > 0.05 (5 x its recent median "
        f"{median:.4g}, at least 0.05); no checkpoint was written before it; start again, e.g. with a lower optim.lr or "
        "fewer passes (algorithm.mu)")


def test_a_reward_for_length_alone_runs_away_to_the_limit(smoke_cfg):
    t = GRPOTrainer(smoke_cfg("name=length", *SMALL, "optim.lr=0.03", STOPS, "rewards={test_length: 1.0}"))
    rows = _steps(t, 7)
    share = [r["truncated_frac"] for r in rows]
    base = statistics.median(share[:3])
    assert base <= 0.25
    first = next(i for i in range(3, 7) if sum(share[i - 2:i + 1]) / 3 > 0.5) + 1
    assert _fired(rows) == [(first, "length_runaway")]
    e = _event(rows, "length_runaway")
    mean = sum(share[first - 3:first]) / 3
    assert e["message"] == (f"guardrail length_runaway at step {first}: truncated_frac {mean:.4g} > 0.5 (mean of the last 3 "
                            f"steps; the larger of 0.5 and 2 x its early median {base:.3g}); warned")
    assert len(e["example"]) == 4  # a completion cut at max_new_tokens


@pytest.mark.parametrize("digit", [3, 7])
def test_a_reward_that_pays_beside_the_task_is_reported_as_hacked(smoke_cfg, digit):
    # a second reward pays for sevens, and the policy follows it: when the task pays answers starting with 3,
    # accuracy stays at 0 (hacked); when it pays answers starting with 7, accuracy rises with it (not hacked)
    t = GRPOTrainer(smoke_cfg("name=hack", *SMALL, "optim.lr=0.05", f"data.tasks=[{{name: first_digit, n: 256, options: {{digit: {digit}}}}}]",
                              "rewards={accuracy: {weight: 1.0, extract: none}, test_share_of_sevens: 1.0}"))
    rows = _steps(t, 7)
    if digit == 7:
        assert rows[-1]["accuracy"] > 0.5 and rows[-1]["reward/test_share_of_sevens"] > 0.5
        assert "reward_hacking" not in [n for _, n in _fired(rows)]
        return
    e = _event(rows, "reward_hacking")
    sevens = [r["reward/test_share_of_sevens"] for r in rows]
    step = next(i for i in range(3, 7) if sum(sevens[i - 2:i + 1]) / 3 >= statistics.median(sevens[:3]) + 0.3) + 1
    assert step <= 6 and [s for s, n in _fired(rows) if n == "reward_hacking"] == [step]
    assert e["figure"] == "reward/test_share_of_sevens"
    assert e["value"] == pytest.approx(sum(sevens[step - 3:step]) / 3)
    assert e["threshold"] == pytest.approx(statistics.median(sevens[:3]) + 0.3)
    assert all(r["accuracy"] == 0 for r in rows[step - 3:step])
    assert "7" in e["example"] and not e["example"].startswith("3")


def test_completions_repeating_a_line_are_caught(smoke_cfg):
    t = GRPOTrainer(smoke_cfg("name=repeat", *SMALL, "train.steps=6"))
    collect = t.collect

    def loops_from_step_4():
        kept, everything, timing = collect()
        if t.step_no >= 3:
            for g in everything:
                g.texts = ["let me check again\n" * 4] * len(g.texts)
        return kept, everything, timing

    t.collect = loops_from_step_4
    rows = _steps(t, 5)
    assert [r["repeated_line_frac"] for r in rows] == [0, 0, 0, 1, 1]
    assert _fired(rows) == [(4, "repetition")]
    e = _event(rows, "repetition")
    assert e["message"] == ("guardrail repetition at step 4: repeated_line_frac 0.3333 > 0.25 (mean of the last 3 steps; "
                            "the larger of 0.25 and 2 x its early median 0); warned")
    assert e["example"] == "let me check again\n" * 4


def test_answers_paid_without_work_are_caught(smoke_cfg):
    """From step 4 every completion is an answer with an empty think block, and accuracy pays it."""
    t = GRPOTrainer(smoke_cfg("name=unreasoned", *SMALL, "train.steps=6", "data.template=r1_zero"))
    collect = t.collect

    def guesses_from_step_4():
        kept, everything, timing = collect()
        for g in everything:
            n = len(g.texts)
            if t.step_no >= 3:
                g.texts = ["<think> </think> <answer>7</answer>"] * n
            g.per_fn["accuracy"] = [1.0 if t.step_no >= 3 else 0.0] * n
        return kept, everything, timing

    t.collect = guesses_from_step_4
    rows = _steps(t, 5)
    assert [r["unreasoned_frac"] for r in rows] == [0, 0, 0, 1, 1]
    assert _fired(rows) == [(4, "empty_reasoning")]
    e = _event(rows, "empty_reasoning")
    assert e["message"] == ("guardrail empty_reasoning at step 4: unreasoned_frac 0.3333 > 0.3 (mean of the last 3 steps; "
                            "the larger of 0.3 and 2 x its early median 0); warned")
    assert e["example"] == "<think> </think> <answer>7</answer>"


def _paid_guesses(t, text: str) -> None:
    """From now on every completion of `t`'s rollouts reads `text` and the accuracy reward pays it."""
    collect = t.collect

    def guesses():
        kept, everything, timing = collect()
        for g in everything:
            g.texts, g.per_fn["accuracy"] = [text] * len(g.texts), [1.0] * len(g.texts)
        return kept, everything, timing

    t.collect = guesses


def test_answers_under_a_template_without_a_think_block_are_not_unreasoned(smoke_cfg):
    t = GRPOTrainer(smoke_cfg("name=plain", *SMALL, "train.steps=2"))  # the plain template
    _paid_guesses(t, "<answer>7</answer>")
    assert [r["unreasoned_frac"] for r in _steps(t, 2)] == [0, 0]


def test_answers_under_a_chat_template_that_opens_think_are_judged(smoke_cfg, tmp_path):
    """R1-Distill's chat template opens the think block in the prompt; the trainer judged unreasoned answers only by
    the template's name, so under data.template=chat the guardrail could never fire."""
    from ponder import models

    model, tok = models.load("tiny-base")
    tok.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|><think>\n"
    models.save(model, tok, tmp_path / "distill-like")
    t = GRPOTrainer(smoke_cfg("name=chat", *SMALL, f"model.path={tmp_path / 'distill-like'}", "data.template=chat",
                              "rollout.max_new_tokens=8"))
    _paid_guesses(t, "</think> <answer>7</answer>")
    assert [r["unreasoned_frac"] for r in _steps(t, 2)] == [1, 1]


def test_firings_with_an_example_become_samples_rows():
    from ponder.rl.guardrails import example_rows

    m = {"guardrail_events": [{"guardrail": "repetition", "message": "guardrail repetition at step 4: ...", "example": "a\na"},
                              {"guardrail": "kl_spike", "message": "guardrail kl_spike at step 4: ..."}]}
    assert example_rows(m) == [{"guardrail": "repetition", "message": "guardrail repetition at step 4: ...", "completion": "a\na"}]
    assert example_rows({"loss": 1.0}) == []


def test_a_think_block_with_work_is_reasoned():
    from ponder.rl.guardrails import unreasoned

    assert unreasoned("</think> <answer>7</answer>", 8)
    assert unreasoned("<answer>7</answer>", 8)  # no think block at all
    assert unreasoned("3 + 4 </think><answer>7</answer>", 8)  # 4 characters of work
    assert unreasoned("3 + 4 = 7 so </think><answer>7</answer>", 8)  # 7 non-blank characters
    assert not unreasoned("3 + 4 = 7, so 7 </think><answer>7</answer>", 8)  # 9
    assert not unreasoned("<think>12*3=36, 36-5=31</think> <answer>31</answer>", 8)


def test_guardrail_state_survives_a_resume(smoke_cfg):
    cfg = smoke_cfg("name=resume", *SMALL)
    t = GRPOTrainer(cfg)
    _steps(t, 3)
    t.save()
    again = GRPOTrainer(cfg, resume=True)
    assert again.guardrails.state_dict() == t.guardrails.state_dict()
    assert again.guardrails.history.baseline("entropy") == statistics.median(t.guardrails.history.early["entropy"])


def test_bad_guardrail_options_are_one_line_errors(tmp_path, error_line):
    run = lambda *o: error_line("train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}", *o)  # noqa: E731
    assert run("guardrails.entropy_colapse.action=stop") == (
        "ponder: error: unknown config key 'guardrails.entropy_colapse'; did you mean 'guardrails.entropy_collapse'?")
    assert run("guardrails.kl_spike.action=rolback") == (
        "ponder: error: config guardrails.kl_spike.action: 'rolback' is not one of 'off', 'warn', 'lower_lr', 'rollback', 'stop'")
    assert run("train.max_nan_steps=3") == (
        "ponder: error: unknown config key 'train.max_nan_steps'; did you mean 'guardrails.non_finite.max_nan_steps'?")
    assert run("guardrails.lr_factor=2") == (
        "ponder: error: config guardrails.lr_factor must be between 0 and 1 (the learning rate is multiplied by it)")


def test_a_run_started_before_guardrails_resumes_with_its_nan_limit_moved(tmp_path, capsys):
    import yaml

    from ponder.cli import main

    base = ["train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}", "name=old", "rollout.prompts_per_step=2",
            "train.log_samples=0"]
    assert main(base + ["train.steps=1"]) == 0
    config = tmp_path / "old" / "config.yaml"
    old = yaml.safe_load(config.read_text())
    old.pop("guardrails")
    old["train"]["max_nan_steps"] = 5  # where it was
    config.write_text(yaml.safe_dump(old, sort_keys=False))
    assert main(base + ["train.steps=2", "--resume"]) == 0
    assert yaml.safe_load(config.read_text())["changes"] == [{"key": "train.steps", "old": 1, "new": 2, "from_step": 2}]


def test_the_report_lists_firings_and_marks_them_on_every_curve(tmp_path):
    import json
    import re

    from ponder.report import write_report

    event = {"guardrail": "entropy_collapse", "step": 2, "figure": "entropy", "value": 0.01, "op": "<", "threshold": 0.4,
             "action": "warn", "done": "warned", "message": "guardrail entropy_collapse at step 2: entropy 0.01 < 0.4 (...); warned",
             "example": "<b>7777</b>"}
    pages = {}
    for marked in (False, True):
        run = tmp_path / str(marked)
        run.mkdir()
        rows = [{"step": s, "entropy": 4.0 / s, "reward": 0.1 * s} for s in (1, 2, 3)]
        if marked:
            rows[1].update({"guardrail/entropy_collapse": 1.0, "guardrail_events": [event]})
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        pages[marked] = write_report(run).read_text()
    assert "Guardrails fired (1)" in pages[True] and "Guardrails fired" not in pages[False]
    assert "guardrail entropy_collapse at step 2: entropy 0.01 &lt; 0.4 (...); warned" in pages[True]
    assert "&lt;b&gt;7777&lt;/b&gt;" in pages[True]  # the example, escaped
    images = {m: re.findall(r"<img alt='([^']*)' src='([^']*)'", p) for m, p in pages.items()}
    assert [a for a, _ in images[True]] == [a for a, _ in images[False]] == ["reward (total and per reward function)",
                                                                             "entropy (nats per token)"]
    assert all(a != b for (_, a), (_, b) in zip(images[True], images[False]))  # each curve carries the mark


class _Trainer:
    """What Guardrails.check reads and writes of a trainer, without one: a step counter, a rate, no checkpoints."""

    def __init__(self, tmp_path, lr=0.01):
        from types import SimpleNamespace

        self.step_no, self.last_groups, self.nan_streak, self.ckpt_dir = 0, [], 0, tmp_path / "none"
        self.optimizer = SimpleNamespace(param_groups=[{"lr": lr}])
        self.scheduler = SimpleNamespace(base_lrs=[lr])


def _feed(guard, trainer, rows):
    out = []
    for m in rows:
        trainer.step_no += 1
        out.append(guard.check(trainer, m))
    return out


def test_a_kl_that_climbs_from_zero_to_its_level_is_no_spike(tmp_path, capsys):
    """A KL term's first step is 0 (the policy is its reference) and it climbs for a few steps: the median of five
    such steps made the run's normal level a 10x spike, and every short demo run with beta > 0 halved its rate at
    step 6. The spike detectors wait for a full window."""
    from ponder.config import GuardrailsConfig
    from ponder.rl.guardrails import Guardrails

    kl = [0.0, 1e-4, 3e-4, 5e-4, 6e-4] + [0.015, 0.012, 0.017, 0.009, 0.014, 0.011, 0.016]
    t = _Trainer(tmp_path)
    rows = _feed(Guardrails(GuardrailsConfig()), t, [{"kl": v} for v in kl])
    assert _fired(rows) == [] and t.optimizer.param_groups[0]["lr"] == 0.01 and capsys.readouterr().err == ""
    t = _Trainer(tmp_path)  # a real spike past a full window still fires
    rows = _feed(Guardrails(GuardrailsConfig()), t, [{"kl": v} for v in kl[5:] + [0.013] * 5 + [0.5]])
    assert _fired(rows) == [(13, "kl_spike")]


def test_lower_lr_and_rollback_at_one_step_lower_the_rate_once(tmp_path, capsys):
    from ponder.config import build, GuardrailsConfig
    from ponder.rl.guardrails import Guardrails

    cfg = build(GuardrailsConfig, {"baseline_steps": 3, "window": 3, "entropy_collapse": {"action": "lower_lr"}})
    t = _Trainer(tmp_path)
    rows = _feed(Guardrails(cfg), t, [{"entropy": 1.0, "kl": 0.01}] * 3 + [{"entropy": 0.01, "kl": 5.0}])
    assert _fired(rows) == [(4, "entropy_collapse"), (4, "kl_spike")]
    assert t.optimizer.param_groups[0]["lr"] == 0.005 and t.scheduler.base_lrs == [0.005]
    assert _event(rows, "kl_spike")["done"] == ("no checkpoint yet to restore (rollback 1 of at most 3); "
                                                 "lr lowered already at this step")


def test_rollbacks_without_a_checkpoint_count_toward_the_limit(tmp_path):
    """With train.save_every=0 no rollback restores anything: each only halved the rate, without end."""
    from ponder.config import build, GuardrailsConfig
    from ponder.rl.guardrails import Guardrails

    cfg = build(GuardrailsConfig, {"baseline_steps": 3, "window": 3, "max_rollbacks": 2})
    g, t = Guardrails(cfg), _Trainer(tmp_path)
    calm, spike = {"kl": 0.01}, {"kl": 5.0}
    _feed(g, t, [calm] * 3 + [spike] + [calm] * 3 + [spike] + [calm] * 3)
    assert g.rollbacks == 2 and g.stop_reason is None
    _feed(g, t, [spike])
    assert g.stop_reason.startswith("guardrail kl_spike at step 12: ") and "2 rollbacks already" in g.stop_reason


def test_after_a_rollback_a_share_is_not_judged_on_one_step(tmp_path):
    """A rollback forgets the recent figures (they describe weights that are gone); the share guardrails then read
    one step as "the mean of the last 1 steps" and fired on a single noisy batch."""
    from ponder.config import GuardrailsConfig
    from ponder.rl.guardrails import History, length_runaway, StepView

    h = History(5, 10)
    for _ in range(5):
        h.add({"truncated_frac": 0.1})
    h.forget_recent()
    view = StepView({"truncated_frac": 0.55}, [], 0)
    assert length_runaway(GuardrailsConfig().length_runaway, h, view) is None
    for _ in range(4):
        h.add({"truncated_frac": 0.55})
    assert length_runaway(GuardrailsConfig().length_runaway, h, view).describe() == (
        "truncated_frac 0.55 > 0.5 (mean of the last 5 steps; the larger of 0.5 and 2 x its early median 0.1)")


def test_a_warning_says_what_to_try(tmp_path, capsys):
    from ponder.config import GuardrailsConfig
    from ponder.rl.guardrails import Guardrails

    _feed(Guardrails(GuardrailsConfig()), _Trainer(tmp_path), [{"entropy": 1.0}] * 5 + [{"entropy": 0.01}])
    assert capsys.readouterr().err == (
        "ponder: guardrail entropy_collapse at step 6: entropy 0.01 < 0.1 (0.1 x its early median 1); warning only "
        "(guardrails.entropy_collapse.action=warn); if it persists, try a higher algorithm.eps_high (clip-higher), a "
        "higher rollout.temperature, a lower optim.lr or an entropy bonus (algorithm.entropy_coef=0.001)\n")


def test_a_rollback_copies_the_checkpoint_into_the_model_without_a_second_model(tmp_path, monkeypatch):
    """restore read the whole checkpoint into a float32 model on the CPU and copied that: for a bf16 7B policy, 30 GB
    of host memory at the moment a run is in trouble. Now the files go tensor by tensor into the model as it is."""
    from ponder import models

    model, tok = models.load("tiny-random")
    models.save(model, tok, tmp_path / "ckpt")
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    narrow = model.to(torch.bfloat16)
    with torch.no_grad():
        for p in narrow.parameters():
            p.add_(1.0)
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("a second model was loaded"))
    models.load_weights_into(narrow, tmp_path / "ckpt")
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, saved[k].to(torch.bfloat16)) for k, v in narrow.state_dict().items())
    other = tmp_path / "other"
    deeper = type(model)(type(model).config_class(**{**model.config.to_dict(), "num_hidden_layers": model.config.num_hidden_layers + 1}))
    models.save(deeper, tok, other)
    with pytest.raises(Exception, match=r"has no place in the model"):
        models.load_weights_into(narrow, other)
