"""`ponder eval` and a training run's own evaluation give the same figures for the same model and settings.

The trainer evaluates each `eval.tasks` entry with its own engine (`rollout.engine`, generation batch
`rollout.generation_batch`), its stop strings, budget and extraction, seed `seed`; `ponder eval` with
the matching flags and its default engine must sample the very same answers on CPU, so a figure read in
a run's eval_after.json can be checked (or extended to more samples) with `ponder eval` on its checkpoint.
"""

import argparse
import json

import pytest


def ponder_eval(*argv):
    from ponder.evaluate import add_parser

    parser = argparse.ArgumentParser(prog="ponder")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", *argv])
    return args.func(args)


@pytest.mark.parametrize("stop, batch", [(["</answer>"], 16), ([], 256)], ids=["stop-batch16", "nostop-batch256"])
def test_eval_command_gives_the_trainers_figures(tmp_path, capsys, stop, batch):
    from ponder import train
    from ponder.config import load_config
    from ponder.rl.trainer import GRPOTrainer

    cfg = load_config("recipes/zero-tiny.yaml", [
        f"output_dir={tmp_path}", "name=run", "model.path=tiny-base", "rollout.engine=fast", "rollout.max_new_tokens=96",
        f"rollout.generation_batch={batch}", f"rollout.stop={json.dumps(stop)}", "train.threads=0",
        "eval.tasks=[{name: arithmetic, split: test, n: 6, options: {difficulty: medium}}, {name: countdown, split: test, n: 6, options: {difficulty: medium}}]", "eval.k=4",
    ])
    trainer = GRPOTrainer(cfg)
    mine = train._evaluate(trainer, "x", quiet=True)
    theirs = [json.loads(line) for line in (trainer.run_dir / "eval_x_samples.jsonl").read_text().splitlines()]

    out = tmp_path / "eval"
    ponder_eval("--model", "tiny-base", "--tasks", "arithmetic,countdown", "--n", "6", "--option", "difficulty=medium", "--k", "4", "--max-tokens", "96",
                "--temperature", "0.6", "--top-p", "0.95", "--template", "r1_zero", "--extract", "tags_or_boxed",
                "--seed", "0", "--data-seed", "0", "--batch-size", str(batch), "--stop", *stop,
                "--device", "cpu", "--quiet", "--out", str(out))  # the engine: the command's default
    res = json.loads((out / "results.json").read_text())
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]

    for task in ("arithmetic", "countdown"):
        assert res["tasks"][task] == mine[f"{task}/test"]["metrics"], task  # exact, not approximately
        assert res["settings"] == mine[f"{task}/test"]["settings"]
    assert [r["completion"] for r in rows] == [r["completion"] for r in theirs]  # the same answers, one by one
    assert res["settings"]["engine"] == "fast" and res["settings"]["stop"] == stop
    assert res["settings"]["batch_size"] == min(batch, 256)
    assert all(0 < mine[f"{task}/test"]["metrics"]["pass@1"] < 1 for task in ("arithmetic", "countdown"))  # figures that tell answers apart
