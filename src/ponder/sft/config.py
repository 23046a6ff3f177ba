"""The typed recipe of `ponder sft`. Shares the model, optimizer and evaluation sections with GRPO recipes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from ponder.config import EvalConfig, ModelConfig, OptimConfig, TaskSpec
from ponder.errors import UserError


@dataclass
class SFTData:
    files: list[str] = field(default_factory=list)  # JSONL: {prompt, completion} or {messages: [...]} rows
    # Built-in cold-start traces: worked think/answer solutions to problems of these tasks (ponder.sft.coldstart).
    coldstart: list[TaskSpec] = field(default_factory=list)
    template: str = "r1_zero"  # applied to prompts exactly as GRPO applies it (ponder.templates)
    max_len: Optional[int] = None  # tokens per example (prompt + completion); None: the model's context
    add_eos: bool = True  # {prompt, completion} rows end with EOS, so the model learns to stop
    n: Optional[int] = None  # use only the first n rows (after files, then cold-start traces)


@dataclass
class SFTTrain:
    steps: Optional[int] = None  # optimizer steps; None: as many as `epochs` passes over the data take
    epochs: float = 1.0
    batch_size: int = 16  # examples per optimizer step (the loss is the token mean over all of them)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "mixed", "bf16"] = "auto"  # as GRPO's train.precision (ponder.runtime)
    # packed: ponder's own pass over one stream of examples (ponder.rl.packed: varlen attention, no padding, one
    # run of a prompt its examples share); padded: the model's forward over rows of examples packed end to end and
    # padded to the widest; auto: packed for the architectures it supports, where the model asks for no dropout
    forward: Literal["auto", "packed", "padded"] = "auto"
    save_every: int = 50
    keep_last: int = 2
    log_samples: int = 2  # greedy completions of the first training prompts written to samples.jsonl at each save
    sample_max_new_tokens: int = 128
    max_nan_steps: int = 5
    threads: int = 0  # CPU threads for torch (0: torch's default)
    log_to: list[str] = field(default_factory=lambda: ["tensorboard"])  # tensorboard, wandb, mlflow (ponder.metrics)


@dataclass
class SFTConfig:
    name: str = "sft"
    output_dir: str = "runs"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: SFTData = field(default_factory=SFTData)
    optim: OptimConfig = field(default_factory=OptimConfig)  # recipes set lr and schedule (SFT: ~1e-4, cosine)
    train: SFTTrain = field(default_factory=SFTTrain)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def check(cfg: SFTConfig) -> None:
    if not cfg.data.files and not cfg.data.coldstart:
        raise UserError("config data.files is empty; give JSONL files of {prompt, completion} rows (or data.coldstart tasks)")
    t = cfg.train
    if t.batch_size < 1:
        raise UserError("config train.batch_size must be at least 1")
    if t.steps is not None and t.steps < 1:
        raise UserError("config train.steps must be at least 1 (or leave it out and set train.epochs)")
    if t.steps is None and t.epochs <= 0:
        raise UserError("config train.epochs must be positive")
    if cfg.data.max_len is not None and cfg.data.max_len < 2:
        raise UserError("config data.max_len must be at least 2 tokens")
    from ponder.config import check_lora, check_optim, check_sampling, check_tasks, need, need_seed, need_threads

    need_seed(cfg.seed)
    check_tasks("data.coldstart", cfg.data.coldstart)
    check_tasks("eval.tasks", cfg.eval.tasks, unique=True)
    e = cfg.eval  # GRPO's section, checked as GRPO checks it: an unchecked min_p >= 1 cut every token away
    check_sampling("eval.", e.temperature, e.top_p, e.max_new_tokens, e.k, top_k=e.top_k, min_p=e.min_p)
    check_lora(cfg.model)
    if cfg.eval.every:  # the section is GRPO's: SFT evaluates before and after only
        raise UserError(f"config eval.every={cfg.eval.every}: ponder sft evaluates before and after training only; leave it "
                        "out (or evaluate a checkpoint with ponder eval)")
    need(t.save_every >= 0, "train.save_every", t.save_every, "0 (only at the end) or more")
    need(t.keep_last >= 0, "train.keep_last", t.keep_last, "0 (keep every checkpoint) or more")
    need_threads(t.threads, "train.threads")
    need(t.log_samples >= 0, "train.log_samples", t.log_samples, "0 (none) or more")
    need(t.sample_max_new_tokens >= 1, "train.sample_max_new_tokens", t.sample_max_new_tokens, "at least 1")
    need(t.max_nan_steps >= 1, "train.max_nan_steps", t.max_nan_steps, "at least 1 (steps in a row skipped before the run stops)")
    need(cfg.data.n is None or cfg.data.n >= 1, "data.n", cfg.data.n, "at least 1, or null (every row)")
    check_optim(cfg.optim)
    from ponder.metrics import check_log_to

    check_log_to(t.log_to)


def load_sft_config(path, overrides=()) -> SFTConfig:
    from ponder.config import load_config

    cfg = load_config(path, list(overrides), cls=SFTConfig)
    check(cfg)
    return cfg
