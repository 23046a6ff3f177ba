"""The decode step's fused products (ponder.rollout.decode_products) against what they replace, on the GPU.

- head: cuBLAS logits [B, vocab] + the Triton Gumbel sampler, against `head_sample` (one tiled product
  that samples in its epilogue, + a merge);
- gate|up: the cuBLAS product + compiled SwiGLU, against `gate_up_silu`.
Each variant runs 20 times inside one CUDA graph (as in the engine: no launch cost), over 8 copies of the
weights so that gate|up (17 MB) is not served from L2. Prints microseconds per call for each tile config.

    PYTHONPATH=src python3 bench/decode_products.py --shapes 0.5b 1.5b
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from ponder.rollout import decode_products as dp
from ponder.rollout.fast_kernels import kernels, row_keys

SHAPES = {"0.5b": (896, 4864), "1.5b": (1536, 8960)}
VOCAB = 151936
HEAD_CONFIGS = [(128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
                (64, 256, 64, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 128, 8, 3)]
GATE_UP_CONFIGS = [(64, 64, 64, 4, 4), (128, 64, 64, 8, 3), (128, 32, 64, 4, 4), (64, 32, 128, 4, 3),
                   (128, 64, 128, 8, 3), (32, 64, 128, 4, 4), (64, 64, 128, 4, 3), (256, 32, 64, 8, 3),
                   (64, 128, 64, 8, 3)]


def graph_us(fn, copies: int, reps: int = 20, iters: int = 10) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(copies):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fn(i % copies)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return 1000 * start.elapsed_time(end) / (reps * iters)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["0.5b", "1.5b"])
    ap.add_argument("--batch", type=int, nargs="+", default=[256])
    a = ap.parse_args()
    dev = torch.device("cuda")
    K = kernels(dev)
    bf = dict(device=dev, dtype=torch.bfloat16)
    rows = []
    for shape in a.shapes:
        dim, inter = SHAPES[shape]
        head_w = torch.randn((VOCAB, dim), **bf) * 0.05
        gu_w = [torch.randn((2 * inter, dim), **bf) * 0.05 for _ in range(8)]
        for batch in a.batch:
            h = torch.randn((batch, dim), **bf)
            keys = row_keys(torch.tensor(3, device=dev), torch.tensor(1, device=dev), torch.arange(batch, device=dev))
            ref_tok, ref_lp = K["gumbel_pick"](F.linear(h, head_w), keys, 1.0)
            base = graph_us(lambda i: K["gumbel_pick"](F.linear(h, head_w), keys, 1.0), 1)
            rows.append(dict(shape=shape, batch=batch, op="head", variant="cuBLAS + Triton sampler", us=base))
            for cfg in HEAD_CONFIGS:
                try:
                    tok, lp = dp.head_sample(h, head_w, keys, 1.0, cfg)
                    same = (tok == ref_tok).float().mean().item()
                    err = (lp - ref_lp).abs().max().item()
                    us = graph_us(lambda i: dp.head_sample(h, head_w, keys, 1.0, cfg), 1)
                except Exception as e:  # noqa: BLE001  (a config that does not compile: reported, skipped)
                    rows.append(dict(shape=shape, batch=batch, op="head", variant=str(cfg), error=str(e)[:120]))
                    continue
                rows.append(dict(shape=shape, batch=batch, op="head", variant=str(cfg), us=us, same_tokens=same, lp_err=err))
            ref = K["swiglu"](*F.linear(h, gu_w[0]).chunk(2, -1))
            base = graph_us(lambda i: K["swiglu"](*F.linear(h, gu_w[i]).chunk(2, -1)), 8)
            mm = graph_us(lambda i: F.linear(h, gu_w[i]), 8)
            rows.append(dict(shape=shape, batch=batch, op="gate_up", variant="cuBLAS + compiled SwiGLU", us=base, product_us=mm))
            for cfg in GATE_UP_CONFIGS:
                try:
                    out = dp.gate_up_silu(h, gu_w[0], cfg)
                    err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                    us = graph_us(lambda i: dp.gate_up_silu(h, gu_w[i], cfg), 8)
                except Exception as e:  # noqa: BLE001
                    rows.append(dict(shape=shape, batch=batch, op="gate_up", variant=str(cfg), error=str(e)[:120]))
                    continue
                rows.append(dict(shape=shape, batch=batch, op="gate_up", variant=str(cfg), us=us, rel_err=err))
    for r in rows:
        print(json.dumps(r), flush=True)
    print(f"\n{'shape':6} {'batch':>5} {'op':8} {'variant':28} {'us':>8}  check")
    for r in rows:
        check = r.get("error") or (f"same tokens {r['same_tokens']:.3f}, lp err {r['lp_err']:.1e}" if "same_tokens" in r
                                   else f"rel err {r['rel_err']:.1e}" if "rel_err" in r else "")
        print(f"{r['shape']:6} {r['batch']:5} {r['op']:8} {r['variant']:28} {r.get('us', float('nan')):8.1f}  {check}")


if __name__ == "__main__":
    main()
