"""Time of one GRPO step on one GPU, split into generate / reward / train.

Workload (issue 7): a random-weight Qwen2.5-shaped model in bf16, 32 prompts of 128 tokens x 8 samples,
512 new tokens forced, mu = 1, beta = 0, one optimizer step (AdamW) per GRPO step. The step is the
trainer's own pieces (ponder.rl: micro-batches, advantages, losses) around the fast engine (or, with
--engine hf, transformers' generate); the policy pass is the trainer's CUDA one (packed: ponder.rl.packed),
the model's own forward on padded rows with a chunked head (chunked), or the whole logits tensor (full).
The reward is a token-level rule (share of even token ids): random weights write no text to verify,
and the rule costs what a cheap verifier costs.

  PYTHONPATH=src python bench/grpo_step.py --shapes 0.5b 1.5b --logprobs packed --token-budget 32768 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollout import CUDA, DEVICE, build, force_length  # noqa: E402

from ponder.models.tiny import char_tokenizer  # noqa: E402
from ponder.rl.advantages import advantages  # noqa: E402
from ponder.rl.batching import Sample, per_row, to_tensors  # noqa: E402
from ponder.rl.forward import PolicyPass  # noqa: E402
from ponder.rl.logprobs import token_logprobs  # noqa: E402
from ponder.rl.losses import policy_loss, sequence_token_weights  # noqa: E402
from ponder.rollout import SamplingParams  # noqa: E402
from ponder.rollout.fast import FastEngine  # noqa: E402
from ponder.rollout.hf import HFEngine  # noqa: E402


def now():
    if CUDA:
        torch.cuda.synchronize()
    return time.perf_counter()


def full_logits_logprobs(model, t):
    """The plain way, for comparison: the whole [B, L, vocab] logits, then a gather."""
    logits = model(input_ids=t.input_ids, attention_mask=t.attention_mask, use_cache=False).logits
    logits = logits.gather(1, t.target_pos[:, :, None].expand(-1, -1, logits.shape[-1])).float()
    return logits.log_softmax(-1).gather(-1, t.targets[:, :, None]).squeeze(-1)


def train(model, opt, engine, samples, logprobs: str, token_budget: int, max_new: int):
    for s, w in zip(samples, sequence_token_weights([len(s.completion_ids) for s in samples], "grpo", max_new)):
        s.weight = w
    opt.zero_grad(set_to_none=True)
    # the weights are bf16 already; the engine's idle cache holds the head's first logits, as in the trainer
    policy = PolicyPass(logprobs == "packed", 0, torch.device(DEVICE), bf16=False, scratch=engine.idle_memory)
    for mb in policy.micro_batches(samples, token_budget):
        if logprobs == "packed":  # what the trainer runs on CUDA (train.forward: auto)
            logp, _, mask = policy.logprobs(model, mb, with_entropy=True)
        else:
            t = to_tensors(mb, 0, DEVICE)
            mask = t.mask
            if logprobs == "chunked":  # the padded path: the model's forward, chunked head
                logp, _ = token_logprobs(model, t.input_ids, t.attention_mask, positions=t.target_pos + 1)
            else:
                logp = full_logits_logprobs(model, t)
        weight = mask * per_row([s.weight for s in mb], DEVICE)[:, None]
        adv = per_row([s.advantage for s in mb], DEVICE)
        loss, _ = policy_loss(logp, logp.detach(), adv, weight, 0.2, 0.2)  # mu = 1: old = current
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def grpo_step(model, opt, engine, prompts, group, new, step, logprobs, token_budget):
    t0 = now()
    outs = engine.generate(prompts, SamplingParams(n=group, temperature=1.0, max_tokens=new, seed=step))
    t1 = now()
    rewards = torch.tensor([[sum(t % 2 == 0 for t in c.token_ids) / max(len(c.token_ids), 1) for c in out] for out in outs])
    adv = advantages(rewards, "group_std")
    samples = [Sample(p, c.token_ids, adv[i, j].item(), c.finish_reason == "length")
               for i, (p, out) in enumerate(zip(prompts, outs)) for j, c in enumerate(out)]
    t2 = now()
    model.train()
    train(model, opt, engine, samples, logprobs, token_budget, new)
    t3 = now()
    return dict(generate=t1 - t0, reward=t2 - t1, train=t3 - t2, total=t3 - t0)


def profile_train(model, opt, engine, prompts, a, logprobs, budget, path):
    """Kernel time of one train half (after the timed steps), largest first."""
    from torch.profiler import ProfilerActivity, profile

    outs = engine.generate(prompts, SamplingParams(n=a.group, temperature=1.0, max_tokens=a.new, seed=99))
    samples = [Sample(p, c.token_ids, float(j % 3) - 1.0, False) for p, out in zip(prompts, outs) for j, c in enumerate(out)]
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])) as prof:
        train(model, opt, engine, samples, logprobs, budget, a.new)
        now()
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by="cuda_time_total" if CUDA else "cpu_time_total", row_limit=45))
    prof.export_chrome_trace(path.removesuffix(".txt") + ".trace.json")  # the timeline: where the GPU waits
    print(f"profile written: {path} and its .trace.json", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["0.5b", "1.5b"])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=512)
    ap.add_argument("--logprobs", nargs="+", default=["packed", "chunked"],
                    help="packed: ponder.rl.packed (the trainer's CUDA path); chunked: the model's forward on padded "
                         "rows + chunked head; full: the whole logits tensor")
    ap.add_argument("--token-budget", type=int, nargs="+", default=[16384])
    ap.add_argument("--engine", default="fast", choices=["fast", "hf"], help="hf: transformers' generate (slow: use --steps 1)")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing (model.gradient_checkpointing)")
    ap.add_argument("--profile", help="write the kernel table (and a Chrome trace beside it) of one train pass to this file")
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    ap.add_argument("--json")
    a = ap.parse_args()
    report = dict(gpu=torch.cuda.get_device_name() if CUDA else "cpu", workload=vars(a), results=[])
    if CUDA:  # as the trainer does: one non-default stream for everything, which the fast engine captures on
        torch.cuda.set_stream(torch.cuda.Stream())
    tok = char_tokenizer()
    for shape in a.shapes:
        model = build(shape)
        force_length(model, True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=CUDA)
        engine = FastEngine(model, tok) if a.engine == "fast" else HFEngine(model, tok)
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, model.config.vocab_size, (a.prompts, a.prompt), generator=g).tolist()
        if a.checkpointing:
            model.gradient_checkpointing_enable()
        for lp in a.logprobs:
            for budget in a.token_budget:
                grpo_step(model, opt, engine, prompts, a.group, a.new, 0, lp, budget)  # warm-up
                CUDA and torch.cuda.reset_peak_memory_stats()
                runs = [grpo_step(model, opt, engine, prompts, a.group, a.new, s + 1, lp, budget) for s in range(a.steps)]
                row = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                row.update(shape=shape, engine=a.engine, logprobs=lp, budget=budget,
                           peak_gib=(torch.cuda.max_memory_allocated() / 2**30) if CUDA else 0.0,
                           reserved_gib=(torch.cuda.max_memory_reserved() / 2**30) if CUDA else 0.0)
                print(json.dumps(row), flush=True)
                report["results"].append(row)
                if a.profile:
                    profile_train(model, opt, engine, prompts, a, lp, budget, f"{a.profile}.{shape}.{lp}.{budget}.txt")
        del model, opt, engine
        CUDA and torch.cuda.empty_cache()
    print(f"\n{'shape':6} {'logprobs':8} {'budget':>7} {'total s':>8} {'generate':>9} {'reward':>7} {'train':>7} {'peak GiB':>9} {'reserved':>9}")
    for r in report["results"]:
        print(f"{r['shape']:6} {r['logprobs']:8} {r['budget']:7} {r['total']:8.2f} {r['generate']:9.2f} {r['reward']:7.3f} "
              f"{r['train']:7.2f} {r['peak_gib']:9.2f} {r['reserved_gib']:9.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
