"""The SFT trainer: packed batches of examples, token-mean cross-entropy on completions, AdamW.

Simplifications, stated up front:
- One process; the run directory, checkpoints and resume work as in the GRPO trainer (ponder.rl.trainer).
- The loss of a step is the mean over all its target tokens, whatever the packing and micro-batching,
  so the gradient does not depend on `optim.token_budget`.
- Examples are drawn by a seeded permutation per epoch (ponder.tasks.PromptSampler over indices).
"""

from __future__ import annotations

import math
import time

import torch

from ponder import checkpoint, distributed, models, stopping
from ponder.config import to_dict
from ponder.errors import TrainingError, UserError
from ponder.evaluation.runner import task_hash
from ponder.files import make_dir, write_atomic
from ponder.metrics import MetricsWriter
from ponder.optim import make_optimizer
from ponder.rl import memory_plan
from ponder.rl.forward import PolicyPass, use_packed
from ponder.rollout.fast import RolloutCopy
from ponder.runtime import PrecisionChooser, autocast, dump_yaml, pick_device, set_seed, set_threads
from ponder.sft.config import SFTConfig
from ponder.sft.data import load_data, read_data
from ponder.sft.packing import (
    Packed, as_sample, collate, keeps_rows_apart, loss_sum, micro_batches, pack, stream_loss_sum, stream_tokens,
)
from ponder.tasks import PromptSampler


def sft_fixes(precision: str, lora: bool) -> str:
    """What a run whose state leaves no room for activations can do: `ponder sft` runs one process, so no sharding
    or offload to reach for; only the ways this run has not taken yet (an H100 run in bf16 was told to use bf16)."""
    ways = ([] if lora else [memory_plan.LORA_WAY]) + \
        ([] if precision == "bf16" else ["use bf16 weights (train.precision=bf16)"])
    return ", or ".join(ways + ["use a device with more memory"])


class SFTTrainer:
    def __init__(self, cfg: SFTConfig, resume: bool = False, allow_changes: bool = False):
        world = distributed.launched()
        if world > 1:  # each rank would train on every example and write the same files
            raise UserError(f"ponder sft runs one process, and torchrun started {world}; start it without torchrun "
                            "(GRPO's `ponder train` is the command that runs sharded)")
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        self.ckpt_dir = self.run_dir / "checkpoints"
        final = self.run_dir / "final"  # the link save() keeps: a folder there stopped the run after all its training
        if final.exists() and not final.is_symlink():  # (and a file there was replaced unsaid)
            raise UserError(f"{final} is a {'folder' if final.is_dir() else 'file'}, where ponder sft keeps a link to the "
                            "newest checkpoint; move it elsewhere, or choose another name (name=...)")
        last = checkpoint.resume_point(self.run_dir, resume)
        if cfg.train.threads:
            set_threads(cfg.train.threads)
        set_seed(cfg.seed)
        self.device = pick_device(cfg.train.device)
        self.state = checkpoint.load_state(last) if resume else None
        rows, checked_with = read_data(cfg, cfg.seed)  # before the model: a mistake in the data is one line, told at once
        self.data_hash = task_hash(rows)
        saved = (self.state or {}).get("data")
        # (a checkpoint of before 2026-12-07 holds a bare hex digest of another JSON dump: no comparison)
        if str(saved).startswith("sha256:") and saved != self.data_hash and not allow_changes:
            # the sampler's place in its epochs counts examples of the data the run began with
            raise UserError(f"--resume: the rows of data.files / data.coldstart differ from those the run in {self.run_dir} "
                            "trained on; pass --allow-changes to continue on the new rows, or start a new run (name=...)")
        chooser = PrecisionChooser(cfg.train.precision, self.device, cfg.model.lora is not None, resumed=last)
        same_source = last is None or cfg.model.lora is not None  # else the checkpoint's own tokenizer loads with it
        self.model, self.tokenizer = models.load_trainable(cfg.model, last, self.state, cfg.seed, self.device, chooser,
                                                           tokenizer=checked_with if same_source else None)
        self.precision = chooser.chosen
        self.rows, self.examples, self.report = load_data(cfg, self.tokenizer, self.model, rows)
        self.lengths = [len(e.ids) for e in self.examples]
        packed = self._packed()
        # under mixed precision the packed pass's linear layers compute from bf16 copies of the float32 matrices,
        # refreshed after each optimizer step, and add their weight gradients into the float32 .grad in the product
        # (ponder.rl.copy_linear), where autocast cast every matrix in each micro-batch's forward and backward. LoRA
        # needs none: its frozen base is narrowed already
        self.copy = (RolloutCopy(self.model, torch.bfloat16)
                     if packed and self.precision.autocast and cfg.model.lora is None else None)
        self.policy_pass = PolicyPass(packed, self.tokenizer.pad_token_id, self.device, self.precision.autocast,
                                      copies=self.copy.current if self.copy is not None else None)
        # the model's own forward (padded pass): several examples a row where it keeps them apart, else one a row
        self.rows_apart = packed or keeps_rows_apart(self.model)
        self.total_steps = self._planned_steps()
        self.optimizer, self.scheduler = make_optimizer(self.model, cfg.optim, self.total_steps, self.precision.moments)
        self.sampler = PromptSampler(list(range(len(self.examples))), cfg.seed)
        self.step_no, self.nan_streak, self._budget = 0, 0, None
        if self.state is not None:
            checkpoint.restore_training(self, self.state, last)
        make_dir(self.run_dir, "output_dir/name")
        if self.step_no < self.total_steps:  # an earlier end's final figures (a resume with more steps or epochs): a
            (self.run_dir / "eval_after.json").unlink(missing_ok=True)  # stop in this end's evaluation would log them
        checkpoint.remove_unfinished(self.ckpt_dir)
        write_atomic(self.run_dir / "config.yaml", dump_yaml(to_dict(cfg)))
        self.metrics = MetricsWriter(self.run_dir, resume_step=self.step_no if resume else 0,
                                     log_to=cfg.train.log_to, config=to_dict(cfg))

    def _planned_steps(self) -> int:
        """train.steps, or the steps that train.epochs passes over the data take: those done, then the examples left
        in batches. Counted from the start, a resume with more epochs came up short: each epoch that ended in a
        short batch (10 examples in batches of 4: 4, 4, 2) spent a whole step on it, which ceil(epochs x 10 / 4)
        does not count (2 epochs: 5 steps, where 3 + 3 take the 20 examples)."""
        t = self.cfg.train
        if t.steps:
            return t.steps
        done, position = (self.state["step"], self.state["sampler_position"]) if self.state else (0, 0)
        left = max(0, math.ceil(t.epochs * len(self.examples)) - position)  # as step() draws them
        return max(1, done + math.ceil(left / t.batch_size))

    # ---------------------------------------------------------------- one optimizer step
    def step(self) -> dict:
        t0 = time.perf_counter()
        t = self.cfg.train
        want = min(t.batch_size, len(self.examples))  # (a larger batch took every example many times: 2**40, for hours)
        if t.steps is None:  # epochs set the length: the last step takes what is left, so no example comes twice early
            want = max(1, min(want, math.ceil(t.epochs * len(self.examples)) - self.sampler.position))
        batch = self.sampler.next(want)
        budget = self.token_budget()
        if self.policy_pass.packed:
            chunks = self.policy_pass.micro_batches([as_sample(self.examples[i]) for i in batch], budget)
            n_rows = len(batch)
        else:
            # rows no wider than the longest example: the plan costs a token at that width, and a wider row would
            # pay the [row x row] mask and attention for no less padding
            capacity = min(self.report.max_len, budget, max(self.lengths)) if self.rows_apart else 0
            rows = [[batch[j] for j in row] for row in pack([self.lengths[i] for i in batch], capacity)]
            chunks = micro_batches(rows, self.lengths, budget)
            n_rows = len(rows)
        targets = sum(sum(self.examples[i].mask) for i in batch)
        self.optimizer.zero_grad(set_to_none=True)
        total, computed, padding = 0.0, 0, 0
        for mb in chunks:
            loss, n, pad = self._loss_sum(mb)
            loss = loss / targets
            loss.backward()
            total += loss.item()
            computed, padding = computed + n, padding + pad
        grad_clip = self.cfg.optim.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
        skipped = not (math.isfinite(total) and torch.isfinite(grad_norm))
        if skipped:  # as in GRPO: skip the update, stop after a streak
            self.optimizer.zero_grad(set_to_none=True)
            self.nan_streak += 1
            if self.nan_streak >= self.cfg.train.max_nan_steps:
                raise TrainingError(f"{self.nan_streak} non-finite losses in a row at step {self.step_no + 1}; lower optim.lr. The last good checkpoint is in {self.ckpt_dir}")
        else:
            self.optimizer.step()
            self.nan_streak = 0
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.step_no += 1
        elapsed = time.perf_counter() - t0
        tokens = sum(self.lengths[i] for i in batch)
        return {
            "loss": total, "grad_norm": grad_norm.item() if not skipped else float("nan"), "skipped_updates": float(skipped),
            "lr": lr, "epoch": self.sampler.position / len(self.examples), "examples": len(batch), "rows": n_rows,
            "micro_batches": len(chunks), "tokens": tokens, "target_tokens": targets, "pack_efficiency": 1 - padding / max(computed, 1),
            "time/step": elapsed, "tokens_per_s": tokens / max(elapsed, 1e-9), "token_budget": budget,
        }

    def _packed(self) -> bool:
        """train.forward, where auto takes the packed pass if it supports the model and the model asks for no
        dropout: GRPO turns dropout off (ponder.models.disable_dropout), SFT trains with what the config asks, and
        the packed pass runs none."""
        forward, packed = self.cfg.train.forward, use_packed(self.cfg.train.forward, self.model)
        dropout = sorted({attr for _, attr in models.dropout_sites(self.model)})
        if packed and dropout and forward == "packed":
            raise UserError(f"train.forward: packed runs no dropout, and this model asks for some ({', '.join(dropout)} "
                            "above 0); use train.forward: auto or padded (the model's own forward)")
        return packed and not dropout

    def _loss_sum(self, mb) -> tuple[torch.Tensor, int, int]:
        """The micro-batch's summed loss, the tokens its pass ran and how many of them were padding (the packed pass
        runs none: each distinct prompt once, each completion but its last token)."""
        if self.policy_pass.packed:
            return stream_loss_sum(self.policy_pass, self.model, mb), stream_tokens(mb), 0
        packed = collate(self.examples, mb, self.tokenizer.pad_token_id, self.device)
        with autocast(self.device, self.precision.autocast):
            real = sum(self.lengths[i] for row in mb for i in row)
            return loss_sum(self.model, packed), packed.input_ids.numel(), packed.input_ids.numel() - real

    def token_budget(self) -> int:
        """optim.token_budget, or (unset) the plan from free device memory (ponder.rl.memory_plan), made at the first
        step and printed: tokens a micro-batch (the packed pass's stream, or rows x the widest row), with activation
        checkpointing turned on where the longest example would not fit otherwise (model.gradient_checkpointing:
        auto). Without a device memory to read (CPU), the plan's fixed budget."""
        if self._budget is None:
            self._budget = self.cfg.optim.token_budget
            if self._budget is None:
                auto = self.cfg.model.gradient_checkpointing == "auto"
                vocab = self.model.get_output_embeddings().weight.shape[0]
                probe = (memory_plan.policy_probe(self.policy_pass, self.model, self.device, vocab)
                         if self.policy_pass.packed else self._probe)
                fixes = sft_fixes(self.precision.name, self.cfg.model.lora is not None)
                self._budget = memory_plan.plan_with(probe, self.model, self.optimizer, self.device,
                                                     longest=max(self.lengths), may_checkpoint=auto, fixes=fixes,
                                                     shorter="cut the examples (data.max_len)").budget
        return self._budget

    def _probe(self, tokens: int, row: int) -> tuple[int, int, int]:
        """The memory plan's probe under `train.forward: padded` (the packed pass has GRPO's): an SFT pass (forward,
        backward) over rows of `row` random tokens, about `tokens` in all. Each row packs two examples, as the steps'
        rows do (transformers then builds the block-diagonal mask they pay for), whose last three quarters are scored.
        Returns (bytes at its peak, tokens, row)."""
        rows, half = max(tokens // row, 1), row // 2
        g = torch.Generator().manual_seed(tokens + row)
        vocab = self.model.get_output_embeddings().weight.shape[0]
        pos = torch.cat((torch.arange(half), torch.arange(row - half))).expand(rows, row)
        mask = (pos >= half // 4).long()
        batch = Packed(torch.randint(0, vocab, (rows, row), generator=g).to(self.device), pos.to(self.device),
                       mask.to(self.device))

        def step():
            with autocast(self.device, self.precision.autocast):
                loss = loss_sum(self.model, batch)
            loss.backward()

        return memory_plan.peak_of(step, self.model, self.device), rows * row, row

    # ---------------------------------------------------------------- samples, checkpoints
    def sample_rows(self, k: int) -> list[dict]:
        """Greedy completions of the first `k` training prompts: what the model has learned to write."""
        from ponder.rollout import SamplingParams, decode_text, engine_keys, make_engine

        if k <= 0:
            return []
        # fast falls back to hf for architectures it does not support; the engine lives for this call only
        engine = make_engine("fast", self.model, self.tokenizer, keep_cache=False)
        prompts = [self.examples[i].ids[: self.examples[i].prompt_len] for i in range(min(k, len(self.examples)))]
        with torch.random.fork_rng(devices=[]):
            with engine_keys("train.sample_max_new_tokens", "train.log_samples"):
                outs = engine.generate(prompts, SamplingParams(n=1, temperature=0.0, max_tokens=self.cfg.train.sample_max_new_tokens))
        rows = []
        for i, out in enumerate(outs):
            ex = self.examples[i]
            rows.append({
                "prompt": self.tokenizer.decode(prompts[i], skip_special_tokens=True),
                "completion": decode_text(self.tokenizer, out[0].token_ids),
                "reference": decode_text(self.tokenizer, [t for t, m in zip(ex.ids, ex.mask) if m]),
            })
        return rows

    @stopping.whole()  # a SIGTERM meanwhile waits for the checkpoint (and what points at it) to be whole
    def save(self) -> None:
        state = checkpoint.training_state(self)
        path = checkpoint.save(self.ckpt_dir, self.step_no, self.model, self.tokenizer, state, self.cfg.train.keep_last)
        final = self.run_dir / "final"  # the newest weights, for recipes that continue from this run
        tmp = self.run_dir / ".final-link"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(path.relative_to(self.run_dir))
        tmp.replace(final)

