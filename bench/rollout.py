"""Rollout throughput on one GPU: ponder's fast engine beside transformers' generate, one run, same workload.

Random-weight Qwen2.5-shaped models in bf16 (speed does not depend on the weights); every completion is
forced to full length. Prints a table and writes JSON. With --check, first the GPU correctness checks at
bf16 tolerance (teacher-forced log-probs, prefill logits, greedy agreement, weights updated in place).

  PYTHONPATH=src python bench/rollout.py --check --shapes 0.5b 1.5b --hf dynamic --json out.json
  PYTHONPATH=src python bench/rollout.py --lengths long-tail --batch 64 --n 8 --new 8192 --shapes 1.5b --variants triton
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from ponder.models.tiny import char_tokenizer
from ponder.rollout import SamplingParams
from ponder.rollout.fast import FastEngine

SHAPES = {
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864),
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, intermediate_size=8960),
    "7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944),
    "smoke": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128),
}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: only to smoke-test this script (--shapes smoke)
CUDA = DEVICE == "cuda"


def build(shape: str, seed: int = 0, init_std: float = 0.02):
    # Qwen2.5's: 0.5B and 1.5B tie the head to the embedding; 7B has its own head and a vocabulary of 152,064
    vocab = {"smoke": 20000, "7b": 152064}.get(shape, 151936)
    cfg = Qwen2Config(
        vocab_size=vocab, tie_word_embeddings=shape != "7b", max_position_embeddings=32768, rope_theta=1e6,
        rms_norm_eps=1e-6, initializer_range=init_std, **SHAPES[shape],
    )
    torch.manual_seed(seed)
    with torch.device(DEVICE):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    for layer in model.model.layers:  # Qwen2's q/k/v biases start at zero; make them count
        for p in (layer.self_attn.q_proj.bias, layer.self_attn.k_proj.bias, layer.self_attn.v_proj.bias):
            p.data.normal_(0, init_std)
    model.eval()
    return model


def sync_time(fn):
    if CUDA:
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if CUDA:
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def force_length(model, on: bool):
    """No EOS: -1 never matches for the fast engine; None for transformers (with min_new_tokens)."""
    model.generation_config.eos_token_id = [-1] if on else None


# ------------------------------------------------------------------------------------------ checks
def check(shape: str) -> dict:
    """bf16 tolerance, measured: the fast engine's error against a float32 reference, beside the error of
    transformers' own bf16 forward against the same reference."""
    import copy

    model = build(shape, seed=1, init_std=0.05)
    vocab = model.config.vocab_size
    tok = char_tokenizer()
    g = torch.Generator().manual_seed(0)
    lens = [5, 17, 33, 64, 100, 128, 9, 77]
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]
    force_length(model, True)
    eng = FastEngine(model, tok)
    res = {}

    def lp_of(m, p, ids):
        x = torch.tensor([p + ids], device=DEVICE)
        logits = m(input_ids=x).logits[0, len(p) - 1 : -1].float()
        return logits.log_softmax(-1).gather(-1, torch.tensor(ids, device=DEVICE)[:, None]).squeeze(-1)

    def teacher_forced(tag, temperature=0.0):
        ref32 = copy.deepcopy(model).float()
        outs = eng.generate(prompts, SamplingParams(temperature=temperature, max_tokens=48, logprobs=True, seed=0))
        mine, hf = [], []
        for p, (c,) in zip(prompts, outs):
            r = lp_of(ref32, p, c.token_ids)
            mine.append((torch.tensor(c.logprobs, device=DEVICE) - r).abs())
            hf.append((lp_of(model, p, c.token_ids) - r).abs())
        mine, hf = torch.cat(mine), torch.cat(hf)
        res[tag] = dict(fast_vs_fp32_mean=mine.mean().item(), fast_vs_fp32_max=mine.max().item(),
                        hf_bf16_vs_fp32_mean=hf.mean().item(), hf_bf16_vs_fp32_max=hf.max().item())
        del ref32
        return outs

    outs = teacher_forced("teacher_forced_logprobs")
    # sampled at temperature 1: the log-probs the sampler reports (on CUDA, the Triton inverse-CDF sampler)
    teacher_forced("sampled_logprobs", 1.0)
    # greedy agreement with transformers' generate (bf16 kernels differ, so near-ties may flip)
    width = max(lens)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    att = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], att[i, width - len(p):] = torch.tensor(p), 1
    force_length(model, False)
    hf = model.generate(input_ids=ids.to(DEVICE), attention_mask=att.to(DEVICE), do_sample=False, max_new_tokens=48,
                        min_new_tokens=48, pad_token_id=0)[:, width:].tolist()
    force_length(model, True)
    first_diff = [next((j for j, (a, b) in enumerate(zip(h, c.token_ids)) if a != b), 48) for h, (c,) in zip(hf, outs)]
    res["greedy_vs_hf_generate"] = dict(identical_sequences=sum(d == 48 for d in first_diff), of=len(prompts),
                                        first_divergence=first_diff)
    # prefill logits over the whole vocabulary, both against float32
    ref32 = copy.deepcopy(model).float()
    mine = eng.fwd.prefill(prompts, spread_tables(eng.fwd, len(prompts), max(lens))).float()
    ref = torch.stack([ref32(input_ids=torch.tensor([p], device=DEVICE)).logits[0, -1].float() for p in prompts])
    hfb = torch.stack([model(input_ids=torch.tensor([p], device=DEVICE)).logits[0, -1].float() for p in prompts])
    res["prefill_logits_rel_err"] = dict(fast=((mine - ref).norm() / ref.norm()).item(), hf_bf16=((hfb - ref).norm() / ref.norm()).item())
    del ref32
    # weights updated in place (as an optimizer does): the captured graphs must see them
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.05)
    teacher_forced("after_inplace_update")
    ok = all(res[k]["fast_vs_fp32_mean"] <= 1.5 * res[k]["hf_bf16_vs_fp32_mean"] + 1e-3
             for k in ("teacher_forced_logprobs", "sampled_logprobs", "after_inplace_update"))
    ok &= res["prefill_logits_rel_err"]["fast"] <= 1.5 * res["prefill_logits_rel_err"]["hf_bf16"] + 1e-3
    res["pass"] = ok
    del eng, model
    CUDA and torch.cuda.empty_cache()
    return res


def spread_tables(f, rows: int, positions: int) -> torch.Tensor:
    """Block tables giving each of `rows` rows its own blocks for `positions` slots (blocks 1, 2, ...)."""
    per_row = -(-positions // f.block)
    assert rows * per_row < f.blocks, "the pool is smaller than these rows"
    return 1 + torch.arange(rows * per_row, device=f.device).view(rows, per_row)


def at_position(f, batch: int, pos: int):
    """Rows [0, batch) set to feed position `pos`, each through blocks of its own (the state after a call
    points idle rows at the sink block, which would make every read hit the same cached slots)."""
    t = spread_tables(f, batch, pos + 1)
    f.table[:batch, : t.shape[1]] = t
    f.pos[:batch] = pos
    f.n_out[:batch] = 1


@torch.no_grad()
def profile(model, tok, prompts, new, out_dir, pos: int = 130) -> dict:
    """GPU time of one captured decode step (no host work), and the kernels of that step by time."""
    eng = FastEngine(model, tok)
    force_length(model, True)
    eng.generate(prompts, SamplingParams(temperature=1.0, max_tokens=new, seed=0))
    f, batch = eng.fwd, len(prompts)
    res = {}
    for key in sorted(k for k in eng.graphs if k[0] == batch):
        graph, _ = eng.graphs[key]
        at_position(f, batch, pos)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        graph.replay()
        start.record()
        for _ in range(50):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        res[f"graph_ms_len{key[1]}"] = start.elapsed_time(end) / 50
    from torch.profiler import ProfilerActivity, profile as prof

    at_position(f, batch, pos)
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(3):
            f.step(batch, f.positions, 1.0)
        torch.cuda.synchronize()
    table = p.key_averages().table(sort_by="cuda_time_total", row_limit=30)
    if out_dir:
        with open(f"{out_dir}/profile.txt", "w") as fh:
            fh.write(table)
    print("\n".join(table.splitlines()[:24]))
    eng.release()
    return res


# ------------------------------------------------------------------------------------------ bench
def shown(row: dict) -> dict:
    print("done:", json.dumps(row), flush=True)
    return row


def long_tail(samples: int, limit: int, median: int = 1500, tail: float = 0.1, seed: int = 0) -> list[int]:
    """R1-Zero-like answer lengths: lognormal with the given median, a `tail` share reaching `limit`."""
    import math

    sigma = math.log(limit / median) / statistics.NormalDist().inv_cdf(1 - tail)
    g = torch.Generator().manual_seed(seed)
    draw = torch.exp(math.log(median) + sigma * torch.randn(samples, generator=g, dtype=torch.float64))
    return draw.round().clamp(1, limit).long().tolist()


def quantiles(lengths: list[int]) -> dict:
    x = torch.tensor(lengths, dtype=torch.float64)
    return {f"p{q}": int(x.quantile(q / 100)) for q in (10, 25, 50, 75, 90)} | dict(
        mean=round(x.mean().item()), at_limit=sum(v == max(lengths) for v in lengths))


def bench_fast(model, tok, prompts, new, variant: str, n: int = 1, limits: list[int] | None = None, tag: str = "") -> dict:
    attention, *more = variant.split("+")
    eng = FastEngine(model, tok, attention=attention, fused="eager" not in more, kv_dtype="fp8" if "fp8" in more else "auto",
                     weight_dtype="fp8" if "w8" in more else "auto")
    params = SamplingParams(n=n, temperature=1.0, max_tokens=new, seed=0)
    force_length(model, True)
    first, _ = sync_time(lambda: eng.generate(prompts, params, limits=limits))  # includes graph capture
    t_pre, _ = sync_time(lambda: eng.generate(prompts, SamplingParams(n=n, temperature=1.0, max_tokens=1, seed=0)))
    CUDA and torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(2 if limits is None else 1):
        t, outs = sync_time(lambda: eng.generate(prompts, params, limits=limits))
        times.append(t)
    want = limits or [new] * (len(prompts) * n)
    assert [len(c.token_ids) for o in outs for c in o] == want, "completions were not forced to their lengths"
    t = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() if CUDA else 0
    stats = dict(eng.stats)
    eng.release()
    del eng
    CUDA and torch.cuda.empty_cache()
    tokens = sum(want)
    return dict(engine=f"fast ({variant}){tag}", seconds=t, tokens_per_s=tokens / t,
                ms_per_decode_step=1000 * (t - t_pre) / (max(want) - 1), prefill_s=t_pre, first_call_s=first,
                peak_gib=peak / 2**30, kv_gib_peak=stats.get("kv_gib_peak"), gave_way=stats.get("gave_way"))


def bench_hf_bound(model, prompts, n: int, limits: list[int], steps: int) -> dict:
    """transformers' generate on the same samples, timed for `steps` new tokens: its batch runs until its
    longest sample ends, so max(limits) steps at no less than this step time bound its time from below."""
    ids = torch.tensor(prompts, device=DEVICE).repeat_interleave(n, 0)
    force_length(model, False)
    kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=steps, min_new_tokens=steps, pad_token_id=0)
    CUDA and torch.cuda.reset_peak_memory_stats()
    t, _ = sync_time(lambda: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw))
    peak = torch.cuda.max_memory_allocated() if CUDA else 0
    CUDA and torch.cuda.empty_cache()
    bound = t / steps * max(limits)
    return dict(engine=f"hf generate, lower bound ({steps} steps timed)", seconds=bound, tokens_per_s=sum(limits) / bound,
                ms_per_decode_step=1000 * t / steps, peak_gib=peak / 2**30)


def bench_hf(model, prompts, new, cache: str) -> dict:
    ids = torch.tensor(prompts, device=DEVICE)
    force_length(model, False)
    kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
    if cache == "static":
        kw["cache_implementation"] = "static"
        first, _ = sync_time(lambda: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw))
    else:
        first = None
    CUDA and torch.cuda.reset_peak_memory_stats()
    t, out = sync_time(lambda: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw))
    assert out.shape[1] == ids.shape[1] + new
    peak = torch.cuda.max_memory_allocated() if CUDA else 0
    CUDA and torch.cuda.empty_cache()
    return dict(engine=f"hf generate ({cache} cache)", seconds=t, tokens_per_s=len(prompts) * new / t,
                ms_per_decode_step=1000 * t / new, first_call_s=first, peak_gib=peak / 2**30)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["0.5b", "1.5b"])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=512)
    ap.add_argument("--variants", nargs="+", default=["triton", "sdpa"], help="attention[+eager][+fp8][+w8]: triton, sdpa, matmul, sdpa+eager, triton+fp8 (an fp8 KV cache), "
                    "triton+w8 (the layers' products from e4m3 matrices: weight_dtype fp8)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", help="folder for the profile table")
    ap.add_argument("--profile-pos", type=int, default=130, help="the position every row feeds in the profiled step")
    ap.add_argument("--hf", nargs="*", default=["dynamic"], help="transformers' generate with these caches")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--lengths", choices=["uniform", "long-tail"], default="uniform",
                    help="long-tail: --batch prompts x --n samples, each forced to end at a length drawn from a lognormal "
                         "(median 1,500, 10%% at the --new limit), beside the same samples all at the mean length")
    ap.add_argument("--n", type=int, default=1, help="samples per prompt")
    ap.add_argument("--hf-steps", type=int, default=64, help="long-tail: steps timed for transformers' lower bound")
    ap.add_argument("--json")
    a = ap.parse_args()
    report = dict(gpu=torch.cuda.get_device_name() if CUDA else "cpu", torch=torch.__version__, workload=vars(a), results=[])
    if a.check:
        report["check"] = check("0.5b" if CUDA else "smoke")
        print("check:", json.dumps(report["check"]), flush=True)
    tok = char_tokenizer()
    for shape in a.shapes:
        model = build(shape)
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, model.config.vocab_size, (a.batch, a.prompt), generator=g).tolist()
        weights = torch.cuda.memory_allocated() if CUDA else 0
        if a.lengths == "long-tail":
            limits = long_tail(a.batch * a.n, a.new)
            report["lengths"] = quantiles(limits)
            print("lengths:", json.dumps(report["lengths"]), flush=True)
            mean = round(sum(limits) / len(limits))
            # each row printed as it ends: a 7B long-tailed run takes minutes a row
            rows = [shown(bench_fast(model, tok, prompts, a.new, v, a.n, limits, " long-tail")) for v in a.variants]
            rows += [shown(bench_fast(model, tok, prompts, a.new, v, a.n, [mean] * len(limits), f" all at {mean}"))
                     for v in a.variants]
            if a.hf:
                rows.append(shown(bench_hf_bound(model, prompts, a.n, limits, a.hf_steps)))
        else:
            rows = [bench_fast(model, tok, prompts, a.new, v, a.n) for v in a.variants]
            for cache in a.hf:
                rows.append(bench_hf(model, prompts, a.new, cache))
        base = rows[0]["tokens_per_s"]
        for r in rows:
            r.update(shape=shape, weights_gib=weights / 2**30, speedup_of_fast=base / r["tokens_per_s"])
            print(json.dumps(r), flush=True)
        report["results"] += rows
        if a.profile and CUDA and shape == a.shapes[0]:
            report["profile"] = profile(model, tok, prompts, a.new, a.out, a.profile_pos)
            print("profile:", json.dumps(report["profile"]), flush=True)
        del model
        CUDA and torch.cuda.empty_cache()
    print(f"\n{'shape':6} {'engine':44} {'tokens/s':>10} {'s':>8} {'ms/step':>8} {'peak GiB':>9} {'KV GiB':>7} {'fast is x':>9}")
    for r in report["results"]:
        kv = f"{r['kv_gib_peak']:7.2f}" if r.get("kv_gib_peak") is not None else f"{'':7}"
        print(f"{r['shape']:6} {r['engine']:44} {r['tokens_per_s']:10,.0f} {r['seconds']:8.2f} {r['ms_per_decode_step']:8.2f} "
              f"{r['peak_gib']:9.2f} {kv} {r['speedup_of_fast']:9.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
