"""The GRPO trainer: sample G completions per prompt, score them with rules, push toward the better ones.

Simplifications, stated up front (in the manner of nanochat's chat_rl.py):
- One process. Each step owns whole prompt groups, so advantages need no communication (but batch_std's
  one scale); data-parallel ranks each run this same step on their own groups (ponder.distributed), the
  policy sharded across them by FSDP2, which also reduces the gradients (ponder.sharding). Every rank makes
  as many forward and backward passes as the busiest one (padding micro-batches weigh zero).
- The learning-rate schedule counts RL steps (one per batch of rollouts), not optimizer steps.
- Generation and training share one model object. On CUDA the fast engine samples from a bfloat16 copy of
  the float32 weights' matrices, refreshed after every optimizer step (ponder.rollout.fast.RolloutCopy):
  the update keeps float32 precision and no decode step casts a weight. bf16 weights (train.precision=bf16)
  are sampled from as they are. Sharded, the engine decodes from a full copy in that layout, refreshed from
  the shards (ponder.sharding.RolloutWeights).
"""

from __future__ import annotations

import copy
import functools
import heapq
import math
import sys
import time
from dataclasses import dataclass

import torch

from ponder import checkpoint, distributed, models, positions, sharding, stopping
from ponder.config import RunConfig, to_dict
from ponder.errors import UserError
from ponder.evaluation.runner import task_hash
from ponder.files import make_dir, write_atomic
from ponder.metrics import MetricsWriter, mean, reflection_rate
from ponder.optim import make_optimizer
from ponder.rewards import RewardSet
from ponder.rewards.format import strict_format
from ponder.rewards.language import mixing_rate
from ponder.rl import memory_plan
from ponder.rl.advantages import advantages
from ponder.rl.batching import Sample, pad_rows, per_row
from ponder.rl.forward import PolicyPass, use_packed
from ponder.rl.guardrails import Guardrails, paid_without_work, repeats_a_line
from ponder.rl.losses import high_entropy_mask, micro_batch_weights, policy_loss, sequence_token_weights
from ponder.rollout import SamplingParams, completion_texts, engine_keys, make_engine
from ponder.runtime import PrecisionChooser, dump_yaml, keep_freed_memory, pick_device, set_seed, set_threads
from ponder.tasks import PromptSampler, check_prompts, load_examples, mix, prompt_key, tasks_named_by
from ponder.templates import TEMPLATES, encoded_prompt, render, require_chat_template, with_chat_options

# prompts the first memory plan encodes to find the data's longest (tokens per character vary little within a task)
LONGEST_BY_CHARS = 64


@dataclass
class Group:
    """The G completions of one prompt, scored."""

    example: dict
    samples: list[Sample]
    texts: list[str]
    rewards: list[float]
    per_fn: dict[str, list]


class GRPOTrainer:
    def __init__(self, cfg: RunConfig, resume: bool = False, allow_changes: bool = False):
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        self.ckpt_dir = self.run_dir / "checkpoints"
        last = checkpoint.resume_point(self.run_dir, resume)
        set_threads(cfg.train.threads)  # under torchrun, the cores divided among the processes of this machine
        self.rank, self.world = distributed.setup(cfg.train.collective_timeout)
        if cfg.rollout.prompts_per_step % self.world:
            raise UserError(f"rollout.prompts_per_step={cfg.rollout.prompts_per_step} must be divisible by the {self.world} processes")
        set_seed(cfg.seed)  # the same on every rank: identical initial weights
        self.device = pick_device(cfg.train.device)
        if self.device.type == "cpu":
            keep_freed_memory()  # each step reuses the pages of the last, not fresh ones from the system
        if self.device.type == "cuda":
            # one stream other than the default for the whole run: the fast engine captures its graphs on the
            # current stream when it can, so rollouts and updates share one cuBLAS workspace
            torch.cuda.set_stream(torch.cuda.Stream(self.device))
        # the template, the data and the rewards first: a mistake in them is one line before minutes of loading a model
        unchecked = self._load_data(last)
        self.state = checkpoint.load_state(last) if resume else None
        self.data_hash = task_hash(self.examples)
        saved = (self.state or {}).get("data")
        if saved is not None and saved != self.data_hash and not allow_changes:
            # the sampler's place counts prompts of the data the run began with: on other rows it draws other prompts
            raise UserError(f"--resume: the prompts of data.tasks differ from those the run in {self.run_dir} trained "
                            "on (a task file or dataset changed since, or how a weight draws: weight x n examples since "
                            "2026-12-07); pass --allow-changes to continue on the new prompts, or start a new run (name=...)")
        self.sampler = PromptSampler(self.examples, cfg.seed)

        self.sharding = sharding.resolve(cfg.train.sharding, self.world, cfg.train.offload)
        # sharded, each rank holds its share of the weights, gradients and optimizer state: auto counts that share
        shards = self.world if self.sharding != "none" else 1
        chooser = PrecisionChooser(cfg.train.precision, self.device, cfg.model.lora is not None, self.rank == 0, last, shards,
                                   offload=cfg.train.offload)
        loaded = self._data_tokenizer() if self._data_tokenizer.cache_info().currsize else None
        self.model, self.tokenizer = models.load_trainable(cfg.model, last, self.state, cfg.seed, self.device, chooser,
                                                           narrow_frozen=self.sharding == "none", tokenizer=loaded)
        # where the model's config was not at hand before it loaded (a Hub model downloaded just now)
        positions.check_loaded(unchecked, cfg.data.template, self.model, self.tokenizer)
        self.precision = chooser.chosen
        models.disable_dropout(self.model)  # before the reference copy: neither scores with dropout
        self.ref = self._make_reference()
        self.rollout_weights = self._shard() if self.sharding != "none" else None
        self.optimizer, self.scheduler = make_optimizer(self.model, cfg.optim, max(cfg.train.steps, 1), self.precision.moments)
        # rollouts from the policy's own weights, or (sharded) from a full copy refreshed after every update
        self.engine = make_engine(cfg.rollout.engine, self.rollout_weights.model if self.rollout_weights else self.model,
                                  self.tokenizer, **{"batch_size": cfg.rollout.generation_batch, **cfg.rollout.engine_options})
        self.start_notices += rollout_notices(self.engine, cfg.algorithm)  # of the engine built (it may fall back to hf)
        # the engine's idle cache holds the head's logits between rollouts
        # and its bf16 copies of the float32 matrices serve the update's products (ponder.rl.copy_linear)
        self.policy_pass = PolicyPass(use_packed(cfg.train.forward, self.model), self.tokenizer.pad_token_id,
                                      self.device, self.precision.autocast, scratch=self.engine.idle_memory,
                                      copies=self.engine.rollout_matrices, entropy_grad=bool(cfg.algorithm.entropy_coef))
        # id(example) -> (prompt ids, whether its text left a think block open: R1-Distill's chat template)
        self._prompts: dict[int, tuple[list[int], bool]] = {}
        self._past_context = False  # told once that prompt + rollout.max_new_tokens exceed the model's positions
        self.step_no, self.nan_streak, self._budget, self._planned_cache = 0, 0, None, 0
        self._longest_prompt = self._planned_prompt = 0  # tokens: of the prompts encoded so far, and when planned
        self._data_measured = False  # the data's longest prompts encoded for the plan
        self._fresh = False  # whether the weights are still those the step's rollout ran (learn sets it)
        self._temp = cfg.rollout.temperature or 1.0  # greedy rollouts: score under the plain distribution
        self.guardrails = Guardrails(cfg.guardrails, announce=self.rank == 0)
        self._asks_reasoning = "<think>" in TEMPLATES.get(cfg.data.template, cfg.data.template)
        if self.state is not None:
            checkpoint.restore_training(self, self.state, last)
            self.guardrails.load_state_dict(self.state.get("guardrails"))
        self.sync_rollout_weights()
        if self.rank == 0:
            for line in self.start_notices:
                print(line, file=sys.stderr)
            make_dir(self.run_dir, "output_dir/name")
            if not resume:  # the directory of an attempt that saved nothing, started again: its evaluations are not
                for stale in ("eval_before.json", "eval_after.json"):  # this run's (the report showed them)
                    (self.run_dir / stale).unlink(missing_ok=True)
            elif self.step_no < cfg.train.steps:  # an earlier end's final figures: a stop in this end's evaluation
                (self.run_dir / "eval_after.json").unlink(missing_ok=True)  # would log them as this end's on resume
            checkpoint.remove_unfinished(self.ckpt_dir)
            write_atomic(self.run_dir / "config.yaml", dump_yaml(to_dict(cfg)))
        self.metrics = MetricsWriter(self.run_dir, resume_step=self.step_no if resume else 0, enabled=self.rank == 0,
                                     log_to=cfg.train.log_to, config=to_dict(cfg))

    # ---------------------------------------------------------------- the GRPO step, top to bottom
    def step(self) -> dict:
        t0 = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        groups, all_groups, timing = self.collect()  # generate + reward + advantages (+ dynamic sampling)
        self.last_groups = all_groups
        t_train = time.perf_counter()
        stats = self.learn([s for g in groups for s in g.samples])
        # the rate this update used (logged), before the schedule moves on; the optimizer's own, which a guardrail
        # that lowered it set (the scheduler's last rate is stale until its next step)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.step_no += 1
        self._maybe_reset_reference()
        timing["train"] = time.perf_counter() - t_train
        timing["total"] = time.perf_counter() - t0
        m = distributed.mean_metrics(*self._step_metrics(all_groups, stats, timing, lr))
        m = self.guardrails.check(self, m)  # may warn, lower the lr, roll back, or ask the run to stop
        self.sync_rollout_weights()  # after the update (and any rollback): rank 0 may evaluate before the next step
        return m

    def learn(self, samples: list[Sample]) -> list[dict]:
        """`mu` passes over the step's samples, `minibatches` optimizer steps each; their figures."""
        a = self.cfg.algorithm
        # split before masking: every rank makes the same number of updates whatever its mask left it, and a
        # sample's mini-batch does not depend on which others were cut off
        minis = _split(samples, a.minibatches)
        self._fresh = True  # the weights the rollout ran, until the first optimizer step
        if a.mask_truncated:  # DAPO overlong filtering: a cut-off answer is no evidence either way
            minis = [[s for s in mini if not s.truncated] for mini in minis]
        kept = [s for mini in minis for s in mini]
        if a.mu > 1 or a.minibatches > 1:  # later updates need the log-probs of the sampling policy
            self._score([s for s in kept if not self._idle(s)], "old_logp", self.model)
        if a.beta:
            self._score(kept, "ref_logp", self.ref)
        # mu passes over the same rollouts (DeepSeekMath's inner iterations)
        stats = [self.update(mini) for _ in range(a.mu) for mini in minis]
        sharding.reshard(self.model)  # passes without backward (scoring) leave fsdp_noreshard's weights gathered
        return stats

    def update(self, samples: list[Sample]) -> dict:
        """One optimizer step on `samples`, accumulated over micro-batches by token budget."""
        a, o = self.cfg.algorithm, self.cfg.optim
        lengths = [len(s.completion_ids) for s in samples]
        # normalisers over the whole batch, across ranks, so that summed gradients are the batch's gradient
        n_total = distributed.sum_all(len(lengths))
        weights = sequence_token_weights(lengths, a.loss_agg, self.cfg.rollout.max_new_tokens,
                                         n_total=n_total, tokens_total=distributed.sum_all(sum(lengths)))
        for s, w in zip(samples, weights):
            s.weight = w
        # samples with no gradient (zero advantage, train.skip_zero_advantage): counted above, forward only below
        idle = [s for s in samples if self._idle(s)]
        samples = [s for s in samples if not self._idle(s)]
        batches = self.policy_pass.micro_batches(samples, self.token_budget())
        if a.loss_agg == "bnpo":  # the mean over every rank's micro-batches, however many each has
            micro = micro_batch_weights([[len(s.completion_ids) for s in mb] for mb in batches], total=distributed.sum_all(len(batches)))
            for mb, ws in zip(batches, micro):
                for s, w in zip(mb, ws):
                    s.weight = w
        self.optimizer.zero_grad(set_to_none=True)
        names = ("loss", "clip_low", "clip_high", "clip_dual", "kl", "tokens", "entropy", "is_ratio", "is_capped", "is_tokens")
        if not n_total:  # no rank has a sample (all masked): no step, since AdamW would still decay and follow momentum
            return {**dict.fromkeys(names, 0.0), "grad_norm": 0.0, "skipped": 0.0}
        # sums stay on the device until the end: a read per micro-batch would wait for the GPU each time
        totals = {k: torch.zeros((), device=self.device) for k in names}
        self._entropy_only(idle, totals)
        batches, real = sharding.lockstep(batches, self._padding)  # as many passes as the busiest rank
        if not batches:  # every sample idle on every rank: zero gradients all the same, so that AdamW steps as before
            batches = [self._padding()]
        for i, mb in enumerate(batches):
            logp, entropy, mask = self.policy_pass.logprobs(self.model, mb, with_entropy=True, temperature=self._temp)
            weight = mask * per_row([s.weight for s in mb], self.device)[:, None]
            old = self._saved(mb, "old_logp", logp)
            ref = self._saved(mb, "ref_logp", logp) if a.beta else None
            adv = per_row([s.advantage for s in mb], self.device)
            scale = None
            if a.rollout_is_cap is not None:  # TIS: the tokens came from the engine's probabilities, not pi_old's
                is_ratio = torch.exp(old - self._saved(mb, "rollout_logp", logp))
                scale = is_ratio.clamp(max=a.rollout_is_cap)
                live = weight != 0
                totals["is_ratio"] += is_ratio.mul(live).sum()
                totals["is_capped"] += (is_ratio > a.rollout_is_cap).mul(live).sum()
                totals["is_tokens"] += live.sum()
            if a.top_entropy_quantile < 1:  # 80/20: the other tokens carry no policy gradient
                keep = high_entropy_mask(entropy, weight != 0, a.top_entropy_quantile)
                scale = keep if scale is None else scale * keep
            loss, st = policy_loss(logp, old, adv, weight, a.eps_low, a.eps_high, a.beta, ref,
                                   ratio_level=a.ratio, kl_estimator=a.kl_estimator, token_scale=scale,
                                   entropy_coef=a.entropy_coef, entropy=entropy, dual_clip=a.dual_clip)
            sharding.accumulate(self.model, last=i == len(batches) - 1, mode=self.sharding)
            loss.backward()  # sharded: FSDP2 sums the gradients across ranks
            if i < real:
                totals["loss"] += loss.detach()
                totals["entropy"] += (entropy.detach() * mask).sum()  # (with entropy_coef it holds the graph)
                for k in ("clip_low", "clip_high", "clip_dual", "kl", "tokens"):
                    totals[k] += st[k]
        totals = dict(zip(totals, torch.stack(list(totals.values())).tolist()))
        grad_norm = sharding.full_tensor(  # over sharded gradients, a DTensor: its full value, the same on every rank
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), o.grad_clip if o.grad_clip > 0 else float("inf")))
        # every rank must skip alike: one rank's non-finite loss is everyone's
        if not (math.isfinite(distributed.sum_all(totals["loss"])) and torch.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)  # skip the step; weights stay as they were
            self.nan_streak += 1  # a streak is guardrails.non_finite's to act on
            return {**totals, "grad_norm": float("nan"), "skipped": 1.0}
        self.optimizer.step()
        self._fresh = False
        self.nan_streak = 0
        return {**totals, "grad_norm": grad_norm.item(), "skipped": 0.0}

    def _idle(self, s: Sample) -> bool:
        """Whether `s` takes no part in the gradient (train.skip_zero_advantage): advantage exactly 0, no KL or
        entropy term, and a loss whose normalisers do not depend on which samples share a micro-batch (all but bnpo)."""
        return self._skips_idle() and s.advantage == 0

    def _skips_idle(self) -> bool:
        a = self.cfg.algorithm
        return self.cfg.train.skip_zero_advantage and not a.beta and not a.entropy_coef and a.loss_agg != "bnpo"

    @torch.no_grad()
    def _entropy_only(self, samples: list[Sample], totals: dict) -> None:
        """The entropy and token count of samples that take no part in the gradient (train.skip_zero_advantage), so
        that the logged entropy stays the mean over all of the step's tokens. While the weights are the rollout's
        (before the step's first optimizer step), the engine's own entropies of those tokens (the fast engine gives
        them): no forward at all; a forward for the rest."""
        if self._fresh:
            known = [s for s in samples if s.rollout_entropy is not None]
            totals["entropy"] += math.fsum(s.rollout_entropy for s in known)
            totals["tokens"] += sum(len(s.completion_ids) for s in known)
            samples = [s for s in samples if s.rollout_entropy is None]
        batches, real = sharding.lockstep(self.policy_pass.micro_batches(samples, self.token_budget()), self._padding)
        for mb in batches[:real]:
            _, entropy, mask = self.policy_pass.logprobs(self.model, mb, with_entropy=True, temperature=self._temp)
            totals["entropy"] += (entropy * mask).sum()
            totals["tokens"] += mask.sum()
        for mb in batches[real:]:  # other ranks' passes: a sharded forward is a collective
            self.policy_pass.logprobs(self.model, mb, temperature=self._temp)

    def token_budget(self) -> int:
        """optim.token_budget, or (unset) the plan from free device memory, made at the first update (the
        engine's cache exists by then) and the same on every rank (bnpo's normaliser depends on it). Made again
        when the engine's cache has grown since (longer answers): the pool takes memory the plan counted free,
        and the planned micro-batches would no longer fit; and when a prompt longer than any the plan saw has
        come: its samples are the run's longest rows, which the plan costs and checkpoints for. The first plan already
        counts the data's longest prompts (LONGEST_BY_CHARS of them by characters, encoded), so that a prompt whose
        samples cannot fit even checkpointed stops the run at its first update, not hours in; a longer one that the
        estimate missed is planned for when it comes."""
        if self.cfg.optim.token_budget is None and not self._data_measured and memory_plan.reads_memory(self.device):
            self._data_measured = True
            for ex in heapq.nlargest(LONGEST_BY_CHARS, self.examples, key=lambda ex: len(str(ex["prompt"]))):
                self._encode(ex)
        if self._budget is not None and self.cfg.optim.token_budget is None:
            grown = self.engine.cache_bytes() > self._planned_cache or self._longest_prompt > self._planned_prompt
            if distributed.max_all(float(grown)):
                self._budget = None
        if self._budget is None:
            self._budget = self.cfg.optim.token_budget
            self._planned_cache = self.engine.cache_bytes()
            self._planned_prompt = self._longest_prompt = int(distributed.max_all(float(self._longest_prompt)))
            if self._budget is None:
                longest = self._longest_prompt + self.cfg.rollout.max_new_tokens
                p = memory_plan.plan(self.policy_pass, self.model, self.optimizer, self.device,
                                     self.model.get_output_embeddings().weight.shape[0], print_line=self.rank == 0,
                                     longest=longest, may_checkpoint=self.cfg.model.gradient_checkpointing == "auto",
                                     fixes=memory_plan.grpo_fixes(self.cfg.model.lora is not None, self.cfg.train.offload))
                self._budget = int(-distributed.max_all(-p.budget))
        return self._budget

    # ---------------------------------------------------------------- rollouts
    def collect(self):
        """Groups for one step. With dynamic sampling, groups whose answers are all right or all wrong carry no
        signal (_varies): drop them and draw more prompts, at most `max_resample_rounds` extra times."""
        a, want = self.cfg.algorithm, self.cfg.rollout.prompts_per_step // self.world
        kept, everything, timing = [], [], {"generate": 0.0, "reward": 0.0}
        for round_no in range(1 + (a.max_resample_rounds if a.dynamic_sampling else 0)):
            need = int(distributed.max_all(want - len(kept)))  # ranks draw in lockstep: one data position
            if need <= 0:
                break
            examples = self.sampler.next(need * self.world)[self.rank :: self.world][: max(want - len(kept), 0)]
            groups = self.rollout(examples, round_no, timing) if examples else []
            everything += groups
            kept += [g for g in groups if not a.dynamic_sampling or self._varies(g)]
        uniform = not kept
        if uniform:  # no group carried a signal: train on them anyway, with zero advantage (zero gradient)
            kept = everything[-want:]
        kept = kept[:want]
        assign_advantages(kept, a.advantage)  # once the batch is whole: batch_std scales by all of it
        if uniform and a.dynamic_sampling:  # (their totals may differ by a shaping term alone, which group_std would
            for g in kept:  # scale up to full-size advantages: what dynamic sampling drops the groups for)
                for s in g.samples:
                    s.advantage = 0.0
        return kept, everything, timing

    def _varies(self, g: Group) -> bool:
        """Whether dynamic sampling keeps a group: its correctness reward differs within it (DAPO drops the prompts
        answered all right or all wrong). On the total, a shaping term alone (length, format) kept an all-right group,
        whose std-scaled advantages then blew that term up to full size."""
        by = self.cfg.algorithm.dynamic_sampling_by
        names = [by] if by else ["accuracy", "code"]
        # the first that applies to this prompt's task (a math and code mix: accuracy for one, code for the other)
        values = next((g.per_fn[n] for n in names if n in g.per_fn and any(v is not None for v in g.per_fn[n])),
                      g.rewards)
        return len(set(values)) > 1

    def rollout(self, examples: list[dict], round_no: int, timing: dict) -> list[Group]:
        r, G = self.cfg.rollout, self.cfg.rollout.group_size
        t0 = time.perf_counter()
        prompt_ids = [self._encode(ex) for ex in examples]
        self._check_context(max(map(len, prompt_ids), default=0))
        params = SamplingParams(
            n=G, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, min_p=r.min_p, max_tokens=r.max_new_tokens,
            stop=tuple(r.stop), seed=(self.cfg.seed * 1_000_003 + self.step_no * 101 + round_no + 7919 * self.rank) % 2**31,
            entropies=self._skips_idle(),  # the entropy of samples the update then skips, without a forward for it
            logprobs=self.cfg.algorithm.rollout_is_cap is not None,
        )
        with engine_keys("rollout.max_new_tokens", "rollout.group_size, rollout.prompts_per_step"):
            outs = self.engine.generate(prompt_ids, params)
        t1 = time.perf_counter()
        texts = completion_texts(self.tokenizer, outs)
        flat = [t for ts in texts for t in ts]
        columns = {k: [ex.get(k) for ex in examples for _ in range(G)] for k in self.column_names}
        columns["completion_length"] = [len(c.token_ids) for out in outs for c in out]
        columns["truncated"] = [c.finish_reason == "length" for out in outs for c in out]
        columns["think_opened"] = [self._prompts[id(ex)][1] for ex in examples for _ in range(G)]
        prompts = [ex["prompt"] for ex in examples for _ in range(G)]
        totals, per_fn = self.rewards.score(flat, prompts, columns)
        timing["generate"] += t1 - t0
        timing["reward"] += time.perf_counter() - t1
        groups = []
        for i, (ex, out) in enumerate(zip(examples, outs)):
            sl = slice(i * G, (i + 1) * G)
            samples = [Sample(prompt_ids[i], c.token_ids, truncated=c.finish_reason == "length",
                              rollout_entropy=None if c.entropies is None else math.fsum(c.entropies),
                              rollout_logp=None if c.logprobs is None else torch.tensor(c.logprobs)) for c in out]
            groups.append(Group(ex, samples, texts[i], totals[sl], {k: v[sl] for k, v in per_fn.items()}))
        return groups

    def _check_context(self, longest_prompt: int) -> None:
        """One notice when a rollout may run past the positions the model was trained for (SFT cuts examples
        there; GRPO's samples would go on with positions it never saw, or fail for learned position tables)."""
        limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        need = longest_prompt + self.cfg.rollout.max_new_tokens
        if self._past_context or not isinstance(limit, int) or need <= limit:
            return
        self._past_context = True
        if self.rank == 0:
            print(f"ponder: a prompt of {longest_prompt} tokens + rollout.max_new_tokens {self.cfg.rollout.max_new_tokens} "
                  f"= {need} positions, past the model's max_position_embeddings ({limit}); lower "
                  "rollout.max_new_tokens or drop long prompts", file=sys.stderr)

    def _encode(self, ex: dict) -> list[int]:
        key = id(ex)
        if key not in self._prompts:
            self._prompts[key] = encoded_prompt(self.cfg.data.template, ex["prompt"], self.tokenizer)
            self._longest_prompt = max(self._longest_prompt, len(self._prompts[key][0]))
        return self._prompts[key][0]

    def _saved(self, mb: list[Sample], attr: str, logp: torch.Tensor) -> torch.Tensor:
        """The rows' log-probs kept by _score (old_logp, ref_logp), or, where none were kept (mu = 1: the
        sampling policy is the current one; a padding micro-batch), `logp` itself, detached."""
        rows = [getattr(s, attr) for s in mb]
        return pad_rows(rows, logp.shape[1], self.device) if rows[0] is not None else logp.detach()

    def _padding(self) -> list[Sample]:
        """A micro-batch of weight zero: one token after one token, for a rank with fewer micro-batches than
        another (its forward and backward take part in FSDP's gathers and reductions, and add nothing)."""
        pad = self.tokenizer.pad_token_id
        return [Sample([pad], [pad], weight=0.0)]

    @torch.no_grad()
    def _score(self, samples: list[Sample], attr: str, model) -> None:
        batches, _ = sharding.lockstep(self.policy_pass.micro_batches(samples, self.token_budget()), self._padding)
        for mb in batches:
            if model is None:  # LoRA reference: the base weights, adapters switched off
                with self.model.disable_adapter():
                    logp, _, _ = self.policy_pass.logprobs(self.model, mb, temperature=self._temp)
            else:
                logp, _, _ = self.policy_pass.logprobs(model, mb, temperature=self._temp)
            for s, row in zip(mb, logp):
                setattr(s, attr, row[: len(s.completion_ids)].cpu())

    # ---------------------------------------------------------------- metrics
    def _is_metrics(self, stats: list[dict]) -> dict:
        """With algorithm.rollout_is_cap: the mean of pi_old / pi_engine over the updated tokens (1 where the engine
        samples exactly the trainer's distribution), and the share of them capped."""
        n = sum(s.get("is_tokens", 0.0) for s in stats)
        if self.cfg.algorithm.rollout_is_cap is None or not n:
            return {}
        return {"rollout_is/mean": sum(s["is_ratio"] for s in stats) / n,
                "rollout_is/capped_frac": sum(s["is_capped"] for s in stats) / n}

    def _step_metrics(self, groups: list[Group], stats: list[dict], timing: dict, lr: float) -> tuple[dict, dict]:
        """The step's figures on this rank, and what each mean is over (samples, groups, tokens: mean_metrics weighs
        the ranks' figures by them). `lr`: the rate the step's update used."""
        texts = [t for g in groups for t in g.texts]
        lengths = [len(s.completion_ids) for g in groups for s in g.samples]
        n_tokens = sum(s["tokens"] for s in stats)
        # no token measured (mask_truncated removed every completion): no figure, not a 0 the guardrails read as collapse
        per_token = {k: sum(s[k] for s in stats) / n_tokens if n_tokens else float("nan")
                     for k in ("entropy", "kl", "clip_low", "clip_high", "clip_dual")}
        m = {
            "reward": mean([r for g in groups for r in g.rewards]),
            **{f"reward/{k}": mean([v for g in groups for v in g.per_fn[k]]) for k in self.rewards.fns},
            "format_rate": mean([float(strict_format(t, self._prompts[id(g.example)][1])) for g in groups for t in g.texts]),
            "completion_len/mean": mean(lengths), "completion_len/max": max(lengths),
            "truncated_frac": mean([float(s.truncated) for g in groups for s in g.samples]),
            "reflection_rate": reflection_rate(texts, self.cfg.train.reflection_words),
            "mixing_rate": mixing_rate(texts),  # chains with English and Chinese words (R1-Zero's language mixing)
            "repeated_line_frac": mean([float(repeats_a_line(t, self.cfg.guardrails.repetition.min_repeats)) for t in texts]),
            # only where the template asks for a think block, or the prompt opened one (a chat template such as
            # R1-Distill's); a plain prompt's answers have none to leave empty
            "unreasoned_frac": mean([float((self._asks_reasoning or self._prompts[id(g.example)][1])
                                           and paid_without_work(g, j, self.cfg.guardrails.empty_reasoning.min_chars))
                                     for g in groups for j in range(len(g.texts))]),
            "zero_var_groups_frac": mean([float(len(set(g.rewards)) == 1) for g in groups]),
            "groups_generated": len(groups),
            "loss": sum(s["loss"] for s in stats) / len(stats),
            "entropy": per_token["entropy"],
            "kl": per_token["kl"],
            "clip_low_frac": per_token["clip_low"],
            "clip_high_frac": per_token["clip_high"],
            **({"clip_dual_frac": per_token["clip_dual"]} if self.cfg.algorithm.dual_clip is not None else {}),
            **self._is_metrics(stats),
            "grad_norm": mean([s["grad_norm"] for s in stats]),
            "skipped_updates": sum(s["skipped"] for s in stats),
            "lr": lr,
            **{f"time/{k}": v for k, v in timing.items()},
            "tokens_per_s": sum(lengths) / max(timing["generate"], 1e-9),
            "token_budget": self.token_budget(),
        }
        if self.device.type == "cuda":  # the step's peaks: allocated tensors, and what the process holds
            m["memory/peak_allocated_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            m["memory/peak_reserved_gib"] = torch.cuda.max_memory_reserved(self.device) / 2**30
        if "accuracy" in self.rewards.fns:
            m["accuracy"] = m["reward/accuracy"]
        per = {k: len(texts) for k in m if k == "accuracy" or k.startswith("reward") or k in (
            "format_rate", "completion_len/mean", "truncated_frac", "reflection_rate", "mixing_rate", "repeated_line_frac",
            "unreasoned_frac")}
        per |= {"zero_var_groups_frac": len(groups),
                **dict.fromkeys(("entropy", "kl", "clip_low_frac", "clip_high_frac", "clip_dual_frac"), n_tokens),
                **dict.fromkeys(self._is_metrics(stats), sum(s["is_tokens"] for s in stats))}
        tasks = sorted({g.example.get("task", "") for g in groups})
        # a mix: each task's own curves (reflection pays on some only), also where this rank's groups hold one task
        for task in tasks if len(tasks) > 1 or len(self.cfg.data.tasks) > 1 else []:
            mine = [g for g in groups if g.example.get("task", "") == task]
            if "accuracy" in self.rewards.fns:
                m[f"accuracy/{task}"] = mean([v for g in mine for v in g.per_fn["accuracy"]])
            m[f"completion_len/{task}"] = mean([len(s.completion_ids) for g in mine for s in g.samples])
            m[f"reflection_rate/{task}"] = reflection_rate([t for g in mine for t in g.texts], self.cfg.train.reflection_words)
            per |= dict.fromkeys((f"accuracy/{task}", f"completion_len/{task}", f"reflection_rate/{task}"),
                                 sum(len(g.texts) for g in mine))
        langs = sorted({g.example["target"] for g in groups if g.example.get("target") in ("en", "zh")})
        for lang in langs:  # bilingual prompts: mixing and accuracy for each target language
            mine = [g for g in groups if g.example.get("target") == lang]
            m[f"mixing_rate/{lang}"] = mixing_rate([t for g in mine for t in g.texts])
            if "accuracy" in self.rewards.fns:
                m[f"accuracy/{lang}"] = mean([v for g in mine for v in g.per_fn["accuracy"]])
            per |= dict.fromkeys((f"mixing_rate/{lang}", f"accuracy/{lang}"), sum(len(g.texts) for g in mine))
        return m, per

    def sample_rows(self, groups: list[Group], k: int) -> list[dict]:
        """k of the step's completions for samples.jsonl: each prompt's first, then each one's second, and so on."""
        picks = [(g, j) for j in range(max((len(g.texts) for g in groups), default=0)) for g in groups if j < len(g.texts)]
        return [{"prompt": g.example["prompt"], "answer": g.example.get("answer"), "completion": g.texts[j],
                 "reward": g.rewards[j], "rewards": {n: v[j] for n, v in g.per_fn.items()},
                 "completion_length": len(g.samples[j].completion_ids), "truncated": g.samples[j].truncated}
                for g, j in picks[:k]]

    # ---------------------------------------------------------------- set-up and state
    def _drop_long_prompts(self, tokenizer) -> list[str]:
        """data.max_prompt_tokens: the training examples whose prompt under the template has at most that many tokens
        (templates.encoded_prompt, as the rollouts encode it); the notice of those left out."""
        limit, template = self.cfg.data.max_prompt_tokens, self.cfg.data.template
        lengths = [len(encoded_prompt(template, ex["prompt"], tokenizer)[0]) for ex in self.examples]
        kept = [ex for ex, n in zip(self.examples, lengths) if n <= limit]
        if not kept:
            raise UserError(f"data.max_prompt_tokens={limit} leaves no prompt: the shortest has {min(lengths)} tokens under "
                            f"the {template} template; raise it, or unset it")
        dropped, self.examples = len(self.examples) - len(kept), kept
        return [f"ponder: data.max_prompt_tokens={limit}: {dropped} of {len(lengths)} training prompts are longer under the "
                f"{template} template (the longest {max(lengths)} tokens) and are left out"] if dropped else []

    def _load_data(self, last) -> list[tuple] | None:
        """Load the rewards and the examples, and check them with what loads in a moment, before the model (minutes for
        a large one): the template (a name ponder knows; `chat`, a tokenizer with a chat template, which renders one
        prompt of each sequence of roles of the training and eval tasks), every example's columns against the
        rewards' options, and the longest prompts against a learned position table, read from the model's config.
        Keeps the eval tasks' examples (eval_examples) for every evaluation of the run. Returns the prompt sets
        (examples, new tokens, their key) whose positions are left to check once the model has loaded, where its
        config was not at hand; else None."""
        cfg, r, e = self.cfg, self.cfg.rollout, self.cfg.eval
        source = str(last) if last is not None and cfg.model.lora is None else cfg.model.path  # as load_trainable's
        tokenizer = functools.cache(lambda: with_chat_options(models.load_tokenizer(source, cfg.model.trust_remote_code),
                                                              cfg.model.chat_template_kwargs))  # when needed
        self._data_tokenizer = tokenizer  # the model's loading takes it, if it was needed (not loaded twice)
        chat = tokenizer() if cfg.data.template == "chat" else None  # a text template renders without one
        if chat is not None:  # the data's own prompts judge the chat template (check_prompts, below): one made up
            require_chat_template(chat)  # here was refused by templates that need a system turn, which the data has
        else:
            render(cfg.data.template, "1 + 1 = ?")  # a template name ponder knows
        self.rewards = RewardSet(cfg.rewards)
        self.examples = mix(cfg.data.tasks, cfg.seed)
        data_notices = self._drop_long_prompts(tokenizer()) if cfg.data.max_prompt_tokens else []
        if r.prompts_per_step > len(self.examples):  # allowed (a file of a few rows, to try a setup), but said
            data_notices.append(f"ponder: rollout.prompts_per_step={r.prompts_per_step:,} is more than the run's "
                                f"{len(self.examples):,} training prompts (data.tasks, weights applied): each step "
                                "draws some of them more than once")
        # every step passes every column of the data (None where a row has none), not those of its batch: a reward
        # reading a column that one task's rows lack failed at the first batch without them, hours in
        self.column_names = _columns(self.examples)
        self.rewards.check({**dict.fromkeys(self.column_names), **self.examples[0]})
        self.rewards.check_columns(set(self.column_names))
        with tasks_named_by("eval.tasks"):  # a missing file or option is named where it is set
            self.eval_examples = [load_examples(spec, cfg.seed) for spec in e.tasks]  # one list per eval task, kept
        self.start_notices = trained_on(self.examples, self.eval_examples, e.tasks)  # printed once all checks pass
        if r.temperature == 0 or r.top_k == 1:  # allowed (it means greedy), but a run of it learns nothing
            setting = "rollout.temperature=0" if r.temperature == 0 else "rollout.top_k=1"
            self.start_notices.append(f"ponder: {setting} decodes greedily: a prompt's {r.group_size} answers are alike, "
                                      "so every group's rewards are equal and GRPO learns nothing; sample with a "
                                      "temperature above 0 (R1-Zero: 1.0)")
        self.start_notices += ratio_notices(cfg.algorithm) + data_notices
        new_tokens = (e.max_new_tokens, "eval.max_new_tokens") if e.max_new_tokens else (r.max_new_tokens, "rollout.max_new_tokens")
        prompt_sets = [(self.examples, r.max_new_tokens, "rollout.max_new_tokens"),
                       *((examples, *new_tokens) for examples in self.eval_examples)]
        for examples, _, _ in prompt_sets:
            self.start_notices += check_prompts(examples, cfg.data.template, chat)
        return positions.check_before_loading(prompt_sets, cfg.data.template, source, cfg.model.trust_remote_code, tokenizer)

    def _make_reference(self):
        """A frozen reference for the KL term; none at all when beta is 0. With LoRA and no resets the
        reference is the base model itself (adapters switched off), so nothing is copied."""
        a = self.cfg.algorithm
        if not a.beta:
            return None
        if self.cfg.model.lora is not None and not a.ref_reset_every:
            return None  # _score uses model.disable_adapter()
        ref = copy.deepcopy(self.model).eval()  # the policy as loaded: the initial model, or the resumed one
        if self.state is not None:
            if self.state.get("ref") is not None:
                ref.load_state_dict(self.state["ref"])
            else:  # never reset: the reference is the initial model, not the resumed policy
                ref, _ = models.load(self.cfg.model.path, seed=self.cfg.seed, dtype=self.precision.dtype,
                                     trust_remote_code=self.cfg.model.trust_remote_code)
                ref = ref.to(self.device).eval()
        ref.requires_grad_(False)
        return ref

    def _shard(self) -> sharding.RolloutWeights:
        """The policy and the reference sharded (ponder.sharding); the full copy rollouts decode from, made first."""
        if self.world == 1:
            sharding.join_single_process_group(self.device)
        r = self.cfg.rollout  # matrices in the engine's decode dtype: it takes the copy as it is
        rollout = sharding.RolloutWeights(self.model, sharding.rollout_dtype(r.engine, r.engine_options, self.device))
        for model in (self.model, self.ref):
            if model is not None:
                sharding.shard(model, self.sharding, self.device, bf16=self.precision.autocast, offload=self.cfg.train.offload,
                               frozen=model is self.ref)
        return rollout

    def sync_rollout_weights(self) -> None:
        """Sharded: the rollout copy takes the current weights (every rank calls; a gather per parameter)."""
        if self.rollout_weights is not None:
            self.rollout_weights.refresh(self.model, self.device)

    def _maybe_reset_reference(self):
        a = self.cfg.algorithm
        if self.ref is None or not a.ref_reset_every or self.step_no % a.ref_reset_every:
            return
        if a.ref_mix >= 1:
            self.ref.load_state_dict(self.model.state_dict())  # R1: the reference follows the policy every 400 steps
            return
        policy = dict(self.model.named_parameters())
        with torch.no_grad():  # TR-DPO's soft update: a share of the way toward the policy. By parameter, each once:
            for name, r in self.ref.named_parameters():  # a state dict names a tied embedding twice (mixed twice)
                r.lerp_(policy[name].detach().to(r.dtype), a.ref_mix)

    @stopping.whole()  # a SIGTERM meanwhile waits for the checkpoint (and what points at it) to be whole
    def save(self) -> None:
        sharded = self.rollout_weights is not None
        state = checkpoint.training_state(self, optimizer=not sharded)  # sharded: in the DCP directory
        ref = self.ref is not None and self.cfg.algorithm.ref_reset_every
        state["ref"] = (sharding.full_model_state(self.ref) if sharded else self.ref.state_dict()) if ref else None
        state["guardrails"] = self.guardrails.state_dict()
        # a full disk or a directory not writable is one line (checkpoint._writing), on rank 0 alone too
        if sharded:  # every rank writes its shards; rank 0 the Hugging Face directory and the trainer state
            checkpoint.save_sharded(self.ckpt_dir, self.step_no, self.model, self.optimizer, self.tokenizer, state,
                                    self.cfg.train.keep_last)
        elif self.rank == 0:
            checkpoint.save(self.ckpt_dir, self.step_no, self.model, self.tokenizer, state, self.cfg.train.keep_last)
        distributed.barrier()


def assign_advantages(groups: list[Group], mode: str) -> None:
    """Each sample's advantage, from its group's rewards (ponder.rl.advantages). batch_std divides by the std
    of the step's whole batch, every rank's groups (so every rank calls this, once per step)."""
    rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float32) if groups else torch.zeros(0, 0)
    std = distributed.std_all(rewards) if mode == "batch_std" else None
    if groups:
        adv = advantages(rewards, mode, batch_std=std)
        for g, row in zip(groups, adv.tolist()):
            for s, value in zip(g.samples, row):
                s.advantage = value


def ratio_notices(a) -> list[str]:
    """Start notices for a sequence-level ratio (GSPO) or a dual clip where it cannot do what it is for."""
    on_policy = a.mu == 1 and a.minibatches == 1  # every ratio is 1
    off_policy = "set algorithm.mu or algorithm.minibatches above 1"
    notices = []
    if a.ratio == "sequence" and on_policy:
        notices.append("ponder: algorithm.ratio=sequence (GSPO) changes nothing at mu = 1 with one mini-batch, where "
                       f"every ratio is 1; it clips updates made off-policy: {off_policy}")
    elif a.ratio == "sequence" and min(a.eps_low, a.eps_high) >= 0.01:
        notices.append(f"ponder: algorithm.ratio=sequence clips a sequence's mean ratio to [{1 - a.eps_low:g}, "
                       f"{1 + a.eps_high:g}], which it seldom leaves; GSPO clips at algorithm.eps_low=3e-4 "
                       "algorithm.eps_high=4e-4")
    if a.dual_clip is not None and on_policy:
        notices.append(f"ponder: algorithm.dual_clip={a.dual_clip:g} changes nothing at mu = 1 with one mini-batch, "
                       f"where every ratio is 1; it bounds updates made off-policy: {off_policy}")
    return notices


def rollout_notices(engine, a) -> list[str]:
    """A start notice where the sampler's probabilities knowingly differ from the update's and nothing corrects it."""
    rounded = getattr(engine, "rounded", [])
    if rounded and a.rollout_is_cap is None:
        return [f"ponder: rollout.engine_options {' and '.join(rounded)} samples through rounded numbers (e4m3), so the "
                "sampled tokens' probabilities differ from those the update computes; algorithm.rollout_is_cap (e.g. 2) "
                "weighs each token by their ratio"]
    return []


def _split(samples: list[Sample], k: int) -> list[list[Sample]]:
    """Exactly k mini-batches in order, sizes differing by at most one (some empty when fewer than k samples).
    Ranks are dealt groups in turn, so rank r's i-th mini-batch holds its groups of the one process's i-th
    (when every rank's groups split evenly into k)."""
    n = len(samples)
    return [samples[i * n // k : (i + 1) * n // k] for i in range(k)]


def trained_on(train: list[dict], evals: list[list[dict]], specs) -> list[str]:
    """A notice for each eval task with problems the training data also holds (the same prompt): figures that count
    them are not held out (a test file cut from the same source, a generator's splits drawn apart too briefly)."""
    seen = {prompt_key(ex) for ex in train}
    lines = []
    for spec, examples in zip(specs, evals):
        if k := sum(prompt_key(ex) in seen for ex in examples):
            lines.append(f"ponder: eval task '{spec.name}' ({spec.split}): {k} of its {len(examples)} problems are in the "
                         "training data too (the same prompt); its figures are not held out")
    return lines


def _columns(examples: list[dict]) -> list[str]:
    keys: dict[str, None] = {}
    for ex in examples:
        keys.update(dict.fromkeys(k for k in ex if k != "prompt"))
    return list(keys)
