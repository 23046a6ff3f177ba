"""R1-Zero from the shipped tiny-base: a short GRPO run on CPU must raise held-out accuracy."""

import json

from ponder.config import load_config
from ponder.train import train


def test_short_grpo_run_from_tiny_base_raises_accuracy(tmp_path):
    cfg = load_config("recipes/zero-tiny.yaml", [
        f"output_dir={tmp_path}", "name=zero", "train.steps=15", "train.save_every=0", "optim.lr=3e-4",
        "data.tasks=[{name: arithmetic, split: train, options: {difficulty: hard}}]",
        "eval.tasks=[{name: arithmetic, split: test, n: 48, options: {difficulty: hard}}]",
    ])
    train(cfg)
    before = json.loads((cfg.run_dir / "eval_before.json").read_text())["arithmetic/test"]["metrics"]
    after = json.loads((cfg.run_dir / "eval_after.json").read_text())["arithmetic/test"]["metrics"]
    # a short run on hard chains only; the README's figures come from 80 steps on the whole mix
    assert before["pass@1"] < 0.4
    assert after["pass@1"] > before["pass@1"] + 0.25, (before["pass@1"], after["pass@1"])
    assert after["format_rate"] >= 0.9
    assert after["mean_length"] > before["mean_length"]
    assert (cfg.run_dir / "report.html").is_file()
